"""Multi-turn chat: chat sessions vs plain chat completions with and without prefix caching.

SGLang's multi-turn benchmark, in process: C conversations x T turns, sent round-robin (turn k
of every conversation is sent at once, then turn k+1). Every conversation starts with the same
system prompt (~S tokens); each user message is ~U tokens of real text (standard-library
documentation); O greedy output tokens per turn, EOS ignored. Three methods, one loaded model:

- chat sessions: `rt.chat(system=...)`, one `session.astream(text)` per turn. The session's
  context keeps the conversation's KV, its replies as the token ids generated.
- plain + prefix cache: each turn renders the whole conversation with the model's chat template
  (the assistant replies as the text the model returned) and runs it as one fresh request,
  relying on the engine's block-level automatic prefix cache.
- plain, no cache: the same with prefix caching off.

Hardware-independent figures come first: prompt tokens sent and computed per turn (the engine's
`prompt_tokens_computed` delta over the round) against the optimum (the tokens no KV held
before the turn), cached tokens (as the API reports them); then
TTFT p50 per turn and wall time per round. It also compares the greedy replies of the three
methods, conversation by conversation, and explains where they differ.

    python benchmarks/multiturn.py            # 8 conversations x 6 turns, S=100, U=40, O=24
    python benchmarks/multiturn.py --quick    # a small run (3 x 3, O=8)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import os
import re
import statistics
import sys
import time
import unittest
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import parrot_core as P  # noqa: E402
from _texts import document  # noqa: E402
from parrot_core.chat.transcript import common_prefix_len  # noqa: E402
from parrot_core.engines.builtin.config import EngineConfig  # noqa: E402
from parrot_core.engines.builtin.engine import BuiltinEngine, load_model  # noqa: E402
from parrot_core.engines.builtin.model import LlamaModel  # noqa: E402

CHAT = "chat sessions"
PLAIN = "plain + prefix cache"
NO_CACHE = "plain, no cache"
METHODS = (CHAT, PLAIN, NO_CACHE)


@dataclass
class Turn:
    """One round: turn `turn` (1-based) of every conversation, sent at once."""

    method: str
    turn: int
    prompt_tokens: int  # sent: the whole conversation so far (the API's prompt_tokens)
    prompt_tokens_computed: int  # the engine's prompt_tokens_computed delta over the round
    optimum_computed: int  # prompt tokens no KV held before the round (see `optimum`)
    cached_tokens: int  # as the API reports them
    output_tokens: int
    ttft_p50_s: float
    wall_s: float

    @property
    def computed_per_prompt_token(self) -> float:
        return self.prompt_tokens_computed / self.prompt_tokens


@dataclass
class Run:
    """One method over every round. `prompts[c][k]` / `replies[c][k]`: the exact token ids of
    conversation c's turn k prompt (for chat sessions: what the session's context held before
    the reply) and reply."""

    method: str
    turns: list[Turn]
    prompts: list[list[list[int]]] = field(repr=False)
    replies: list[list[list[int]]] = field(repr=False)
    reply_texts: list[list[str]] = field(repr=False)
    wall_s: float = 0.0

    def total(self, name: str) -> int:
        return sum(getattr(t, name) for t in self.turns)


# -------------------------------------------------------------------------------- workload


def corpus() -> list[str]:
    """Words of real text: the documentation the other benchmarks use, then more of the
    standard library's, enough for 8 x 6 distinct user messages of ~40 tokens."""
    return " ".join([document(), re.__doc__, heapq.__doc__, unittest.__doc__]).split()


def take(words: list[str], start: int, n_tokens: int, count: Callable[[str], int]) -> tuple[str, int]:
    """The shortest run of words from `start` of at least `n_tokens` tokens, and where it ends."""
    end = start + 1
    while end < len(words) and count(" ".join(words[start:end])) < n_tokens:
        end += 1
    return " ".join(words[start:end]), end


def workload(conversations: int, turns: int, system_len: int, user_len: int, count: Callable[[str], int]) -> tuple[str, list[list[str]]]:
    """The system prompt and, per conversation, its user messages (all distinct)."""
    words = corpus()
    intro = "You are a concise assistant for Python programmers. Answer from this reference: "
    system, pos = take(words, 0, max(1, system_len - count(intro)), count)
    users = []
    for _ in range(conversations):
        row = []
        for _ in range(turns):
            text, pos = take(words, pos, user_len, count)
            if count(text) < user_len:
                raise SystemExit(f"not enough text for {conversations} x {turns} user messages of {user_len} tokens")
            row.append(text)
        users.append(row)
    return intro + system, users


# -------------------------------------------------------------------------------- methods


def optimum(prompts: list[list[list[int]]], replies: list[list[list[int]]], k: int) -> int:
    """The fewest prompt tokens round `k` can compute: those of each prompt past its longest
    common prefix with what the conversation's KV held after the previous round (its prompt
    and reply, less the reply's last token, which is sampled but never fed back); in round 0,
    the prefix all prompts share once (the system prompt and the template's user header: chat
    sessions share only the system prompt, so their round 0 is a few tokens per
    conversation above it)."""
    if k == 0:
        first = [p[0] for p in prompts]
        shared = min(common_prefix_len(first[0], p) for p in first)
        return sum(map(len, first)) - (len(first) - 1) * shared
    return sum(len(p[k]) - common_prefix_len(p[k], p[k - 1] + r[k - 1][:-1]) for p, r in zip(prompts, replies))


async def timed(stream: AsyncIterator[P.StreamDelta]) -> tuple[float, list[int], str, int, int]:
    """Drain a stream: (TTFT, token ids, text, prompt_tokens, cached_tokens)."""
    start = time.perf_counter()
    first, ids, pieces, prompt, cached = None, [], [], 0, 0
    async with contextlib.aclosing(stream) as deltas:
        async for d in deltas:
            if first is None and d.token_ids:
                first = time.perf_counter() - start
            ids.extend(d.token_ids)
            pieces.append(d.text)
            prompt, cached = d.prompt_tokens, d.cached_tokens
    return first or 0.0, ids, "".join(pieces), prompt, cached


def run_method(rt: P.Runtime, method: str, system: str, users: list[list[str]], output_len: int, warmup: bool, bar: tqdm) -> Run:
    conversations, turns = len(users), len(users[0])
    before = rt.engine.runtime_info().prompt_tokens_computed  # cache_warmup's system prompt counts in turn 1
    start = time.perf_counter()
    sampling = {"max_tokens": output_len, "temperature": 0.0, "ignore_eos": True}
    config = P.ChatSessionConfig(max_context_length=4096, cache_warmup=warmup)
    sessions = [rt.chat(system=system, session_id=f"conv-{c}", config=config) for c in range(conversations)] if method == CHAT else []
    history = [[{"role": "system", "content": system}] for _ in range(conversations)]
    run = Run(method, [], [[] for _ in users], [[] for _ in users], [[] for _ in users])

    async def one(c: int, k: int) -> tuple[float, int, int, int]:
        text = users[c][k]
        if method == CHAT:
            ttft, ids, reply, prompt, cached = await timed(sessions[c].astream(text, **sampling))
            held = sessions[c].token_ids  # the conversation's tokens, this reply last
            prompt_ids = held[: len(held) - len(ids)]
        else:
            history[c].append({"role": "user", "content": text})
            prompt_ids = rt.tokenize_prompt(rt.apply_chat_template(history[c]))
            ttft, ids, reply, prompt, cached = await timed(rt.astream(prompt_ids, **sampling))
            history[c].append({"role": "assistant", "content": reply})
        run.prompts[c].append(prompt_ids)
        run.replies[c].append(ids)
        run.reply_texts[c].append(reply)
        bar.update(1)
        return ttft, prompt, cached, len(ids)

    async def round_(k: int) -> list[tuple[float, int, int, int]]:
        return list(await asyncio.gather(*(one(c, k) for c in range(conversations))))

    for k in range(turns):
        t0 = time.perf_counter()
        results = asyncio.run(round_(k))
        wall = time.perf_counter() - t0
        rt.engine.wait_idle()
        after = rt.engine.runtime_info().prompt_tokens_computed
        run.turns.append(Turn(
            method=method,
            turn=k + 1,
            prompt_tokens=sum(r[1] for r in results),
            prompt_tokens_computed=after - before,
            optimum_computed=optimum(run.prompts, run.replies, k),
            cached_tokens=sum(r[2] for r in results),
            output_tokens=sum(r[3] for r in results),
            ttft_p50_s=statistics.median(r[0] for r in results),
            wall_s=wall,
        ))
        before = after
    run.wall_s = time.perf_counter() - start
    for s in sessions:
        s.close()
    return run


def runtime(model: LlamaModel, loaded, caching: bool) -> P.Runtime:  # noqa: ANN001 - the loader's result
    engine = BuiltinEngine(model, loaded.tokenizer, EngineConfig(enable_prefix_caching=caching, kv_cache_memory_gb=0.5), loaded.model_name)
    rt = P.Runtime(engine=engine)
    rt.generate("Warm up the kernels.", max_tokens=2, temperature=0.0)  # first forward passes are slow
    rt.flush_cache()
    return rt


# -------------------------------------------------------------------------------- replies compared


def first_difference(a: list[int], b: list[int]) -> int | None:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), None if len(a) == len(b) else n)


@dataclass
class Agreement:
    pair: str
    identical: int
    total: int
    first_divergence: list[int | None]  # per conversation: the first turn whose reply differs

    @property
    def fraction(self) -> float:
        return self.identical / self.total


def agreement(a: Run, b: Run) -> Agreement:
    same = [[x == y for x, y in zip(ra, rb)] for ra, rb in zip(a.replies, b.replies)]
    first = [next((k + 1 for k, s in enumerate(row) if not s), None) for row in same]
    return Agreement(f"{a.method} vs {b.method}", sum(map(sum, same)), sum(map(len, same)), first)


def explain(runs: dict[str, Run], tok) -> list[str]:  # noqa: ANN001 - the engine's Tokenizer
    """Notes on why replies could differ: how many chat-session replies survive decode and
    re-tokenize unchanged (the plain path's history is the decoded text) and stay in the next
    prompt as generated; per method, how many turn prompts are token-identical to the chat
    session's; and, per conversation, the first turn whose prompt tokens differ (where, and
    which tokens) or whose reply differs from the same prompt tokens."""
    notes = []
    chat = runs[CHAT]
    retok = [(c, k) for c, row in enumerate(chat.replies) for k, ids in enumerate(row) if tok.encode(tok.decode(ids)) != ids]
    with_eos = [(c, k) for c, row in enumerate(chat.replies) for k, ids in enumerate(row) if tok.eos_token_id in ids]
    n = sum(map(len, chat.replies))
    followed = [(p, r, k) for p, r in zip(chat.prompts, chat.replies) for k in range(len(p) - 1)]
    kept = sum(p[k + 1][: len(p[k]) + len(r[k])] == p[k] + r[k] for p, r, k in followed)
    notes.append(
        f"{n - len(retok)} of {n} chat-session replies come back as the same token ids after decode + re-tokenize"
        f" (what the plain path does); {len(with_eos)} contain the end-of-turn token (generated under ignore_eos;"
        f" the returned text drops it). {kept} of {len(followed)} replies followed by another turn stay in the"
        " session's next prompt as the ids generated; the others no longer match the re-rendered conversation"
        " text and are re-tokenized from the first differing token (so that prompt equals the plain path's)."
    )
    for name in (PLAIN, NO_CACHE):
        other = runs[name]
        same = sum(a == b for pa, pb in zip(chat.prompts, other.prompts) for a, b in zip(pa, pb))
        notes.append(f"{same} of {n} turn prompts of {name} are token-identical to the chat session's.")
        for c in range(len(chat.replies)):
            for k in range(len(chat.replies[c])):
                d = first_difference(chat.prompts[c][k], other.prompts[c][k])
                if d is not None:
                    a, b = chat.prompts[c][k], other.prompts[c][k]
                    notes.append(
                        f"conversation {c} turn {k + 1}: {name}'s prompt differs from the chat session's at token {d}"
                        f" of {len(a)}: session {a[d:d + 4]} {tok.decode(a[d:d + 4], skip_special_tokens=False)!r}"
                        f" vs re-rendered {b[d:d + 4]} {tok.decode(b[d:d + 4], skip_special_tokens=False)!r}"
                    )
                    break
                if chat.replies[c][k] != other.replies[c][k]:
                    notes.append(
                        f"conversation {c} turn {k + 1}: same prompt tokens, different greedy reply from {name}"
                        f" at token {first_difference(chat.replies[c][k], other.replies[c][k])}"
                        " (likely float rounding: the KV was computed in different chunks and batches)"
                    )
                    break
    return notes


# -------------------------------------------------------------------------------- report


def print_table(runs: list[Run]) -> None:
    header = f"{'method':22}{'turn':>5}{'prompt tok':>11}{'computed':>10}{'optimum':>9}{'cached':>8}{'comp/prompt':>12}{'out tok':>8}{'TTFT p50':>9}{'wall s':>8}"
    print(header)
    print("-" * len(header))
    for r in runs:
        for t in r.turns:
            print(
                f"{r.method:22}{t.turn:>5}{t.prompt_tokens:>11,}{t.prompt_tokens_computed:>10,}{t.optimum_computed:>9,}{t.cached_tokens:>8,}"
                f"{t.computed_per_prompt_token:>12.3f}{t.output_tokens:>8}{t.ttft_p50_s:>9.3f}{t.wall_s:>8.2f}"
            )
        prompt, computed = r.total("prompt_tokens"), r.total("prompt_tokens_computed")
        print(
            f"{r.method:22}{'all':>5}{prompt:>11,}{computed:>10,}{r.total('optimum_computed'):>9,}{r.total('cached_tokens'):>8,}{computed / prompt:>12.3f}"
            f"{r.total('output_tokens'):>8}{statistics.median(t.ttft_p50_s for t in r.turns):>9.3f}{r.wall_s:>8.2f}"
        )
        print()


def plot(runs: list[Run], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in (
        (axes[0], lambda t: t.prompt_tokens_computed, "prompt tokens computed per turn"),
        (axes[1], lambda t: t.ttft_p50_s, "TTFT p50 per turn (s)"),
    ):
        for r in runs:
            ax.plot([t.turn for t in r.turns], [metric(t) for t in r.turns], marker="o", label=r.method)
        ax.set_xlabel("turn")
        ax.set_title(label)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list[Run]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="llama GGUF file (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system-len", type=int, default=100, help="system prompt tokens (about)")
    ap.add_argument("--user-len", type=int, default=40, help="tokens per user message (about)")
    ap.add_argument("--output-len", type=int, default=24)
    ap.add_argument("--cache-warmup", action="store_true", help="chat sessions fill the system prompt when created (counted in turn 1)")
    ap.add_argument("--quick", action="store_true", help="a small run (3 x 3, O=8)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.conversations, args.turns, args.output_len = 3, 3, 8
    if args.conversations < 1 or args.turns < 1 or args.output_len < 1:
        ap.error("--conversations, --turns and --output-len must be at least 1")

    model, loaded = load_model(args.model)
    tok = loaded.tokenizer
    count = lambda text: len(tok.encode(text))  # noqa: E731
    system, users = workload(args.conversations, args.turns, args.system_len, args.user_len, count)

    runs: dict[str, Run] = {}
    with tqdm(total=len(METHODS) * args.conversations * args.turns, desc="multiturn", unit="turn") as bar:
        for method in METHODS:
            bar.set_postfix_str(method)
            rt = runtime(model, loaded, caching=method != NO_CACHE)
            try:
                runs[method] = run_method(rt, method, system, users, args.output_len, args.cache_warmup, bar)
            finally:
                rt.close()
    ordered = [runs[m] for m in METHODS]
    print(f"\n{args.conversations} conversations x {args.turns} turns; system prompt {count(system)} tokens,"
          f" user messages {min(count(u) for row in users for u in row)}-{max(count(u) for row in users for u in row)} tokens,"
          f" {args.output_len} output tokens per turn (greedy, EOS ignored)\n")
    print_table(ordered)
    chat = runs[CHAT]
    for other in (PLAIN, NO_CACHE):
        r = runs[other]
        print(f"{other}: computes {r.total('prompt_tokens_computed') / chat.total('prompt_tokens_computed'):.1f}x the prompt tokens of"
              f" chat sessions; wall {r.wall_s / chat.wall_s:.2f}x")
    agreements = [agreement(runs[CHAT], runs[PLAIN]), agreement(runs[CHAT], runs[NO_CACHE]), agreement(runs[PLAIN], runs[NO_CACHE])]
    print("\nidentical greedy replies (same conversation, same turn):")
    for a in agreements:
        print(f"  {a.pair}: {a.identical}/{a.total} ({a.fraction:.0%}); first differing turn per conversation: {a.first_divergence}")
    notes = explain(runs, tok)
    print("note: " + "\nnote: ".join(notes))

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "multiturn")
    with open(stem + ".json", "w") as f:
        json.dump({
            "args": vars(args),
            "system_prompt_tokens": count(system),
            "results": [
                {"method": r.method, "wall_s": r.wall_s,
                 "turns": [asdict(t) | {"computed_per_prompt_token": t.computed_per_prompt_token} for t in r.turns]}
                for r in ordered
            ],
            "identical_replies": [asdict(a) | {"fraction": a.fraction} for a in agreements],
            "notes": notes,
        }, f, indent=2)
    plot(ordered, stem + ".png", f"{args.conversations} conversations x {args.turns} turns, SmolLM2-135M float32, CPU")
    print(f"wrote {stem}.json and {stem}.png")
    return ordered


if __name__ == "__main__":
    main()
