"""Placement over several engines: prefix affinity vs load alone (issue 11, several engines).

Workload: G groups x P requests; each prompt is its group's system prompt (L random tokens) and
its own question (Q tokens); O greedy output tokens, EOS ignored; the requests arrive in a
shuffled order, in waves of W at once, through `Runtime.generate` (plain requests: no
serve-layer contexts, so what places a request by its prefix is `PrefixAffinity`).

Configurations, on the same loaded weights (one `LlamaModel` shared by the engines):
- one builtin engine;
- two builtin engines, the global scheduler as it is (prefix affinity, then load);
- two builtin engines with prefix affinity switched off (placement by load alone).

The hardware-independent figure is prompt tokens computed per prompt token sent (the optimum:
each system prompt computed once per engine that runs it); with two engines on this 2-core
machine both share the same cores, so wall time shows overhead, not scale-out.

    python benchmarks/placement.py            # G=4, P=8, L=384, Q=32, O=4, W=8
    python benchmarks/placement.py --quick
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import time
from dataclasses import asdict, dataclass

from tqdm import tqdm

import parrot_core as P
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import load_model
from parrot_core.engines.builtin.model import LlamaModel


@dataclass
class Result:
    config: str
    engines: int
    requests: int
    prompt_tokens: int
    prompt_tokens_computed: int
    optimum_one_engine: int  # every system prompt computed once
    computed_per_engine: dict[str, int]
    groups_split: int  # groups whose requests ran on more than one engine
    wall_s: float

    @property
    def computed_per_prompt_token(self) -> float:
        return self.prompt_tokens_computed / self.prompt_tokens


def prompts_of(groups: int, per_group: int, system_len: int, question_len: int, vocab: int, seed: int) -> list[tuple[int, list[int]]]:
    rng = random.Random(seed)
    tokens = lambda n: [rng.randrange(100, vocab) for _ in range(n)]  # noqa: E731 - skip special ids
    out = []
    for g in range(groups):
        system = tokens(system_len)
        out.extend((g, system + tokens(question_len)) for _ in range(per_group))
    rng.shuffle(out)
    return out


def measure(name: str, loaded, model: LlamaModel, engines: int, affinity: bool, work: list[tuple[int, list[int]]], args) -> Result:
    made = [P.BuiltinEngine(model, loaded.tokenizer, EngineConfig(num_kv_blocks=args.blocks), loaded.model_name) for _ in range(engines)]
    rt = P.Runtime(engines=made)
    scheduler = rt.core.scheduler
    # benchmark-only instrumentation: which engines each group's prompts went to (a prompt's
    # first chunk key names its group's system prompt), and, for "load only", no prefix matches
    groups: dict[int, set] = {}
    record = scheduler.affinity.record

    def observe(engine_id, keys) -> None:  # noqa: ANN001
        if keys:
            groups.setdefault(keys[0], set()).add(engine_id)
        record(engine_id, keys)

    scheduler.affinity.record = observe
    if not affinity:
        scheduler.affinity.match = lambda keys: {}
    try:
        before = {eid: e["info"].prompt_tokens_computed for eid, e in rt.engine_stats().items()}
        bar = tqdm(total=len(work), desc=name, unit="req", leave=False)
        start = time.perf_counter()

        def one(ids: list[int]) -> None:
            rt.generate(ids, max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
            bar.update(1)

        with concurrent.futures.ThreadPoolExecutor(args.wave) as pool:
            for i in range(0, len(work), args.wave):
                list(pool.map(one, [ids for _, ids in work[i : i + args.wave]]))
        wall = time.perf_counter() - start
        bar.close()
        computed = {eid: e["info"].prompt_tokens_computed - before[eid] for eid, e in rt.engine_stats().items()}
    finally:
        rt.close()
    return Result(
        config=name,
        engines=engines,
        requests=len(work),
        prompt_tokens=sum(len(ids) for _, ids in work),
        prompt_tokens_computed=sum(computed.values()),
        optimum_one_engine=args.groups * args.system_len + len(work) * args.question_len,
        computed_per_engine=computed,
        groups_split=sum(1 for used in groups.values() if len(used) > 1),
        wall_s=wall,
    )


def print_table(results: list[Result]) -> None:
    header = f"{'configuration':34}{'prompt tok':>11}{'computed':>10}{'optimum':>9}{'comp/prompt':>12}{'groups split':>13}{'per engine':>24}{'wall s':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        per = "/".join(f"{v:,}" for v in r.computed_per_engine.values())
        print(
            f"{r.config:34}{r.prompt_tokens:>11,}{r.prompt_tokens_computed:>10,}{r.optimum_one_engine:>9,}"
            f"{r.computed_per_prompt_token:>12.3f}{r.groups_split:>13}{per:>24}{r.wall_s:>8.1f}"
        )


def plot(results: list[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r.config for r in results]
    ax.barh(names, [r.computed_per_prompt_token for r in results], color=["#888", "#2a7", "#c55"][: len(results)])
    ax.axvline(results[0].optimum_one_engine / results[0].prompt_tokens, color="k", linestyle="--", label="optimum (one engine)")
    ax.set_xlabel("prompt tokens computed per prompt token sent (lower is better)")
    ax.legend(loc="lower right")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--per-group", type=int, default=8)
    ap.add_argument("--system-len", type=int, default=384)
    ap.add_argument("--question-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=4)
    ap.add_argument("--wave", type=int, default=8, help="requests sent at once")
    ap.add_argument("--blocks", type=int, default=2048, help="KV blocks of each engine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="G=2, P=4, L=256")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "placement.json"))
    args = ap.parse_args()
    if args.quick:
        args.groups, args.per_group, args.system_len = 2, 4, 256
    model, loaded = load_model()
    work = prompts_of(args.groups, args.per_group, args.system_len, args.question_len, loaded.config.vocab_size, args.seed)
    results = [
        measure("one engine", loaded, model, 1, True, work, args),
        measure("two engines, prefix affinity", loaded, model, 2, True, work, args),
        measure("two engines, load only", loaded, model, 2, False, work, args),
    ]
    print_table(results)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "results": [asdict(r) | {"computed_per_prompt_token": r.computed_per_prompt_token} for r in results]}, f, indent=2)
    plot(results, args.out.removesuffix(".json") + ".png")
    print(f"wrote {args.out} and its PNG")


if __name__ == "__main__":
    main()
