"""One layer's attention, per kind of step, on the default model's attention shape (9 query
heads, 3 KV heads, head size 64, blocks of 16 or `--block-size`): torch's paths over the token-major pool (what
the builtin engine runs without vLLM: flash prefills, gathers + SDPA, cascade attention for
shared prefixes) against vLLM's paged CPU kernel over the pool in vLLM's block layout (what it
runs with the `vllm` extra: `parrot_core/engines/builtin/cpu_kernels.py`).

Both run the model's own code (`LlamaModel._attention` and `VllmKVCache.attend`, each with its
per-step planning) on the same K/V, and their outputs are checked against each other. The
vLLM column needs vLLM's CPU build in this environment (`pip install -e '.[vllm]'`, as `make
test` does); without it only torch's paths are timed.

    python benchmarks/attention_kernels.py [--threads 2] [--dtype float32|bfloat16] [--block-size 16]

vLLM's kernel takes its "vec16" path on blocks of 16 and its "vec" path on blocks of a multiple
of 32 (`cpu_kernels.kernel_isa`, as vLLM picks it).
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Callable

import torch

from model_speed import on_own_thread, timed, write_results  # a sibling script (benchmarks/ is on the path)
from parrot_core.engines.builtin.cpu_kernels import VllmKVCache, kernel_isa, vllm_kv_supported
from parrot_core.engines.builtin.model import ForwardBatch, KVCache, LlamaConfig, LlamaModel

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
# name -> sequences as (prefix group or None, shared prefix tokens, own tokens, new tokens)
Seq = tuple[int | None, int, int, int]
STEPS: dict[str, list[Seq]] = {
    "prefill 8 x 256": [(None, 0, 256, 256)] * 8,
    "prefill 1 x 2048": [(None, 0, 2048, 2048)],
    "decode 32, own ~270": [(None, 0, 270 + i % 7, 1) for i in range(32)],
    "decode 32, shared 1024 + ~40": [(0, 1024, 40 + i % 5, 1) for i in range(32)],
    "decode 4 x 8, shared 512 + ~80": [(i // 8, 512, 80 + i % 3, 1) for i in range(32)],
    "chunks 32 x 32 over shared 1024": [(0, 1024, 32, 32)] * 32,
    "chunks 4 x 8 x 64 over shared 512": [(i // 8, 512, 64, 64) for i in range(32)],
}


def median_ms(fn: Callable[[], object], repeats: int = 7) -> float:
    return timed(fn, repeats) * 1000


def layout(seqs: list[Seq], block: int) -> tuple[list[list[int]], list[int], list[int], int]:
    """Block tables (shared prefixes shared, the rest scattered), context and query lengths."""
    n_blocks = sum(-(-(own) // block) for _, _, own, _ in seqs) + sum({g: p // block for g, p, _, _ in seqs if g is not None}.values())
    free = random.Random(0).sample(range(n_blocks), n_blocks)
    prefixes: dict[int, list[int]] = {}
    tables, ctxs, qlens = [], [], []
    for group, prefix, own, new in seqs:
        if group is not None and group not in prefixes:
            prefixes[group] = [free.pop() for _ in range(prefix // block)]
        tables.append(prefixes.get(group, []) + [free.pop() for _ in range(-(-own // block))])
        ctxs.append(prefix + own)
        qlens.append(new)
    return tables, ctxs, qlens, n_blocks


def bench_step(model: LlamaModel, seqs: list[Seq], dtype: torch.dtype, vllm: bool, block: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    tables, ctxs, qlens, n_blocks = layout(seqs, block)
    batch = ForwardBatch.build([[0] * q for q in qlens], ctxs, tables, block)
    pool = KVCache.allocate(model.config, n_blocks, block, dtype)
    every = torch.tensor([t[p // block] * block + p % block for t, c in zip(tables, ctxs) for p in range(c)]).unique()
    k_all, v_all = (torch.randn(every.numel(), KV_HEADS, HEAD_DIM, generator=g).to(dtype) for _ in range(2))
    pool.write(0, every, k_all, v_all)
    q = torch.randn(len(batch.token_ids), HEADS, HEAD_DIM, generator=g).to(dtype)
    k_new, v_new = pool.read(0, batch.slot_mapping)

    def torch_paths() -> torch.Tensor:
        return model._attention(q, k_new, v_new, pool.k[0], pool.v[0], model._plan(batch, block))

    row = {"torch_ms": median_ms(torch_paths), "tokens": float(sum(qlens))}
    if vllm:
        paged = VllmKVCache.allocate(1, KV_HEADS, HEAD_DIM, n_blocks, block, dtype)
        paged.write(0, every, k_all, v_all)

        def vllm_kernel() -> torch.Tensor:
            return paged.attend(0, q, paged.prepare(qlens, ctxs, tables, HEADS))

        want, got = torch_paths().float(), vllm_kernel().float()
        diff = (got - want).abs().max().item()
        if diff > (1e-4 if dtype == torch.float32 else 5e-2) * max(1.0, want.abs().max().item()):
            raise AssertionError(f"the two paths disagree by {diff}")
        row["vllm_ms"] = median_ms(vllm_kernel)
    return row


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    labels = list(results["steps"])
    x = range(len(labels))
    for i, key in enumerate(("torch_ms", "vllm_ms")):
        values = [results["steps"][s].get(key, 0.0) for s in labels]
        ax.bar([p + 0.4 * i for p in x], values, width=0.4, label={"torch_ms": "torch paths", "vllm_ms": "vLLM paged kernel"}[key])
    ax.set_xticks([p + 0.2 for p in x], labels, rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per layer (log)")
    ax.legend()
    ax.set_title(f"one layer's attention per step kind, {results['dtype']}, blocks of {results['block_size']}, {results['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per KV block (a multiple of 16)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "attention_kernels_{dtype}_{block}.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    block = args.block_size
    if block <= 0 or block % 16:
        ap.error("--block-size must be a positive multiple of 16")
    vllm = vllm_kv_supported(HEAD_DIM, dtype, block)
    if not vllm:
        print("vLLM's CPU build is not installed here (or the CPU lacks AVX-512): timing torch's paths only")
    results: dict = {"dtype": args.dtype, "block_size": block, "kernel_isa": kernel_isa(block), "threads": args.threads, "steps": {}}
    print(f"{'step':>34} {'torch ms':>9} {'vLLM ms':>8} {'speedup':>8}")

    def run() -> None:  # one thread runs everything, as in the engine
        config = LlamaConfig(vocab_size=8, hidden_size=HEADS * HEAD_DIM, intermediate_size=8, num_layers=1, num_heads=HEADS,
                             num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=4096)  # fmt: skip
        model = LlamaModel.random(config, seed=0, dtype=dtype)
        for name, seqs in STEPS.items():
            row = bench_step(model, seqs, dtype, vllm, block)
            results["steps"][name] = row
            line = f"{name:>34} {row['torch_ms']:>9.2f}"
            if "vllm_ms" in row:
                line += f" {row['vllm_ms']:>8.2f} {row['torch_ms'] / row['vllm_ms']:>7.1f}x"
            print(line, flush=True)

    on_own_thread(run)
    write_results(results, args.out.format(dtype=args.dtype, block=block), plot)


if __name__ == "__main__":
    main()
