"""Causal prefill attention on CPU: torch's flash kernel (what the builtin engine runs) against
vLLM's paged CPU kernel (`cpu_attention_with_kv_cache`, what vLLM's CPU build runs), on the
default model's attention shape (9 query heads, 3 KV heads, head size 64).

This measures where the rest of the gap to vLLM lies (README, "Side by side with vLLM"). vLLM's
kernel reads its KV from blocks in its own packed layout, written by its own
`cpu_attn_reshape_and_cache`; it does not read the builtin engine's pool layout (the engine
uses it for fresh prefills only: `parrot_core/engines/builtin/cpu_kernels.py`, which also loads
it here). Both results are checked against each other. The vLLM column needs vLLM's CPU build in this environment
(`pip install -e '.[vllm]'`, as `make test` does); without it only torch's kernel is timed.

    python benchmarks/attention_kernels.py [--threads 2] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from model_speed import on_own_thread, timed, write_results  # a sibling script (benchmarks/ is on the path)
from parrot_core.engines.builtin.cpu_kernels import vllm_ops

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
SHAPES = [(1, 256), (8, 256), (3, 576), (1, 1056), (1, 2048)]  # (sequences, tokens each)


def median_ms(fn: Callable[[], object], repeats: int = 7) -> float:
    return timed(fn, repeats) * 1000


def bench_shape(ops: object | None, seqs: int, length: int, dtype: torch.dtype) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    n = seqs * length
    q, k, v = (torch.randn(n, h, HEAD_DIM, generator=g).to(dtype) for h in (HEADS, KV_HEADS, KV_HEADS))

    def torch_flash() -> torch.Tensor:
        qs, ks, vs = (t.view(seqs, length, -1, HEAD_DIM).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True).transpose(1, 2).reshape(n, HEADS, HEAD_DIM)

    row = {"torch_flash_ms": median_ms(torch_flash)}
    if ops is not None:
        blocks_per_seq = -(-length // BLOCK)
        tables = torch.randperm(seqs * blocks_per_seq, generator=g).view(seqs, blocks_per_seq).to(torch.int32)
        slots = (tables.long()[:, :, None] * BLOCK + torch.arange(BLOCK)).view(seqs, -1)[:, :length].reshape(-1)
        cache = torch.zeros(seqs * blocks_per_seq, KV_HEADS, 2 * BLOCK, HEAD_DIM, dtype=dtype)
        key_cache, value_cache = cache.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, "vec16", 1.0, 1.0, "auto")
        starts = torch.arange(0, n + 1, length, dtype=torch.int32)
        lens = torch.full((seqs,), length, dtype=torch.int32)
        meta = ops.get_scheduler_metadata(seqs, HEADS, KV_HEADS, HEAD_DIM, lens, dtype, starts, True, -1, "vec16", False, None, "auto")
        out = torch.empty_like(q)

        def vllm_kernel() -> torch.Tensor:
            ops.cpu_attention_with_kv_cache(
                q, key_cache, value_cache, out, starts, lens, 1 / math.sqrt(HEAD_DIM), True, None, -1, tables, 0.0, meta, None, None, 1.0, 1.0, "auto"
            )
            return out

        diff = (vllm_kernel().float() - torch_flash().float()).abs().max().item()
        if diff > (1e-4 if dtype == torch.float32 else 5e-2):
            raise AssertionError(f"the two kernels disagree by {diff} at {seqs} x {length}")
        row["vllm_kernel_ms"] = median_ms(vllm_kernel)
    row["gflop"] = seqs * 4 * (length * (length + 1) / 2) * HEADS * HEAD_DIM / 1e9  # the causal half
    return row


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = list(results["shapes"])
    x = range(len(labels))
    for i, key in enumerate(("torch_flash_ms", "vllm_kernel_ms")):
        values = [results["shapes"][s].get(key, 0.0) for s in labels]
        ax.bar([p + 0.4 * i for p in x], values, width=0.4, label=key.replace("_ms", ""))
    ax.set_xticks([p + 0.2 for p in x], labels)
    ax.set_xlabel("sequences x tokens (causal prefill, one layer)")
    ax.set_ylabel("ms")
    ax.legend()
    ax.set_title(f"attention kernels, {results['dtype']}, {results['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "attention_kernels_{dtype}.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    ops = vllm_ops()
    if ops is None:
        print("vLLM's CPU build is not installed here (or the CPU lacks AVX-512): timing torch's kernel only")
    results: dict = {"dtype": args.dtype, "threads": args.threads, "shapes": {}}
    print(f"{'shape':>10} {'GFLOP':>7} {'torch ms':>9} {'GFLOP/s':>8} {'vLLM ms':>8} {'GFLOP/s':>8} {'speedup':>8}")

    def run() -> None:  # one thread runs every kernel, as in the engine
        for seqs, length in SHAPES:
            row = bench_shape(ops, seqs, length, dtype)
            results["shapes"][f"{seqs}x{length}"] = row
            line = f"{seqs:>4} x {length:<4} {row['gflop']:>7.2f} {row['torch_flash_ms']:>9.2f} {row['gflop'] / row['torch_flash_ms'] * 1000:>8.0f}"
            if "vllm_kernel_ms" in row:
                ms = row["vllm_kernel_ms"]
                line += f" {ms:>8.2f} {row['gflop'] / ms * 1000:>8.0f} {row['torch_flash_ms'] / ms:>7.1f}x"
            print(line, flush=True)

    on_own_thread(run)
    write_results(results, args.out.format(dtype=args.dtype), plot)


if __name__ == "__main__":
    main()
