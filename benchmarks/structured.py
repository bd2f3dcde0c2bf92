"""Cost of structured output: decode tokens/s with and without a JSON schema, at batch 1 and 32.

Runs `Runtime.generate` over a model with the real vocabulary and tokenizer (49152 tokens, so
the grammar masks are full size): by default a tiny random Llama (the model is cheap, so the
mask's cost shows; an upper bound on the relative slowdown), with `--real` the default model.
The schema's strings are unbounded, so constrained rows run to max_tokens like free ones.
Prints a table and writes JSON (--out).

    python benchmarks/structured.py [--real] [--max-tokens 64] [--out structured.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from model_speed import on_own_thread  # a sibling script (benchmarks/ is on the path)
from parrot_core import Runtime
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine, load_model
from parrot_core.engines.builtin.model import LlamaConfig, LlamaModel

SCHEMA = {
    "type": "object",
    "properties": {"notes": {"type": "array", "items": {"type": "string"}}, "score": {"type": "integer"}},
    "required": ["notes", "score"],
}


def run(rt: Runtime, batch: int, max_tokens: int, constrained: bool) -> dict[str, float]:
    prompts = [f"Write notes number {i} as JSON:" for i in range(batch)]
    extra = {"json_schema": SCHEMA} if constrained else {"ignore_eos": True}
    rt.generate(prompts[:1], max_tokens=4, temperature=1.0, seed=0, **extra)  # warm-up (grammar compiled)
    start = time.perf_counter()
    outs = rt.generate(prompts, max_tokens=max_tokens, temperature=1.0, seed=0, **extra)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return {"batch": batch, "json_schema": constrained, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="the default model instead of a tiny random one")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="structured.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # built off this thread: a thread that ran parallel torch ops keeps an OpenMP pool of its
    # own, which would slow every step of the engine's thread (see BuiltinEngine._run)
    model, loaded = load_model()
    if not args.real:
        config = LlamaConfig(
            vocab_size=loaded.config.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=1024,
        )
        built: list[LlamaModel] = []
        on_own_thread(lambda: built.append(LlamaModel.random(config, seed=0, dtype=torch.float32)))
        model = built[0]
    rt = Runtime(engine=BuiltinEngine(model, loaded.tokenizer, EngineConfig(num_kv_blocks=1024, max_num_seqs=64), "bench"))
    try:
        rows = [run(rt, b, args.max_tokens, c) for b in (1, 32) for c in (False, True)]
    finally:
        rt.close()
    print(f"model: {'default (real)' if args.real else 'tiny random, real vocabulary'}; max_tokens {args.max_tokens}")
    print(f"{'batch':>5} {'json_schema':>11} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'vs free':>8}")
    for row in rows:
        free = next(r for r in rows if r["batch"] == row["batch"] and not r["json_schema"])
        row["relative"] = row["tokens_per_s"] / free["tokens_per_s"]
        print(f"{row['batch']:>5} {str(row['json_schema']):>11} {row['tokens']:>7} {row['seconds']:>8.3f} {row['tokens_per_s']:>9.1f} {row['relative']:>8.2f}")
    with open(args.out, "w") as f:
        json.dump({"model": "real" if args.real else "tiny", "max_tokens": args.max_tokens, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
