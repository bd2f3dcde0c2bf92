"""Contexts saved to disk: a context's tokens and their KV in a safetensors file (the builtin
engine's form of llama.cpp's slot save/restore).

Format (version 1), one safetensors file:
- tensors: `token_ids` int64 [n] (the whole sequence, root to the context), `k` and `v`
  [num_layers, n, num_kv_heads, head_dim] in the KV pool's dtype, one row per token (never per
  block, so any block size can load it), and optionally `last_hidden` [hidden_size]: the
  final-normed hidden state of the last token (in the model's dtype), from which the next
  token is sampled.
- metadata: `format`, `format_version`, `model_fingerprint` (see `model_fingerprint`),
  `model_name`, `dtype`, `num_tokens`, `num_layers`, `num_kv_heads`, `head_dim`,
  `block_size` (of the engine that saved it; informational) and `checksum` (xxh3-128 over the
  tensors' bytes and `extra`, so a damaged file is refused instead of loaded); optionally
  `extra`: a JSON object of strings to strings that a layer above stores with the context
  (a chat session's conversation, for one). A file without `extra` has the same checksum as
  before `extra` existed.

`read_context_file` checks everything against the loading engine's `KVSpec` before anything
is touched; every problem is a `ContextFileError` whose message says what is wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from parrot_core.engines.builtin.model import LlamaModel
from parrot_core.errors import InvalidRequestError

FORMAT = "parrot-core/context"
FORMAT_VERSION = 1
_FINGERPRINT_SAMPLES = 4096  # values sampled from each fingerprinted weight tensor


class ContextFileError(InvalidRequestError):
    """A saved context file is missing, damaged, of another format or version, or was saved
    from another model (or dtype) than the one loading it."""


@dataclass(frozen=True)
class KVSpec:
    """What a saved context must match to be loaded into an engine."""

    fingerprint: str
    model_name: str
    dtype: torch.dtype  # of the KV
    hidden_dtype: torch.dtype  # of the model (its hidden states)
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    block_size: int


@dataclass(frozen=True)
class ContextKV:
    """A context's tokens and their KV, on the CPU: `k`/`v` are [num_layers, n, kv_heads,
    head_dim]; `last_hidden` ([hidden]) is the state the next token is sampled from, or None
    (the loader then recomputes the last token before sampling). `extra`: strings stored with
    the context in its file (not the engine's: it ignores them)."""

    token_ids: list[int]
    k: Tensor
    v: Tensor
    last_hidden: Tensor | None = None
    extra: Mapping[str, str] = field(default_factory=dict)


def model_fingerprint(model: LlamaModel) -> str:
    """sha256 of the model's config and of values sampled at a fixed stride from a few weight
    tensors (as held, so in the model's dtype). Stable across loads of the same weights in the
    same dtype; another model (or another random seed) gives another fingerprint."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.config), sort_keys=True, default=str).encode())
    h.update(str(model.dtype).encode())
    for tensor in (model.embed, model.norm, model.lm_head.weight, model.layers[0].wqkv.weight, model.layers[-1].w_down.weight):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
        h.update(_bytes(flat[::step][:_FINGERPRINT_SAMPLES].cpu()))
    return h.hexdigest()


def write_context_file(path: str | os.PathLike[str], kv: ContextKV, spec: KVSpec) -> None:
    """Write `kv` (its `extra` too) to `path` atomically (a temporary file in the same folder,
    then a rename): a crash never leaves a half-written file under `path`. `extra` must map
    strings to strings (`InvalidRequestError` otherwise, before anything is written)."""
    extra = _extra_json(kv.extra)
    tensors = {
        "token_ids": torch.tensor(kv.token_ids, dtype=torch.int64),
        "k": kv.k.contiguous(),
        "v": kv.v.contiguous(),
    }
    if kv.last_hidden is not None:
        tensors["last_hidden"] = kv.last_hidden.contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model_fingerprint": spec.fingerprint,
        "model_name": spec.model_name,
        "dtype": _dtype_name(spec.dtype),
        "num_tokens": str(len(kv.token_ids)),
        "num_layers": str(spec.num_layers),
        "num_kv_heads": str(spec.num_kv_heads),
        "head_dim": str(spec.head_dim),
        "block_size": str(spec.block_size),
        "checksum": _checksum(tensors, extra),
    }
    if extra is not None:
        metadata["extra"] = extra
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise ContextFileError(f"cannot write a saved context to {os.fspath(path)!r}: {e}") from None
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ContextFileError(f"cannot write a saved context to {os.fspath(path)!r}: {e}") from None
        raise


def read_context_file(path: str | os.PathLike[str], spec: KVSpec) -> ContextKV:
    """Read and check a saved context against `spec`; raises `ContextFileError` (and reads
    nothing further) at the first problem."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ContextFileError(f"no saved context at {name!r} (not a file)")
    try:
        with safe_open(name, framework="pt") as f:
            meta = f.metadata() or {}
            _check_header(name, meta, spec)
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except ContextFileError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ContextFileError(f"{name!r} is not a readable safetensors file (damaged or truncated?): {e}") from None
    return _check_tensors(name, meta, tensors, spec)


def _check_header(name: str, meta: dict[str, str], spec: KVSpec) -> None:
    if meta.get("format") != FORMAT:
        raise ContextFileError(f"{name!r} is not a saved parrot-core context (format {meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ContextFileError(
            f"{name!r} has format version {meta.get('format_version')!r}; this parrot-core reads version {FORMAT_VERSION}"
        )
    if meta.get("dtype") != _dtype_name(spec.dtype):
        raise ContextFileError(f"{name!r} holds {meta.get('dtype')} KV; this engine's KV is {_dtype_name(spec.dtype)}")
    if meta.get("model_fingerprint") != spec.fingerprint:
        raise ContextFileError(
            f"{name!r} was saved from another model ({meta.get('model_name')!r}, fingerprint"
            f" {str(meta.get('model_fingerprint'))[:12]}...) than this engine's ({spec.model_name!r},"
            f" fingerprint {spec.fingerprint[:12]}...)"
        )


def _check_tensors(name: str, meta: dict[str, str], tensors: dict[str, Tensor], spec: KVSpec) -> ContextKV:
    def bad(what: str) -> ContextFileError:
        return ContextFileError(f"{name!r} is damaged: {what}")

    if {"token_ids", "k", "v"} - set(tensors) or set(tensors) - {"token_ids", "k", "v", "last_hidden"}:
        raise bad(f"it holds the tensors {sorted(tensors)}")
    ids, k, v, hidden = tensors["token_ids"], tensors["k"], tensors["v"], tensors.get("last_hidden")
    n = ids.numel()
    if ids.dtype != torch.int64 or ids.dim() != 1 or n < 1 or meta.get("num_tokens") != str(n):
        raise bad(f"token_ids is {ids.dtype} {list(ids.shape)}, metadata says {meta.get('num_tokens')} tokens")
    shape = [spec.num_layers, n, spec.num_kv_heads, spec.head_dim]
    for label, t in (("k", k), ("v", v)):
        if t.dtype != spec.dtype or list(t.shape) != shape:
            raise bad(f"{label} is {t.dtype} {list(t.shape)}, expected {spec.dtype} {shape}")
    if hidden is not None and (hidden.dtype != spec.hidden_dtype or list(hidden.shape) != [spec.hidden_size]):
        raise bad(f"last_hidden is {hidden.dtype} {list(hidden.shape)}, expected {spec.hidden_dtype} [{spec.hidden_size}]")
    if meta.get("checksum") != _checksum(tensors, meta.get("extra")):
        raise bad("its checksum does not match its contents")
    token_ids = ids.tolist()
    if min(token_ids) < 0 or max(token_ids) >= spec.vocab_size:
        raise bad(f"token ids outside [0, {spec.vocab_size})")
    try:
        extra = json.loads(meta["extra"]) if "extra" in meta else {}
    except ValueError:
        extra = None
    if not _is_str_map(extra):
        raise bad("its extra metadata is not an object of strings")
    return ContextKV(token_ids, k, v, hidden, extra)


def _extra_json(extra: Mapping[str, str]) -> str | None:
    """`extra` as stored (None when empty: the file is then as before `extra` existed)."""
    if not isinstance(extra, Mapping) or not _is_str_map(extra):
        raise InvalidRequestError("the extra metadata of a saved context maps strings to strings")
    return json.dumps(dict(extra), sort_keys=True) if extra else None


def _is_str_map(value: object) -> bool:
    return isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _checksum(tensors: dict[str, Tensor], extra: str | None = None) -> str:
    h = xxhash.xxh3_128()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(_bytes(tensors[key]))
    if extra is not None:
        h.update(b"extra")
        h.update(extra.encode())
    return h.hexdigest()


def _bytes(t: Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, any dtype (bfloat16 has no numpy form, uint8 has)."""
    return memoryview(t.contiguous().view(torch.uint8).numpy())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
