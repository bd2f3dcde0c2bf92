"""Settings of the builtin engine, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parrot_core.errors import InvalidRequestError


# dtype names as vLLM's --dtype takes them ("auto": the GGUF's weights are dequantized to float32)
DTYPE_NAMES = {"auto": "float32", "float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16", "half": "float16"}


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype a --dtype name means; `InvalidRequestError` naming the choices otherwise."""
    if name not in DTYPE_NAMES:
        raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return getattr(torch, DTYPE_NAMES[name])


@dataclass(frozen=True)
class EngineConfig:
    """`num_kv_blocks=None` sizes the pool from `kv_cache_memory_gb`. `max_model_len=None`
    takes the model's own limit. Names follow vLLM's flags where the concept matches."""

    model: str | None = None  # a llama GGUF path; None = the default model (SmolLM2-135M-Instruct)
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 1.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    cache_namespace: bytes = b""  # mixed into every block hash: different namespaces never share KV

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}")
        if self.num_kv_blocks is not None and (not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 1):
            raise InvalidRequestError(f"num_kv_blocks must be a positive integer, got {self.num_kv_blocks!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise InvalidRequestError(f"max_model_len must be positive, got {self.max_model_len!r}")
        if self.kv_cache_memory_gb <= 0:
            raise InvalidRequestError(f"kv_cache_memory_gb must be positive, got {self.kv_cache_memory_gb!r}")
