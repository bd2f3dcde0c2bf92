"""Programs benchmark: map-reduce and chain summarization of real documents.

Three ways to run the same LLM calls, on the same weights, in one process:
- parrot-core: semantic functions; values flow between calls inside the core, shared
  instructions are filled once into shared contexts, the map stage is one task group;
- one-by-one, caching off: each call's full prompt sent as an independent `generate()`
  (how a client library without a serving core runs a program); map calls concurrently;
- one-by-one, caching on: the same, with the engine's automatic prefix caching.

Hardware-independent figures first (prompt tokens computed per prompt token), then wall time.
The documents are the documentation strings of standard Python modules (no downloads).

    python benchmarks/programs.py [--chunks 6] [--words 120]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import parrot_core as P  # noqa: E402
import chain_summary  # noqa: E402
import map_reduce  # noqa: E402
from _texts import chunks  # noqa: E402
from parrot_core.engines.builtin.config import EngineConfig  # noqa: E402
from parrot_core.engines.builtin.engine import BuiltinEngine, load_model  # noqa: E402
from parrot_core.graph import Parameter, RequestMetadata  # noqa: E402

# The examples' prompts; every call here generates the same 32 greedy tokens (OUT).
MAP_TEMPLATE = map_reduce.summarize.template
REFINE_TEMPLATE = chain_summary.refine.template
OUT = dict(max_tokens=32, temperature=0.0)


def render(template: str, **values: str) -> str:
    for k, v in values.items():
        template = template.replace("{{" + k + "}}", v)
    return template.split("{{summary}}")[0]


@dataclass
class Result:
    program: str
    method: str
    calls: int
    prompt_tokens: int
    prompt_tokens_computed: int
    output_tokens: int
    wall_s: float

    @property
    def computed_per_prompt_token(self) -> float:
        return self.prompt_tokens_computed / self.prompt_tokens


def make_functions():
    def summarize(text: P.Input, summary: P.Output(**OUT)):
        pass

    def refine(previous: P.Input, text: P.Input, summary: P.Output(**OUT)):
        pass

    summarize.__doc__, refine.__doc__ = MAP_TEMPLATE, REFINE_TEMPLATE
    return P.semantic_function()(summarize), P.semantic_function()(refine)


def reduce_template(n: int) -> str:
    listed = "\n".join(f"{i + 1}. {{{{s{i}}}}}" for i in range(n))
    return (
        "<|im_start|>system\nYou combine partial summaries into one overview of two sentences.<|im_end|>\n"
        f"<|im_start|>user\nPartial summaries:\n{listed}\nWrite the overview.<|im_end|>\n<|im_start|>assistant\n{{{{summary}}}}"
    )


def run_parrot(rt: P.Runtime, program: str, parts: list[str], bar: tqdm) -> tuple[int, list[str]]:
    summarize, refine = make_functions()
    if program == "map_reduce":
        maps = [summarize.invoke(rt, p) for p in parts]
        params = [Parameter(f"s{i}", var_id=m.id) for i, m in enumerate(maps)]
        params.append(Parameter("summary", is_output=True, sampling=OUT))
        final = rt.submit_call(reduce_template(len(parts)), params, {}, RequestMetadata())["summary"]
        final.get(P.LATENCY)
        bar.update(len(parts) + 1)
        return len(parts) + 1, [m.get() for m in maps] + [final.get()]
    s = summarize.invoke(rt, parts[0])
    for p in parts[1:]:
        s = refine.invoke(rt, s, p)
    s.get(P.LATENCY)
    bar.update(len(parts))
    return len(parts), [s.get()]


def parrot_prompt_tokens(rt: P.Runtime) -> int:
    """What the calls' prompts add up to (each call's whole prompt, as a client would send it)."""
    return rt.session.executor.prompt_tokens


def run_one_by_one(rt: P.Runtime, program: str, parts: list[str], bar: tqdm) -> tuple[int, int]:
    prompt_tokens = 0

    def call(prompt: str) -> str:
        nonlocal prompt_tokens
        out = rt.generate(prompt, **OUT)
        prompt_tokens += out.prompt_tokens
        bar.update(1)
        return out.text

    if program == "map_reduce":
        async def maps() -> list[str]:  # a client library sends the map calls concurrently
            outs = await asyncio.gather(*(rt.agenerate(render(MAP_TEMPLATE, text=p), **OUT) for p in parts))
            return [o.text for o in outs], sum(o.prompt_tokens for o in outs)

        texts, tokens = asyncio.run(maps())
        prompt_tokens += tokens
        bar.update(len(parts))
        reduce_prompt = reduce_template(len(parts))
        for i, t in enumerate(texts):
            reduce_prompt = reduce_prompt.replace("{{s%d}}" % i, t)
        call(reduce_prompt.split("{{summary}}")[0])
        return len(parts) + 1, prompt_tokens
    summary = call(render(MAP_TEMPLATE, text=parts[0]))
    for p in parts[1:]:
        summary = call(render(REFINE_TEMPLATE, previous=summary, text=p))
    return len(parts), prompt_tokens


def main(argv: list[str] | None = None) -> list[Result]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--words", type=int, default=120)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    parts = chunks(words_per_chunk=args.words, limit=args.chunks)

    model, loaded = load_model()

    def runtime(caching: bool) -> P.Runtime:
        engine = BuiltinEngine(model, loaded.tokenizer, EngineConfig(enable_prefix_caching=caching, kv_cache_memory_gb=0.5), loaded.model_name)
        return P.Runtime(engine=engine)

    results: list[Result] = []
    total_calls = 2 * 3 * (len(parts) + 1)
    with tqdm(total=total_calls, desc="programs", unit="call") as bar:
        for program in ("map_reduce", "chain"):
            for method in ("one-by-one, caching off", "one-by-one, caching on", "parrot-core"):
                rt = runtime(caching=method != "one-by-one, caching off")
                start = time.perf_counter()
                if method == "parrot-core":
                    calls, _ = run_parrot(rt, program, parts, bar)
                    prompt_tokens = parrot_prompt_tokens(rt)
                else:
                    calls, prompt_tokens = run_one_by_one(rt, program, parts, bar)
                wall = time.perf_counter() - start
                stats = rt.stats()
                rt.close()
                results.append(Result(program, method, calls, prompt_tokens, stats["prompt_tokens_computed"], stats["generation_tokens"], wall))

    print(f"\n{'program':12}{'method':26}{'calls':>6}{'prompt tok':>11}{'computed':>10}{'comp/prompt':>12}{'out tok':>8}{'wall s':>8}")
    for r in results:
        print(f"{r.program:12}{r.method:26}{r.calls:>6}{r.prompt_tokens:>11,}{r.prompt_tokens_computed:>10,}{r.computed_per_prompt_token:>12.3f}{r.output_tokens:>8}{r.wall_s:>8.1f}")
    for program in ("map_reduce", "chain"):
        by = {r.method: r for r in results if r.program == program}
        base = by["one-by-one, caching off"].wall_s
        print(f"{program}: parrot-core {base / by['parrot-core'].wall_s:.2f}x faster than one-by-one without caching, "
              f"{by['one-by-one, caching on'].wall_s / by['parrot-core'].wall_s:.2f}x vs one-by-one with caching")

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "programs")
    with open(stem + ".json", "w") as f:
        json.dump({"args": vars(args), "results": [asdict(r) | {"computed_per_prompt_token": r.computed_per_prompt_token} for r in results]}, f, indent=2)
    plot(results, stem + ".png")
    print(f"wrote {stem}.json and {stem}.png")
    return results


def plot(results: list[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    programs = ["map_reduce", "chain"]
    methods = list(dict.fromkeys(r.method for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(methods)
    for ax, metric, title in (
        (axes[0], lambda r: r.computed_per_prompt_token, "prompt tokens computed / prompt token"),
        (axes[1], lambda r: r.wall_s, "wall time (s)"),
    ):
        for k, method in enumerate(methods):
            values = [next(metric(r) for r in results if r.program == p and r.method == method) for p in programs]
            ax.bar([i + (k - (len(methods) - 1) / 2) * width for i in range(len(programs))], values, width, label=method)
        ax.set_xticks(range(len(programs)), programs)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("Programs on SmolLM2-135M (CPU): parrot-core vs one call at a time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
