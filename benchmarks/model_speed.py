"""Speed of the builtin engine's model on the default model (CPU, float32 or bfloat16).

Prints the linear layers' speed at 1 to 2,048 rows (every layer's four projections and the lm
head, weights streaming from memory as in a step), prefill throughput at 128/512/2048 tokens on
the engine's pool, decode step times
(forward + logits + argmax) at batch 1/8/32 over contexts of ~256 and ~1024 tokens (B sequences
sharing a prefix, the same KV blocks, plus 32 own tokens each) on torch's paths over the
token-major pool, plain and shared-prefix (cascade), and on vLLM's paged kernel over its block
layout (the engine's pool when the `vllm` extra is installed), and the split of a served
workload's wall time into model time and everything else.
Writes JSON and a PNG to benchmarks/results/.

    python benchmarks/model_speed.py [--threads 2] [--steps 5] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch

from parrot_core.engines.builtin.default_model import default_model_path
from parrot_core.engines.builtin.gguf_loader import load_gguf
from parrot_core.engines.builtin.cpu_kernels import VllmKVCache
from parrot_core.engines.builtin.model import AnyKVCache, ForwardBatch, KVCache, LlamaModel, allocate_kv_cache

BS = 16
SUFFIX = 32  # own tokens of each sequence after the shared prefix


def on_own_thread(fn: Callable[[], None]) -> None:
    """Run `fn` on a thread that ends before this returns. With libgomp, each thread that runs
    parallel torch ops keeps an OpenMP pool until it ends, and two pools slow every step of an
    engine's thread (see BuiltinEngine._run)."""
    worker = threading.Thread(target=fn)
    worker.start()
    worker.join()


def write_results(results: dict, out: str, plot: Callable[[dict, str], None]) -> None:
    """`results` as JSON at `out`, and `plot(results, png)` beside it."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    png = os.path.splitext(out)[0] + ".png"
    plot(results, png)
    print(f"wrote {out} and {png}")


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_linear(model: LlamaModel, rows: int, repeats: int) -> dict[str, float]:
    """The step's linear work at `rows` rows: each projection of every layer in turn (so each
    weight comes from memory, as in a step; the 540 MB of float32 weights do not fit any cache),
    then the lm head. Milliseconds per pass and GFLOP/s."""
    x = torch.randn(rows, model.config.hidden_size, dtype=model.dtype)
    act = torch.randn(rows, model.config.intermediate_size, dtype=model.dtype)
    inputs = {"wqkv": x, "wo": x, "w_gate_up": x, "w_down": act}
    # outputs into reused buffers, as in a step (fresh large tensors would time page faults)
    outputs = {name: torch.empty(rows, getattr(model.layers[0], name).weight.shape[0], dtype=model.dtype) for name in inputs}
    projections = [(getattr(layer, name), inputs[name], outputs[name]) for layer in model.layers for name in inputs]
    flops = sum(2 * rows * lin.weight.numel() for lin, _, _ in projections)

    def layers() -> None:
        for lin, inp, out in projections:
            lin(inp, out)

    layers_s = timed(layers, repeats)
    logits = torch.empty(rows, model.config.vocab_size, dtype=model.dtype)
    head_s = timed(lambda: model.lm_head(x, logits), repeats)
    head_flops = 2 * rows * model.lm_head.weight.numel()
    return {
        "layers_ms": layers_s * 1000,
        "layers_gflops": flops / layers_s / 1e9,
        "lm_head_ms": head_s * 1000,
        "lm_head_gflops": head_flops / head_s / 1e9,
    }


def bench_prefill(model: LlamaModel, length: int, repeats: int) -> float:
    kv = allocate_kv_cache(model.config, -(-length // BS), BS, dtype=model.dtype)
    tokens = torch.randint(0, model.config.vocab_size, (length,)).tolist()
    batch = ForwardBatch.build([tokens], [length], [list(range(kv.num_blocks))], BS)
    return length / timed(lambda: model.compute_logits(model.forward(batch, kv)), repeats)


def setup_shared(model: LlamaModel, prefix_len: int, num_seqs: int, max_steps: int, paged: bool):
    """KV holding a `prefix_len`-token prefix shared by `num_seqs` sequences, each with SUFFIX
    own tokens; in vLLM's layout if `paged`, else token-major."""
    own_blocks = -(-(SUFFIX + max_steps + 1) // BS)
    n_prefix = prefix_len // BS
    n_blocks = n_prefix + num_seqs * own_blocks
    c = model.config
    kv: AnyKVCache = (
        VllmKVCache.allocate(c.num_layers, c.num_kv_heads, c.head_dim, n_blocks, BS, model.dtype)
        if paged
        else KVCache.allocate(c, n_blocks, BS, dtype=model.dtype)
    )
    vocab = model.config.vocab_size
    prefix = torch.randint(0, vocab, (prefix_len,)).tolist()
    shared = list(range(n_prefix))
    model.forward(ForwardBatch.build([prefix], [prefix_len], [shared], BS), kv)
    tables = [shared + list(range(n_prefix + i * own_blocks, n_prefix + (i + 1) * own_blocks)) for i in range(num_seqs)]
    suffixes = [torch.randint(0, vocab, (SUFFIX,)).tolist() for _ in range(num_seqs)]
    model.forward(ForwardBatch.build(suffixes, [prefix_len + SUFFIX] * num_seqs, tables, BS), kv)
    return kv, tables


def bench_decode(model: LlamaModel, kv: AnyKVCache, tables: list[list[int]], ctx: int, batch: int, steps: int, shared: bool) -> float:
    model.enable_shared_prefix = shared
    # force the path under test (the defaults would pick plain for B=1)
    model.shared_prefix_min_batch, model.shared_prefix_min_tokens, model.shared_prefix_min_work = 1, BS, 0
    times = []
    for s in range(steps + 1):  # step 0 is a warm-up
        fb = ForwardBatch.build([[1]] * batch, [ctx + s + 1] * batch, tables[:batch], BS)
        if isinstance(kv, KVCache):
            assert bool(model._plan(fb, BS).shared) == shared
        t = time.perf_counter()
        model.compute_logits(model.forward(fb, kv)).argmax(-1).tolist()
        if s:
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def bench_engine_split(dtype: torch.dtype) -> dict[str, float]:
    """Where a served step's time goes: 32 unique 256-token prompts -> 16 tokens through the
    engine (greedy, EOS ignored); the model's forward passes against the whole wall time."""
    import random

    import parrot_core as P

    rng = random.Random(0)
    with P.Runtime(dtype=dtype, max_num_seqs=32, kv_cache_memory_gb=2.0) as rt:
        prompts = [[rng.randrange(100, 49000) for _ in range(256)] for _ in range(32)]
        rt.generate(prompts[:4], max_tokens=2, temperature=0.0, ignore_eos=True)  # warm-up
        stats = rt.engine.stats
        f0, s0 = stats["forward_seconds"], stats["steps"]
        t = time.perf_counter()
        rt.generate(prompts, max_tokens=16, temperature=0.0, ignore_eos=True)
        wall = time.perf_counter() - t
        return {"wall_s": wall, "forward_s": stats["forward_seconds"] - f0, "steps": stats["steps"] - s0}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lin, a, b) = plt.subplots(1, 3, figsize=(16, 4))
    rows = results["linear"]
    lin.plot([int(r) for r in rows], [r["layers_gflops"] for r in rows.values()], marker="o", label="layers")
    lin.plot([int(r) for r in rows], [r["lm_head_gflops"] for r in rows.values()], marker="o", label="lm head")
    lin.set_xscale("log")
    lin.set_xlabel("rows")
    lin.set_ylabel("linear GFLOP/s")
    lin.legend()
    pre = results["prefill_tok_s"]
    a.bar([str(n) for n in pre], list(pre.values()))
    a.set_xlabel("prompt tokens (one sequence)")
    a.set_ylabel("prefill tokens/s")
    for ctx, rows in results["decode_ms"].items():
        for path_name in ("plain", "shared", "vllm"):
            if all(path_name in r for r in rows.values()):
                b.plot([int(x) for x in rows], [r[path_name] for r in rows.values()], marker="o", label=f"ctx {ctx}, {path_name}")
    b.set_xlabel("batch")
    b.set_ylabel("decode step ms (forward + logits)")
    b.legend()
    fig.suptitle(f"builtin engine, SmolLM2-135M, {results['dtype']}, {results['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def bench_model(args: argparse.Namespace, dtype: torch.dtype, results: dict) -> None:
    """Prefill and decode of the model alone, on the calling thread."""
    t = time.perf_counter()
    loaded = load_gguf(default_model_path())
    load_s = time.perf_counter() - t
    model = LlamaModel(loaded.config, loaded.weights, dtype=dtype)
    del loaded
    print(f"model {default_model_path().rsplit('/', 1)[-1]}  {args.dtype}  threads={torch.get_num_threads()}  load {load_s:.2f} s")
    paged = isinstance(allocate_kv_cache(model.config, 1, BS, dtype=dtype), VllmKVCache)
    results["engine_pool"] = "vllm" if paged else "torch"
    print("the engine's pool: " + ("vLLM's block layout, vLLM's paged kernel" if paged else "token-major, torch's paths (no vLLM here)"))

    print("\nlinear layers (the 30 layers' projections, then the lm head): ms (GFLOP/s)")
    print(f"{'rows':>6} {'layers':>18} {'lm head':>16}")
    for rows in (1, 8, 32, 256, 2048):
        r = bench_linear(model, rows, repeats=3)
        results["linear"][rows] = r
        print(f"{rows:>6} {r['layers_ms']:>9.1f} ({r['layers_gflops']:>5.0f}) {r['lm_head_ms']:>7.1f} ({r['lm_head_gflops']:>5.0f})")

    print("\nprefill (one fresh sequence, the engine's pool)")
    print(f"{'tokens':>8} {'tok/s':>8}")
    for n in (128, 512, 2048):
        rate = bench_prefill(model, n, repeats=3)
        results["prefill_tok_s"][n] = rate
        print(f"{n:>8} {rate:>8.0f}")

    for prefix in (224, 992):  # contexts of ~256 and ~1024 tokens (prefix + 32 own tokens)
        kv, tables = setup_shared(model, prefix, 32, args.steps + 1, paged=False)
        kv_paged = setup_shared(model, prefix, 32, args.steps + 1, paged=True)[0] if paged else None
        ctx = prefix + SUFFIX
        results["decode_ms"][ctx] = {}
        print(f"\ndecode step (forward + logits), ctx ~{ctx}, a {prefix}-token prefix shared by the batch: ms (tokens/s)")
        print(f"{'B':>4} {'torch plain':>16} {'torch cascade':>16} {'vLLM kernel':>16}")
        for b in (1, 8, 32):
            row = {"plain": bench_decode(model, kv, tables, ctx, b, args.steps, shared=False)}
            row["shared"] = bench_decode(model, kv, tables, ctx, b, args.steps, shared=True)
            if kv_paged is not None:
                row["vllm"] = bench_decode(model, kv_paged, tables, ctx, b, args.steps, shared=False)
            results["decode_ms"][ctx][b] = row
            print(f"{b:>4}" + "".join(f" {ms:>7.1f} ({b / ms * 1000:>6.0f})" for ms in row.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "model_speed_{dtype}.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)

    results: dict = {"dtype": args.dtype, "threads": torch.get_num_threads(), "linear": {}, "prefill_tok_s": {}, "decode_ms": {}}
    # On a thread of its own that ends before the engine starts: with libgomp, each thread that
    # ran parallel torch ops keeps an OpenMP pool, and two pools slow every step of the engine's
    # thread (see BuiltinEngine._run); the pool goes away with its thread.
    on_own_thread(lambda: bench_model(args, dtype, results))

    split = bench_engine_split(dtype)
    results["engine_split"] = split
    print(
        f"\nengine, 32 unique 256-token prompts -> 16 tokens: {split['wall_s']:.2f} s wall, "
        f"{split['forward_s']:.2f} s in the model ({split['forward_s'] / split['wall_s']:.0%}), {split['steps']} steps"
    )
    write_results(results, args.out.format(dtype=args.dtype), plot)


if __name__ == "__main__":
    main()
