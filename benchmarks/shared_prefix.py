"""Shared-prefix and zero-hit benchmarks on the builtin engine (prefix caching on vs off).

Shared prefix: SGLang's generated-shared-prefix workload. G groups x P prompts; each prompt is
the group's system prompt (L random tokens) followed by its own question (Q random tokens);
O greedy output tokens each, EOS ignored. All prompts are submitted at once.
Zero-hit: unique random prompts: what prefix caching costs when nothing can be reused.

Both configurations run on the same loaded weights in one process, so ratios compare like with
like. Hardware-independent figures come first: prompt tokens computed per prompt token (and
the optimum), prefix-cache hit rate; then wall time, TTFT p50/p99 and output tokens/s.

    python benchmarks/shared_prefix.py            # headline: 1 x 32, L=1024, Q=32, O=16
    python benchmarks/shared_prefix.py --quick    # a small run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass

from tqdm import tqdm

from parrot_core.engines.base import SamplingParams
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine, load_model
from parrot_core.engines.builtin.model import LlamaModel


@dataclass
class Result:
    workload: str
    prefix_caching: bool
    requests: int
    prompt_tokens: int
    prompt_tokens_computed: int
    optimum_computed: int
    hit_rate: float
    wall_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    output_tokens: int
    output_tok_per_s: float
    model_s: float  # time inside the model's forward passes
    other_s: float  # everything else: scheduling, hashing, bookkeeping, sampling

    @property
    def computed_per_prompt_token(self) -> float:
        return self.prompt_tokens_computed / self.prompt_tokens


def shared_prefix_prompts(groups: int, per_group: int, system_len: int, question_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    tokens = lambda n: [rng.randrange(100, vocab) for _ in range(n)]  # noqa: E731 - skip special ids
    prompts = []
    for _ in range(groups):
        system = tokens(system_len)
        prompts.extend(system + tokens(question_len) for _ in range(per_group))
    return prompts


async def run_workload(engine: BuiltinEngine, prompts: list[list[int]], output_len: int, label: str) -> tuple[float, list[float], int]:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    bar = tqdm(total=len(prompts), desc=label, unit="req", leave=False)
    start = time.perf_counter()

    async def one(cid: int, tokens: list[int]) -> tuple[float, int]:
        await engine.fill(cid, None, tokens)
        first, produced = None, 0
        async for delta in engine.generate(cid, None, params):
            if first is None and delta.token_ids:
                first = time.perf_counter() - start
            produced += len(delta.token_ids)
        engine.free_context(cid)
        bar.update(1)
        return first or 0.0, produced

    results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - start
    bar.close()
    return wall, [r[0] for r in results], sum(r[1] for r in results)


def measure(model: LlamaModel, tokenizer, name: str, workload: str, prompts: list[list[int]], output_len: int, caching: bool, optimum: int, blocks: int) -> Result:
    config = EngineConfig(enable_prefix_caching=caching, num_kv_blocks=blocks)
    engine = BuiltinEngine(model, tokenizer, config, name)
    try:
        wall, ttfts, produced = asyncio.run(run_workload(engine, prompts, output_len, f"{workload} caching={'on' if caching else 'off'}"))
        engine.wait_idle()
        info = engine.runtime_info()
    finally:
        engine.close()
    ttfts.sort()
    return Result(
        workload=workload,
        prefix_caching=caching,
        requests=len(prompts),
        prompt_tokens=sum(map(len, prompts)),
        prompt_tokens_computed=info.prompt_tokens_computed,
        optimum_computed=optimum,
        hit_rate=info.prefix_cache_hits / info.prefix_cache_queries if info.prefix_cache_queries else 0.0,
        wall_s=wall,
        ttft_p50_s=statistics.median(ttfts),
        ttft_p99_s=ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        output_tokens=produced,
        output_tok_per_s=produced / wall,
        model_s=info.extra["forward_seconds"],
        other_s=wall - info.extra["forward_seconds"],
    )


def print_table(results: list[Result]) -> None:
    header = f"{'workload':14}{'caching':>8}{'reqs':>6}{'prompt tok':>11}{'computed':>10}{'optimum':>9}{'comp/prompt':>12}{'hit rate':>9}{'wall s':>8}{'TTFT p50':>9}{'TTFT p99':>9}{'out tok/s':>10}{'model s':>9}{'other s':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.workload:14}{'on' if r.prefix_caching else 'off':>8}{r.requests:>6}{r.prompt_tokens:>11,}{r.prompt_tokens_computed:>10,}"
            f"{r.optimum_computed:>9,}{r.computed_per_prompt_token:>12.3f}{r.hit_rate:>9.1%}{r.wall_s:>8.1f}{r.ttft_p50_s:>9.2f}{r.ttft_p99_s:>9.2f}{r.output_tok_per_s:>10.1f}{r.model_s:>9.2f}{r.other_s:>9.2f}"
        )
    by = {(r.workload, r.prefix_caching): r for r in results}
    for workload in dict.fromkeys(r.workload for r in results):
        on, off = by.get((workload, True)), by.get((workload, False))
        if on and off:
            print(
                f"{workload}: caching on takes {on.wall_s / off.wall_s:.3f}x the wall time of caching off;"
                f" time outside the model: {on.other_s:.2f} s vs {off.other_s:.2f} s"
            )


def plot(results: list[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r.workload for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    for ax, metric, title in (
        (axes[0], lambda r: r.computed_per_prompt_token, "prompt tokens computed / prompt token"),
        (axes[1], lambda r: r.wall_s, "wall time (s)"),
    ):
        for k, caching in enumerate((False, True)):
            values = [next((metric(r) for r in results if r.workload == w and r.prefix_caching == caching), 0) for w in workloads]
            xs = [i + (k - 0.5) * width for i in range(len(workloads))]
            ax.bar(xs, values, width, label=f"prefix caching {'on' if caching else 'off'}")
        ax.set_xticks(range(len(workloads)), workloads)
        ax.set_title(title)
        ax.legend()
    fig.suptitle("parrot-core builtin engine, SmolLM2-135M float32, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list[Result]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="llama GGUF file (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--prompts-per-group", type=int, default=32)
    ap.add_argument("--system-len", type=int, default=1024)
    ap.add_argument("--question-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--zero-hit-prompts", type=int, default=16)
    ap.add_argument("--zero-hit-len", type=int, default=256)
    ap.add_argument("--num-kv-blocks", type=int, default=None, help="default: enough for every request unshared")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workloads", default="shared_prefix,zero_hit", help="comma-separated subset to run")
    ap.add_argument("--quick", action="store_true", help="a small run (1 x 8, L=256, Q=16, O=8)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts_per_group, args.system_len, args.question_len, args.output_len = 8, 256, 16, 8
        args.zero_hit_prompts, args.zero_hit_len = 4, 128

    model, loaded = load_model(args.model)
    vocab = loaded.config.vocab_size
    shared = shared_prefix_prompts(args.groups, args.prompts_per_group, args.system_len, args.question_len, vocab, args.seed)
    optimum = args.groups * (args.system_len + args.prompts_per_group * args.question_len)
    unique = shared_prefix_prompts(args.zero_hit_prompts, 1, args.zero_hit_len, 0, vocab, args.seed + 1)

    def blocks_for(prompts: list[list[int]]) -> int:
        return args.num_kv_blocks or sum(-(-(len(p) + args.output_len) // 16) for p in prompts) + 16

    workloads = {"shared_prefix": (shared, optimum), "zero_hit": (unique, sum(map(len, unique)))}
    results = []
    for name in args.workloads.split(","):
        prompts, best = workloads[name]
        for caching in (True, False):
            results.append(measure(model, loaded.tokenizer, loaded.model_name, name, prompts, args.output_len, caching, best, blocks_for(prompts)))
    results.sort(key=lambda r: (r.workload, not r.prefix_caching))
    print_table(results)

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "shared_prefix" if args.workloads == "shared_prefix,zero_hit" else args.workloads.replace(",", "_"))
    with open(stem + ".json", "w") as f:
        json.dump({"args": vars(args), "results": [asdict(r) | {"computed_per_prompt_token": r.computed_per_prompt_token} for r in results]}, f, indent=2)
    plot(results, stem + ".png")
    print(f"wrote {stem}.json and {stem}.png")
    return results


if __name__ == "__main__":
    main()
