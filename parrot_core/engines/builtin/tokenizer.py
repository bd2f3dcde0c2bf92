"""Tokenizer of a GGUF model, rebuilt with the `tokenizers` library alone, plus chat templates.

Contracts:
- `encode(text)` never adds BOS or any other special token; special-token *text* in the input
  (e.g. `<|im_start|>`) encodes to its single id.
- `IncrementalDetokenizer` turns a stream of ids into text deltas that only ever hold complete
  characters (a multi-byte UTF-8 character split across tokens is held back until complete).
- The tokenizer built from GGUF metadata is cached as a tokenizer JSON under
  `${PARROT_CORE_CACHE_DIR:-~/.cache/parrot-core}/tokenizers/<key>.json`, keyed by the model
  file's path, size and mtime; a cached load does not decode the vocabulary arrays at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from parrot_core.errors import InvalidRequestError, ModelLoadError

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 1  # bump when the way the tokenizer is built changes
_CONTROL, _USER_DEFINED = 3, 4  # GGUF tokenizer.ggml.token_type values

# Pre-tokenizer split of Llama 3 style BPE vocabularies ("llama-bpe" in llama.cpp).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class Tokenizer:
    """A thin wrapper of a `tokenizers.Tokenizer` with the ids and template the engine needs."""

    def __init__(
        self,
        tok: HFTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
    ) -> None:
        self._tok = tok
        self.bos_token_id = bos_token_id
        self.add_bos_token = add_bos_token and bos_token_id is not None
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        self._compiled_template: Any = None

    @property
    def backend(self) -> HFTokenizer:
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no BOS/EOS added (a piece inside a sequence)."""
        # The batch call releases the GIL while it works, so a server's event loop keeps
        # answering while a worker thread tokenizes a huge prompt (`encode` holds the GIL).
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of `text` as the start of a sequence: with the model's BOS first if the
        model asks for one (GGUF `tokenizer.ggml.add_bos_token`) and the text has none."""
        ids = self.encode(text)
        if self.add_bos_token and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode_batch([list(ids)], skip_special_tokens=skip_special_tokens)[0]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (special tokens included)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render the model's chat template. `InvalidRequestError` if the model has none or the
        template rejects the messages."""
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template")
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self.chat_template)
        bos = self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.id_to_token(self.eos_token_id) if self.eos_token_id is not None else ""
        try:
            return self._compiled_template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=bos or "",
                eos_token=eos or "",
                **kwargs,
            )
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"chat template failed: {e}") from e


class IncrementalDetokenizer:
    """Streams text for a growing list of ids. `push(ids)` returns the newly completed text;
    `flush()` returns what is held back at the end (an incomplete character becomes U+FFFD).
    The concatenation of all returned pieces equals `decode(all_ids)`."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window (ids before it are settled)
        self._read = 0  # ids before this are already emitted as text

    def push(self, token_ids: Iterable[int]) -> str:
        self._ids.extend(token_ids)
        if len(self._ids) == self._read:
            return ""
        # Decode a small window that starts a little before the new ids, so that decoders which
        # depend on neighbours (byte-level merges, leading spaces) see the same context.
        before = self._tokenizer.decode(self._ids[self._prefix : self._read], self._skip)
        full = self._tokenizer.decode(self._ids[self._prefix :], self._skip)
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(before) :] if full.startswith(before) else full

    def flush(self) -> str:
        if len(self._ids) == self._read:
            return ""
        before = self._tokenizer.decode(self._ids[self._prefix : self._read], self._skip)
        full = self._tokenizer.decode(self._ids[self._prefix :], self._skip)
        self._prefix = self._read = len(self._ids)
        return full[len(before) :] if full.startswith(before) else full


# ----------------------------------------------------------------------------- chat template


def _compile_template(source: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, indent: int | None = None) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ModelLoadError(f"the model's chat template does not compile: {e}") from e


# ----------------------------------------------------------------------------- GGUF -> tokenizer


def cache_dir() -> str:
    """Root of parrot-core's on-disk caches."""
    return os.environ.get("PARROT_CORE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "parrot-core")


def tokenizer_cache_path(model_path: str) -> str:
    st = os.stat(model_path)
    ident = f"{_CACHE_FORMAT}|{os.path.abspath(model_path)}|{st.st_size}|{st.st_mtime_ns}"
    return os.path.join(cache_dir(), "tokenizers", hashlib.sha256(ident.encode()).hexdigest()[:32] + ".json")


def load_gguf_tokenizer(
    metadata: Mapping[str, Any],
    model_path: str,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
) -> Tokenizer:
    """The tokenizer of a GGUF file, from the cache when possible. `metadata` maps GGUF keys to
    values; array values may be lazy (anything with a `decode()` returning a list)."""
    template = metadata.get("tokenizer.chat_template")
    # llama.cpp's default when the key is absent: SentencePiece ("llama") vocabularies add a BOS.
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", metadata.get("tokenizer.ggml.model") == "llama"))
    path = tokenizer_cache_path(model_path) if use_cache else None
    tok = None
    if path is not None and os.path.isfile(path):
        try:
            tok = HFTokenizer.from_file(path)
        except Exception as e:  # a corrupt cache entry is rebuilt, never fatal
            logger.warning("ignoring unreadable tokenizer cache %s: %s", path, e)
    if tok is None:
        tok = build_tokenizer_from_metadata(metadata)
        if path is not None:
            _write_atomic(path, tok.to_str())
    return Tokenizer(tok, bos_token_id=bos_token_id, eos_token_id=eos_token_id, chat_template=template, add_bos_token=add_bos)


def load_hf_tokenizer(model_dir: str) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory: `tokenizer.json`, with BOS/EOS, whether
    a BOS starts a prompt and the chat template from `tokenizer_config.json` (the files
    `parrot-core export-hf` writes, and those of most HF models). `ModelLoadError` naming the
    file when one is missing or unreadable."""
    tok_path = os.path.join(model_dir, "tokenizer.json")
    try:
        tok = HFTokenizer.from_file(tok_path)
    except Exception as e:  # missing or malformed: the tokenizers library raises plain Exceptions
        raise ModelLoadError(f"cannot read the tokenizer {tok_path}: {e}") from None
    config: dict[str, Any] = {}
    config_path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read {config_path}: {e}") from None

    def token_id(name: str) -> int | None:
        value = config.get(name)
        if isinstance(value, dict):  # {"content": "<s>", ...} in older files
            value = value.get("content")
        return tok.token_to_id(value) if isinstance(value, str) else None

    bos = token_id("bos_token")
    return Tokenizer(
        tok,
        bos_token_id=bos,
        eos_token_id=token_id("eos_token"),
        chat_template=config.get("chat_template") if isinstance(config.get("chat_template"), str) else None,
        add_bos_token=bool(config.get("add_bos_token", False)),
    )


def _write_atomic(path: str, text: str) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop a load
        logger.warning("cannot write tokenizer cache %s: %s", path, e)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value.decode()) if hasattr(value, "decode") and not isinstance(value, (str, bytes)) else list(value)


def build_tokenizer_from_metadata(metadata: Mapping[str, Any]) -> HFTokenizer:
    """Build a byte-level BPE tokenizer (GGUF `tokenizer.ggml.model == "gpt2"`)."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(f"tokenizer type {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = [str(t) for t in _as_list(metadata.get("tokenizer.ggml.tokens"))]
    merges = [tuple(m.split(" ", 1)) for m in _as_list(metadata.get("tokenizer.ggml.merges"))]
    types = [int(t) for t in _as_list(metadata.get("tokenizer.ggml.token_type"))] or [1] * len(tokens)
    if not tokens:
        raise ModelLoadError("the GGUF file has no tokenizer vocabulary")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in ("llama-bpe", "llama3")))
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif pre in ("llama-bpe", "llama3"):
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        if pre not in ("default", "gpt2"):
            logger.warning("GGUF pre-tokenizer %r is not known; using GPT-2's split", pre)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types, strict=False) if ty == _CONTROL]
    )
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types, strict=False) if ty == _USER_DEFINED]
    if user:
        tok.add_tokens(user)
    return tok
