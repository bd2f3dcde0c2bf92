"""`OpenAIEngine`: any OpenAI-compatible server (vLLM, SGLang, llama.cpp, parrot-core's own)
behind the engine protocol (engines/base.py), with *text* contexts, as Parrot's OpenAI engine.

What the engine holds: for each context, its text (as segments, each with the token ids it
stands for). A fork holds its parent's text as of the fork, then its own: a context's *path
text* is its ancestors' text plus its own. The engine keeps no KV and computes nothing itself:

- `fill` records the text of the token ids (`tokenizer.decode`, special tokens kept) and
  returns at once (`cached_tokens` 0). The reuse rule: every `generate` sends the context's
  whole path text as one prompt, and the *server's* own prefix cache finds what earlier
  requests computed (vLLM's and SGLang's automatic prefix caching, llama.cpp's slot cache,
  parrot-core's block cache); a generate reports the server's
  `usage.prompt_tokens_details.cached_tokens` (0 when the server does not report it) as
  `reused_tokens` (the whole path), and as `cached_tokens` the part of it past the path's
  earlier tokens, of the tokens the generate carried (as on every engine; in our counting).
- `generate` sends `path text + text of the prompt ids` to `POST /v1/completions` (stream,
  `n=1`, `stream_options.include_usage`) and streams the server's text back. Each delta's
  `token_ids` are `tokenizer.encode(piece)` of its text: re-tokenized here, not the server's
  ids, unless the engine is made with `server_token_ids=True`: it then asks for vLLM's
  `return_token_ids` (parrot-core's server knows it too) and hands out the ids each chunk
  carries, the server's own count. That matters where a token's text does not say how many
  tokens it stands for (a special token's text is empty; byte tokens' text comes out merged,
  or as U+FFFD), which sampled output meets: the quantum of a suspendable generation and the
  budget carried over go by the ids handed out. (A chunk without ids falls back to
  re-tokenizing.) The generated text joins the context's text exactly as the server produced
  it (a stop string is cut by the server and never joins). Stopping the iteration (or
  cancelling its task) closes the HTTP stream, which is how an OpenAI-compatible server
  learns to abort.
- Text is the truth, not ids: the server re-tokenizes the whole path text, so a context's
  tokens on the server are those of its text as one string. Fills whose texts meet at a
  pre-tokenizer boundary (e.g. one ending in "." and the next starting with " ") tokenize the
  same whole or in pieces; others may not, and then greedy output may differ from an engine
  that computes the pieces' ids as given. A root context's leading BOS id is not sent as
  text when the tokenizer says the model asks for one (`add_bos_token`): the server adds its
  own BOS to a text prompt then. (A BOS id that is also ordinary text, e.g. SmolLM2's
  `<|im_start|>`, is sent as text otherwise.)
- Token ids and text: the `tokenizer` (our `Tokenizer`) turns ids into text and back. Without
  one, a byte codec is used (`byte_tokenizer()`: ids are UTF-8 bytes, an exact round trip of
  any text); token counts are then byte counts, an over-estimate of the server's tokens that
  keeps the serve layer's scheduling conservative. Options that name token ids
  (`stop_token_ids`, `logit_bias`) then mean nothing to the server and are refused.
- Sampling: `SamplingParams` map to OpenAI's fields (max_tokens, temperature, top_p, seed,
  stop, presence/frequency penalties, logit_bias) plus vLLM's extras (top_k, min_p,
  repetition_penalty, min_tokens, ignore_eos, stop_token_ids), each sent only when it differs
  from its default. Structured output: json_schema / json_object as OpenAI's
  `response_format`, regex / choice as vLLM's `structured_outputs`. What cannot be expressed
  is an `InvalidRequestError` naming the field: logprobs and prompt_logprobs (servers report
  token strings, not our ids), a Lark `grammar` (servers read grammars in their own
  dialects).
- Suspendable generations (`parrot_core.switching`, text-based switching): a slice is one
  streamed request. Generated text joins the context as it is handed out, so when the
  consumer stops (a suspension closes the stream) the context holds exactly the text the
  caller got and `context_tokens` reports no unread tail; a resume (`prior_output_tokens >
  0`) sends the prompt plus that text and the server re-tokenizes it (exact for greedy output
  whenever the generated text tokenizes back to the ids generated, as natural text does).
  `min_tokens` is sent less the prior output. What a fresh request cannot continue is refused
  (`check_resumable`): presence / frequency penalties (they count earlier output) and a seed
  with temperature > 0 (the server's random stream restarts). `kv_residency` reports nothing
  computed here: the server's cache shows in `cached_tokens` (its usage) instead.
- Errors: a 4xx answer (or an error event of that kind in the stream) is an
  `InvalidRequestError` with the server's message; an unreachable server, a 5xx or a broken
  stream is an `EngineError` naming the URL (`EngineUnavailableError` when it cannot be reached:
  a runtime with several engines then sends new work elsewhere). After `close()`, queued and running calls and
  every later call raise `RuntimeClosedError`.
- Capacity: no KV is held here, so `runtime_info` reports a synthetic pool of
  `max_num_seqs * max_model_len` tokens (in blocks of `SYNTHETIC_BLOCK_SIZE`, all free): the
  serve layer then admits about `max_num_seqs` full-length requests at once; at most
  `max_num_seqs` HTTP requests run at once, the rest wait here (`num_waiting`). The cache
  figures are the server's, as reported in its usage.
- Threads: `fill` / `generate` / `split` run on one asyncio loop (the Runtime's); the HTTP
  client is made lazily on the loop that first uses it. `close()`, `runtime_info()`,
  `context_ids()` and `check_invariants()` may be called from any thread.
- Not supported: saving and restoring contexts (there is no KV to save): the engine has no
  `kv_spec` / `export_context` / `import_context`, so the runtime raises
  `UnsupportedByEngineError` naming what is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from parrot_core.engines.base import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    FillResult,
    GenerationDelta,
    RuntimeInfo,
    SamplingParams,
    check_resumable_by_resend,
)
from parrot_core.engines.builtin.tokenizer import Tokenizer, load_gguf_tokenizer, load_hf_tokenizer
from parrot_core.errors import (
    EngineError,
    EngineUnavailableError,
    InvalidRequestError,
    InvariantError,
    ModelLoadError,
    RuntimeClosedError,
    UnknownContextError,
)

SYNTHETIC_BLOCK_SIZE = 16
DEFAULT_TIMEOUT_S = 600.0
_CLOSE_WAIT_S = 10.0  # how long close() waits for in-flight requests to hear it
_ENDED = object()  # a generation's request task is done (queued after anything it handed over)


# ----------------------------------------------------------------------------- the byte codec
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 byte values to printable characters (what byte-level BPE
    vocabularies, and the `ByteLevel` pre-tokenizer and decoder, spell bytes with)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer() -> Tokenizer:
    """A `Tokenizer` whose ids are the UTF-8 bytes of the text (vocabulary 256, no merges, no
    special tokens): `decode(encode(text)) == text` for any text."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return Tokenizer(tok)


def _load_tokenizer(tokenizer: Tokenizer | str | os.PathLike[str] | None) -> tuple[Tokenizer, bool]:
    """The tokenizer to use, and whether it is the byte codec."""
    if tokenizer is None:
        return byte_tokenizer(), True
    if isinstance(tokenizer, Tokenizer):
        return tokenizer, False
    if not isinstance(tokenizer, (str, os.PathLike)):
        raise InvalidRequestError(f"tokenizer must be a Tokenizer, a path or None, got {type(tokenizer).__name__}")
    path = os.fspath(tokenizer)
    if os.path.isdir(path):
        return load_hf_tokenizer(path), False
    if not os.path.isfile(path):
        raise ModelLoadError(f"tokenizer path not found: {path!r} (a Hugging Face model directory or a GGUF file)")
    from parrot_core.engines.builtin.gguf_loader import GGUFFile  # reads metadata only, no weights

    f = GGUFFile(path)
    bos, eos = f.get("tokenizer.ggml.bos_token_id"), f.get("tokenizer.ggml.eos_token_id")
    return (
        load_gguf_tokenizer(f.metadata, path, bos_token_id=None if bos is None else int(bos), eos_token_id=None if eos is None else int(eos)),
        False,
    )


# ----------------------------------------------------------------------------- text contexts
@dataclass(frozen=True)
class _Segment:
    """A piece of a context's text and the token ids it stands for (given ids for a fill,
    re-tokenized or the server's ids for generated text)."""

    text: str
    ids: tuple[int, ...]


@dataclass
class _TextContext:
    """`segments`: the whole path (the parent's segments as of the fork, then its own from
    `own_start`); `num_tokens`: their ids, counted."""

    context_id: int
    parent_id: int | None
    segments: list[_Segment] = field(default_factory=list)
    own_start: int = 0
    num_tokens: int = 0

    def add(self, segment: _Segment) -> None:
        self.segments.append(segment)
        self.num_tokens += len(segment.ids)

    def text(self) -> str:
        return "".join(s.text for s in self.segments)


@dataclass
class _Counters:
    prompt_tokens: int = 0  # prompt tokens sent (the server's count when it reports usage)
    cached_tokens: int = 0  # of which the server reported as cached
    generation_tokens: int = 0
    requests: int = 0
    failed: int = 0


@dataclass
class _Job:
    """One HTTP generation in flight: the task that reads the stream and what it hands over."""

    context_id: int
    queue: asyncio.Queue[object]
    task: asyncio.Task[None] | None = None


class OpenAIEngine:
    """An OpenAI-compatible server behind the engine protocol (see the module docstring).

    `base_url`: the server's root, e.g. "http://127.0.0.1:8000" (a trailing "/v1", as OpenAI
    clients spell it, is accepted). `model`: the model name the server serves (also this
    engine's `model_name`). `api_key`: sent as a bearer token. `tokenizer`: a `Tokenizer`, a
    Hugging Face model directory, a GGUF file, or None for the byte codec. `max_model_len`:
    the server's context length; default: the `max_model_len` its `GET /v1/models` reports
    for `model` (vLLM and parrot-core report it; otherwise pass it). `max_num_seqs`: HTTP
    requests run at once. `timeout`: seconds for connecting and between streamed chunks.
    `server_token_ids`: ask for the server's generated ids (vLLM's and parrot-core's
    `return_token_ids`) and hand those out instead of re-tokenized text (see the module
    docstring); only for a server that knows the field and serves this tokenizer's vocabulary."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        tokenizer: Tokenizer | str | os.PathLike[str] | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        timeout: float = DEFAULT_TIMEOUT_S,
        server_token_ids: bool = False,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise InvalidRequestError(f"base_url must be an http(s) URL, got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise InvalidRequestError(f"model must be a non-empty string, got {model!r}")
        if not isinstance(max_num_seqs, int) or isinstance(max_num_seqs, bool) or max_num_seqs < 1:
            raise InvalidRequestError(f"max_num_seqs must be an integer >= 1, got {max_num_seqs!r}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise InvalidRequestError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        url = base_url.rstrip("/")
        self.base_url = url[: -len("/v1")] if url.endswith("/v1") else url
        self.model_name = model
        self.max_num_seqs = max_num_seqs
        self.timeout = float(timeout)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.tokenizer, self.byte_codec = _load_tokenizer(tokenizer)
        if server_token_ids and self.byte_codec:
            raise InvalidRequestError("server_token_ids needs the server's tokenizer: give OpenAIEngine the model's tokenizer")
        self.server_token_ids = bool(server_token_ids)
        if max_model_len is None:
            max_model_len = self._served_max_model_len()
        if not isinstance(max_model_len, int) or isinstance(max_model_len, bool) or max_model_len < 1:
            raise InvalidRequestError(f"max_model_len must be an integer >= 1, got {max_model_len!r}")
        self.max_model_len = max_model_len
        self._lock = threading.Lock()  # guards everything below (other threads read it)
        self._contexts: dict[int, _TextContext] = {}
        self._jobs: dict[int, _Job] = {}  # context id -> its running generation
        self._running = 0  # jobs holding one of the `max_num_seqs` slots
        self._counters = _Counters()
        self._closed = False
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None

    # -- setup -----------------------------------------------------------------------------
    def _served_max_model_len(self) -> int:
        url = f"{self.base_url}/v1/models"
        try:
            response = httpx.get(url, headers=self._headers, timeout=min(self.timeout, 30.0))
        except httpx.HTTPError as e:
            raise EngineError(f"cannot reach the OpenAI-compatible server at {url}: {e}") from None
        if response.status_code >= 400:
            raise _error_from(response.status_code, response.text, url)
        try:
            cards = {c["id"]: c for c in response.json()["data"]}
        except (ValueError, KeyError, TypeError) as e:
            raise EngineError(f"{url} answered something that is not a model list: {e!r}") from None
        if self.model_name not in cards:
            raise InvalidRequestError(f"the server at {self.base_url} serves {sorted(cards)}, not {self.model_name!r}")
        length = cards[self.model_name].get("max_model_len")
        if not isinstance(length, int) or length < 1:
            raise EngineError(f"{url} does not report max_model_len for {self.model_name!r}: pass max_model_len=")
        return length

    def _client_here(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        """The HTTP client of the running loop, made on first use (an `httpx.AsyncClient`
        belongs to the loop it runs on). Called with the lock held."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is None or self._loop.is_closed():
            limits = httpx.Limits(max_connections=self.max_num_seqs, max_keepalive_connections=self.max_num_seqs)
            self._client = httpx.AsyncClient(headers=self._headers, timeout=httpx.Timeout(self.timeout), limits=limits)
            self._loop, self._slots = loop, asyncio.Semaphore(self.max_num_seqs)
        elif self._loop is not loop:
            raise EngineError("an OpenAIEngine runs on one event loop (the one that first used it)")
        assert self._slots is not None
        return self._client, self._slots

    # -- contexts --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeClosedError("this engine is closed")

    def _context_for(self, context_id: int, parent_id: int | None) -> _TextContext:
        """The context, made on first use as a fork of its parent (lock held)."""
        if context_id in self._jobs:
            raise InvalidRequestError(f"context {context_id} is busy with another request")
        ctx = self._contexts.get(context_id)
        if ctx is not None:
            return ctx
        if parent_id is None:
            ctx = _TextContext(context_id, None)
        else:
            parent = self._contexts.get(parent_id)
            if parent is None:
                raise InvalidRequestError(f"parent context {parent_id} of context {context_id} does not exist on this engine")
            ctx = _TextContext(context_id, parent_id, list(parent.segments), len(parent.segments), parent.num_tokens)
        self._contexts[context_id] = ctx
        return ctx

    def _segment(self, ctx: _TextContext, token_ids: Sequence[int]) -> _Segment:
        ids = tuple(token_ids)
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.tokenizer.vocab_size]
        if bad:
            raise InvalidRequestError(f"token ids must be integers in [0, {self.tokenizer.vocab_size}); got {bad[:5]}")
        shown = ids
        if ctx.num_tokens == 0 and self.tokenizer.add_bos_token and ids[:1] == (self.tokenizer.bos_token_id,):
            shown = ids[1:]  # the model asks for a BOS: the server adds its own to a text prompt
        return _Segment(self.tokenizer.decode(shown, skip_special_tokens=False), ids)

    async def fill(self, context_id: int, parent_context_id: int | None, token_ids: Sequence[int]) -> FillResult:
        """Record the tokens' text (nothing is computed: the server's prefix cache does the
        reuse when a generate sends the path)."""
        self._check_open()
        with self._lock:
            ctx = self._context_for(context_id, parent_context_id)
            if token_ids:
                ctx.add(self._segment(ctx, token_ids))
        return FillResult(context_id, len(token_ids), 0)

    async def split(self, context_id: int, source_id: int, drop_last: int) -> None:
        """Create `context_id` holding `source_id`'s path except its last `drop_last` tokens.
        A cut inside a segment keeps the text of that segment's leading ids (exact for ids
        that tokenize text byte-level, as fills and generated pieces do)."""
        self._check_open()
        with self._lock:
            if source_id in self._jobs:
                raise InvalidRequestError(f"context {source_id} is busy with another request")
            source = self._contexts.get(source_id)
            if source is None:
                raise InvalidRequestError(f"context {source_id} does not exist on this engine")
            if context_id in self._contexts:
                raise InvalidRequestError(f"context {context_id} already exists on this engine")
            if not 0 <= drop_last <= source.num_tokens:
                raise InvalidRequestError(f"cannot drop {drop_last} of context {source_id}'s {source.num_tokens} tokens")
            ctx = _TextContext(context_id, None)
            keep = source.num_tokens - drop_last
            for seg in source.segments:
                if ctx.num_tokens + len(seg.ids) > keep:
                    ids = seg.ids[: keep - ctx.num_tokens]
                    if ids:
                        ctx.add(_Segment(self.tokenizer.decode(ids, skip_special_tokens=False), ids))
                    break
                ctx.add(seg)
            ctx.own_start = len(ctx.segments)
            self._contexts[context_id] = ctx

    def free_context(self, context_id: int) -> None:
        """Drop the context (aborting a generation still running on it). Never raises."""
        with self._lock:
            self._contexts.pop(context_id, None)
            job = self._jobs.get(context_id)
            loop = self._loop
        if job is not None and job.task is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(job.task.cancel)

    def context_ids(self) -> set[int]:
        with self._lock:
            return set(self._contexts)

    def reset_prefix_cache(self) -> int:
        """Nothing to forget here (the server's cache is its own): 0."""
        return 0

    # -- generate --------------------------------------------------------------------------
    def _request_body(self, params: SamplingParams, prompt: str) -> dict[str, Any]:
        """The `/v1/completions` request of `params`; `InvalidRequestError` naming a field
        that cannot be expressed."""
        p = params
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(p, name) is not None:
                raise InvalidRequestError(f"{name} is not supported by OpenAIEngine (servers report token strings, not token ids)")
        if p.prior_output_tokens:
            self.check_resumable(p)
        if self.byte_codec:
            for name in ("stop_token_ids", "logit_bias"):
                if getattr(p, name):
                    raise InvalidRequestError(f"{name} needs the server's token ids: give OpenAIEngine the model's tokenizer")
        body: dict[str, Any] = {
            "model": self.model_name,
            "prompt": prompt,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "n": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.server_token_ids:
            body["return_token_ids"] = True
        optional = {
            "seed": (p.seed, None),
            "stop": (list(p.stop), []),
            "presence_penalty": (p.presence_penalty, 0.0),
            "frequency_penalty": (p.frequency_penalty, 0.0),
            "logit_bias": ({str(t): b for t, b in p.logit_bias}, {}),  # type: ignore[union-attr]
            # vLLM's extras
            "top_k": (p.top_k if p.top_k > 0 else -1, -1),
            "min_p": (p.min_p, 0.0),
            "repetition_penalty": (p.repetition_penalty, 1.0),
            "min_tokens": (max(0, p.min_tokens - p.prior_output_tokens), 0),  # a resume: the prior output counted
            "ignore_eos": (p.ignore_eos, False),
            "stop_token_ids": (list(p.stop_token_ids), []),
        }
        body.update({name: value for name, (value, default) in optional.items() if value != default})
        spec = p.structured
        if spec is not None:
            assert not isinstance(spec, dict)
            if spec.grammar is not None:
                raise InvalidRequestError("grammar is not supported by OpenAIEngine (servers read grammars in their own dialects)")
            if spec.json_schema is not None:
                schema = json.loads(spec.json_schema) if isinstance(spec.json_schema, str) else dict(spec.json_schema)
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
            elif spec.json_object:
                body["response_format"] = {"type": "json_object"}
            elif spec.regex is not None:
                body["structured_outputs"] = {"regex": spec.regex}
            else:
                body["structured_outputs"] = {"choice": list(spec.choice or ())}
        return body

    def check_resumable(self, params: SamplingParams) -> None:
        """`InvalidRequestError` naming the field if a generation sampled with `params` cannot
        be continued by a fresh request on the prompt plus its text so far."""
        check_resumable_by_resend(params, "OpenAIEngine")

    def context_tokens(self, context_id: int) -> asyncio.Future[list[int]]:
        """The context's whole token sequence (the ids of its path's segments): what the
        generates handed out, no more. Unknown: `UnknownContextError`."""
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        with self._lock:
            ctx = self._contexts.get(context_id)
            if ctx is None:
                future.set_exception(UnknownContextError(f"unknown context {context_id}"))
            else:
                future.set_result([t for seg in ctx.segments for t in seg.ids])
        return future

    def kv_residency(self, context_ids: Sequence[int]) -> asyncio.Future[dict[int, tuple[int, int]]]:
        """(tokens, 0) for each of these contexts held here: no KV is computed here."""
        future: asyncio.Future[dict[int, tuple[int, int]]] = asyncio.get_running_loop().create_future()
        with self._lock:
            future.set_result({cid: (self._contexts[cid].num_tokens, 0) for cid in context_ids if cid in self._contexts})
        return future

    async def generate(
        self,
        context_id: int,
        parent_context_id: int | None,
        params: SamplingParams,
        prompt_token_ids: Sequence[int] = (),
    ) -> AsyncIterator[GenerationDelta]:
        """Send the context's path text (plus the prompt's) and stream the server's text; see
        the module docstring."""
        with self._lock:
            self._check_open()  # under the lock: close() sees every job that starts
            ctx = self._context_for(context_id, parent_context_id)
            segment = self._segment(ctx, prompt_token_ids) if prompt_token_ids else None
            prompt = ctx.text() + (segment.text if segment else "")
            if not prompt:
                raise InvalidRequestError(f"context {context_id} is empty and the generate carries no prompt: nothing to continue")
            body = self._request_body(params, prompt)
            client, slots = self._client_here()
            if segment is not None:
                ctx.add(segment)
            carried, path_tokens = (len(segment.ids) if segment else 0), ctx.num_tokens
            job = _Job(context_id, asyncio.Queue())
            job.task = asyncio.get_running_loop().create_task(self._stream(client, slots, body, job, ctx.num_tokens))
            # after whatever the task handed over; alone when it was cancelled (even before it started)
            job.task.add_done_callback(lambda _: job.queue.put_nowait(_ENDED))
            self._jobs[context_id] = job
        finished = False
        try:
            while True:
                event = await job.queue.get()
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                if isinstance(event, _Segment):
                    with self._lock:
                        ctx.add(event)
                    yield GenerationDelta(list(event.ids), event.text)
                    continue
                finished = True
                if event is _ENDED:  # cancelled: by close(), or by free_context (an abort)
                    if self._closed:
                        raise RuntimeClosedError("the engine was closed while this generation ran")
                    yield GenerationDelta([], "", FINISH_ABORT, 0)
                    return
                finish_reason, reused = event  # type: ignore[misc]
                # the server's cache figure covers the whole path it was sent; of the tokens this
                # call carried, the share past the path's earlier tokens (in our counting)
                cached = max(0, min(carried, reused - (path_tokens - carried)))
                yield GenerationDelta([], "", finish_reason, cached, reused_tokens=reused)
                return
        finally:
            task = job.task
            if not finished:  # the caller went away: closing the stream makes the server abort
                task.cancel()
            with contextlib.suppress(BaseException):
                await task
            with self._lock:
                if self._jobs.get(context_id) is job:
                    del self._jobs[context_id]

    async def _stream(self, client: httpx.AsyncClient, slots: asyncio.Semaphore, body: dict[str, Any], job: _Job, path_tokens: int) -> None:
        """Run one request and hand `job.queue` its pieces (`_Segment`s), then (finish_reason,
        cached_tokens), or an exception. It is cancelled by the consumer leaving (nobody
        listens), by `free_context` or by `close()`; the consumer then finds only `_ENDED`."""
        url = f"{self.base_url}/v1/completions"
        put = job.queue.put_nowait
        try:
            async with slots:
                with self._lock:
                    self._running += 1
                    self._counters.requests += 1
                try:
                    finish, usage = await self._read(client, url, body, put)
                finally:
                    with self._lock:
                        self._running -= 1
            cached = _cached_tokens(usage)
            with self._lock:
                c = self._counters
                c.prompt_tokens += usage.get("prompt_tokens", path_tokens) if usage else path_tokens
                c.cached_tokens += cached
                if usage and isinstance(usage.get("completion_tokens"), int):
                    c.generation_tokens += usage["completion_tokens"]
            put((finish, cached))
        except Exception as e:  # noqa: BLE001 - every failure reaches the caller, typed
            with self._lock:
                self._counters.failed += 1
            put(e if isinstance(e, (InvalidRequestError, EngineError, RuntimeClosedError)) else EngineError(f"{url}: {type(e).__name__}: {e}"))

    async def _read(self, client: httpx.AsyncClient, url: str, body: dict[str, Any], put: Any) -> tuple[str, dict[str, Any] | None]:
        """Stream one completion: hands each text piece to `put`; returns the finish reason
        and the usage (None if the server sent none)."""
        finish: str | None = None
        usage: dict[str, Any] | None = None
        try:
            async with client.stream("POST", url, json=body) as response:
                if response.status_code >= 400:
                    raise _error_from(response.status_code, (await response.aread()).decode("utf-8", "replace"), url)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, `event:` lines
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise _error_from(None, event, url)
                    if event.get("usage"):
                        usage = event["usage"]
                    for choice in event.get("choices") or ():
                        piece = self._piece(choice, url)
                        if piece.text or piece.ids:
                            put(piece)
                        if choice.get("finish_reason"):
                            finish = _finish(choice["finish_reason"])
        except (InvalidRequestError, EngineError):
            raise
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:  # the server is gone: the core takes it out of placement
            raise EngineUnavailableError(f"cannot reach the OpenAI-compatible server at {url}: {type(e).__name__}: {e}") from None
        except httpx.HTTPError as e:
            raise EngineError(f"the OpenAI-compatible server at {url} failed: {type(e).__name__}: {e}") from None
        except (ValueError, TypeError, AttributeError) as e:  # JSON that is not an event
            raise EngineError(f"the OpenAI-compatible server at {url} sent a malformed stream: {e}") from None
        if finish is None:
            raise EngineError(f"the stream from {url} ended before the generation finished")
        return finish, usage

    def _piece(self, choice: dict[str, Any], url: str) -> _Segment:
        """One streamed choice's text and the ids it stands for: the server's, when asked for
        and sent (checked against the vocabulary), else its text re-tokenized."""
        text = choice.get("text") or ""
        if not isinstance(text, str):
            raise EngineError(f"the OpenAI-compatible server at {url} sent text that is not a string: {text!r}")
        ids = choice.get("token_ids") if self.server_token_ids else None
        if ids is None:
            return _Segment(text, tuple(self.tokenizer.encode(text)) if text else ())
        vocab = self.tokenizer.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise EngineError(f"the OpenAI-compatible server at {url} sent token_ids that are not ids of this tokenizer (vocabulary {vocab}): {ids!r:.200}")
        return _Segment(text, tuple(ids))

    # -- lifecycle and introspection -------------------------------------------------------
    def runtime_info(self) -> RuntimeInfo:
        blocks = -(-self.max_num_seqs * self.max_model_len // SYNTHETIC_BLOCK_SIZE)
        with self._lock:
            c = self._counters
            return RuntimeInfo(
                model_name=self.model_name,
                block_size=SYNTHETIC_BLOCK_SIZE,
                num_blocks_total=blocks,
                num_blocks_free=blocks,
                num_blocks_cached=0,
                num_contexts=len(self._contexts),
                num_running=self._running,
                num_waiting=len(self._jobs) - self._running,
                prefix_cache_queries=c.prompt_tokens,
                prefix_cache_hits=c.cached_tokens,
                prompt_tokens_computed=c.prompt_tokens - c.cached_tokens,
                generation_tokens=c.generation_tokens,
                num_preemptions=0,
                extra={"requests_total": float(c.requests), "requests_failed": float(c.failed)},
            )

    def check_invariants(self) -> None:
        with self._lock:
            for cid, ctx in self._contexts.items():
                if ctx.context_id != cid or not 0 <= ctx.own_start <= len(ctx.segments):
                    raise InvariantError(f"context {cid} is malformed: {ctx.context_id=}, {ctx.own_start=}")
                if ctx.num_tokens != sum(len(s.ids) for s in ctx.segments):
                    raise InvariantError(f"context {cid} counts {ctx.num_tokens} tokens but holds {sum(len(s.ids) for s in ctx.segments)}")
            if not 0 <= self._running <= min(self.max_num_seqs, len(self._jobs)):
                raise InvariantError(f"{self._running} requests running with {len(self._jobs)} in flight (max {self.max_num_seqs})")
            c = self._counters
            if not 0 <= c.cached_tokens <= c.prompt_tokens or min(c.generation_tokens, c.requests, c.failed) < 0:
                raise InvariantError(f"the counters are inconsistent: {c}")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Fail every queued or running generation with `RuntimeClosedError` (their streams
        are closed) and close the HTTP client; later calls raise `RuntimeClosedError`.
        Idempotent; callable from any thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            client, loop = self._client, self._loop
            tasks = [job.task for job in self._jobs.values() if job.task is not None]
        if client is None or loop is None or loop.is_closed():
            return

        async def shut() -> None:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.aclose()

        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is loop:  # on its own loop: cannot wait for it
                loop.create_task(shut())
                return
        if loop.is_running():
            with contextlib.suppress(Exception):  # a loop that stops meanwhile drops the sockets itself
                asyncio.run_coroutine_threadsafe(shut(), loop).result(timeout=_CLOSE_WAIT_S)



def _finish(reason: str) -> str:
    return {"length": FINISH_LENGTH, "abort": FINISH_ABORT}.get(reason, FINISH_STOP)


def _cached_tokens(usage: dict[str, Any] | None) -> int:
    details = (usage or {}).get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) and cached >= 0 else 0


def _error_from(status: int | None, payload: str | dict[str, Any], url: str) -> Exception:
    """The typed error of an HTTP error answer (`status`), or of an error event in a stream
    (`status` None): the server's message; a 4xx or an invalid-request event is the caller's
    fault (`InvalidRequestError`), anything else the server's (`EngineError`, naming `url`)."""
    error: Any = payload
    if isinstance(payload, str):
        try:
            error = json.loads(payload)
        except ValueError:
            error = {"error": {"message": payload.strip() or f"HTTP {status}"}}
    info = error.get("error", error) if isinstance(error, dict) else {"message": str(error)}
    if not isinstance(info, dict):
        info = {"message": str(info)}
    message = str(info.get("message") or info.get("detail") or error)
    if (status is not None and 400 <= status < 500) or (status is None and info.get("type") == "invalid_request_error"):
        return InvalidRequestError(message)
    return EngineError(f"the OpenAI-compatible server at {url} failed ({'HTTP ' + str(status) if status else 'in the stream'}): {message}")
