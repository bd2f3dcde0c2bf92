"""Many agents on few slots: KV-based vs text-based vs recompute-from-scratch switching vs FIFO.

A agents (distinct prompts of about P tokens) each generate O greedy tokens (EOS ignored) on
an engine that runs S sequences at once (`max_num_seqs`). Four ways to share the S slots:

- KV-based switching: `rt.round_robin(..., token_quantum=Q)`: each agent runs Q tokens, is
  suspended with its KV kept, and the next one takes the slot; a resume computes nothing again.
- text-based switching: the same round robin on an `OpenAIEngine` against parrot-core's own
  OpenAI-compatible server (in this process, over the same engine configuration, prefix
  caching on): a turn is one streamed request; a resume re-sends the prompt plus the text so
  far and the server's prefix cache supplies the full blocks it still holds. Its figures are
  the served engine's.
- recompute-from-scratch switching: the same turns, but a turn after the first re-sends the
  prompt plus the output so far (as token ids) as a fresh prompt, with prefix caching off:
  what a switch costs when no KV is kept (AIOS's behaviour: "the saved KV is never fed back").
- FIFO: every agent submitted at once as a plain generation; the engine runs S at a time, in
  arrival order, each to its end.

Figures: prompt tokens computed again (the engine's `prompt_tokens_computed` beyond each
prompt's first prefill and the one pending token each resume computes, which an uninterrupted
run computes as a decode), time to finish everything, time to first token of the last agent
(and the mean), and fairness: Jain's index of per-agent progress sampled over the run (1 = all
agents equally far along) and, for the round-robin modes, per round the fewest and most tokens
an agent added. The outputs are also compared token for token (text-based: the client's
re-tokenization of the streamed text).

    python benchmarks/switching.py            # 16 agents, 4 slots, P~48, O=64, Q=16
    python benchmarks/switching.py --quick    # 8 agents, 2 slots, O=24, Q=8
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import parrot_core as P  # noqa: E402
from _texts import chunks  # noqa: E402
from parrot_core.engines.builtin.config import EngineConfig  # noqa: E402
from parrot_core.engines.builtin.engine import BuiltinEngine, load_model  # noqa: E402
from parrot_core.engines.builtin.model import LlamaModel  # noqa: E402
from parrot_core.engines.openai import OpenAIEngine  # noqa: E402
from parrot_core.server.app import create_app  # noqa: E402
from parrot_core.server.server import Server  # noqa: E402
from parrot_core.server.settings import ServeSettings  # noqa: E402

KV = "KV-based switching"
TEXT = "text-based switching"
RECOMPUTE = "recompute from scratch"
FIFO = "FIFO (no switching)"
MODES = (KV, TEXT, RECOMPUTE, FIFO)
SAMPLES = 20  # progress snapshots for the fairness index


@dataclass
class Run:
    mode: str
    wall_s: float
    prompt_tokens: int  # the agents' prompts, once each
    prompt_tokens_computed: int  # engine counter over the run
    resumes: int  # turns after an agent's first
    outputs: list[list[int]]
    # per agent, (time, tokens done) points of its progress, in time order: the first is its first token
    progress: list[list[tuple[float, int]]] = field(repr=False)
    rounds: list[dict[str, int]] = field(default_factory=list)  # round-robin: per round min/max tokens

    @property
    def ttft_s(self) -> list[float]:
        """Per agent: its first token, seconds from the start."""
        return [points[0][0] for points in self.progress]

    @property
    def finish_s(self) -> list[float]:
        """Per agent: its last token."""
        return [points[-1][0] for points in self.progress]

    @property
    def recomputed(self) -> int:
        return self.prompt_tokens_computed - self.prompt_tokens - self.resumes

    def jain(self) -> float:
        """Mean over the run of Jain's index of the agents' progress (fraction of O done)."""
        values = []
        for k in range(1, SAMPLES):
            t = self.wall_s * k / SAMPLES
            x = [_done_at(points, t) for points in self.progress]
            if sum(x) > 0:
                values.append(sum(x) ** 2 / (len(x) * sum(v * v for v in x)))
        return statistics.mean(values) if values else 1.0


def _done_at(points: list[tuple[float, int]], t: float) -> float:
    """Tokens an agent had at time t, linearly interpolated between its progress points."""
    done, last_t = 0.0, None  # nothing before the first token
    for pt, tokens in points:
        if pt > t:
            return done if last_t is None else done + (tokens - done) * (t - last_t) / max(pt - last_t, 1e-9)
        done, last_t = float(tokens), pt
    return done


def make_runtime(model: LlamaModel, loaded, slots: int, caching: bool) -> P.Runtime:
    config = EngineConfig(max_num_seqs=slots, enable_prefix_caching=caching, kv_cache_memory_gb=0.25)
    return P.Runtime(engine=BuiltinEngine(model, loaded.tokenizer, config, loaded.model_name))


def run_kv(rt: P.Runtime, prompts: list[list[int]], output_len: int, quantum: int, slots: int, bar: tqdm) -> Run:
    return _round_robin(KV, rt, rt, prompts, output_len, quantum, slots, bar)


def run_text(served: P.Runtime, model_name: str, tokenizer, prompts: list[list[int]], output_len: int, quantum: int, slots: int, bar: tqdm) -> Run:
    """The round robin through an `OpenAIEngine` against `served` behind our own server."""
    settings = ServeSettings(port=0, log_stats_interval=0)
    server = Server(create_app(served, settings), settings, log_level="warning").start_in_thread()
    client = None
    try:
        client = P.Runtime(engine=OpenAIEngine(server.url, model_name, tokenizer=tokenizer, max_num_seqs=slots))
        return _round_robin(TEXT, client, served, prompts, output_len, quantum, slots, bar)
    finally:
        if client is not None:
            client.close()
        server.stop_thread()


def _round_robin(mode: str, rt: P.Runtime, computing: P.Runtime, prompts: list[list[int]], output_len: int, quantum: int, slots: int, bar: tqdm) -> Run:
    """`rt.round_robin`; `computing`: the runtime whose engine does the work (counted)."""
    before = computing.stats()["prompt_tokens_computed"]
    t0 = time.perf_counter()
    result = rt.round_robin(prompts, max_tokens=output_len, token_quantum=quantum, slots=slots, ignore_eos=True, temperature=0.0)
    wall = time.perf_counter() - t0
    computing.engine.wait_idle()
    bar.update(len(prompts))
    progress: list[list[tuple[float, int]]] = [[] for _ in prompts]
    done = [0] * len(prompts)
    for s in sorted(result.slices, key=lambda s: s.end):
        if s.first_token is not None:
            progress[s.agent].append((s.first_token, done[s.agent] + 1))
        done[s.agent] += s.tokens
        progress[s.agent].append((s.end, done[s.agent]))
    computed = computing.stats()["prompt_tokens_computed"] - before
    outputs = [o.token_ids for o in result.outputs]
    return Run(mode, wall, sum(map(len, prompts)), computed, len(result.slices) - len(prompts), outputs, progress, _round_spread(result.rounds()))


def _round_spread(rounds: list[dict[int, int]]) -> list[dict[str, int]]:
    return [{"round": r, "agents": len(p), "min_tokens": min(p.values()), "max_tokens": max(p.values())} for r, p in enumerate(rounds)]


async def _recompute(rt: P.Runtime, prompts: list[list[int]], output_len: int, quantum: int, slots: int, bar: tqdm, t0: float) -> tuple:
    """Round robin in which each turn is a fresh generation of prompt + output so far."""
    n = len(prompts)
    outputs: list[list[int]] = [[] for _ in range(n)]
    progress: list[list[tuple[float, int]]] = [[] for _ in range(n)]
    rounds: list[dict[int, int]] = []
    ready = [(0, a) for a in range(n)]
    resumes = 0
    wake = asyncio.Condition()
    done = [False] * n

    async def turn(agent: int) -> int:
        ids = prompts[agent] + outputs[agent]
        budget = min(quantum, output_len - len(outputs[agent]))
        added = 0
        async for delta in rt.astream(ids, max_tokens=budget, ignore_eos=True, temperature=0.0):
            outputs[agent].extend(delta.token_ids)
            added += len(delta.token_ids)
            if delta.token_ids:
                progress[agent].append((time.perf_counter() - t0, len(outputs[agent])))
        return added

    async def worker() -> None:
        nonlocal resumes
        while True:
            async with wake:
                await wake.wait_for(lambda: all(done) or bool(ready))
                if all(done):
                    return
                round_no, agent = heapq.heappop(ready)
            resumes += round_no > 0
            added = await turn(agent)
            while len(rounds) <= round_no:
                rounds.append({})
            rounds[round_no][agent] = added
            async with wake:
                if len(outputs[agent]) < output_len:
                    heapq.heappush(ready, (round_no + 1, agent))
                else:
                    done[agent] = True
                    bar.update(1)
                wake.notify_all()

    await asyncio.gather(*(worker() for _ in range(min(slots, n))))
    return outputs, progress, rounds, resumes


def run_recompute(rt: P.Runtime, prompts: list[list[int]], output_len: int, quantum: int, slots: int, bar: tqdm) -> Run:
    before = rt.stats()["prompt_tokens_computed"]
    t0 = time.perf_counter()
    outputs, progress, rounds, resumes = asyncio.run(_recompute(rt, prompts, output_len, quantum, slots, bar, t0))
    wall = time.perf_counter() - t0
    rt.engine.wait_idle()
    computed = rt.stats()["prompt_tokens_computed"] - before
    return Run(RECOMPUTE, wall, sum(map(len, prompts)), computed, resumes, outputs, progress, _round_spread(rounds))


def run_fifo(rt: P.Runtime, prompts: list[list[int]], output_len: int, bar: tqdm) -> Run:
    before = rt.stats()["prompt_tokens_computed"]
    t0 = time.perf_counter()
    progress: list[list[tuple[float, int]]] = [[] for _ in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]

    async def one(agent: int) -> None:
        async for delta in rt.astream(prompts[agent], max_tokens=output_len, ignore_eos=True, temperature=0.0):
            outputs[agent].extend(delta.token_ids)
            if delta.token_ids:
                progress[agent].append((time.perf_counter() - t0, len(outputs[agent])))
        bar.update(1)

    async def all_agents() -> None:
        tasks = []
        for a in range(len(prompts)):  # submitted in agent order: that is the FIFO order
            tasks.append(asyncio.create_task(one(a)))
            await asyncio.sleep(0.001)
        await asyncio.gather(*tasks)

    asyncio.run(all_agents())
    wall = time.perf_counter() - t0
    rt.engine.wait_idle()
    computed = rt.stats()["prompt_tokens_computed"] - before
    return Run(FIFO, wall, sum(map(len, prompts)), computed, 0, outputs, progress)


def print_table(runs: list[Run]) -> None:
    header = (
        f"{'mode':24}{'recomputed tok':>15}{'computed/prompt':>16}{'finish s':>9}{'TTFT last s':>12}"
        f"{'TTFT mean s':>12}{'Jain':>6}{'round min-max tok':>19}"
    )
    print(header)
    print("-" * len(header))
    for r in runs:
        spread = (
            f"{min(x['min_tokens'] for x in r.rounds[:-1] or r.rounds)}-{max(x['max_tokens'] for x in r.rounds)}" if r.rounds else "-"
        )
        print(
            f"{r.mode:24}{r.recomputed:>15,}{r.prompt_tokens_computed / r.prompt_tokens:>16.2f}{r.wall_s:>9.2f}"
            f"{max(r.ttft_s):>12.2f}{statistics.mean(r.ttft_s):>12.2f}{r.jain():>6.2f}{spread:>19}"
        )


def plot(runs: list[Run], path: str, title: str, output_len: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs) + 1, figsize=(4.2 * (len(runs) + 1), 3.8))
    for ax, r in zip(axes, runs):
        for points in r.progress:
            ax.plot([0.0, points[0][0]] + [t for t, _ in points], [0, 0] + [k for _, k in points], linewidth=0.9)
        ax.set_title(f"{r.mode}\nper-agent tokens over time", fontsize=9)
        ax.set_xlabel("s")
        ax.set_ylim(0, output_len * 1.05)
    ax = axes[-1]
    names = [r.mode.split(" (")[0] for r in runs]
    x = range(len(runs))
    ax.bar([i - 0.2 for i in x], [max(r.ttft_s) for r in runs], width=0.4, label="TTFT of the last agent (s)")
    ax.bar([i + 0.2 for i in x], [r.wall_s for r in runs], width=0.4, label="time to finish (s)")
    ax.set_xticks(list(x), names, fontsize=7, rotation=15)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def workload(agents: int, prompt_len: int, count: Callable[[str], int], encode: Callable[[str], list[int]]) -> list[list[int]]:
    """`agents` distinct prompts of about `prompt_len` tokens (documentation text)."""
    texts = chunks(words_per_chunk=max(8, int(prompt_len * 0.7)), limit=agents)
    if len(texts) < agents:
        raise SystemExit(f"the text corpus has only {len(texts)} chunks; ask for fewer agents")
    return [encode(f"Agent {i}. Continue this text:\n{t}") for i, t in enumerate(texts)]


def main(argv: list[str] | None = None) -> list[Run]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="llama GGUF file (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--agents", type=int, default=16)
    ap.add_argument("--slots", type=int, default=4, help="max_num_seqs: sequences the engine runs at once")
    ap.add_argument("--prompt-len", type=int, default=48, help="prompt tokens per agent (about)")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--quantum", type=int, default=16, help="tokens per turn")
    ap.add_argument("--quick", action="store_true", help="a small run (8 agents, 2 slots, O=24, Q=8)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.agents, args.slots, args.output_len, args.quantum = 8, 2, 24, 8
    if min(args.agents, args.slots, args.output_len, args.quantum, args.prompt_len) < 1:
        ap.error("every size must be at least 1")

    model, loaded = load_model(args.model)
    tok = loaded.tokenizer
    prompts = workload(args.agents, args.prompt_len, lambda s: len(tok.encode(s)), tok.encode_prompt)

    runs: dict[str, Run] = {}
    with tqdm(total=len(MODES) * args.agents, desc="switching", unit="agent") as bar:
        for mode in MODES:
            bar.set_postfix_str(mode)
            rt = make_runtime(model, loaded, args.slots, caching=mode != RECOMPUTE)
            try:
                rt.generate(prompts[0][:8], max_tokens=2)  # warm up (not counted)
                if mode == KV:
                    runs[mode] = run_kv(rt, prompts, args.output_len, args.quantum, args.slots, bar)
                elif mode == TEXT:
                    runs[mode] = run_text(rt, loaded.model_name, tok, prompts, args.output_len, args.quantum, args.slots, bar)
                elif mode == RECOMPUTE:
                    runs[mode] = run_recompute(rt, prompts, args.output_len, args.quantum, args.slots, bar)
                else:
                    runs[mode] = run_fifo(rt, prompts, args.output_len, bar)
                rt.check_invariants()
            finally:
                rt.close()
    ordered = [runs[m] for m in MODES]
    lens = [len(p) for p in prompts]
    print(
        f"\n{args.agents} agents on {args.slots} slots; prompts {min(lens)}-{max(lens)} tokens, {args.output_len} output tokens each"
        f" (greedy, EOS ignored), turns of {args.quantum} tokens\n"
    )
    print_table(ordered)
    same = {
        f"{a} vs {b}": sum(x == y for x, y in zip(runs[a].outputs, runs[b].outputs))
        for a, b in ((KV, FIFO), (TEXT, FIFO), (KV, RECOMPUTE), (RECOMPUTE, FIFO))
    }
    print("\nidentical outputs (agents): " + "; ".join(f"{k}: {v}/{args.agents}" for k, v in same.items()))
    print(
        "recomputed tok: prompt tokens computed beyond each prompt's first prefill and each resume's pending token;"
        " Jain: fairness of per-agent progress over the run (1 = even); round min-max: tokens an agent added per turn"
    )

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "switching")
    with open(stem + ".json", "w") as f:
        json.dump(
            {
                "args": vars(args),
                "prompt_tokens": lens,
                "results": [
                    {
                        **{k: v for k, v in asdict(r).items() if k not in ("outputs", "progress")},
                        "ttft_s": r.ttft_s,
                        "finish_s": r.finish_s,
                        "recomputed_tokens": r.recomputed,
                        "ttft_last_s": max(r.ttft_s),
                        "ttft_mean_s": statistics.mean(r.ttft_s),
                        "jain": r.jain(),
                    }
                    for r in ordered
                ],
                "identical_outputs": same,
            },
            f,
            indent=2,
        )
    plot(ordered, stem + ".png", f"{args.agents} agents on {args.slots} slots, O={args.output_len}, Q={args.quantum}; SmolLM2-135M float32, CPU", args.output_len)
    print(f"wrote {stem}.json and {stem}.png")
    return ordered


if __name__ == "__main__":
    main()
