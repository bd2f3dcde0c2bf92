"""Speed of the builtin engine's model on the default model (float32, CPU).

Prints prefill throughput and decode step times (forward + logits + argmax) at a context of
about 1056 tokens: B sequences that share a 1024-token prefix (the same KV blocks) plus 32 own
tokens each, with the plain paged path and with the shared-prefix (cascade) path.

    python benchmarks/model_speed.py [--threads 2] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from parrot_core.engines.builtin.default_model import default_model_path
from parrot_core.engines.builtin.gguf_loader import load_gguf
from parrot_core.engines.builtin.model import ForwardBatch, KVCache, LlamaModel

BS = 16
PREFIX, SUFFIX = 1024, 32


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_prefill(model: LlamaModel, length: int, repeats: int) -> float:
    kv = KVCache.allocate(model.config, -(-length // BS), BS)
    tokens = torch.randint(0, model.config.vocab_size, (length,)).tolist()
    batch = ForwardBatch.build([tokens], [length], [list(range(kv.num_blocks))], BS)
    return length / timed(lambda: model.compute_logits(model.forward(batch, kv)), repeats)


def setup_shared(model: LlamaModel, num_seqs: int, max_steps: int):
    """KV holding a 1024-token prefix shared by `num_seqs` sequences, each with 32 own tokens."""
    own_blocks = -(-(SUFFIX + max_steps + 1) // BS)
    n_prefix = PREFIX // BS
    kv = KVCache.allocate(model.config, n_prefix + num_seqs * own_blocks, BS)
    vocab = model.config.vocab_size
    prefix = torch.randint(0, vocab, (PREFIX,)).tolist()
    shared = list(range(n_prefix))
    model.forward(ForwardBatch.build([prefix], [PREFIX], [shared], BS), kv)
    tables = [shared + list(range(n_prefix + i * own_blocks, n_prefix + (i + 1) * own_blocks)) for i in range(num_seqs)]
    suffixes = [torch.randint(0, vocab, (SUFFIX,)).tolist() for _ in range(num_seqs)]
    model.forward(ForwardBatch.build(suffixes, [PREFIX + SUFFIX] * num_seqs, tables, BS), kv)
    return kv, tables


def bench_decode(model: LlamaModel, kv: KVCache, tables: list[list[int]], batch: int, steps: int, shared: bool) -> float:
    model.enable_shared_prefix = shared
    # force the path under test (the defaults would pick plain for B=1)
    model.shared_prefix_min_batch, model.shared_prefix_min_tokens, model.shared_prefix_min_work = 1, BS, 0
    ctx = PREFIX + SUFFIX
    times = []
    for s in range(steps + 1):  # step 0 is a warm-up
        fb = ForwardBatch.build([[1]] * batch, [ctx + s + 1] * batch, tables[:batch], BS)
        plan = model._plan(fb, BS)
        assert bool(plan.shared) == shared
        t = time.perf_counter()
        model.compute_logits(model.forward(fb, kv)).argmax(-1).tolist()
        if s:
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    t = time.perf_counter()
    loaded = load_gguf(default_model_path())
    load_s = time.perf_counter() - t
    model = LlamaModel(loaded.config, loaded.weights)
    del loaded
    print(f"model {default_model_path().rsplit('/', 1)[-1]}  float32  threads={torch.get_num_threads()}  load {load_s:.2f} s")

    print("\nprefill (one fresh sequence)")
    print(f"{'tokens':>8} {'tok/s':>8}")
    for n in (128, 512):
        print(f"{n:>8} {bench_prefill(model, n, repeats=3):>8.0f}")

    kv, tables = setup_shared(model, 32, args.steps + 1)
    print(f"\ndecode step (forward + logits), ctx ~{PREFIX + SUFFIX}, {PREFIX}-token prefix shared by the batch")
    print(f"{'B':>4} {'plain ms':>9} {'shared ms':>10} {'speedup':>8} {'plain tok/s':>12} {'shared tok/s':>13}")
    for b in (1, 8, 32):
        plain = bench_decode(model, kv, tables, b, args.steps, shared=False)
        casc = bench_decode(model, kv, tables, b, args.steps, shared=True)
        print(f"{b:>4} {plain:>9.1f} {casc:>10.1f} {plain / casc:>7.2f}x {b / plain * 1000:>12.1f} {b / casc * 1000:>13.1f}")


if __name__ == "__main__":
    main()
