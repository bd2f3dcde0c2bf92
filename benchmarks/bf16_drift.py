"""How far each engine's bfloat16 greedy ids drift from float32 ids, on the harness's workloads.

In bfloat16 the two engines' greedy ids differ on some requests (`vs_vllm.py --dtype bfloat16`).
This asks whether one engine's bfloat16 is the less exact one: it runs the same requests on
parrot-core and vLLM's CPU build, each in float32 and in bfloat16 (one worker at a time, as in
`vs_vllm.py`), checks that the two float32 runs agree (the reference), and counts per engine
the bfloat16 requests identical to the reference and the share of generated tokens before a
request's first difference. Greedy, EOS ignored; nothing is timed.

    python benchmarks/bf16_drift.py [--rows 3 4 5] [--draws 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
from datetime import datetime, timezone

from parrot_core.chat.transcript import common_prefix_len

ENGINES = ("parrot", "vllm")


def drift(reference: list[list[int]], got: list[list[int]]) -> dict[str, float]:
    """Requests identical to the reference, and the share of its tokens before each first difference."""
    if len(reference) != len(got):
        raise ValueError(f"{len(got)} outputs for {len(reference)} reference requests")
    tokens = sum(len(r) for r in reference)
    return {
        "requests": len(reference),
        "identical": sum(r == g for r, g in zip(reference, got)),
        "tokens_before_first_difference": sum(common_prefix_len(r, g) for r, g in zip(reference, got)) / max(tokens, 1),
    }


def run_engine(args: argparse.Namespace, engine: str, dtype: str) -> dict[int, list[list[int]]]:
    """Every draw of every row on one freshly started worker: row -> outputs of all its draws."""
    from vs_vllm import WORKLOADS, make_worker  # a sibling script (benchmarks/ is on the path)

    worker = make_worker(args, engine, dtype, f"bf16_drift_{engine}_{dtype}.log")
    print(f"{engine} {dtype}: starting ...", flush=True)
    try:
        worker.wait_ready()
        outputs: dict[int, list[list[int]]] = {}
        for n in args.rows:
            workload = WORKLOADS[n - 1]
            for k in range(args.draws):
                conversations = workload.make(random.Random(args.seed * 1000 + 10 * n + k))
                outputs.setdefault(n, []).extend(worker.run(conversations, workload.max_tokens)["outputs"])
            print(f"    row {n}: {len(outputs[n])} requests", flush=True)
        return outputs
    finally:
        worker.close()


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(results["rows"])
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, engine in enumerate(ENGINES):
        values = [results["rows"][n][engine]["tokens_before_first_difference"] for n in rows]
        ax.bar([x + 0.4 * i for x in range(len(rows))], values, width=0.4, label=f"{engine} bfloat16")
    ax.set_xticks([x + 0.2 for x in range(len(rows))], [f"row {n}" for n in rows])
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of float32 ids before the first difference")
    ax.set_title(f"bfloat16 drift from float32 greedy ids ({results['date']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from vs_vllm import RESULTS, ROOT, WORKLOADS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="*", default=[3, 4, 5], help="workload rows of vs_vllm.py")
    ap.add_argument("--draws", type=int, default=2, help="random draws of each row")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--kv-gb", type=float, default=2.0)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--vllm-venv", default=os.path.join(ROOT, ".venv-vllm"))
    ap.add_argument("--out", default=os.path.join(RESULTS, "bf16_drift.json"))
    args = ap.parse_args()
    if args.draws < 1 or not args.rows or any(not 1 <= n <= len(WORKLOADS) for n in args.rows):
        ap.error(f"--draws must be at least 1 and --rows between 1 and {len(WORKLOADS)}")

    runs = {(engine, dtype): run_engine(args, engine, dtype) for engine in ENGINES for dtype in ("float32", "bfloat16")}
    results: dict = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "draws": args.draws, "rows": {}}
    print(f"\n| row | float32: parrot-core = vLLM | {' | '.join(f'{e} bfloat16: identical / tokens before 1st diff' for e in ENGINES)} |")
    print("|---|---|" + "---|" * len(ENGINES))
    for n in args.rows:
        reference = runs[("parrot", "float32")][n]
        row = {"float32_agree": drift(reference, runs[("vllm", "float32")][n])}
        row.update({engine: drift(reference, runs[(engine, "bfloat16")][n]) for engine in ENGINES})
        results["rows"][n] = row
        agree = row["float32_agree"]
        cells = [f"{row[e]['identical']}/{row[e]['requests']}, {row[e]['tokens_before_first_difference']:.0%}" for e in ENGINES]
        print(f"| {n} | {agree['identical']}/{agree['requests']} | {' | '.join(cells)} |")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    png = os.path.splitext(args.out)[0] + ".png"
    plot(results, png)
    print(f"\nwrote {args.out} and {png}")


if __name__ == "__main__":
    main()
