"""Fair sharing among agents (`rt.round_robin(prompts, ...)`): many long generations, more than
the engine runs at once, take turns. At most `slots` slices run at a time; each runs for a
quantum (`token_quantum` tokens and/or `time_limit` seconds), is suspended with its KV kept,
and the next waiting agent gets the slot. No generation starves, and the preempted work is
never recomputed while its KV fits (an evicted agent is recomputed exactly on its next turn).

Order: rounds. The agent whose next slice has the lowest round number goes first (then agent
order), and no slice of round r starts before every unfinished agent has started its slice of
round r - 1: a slow slice delays the others by at most one round, never more.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from parrot_core.engines.base import SamplingParams, TokenLogprob
from parrot_core.errors import InvalidRequestError
from parrot_core.frontend.runtime import GenerateOutput
from parrot_core.switching.manager import FINISH_SUSPENDED, SlicedOutput, SliceDelta, SwitchingManager, collect_slice


@dataclass(frozen=True)
class SliceRecord:
    """One turn of one agent: its round (0 first), the tokens it added, when it started and
    ended (seconds since the run began; `first_token` None if it added none), how it ended,
    and the context tokens it had to compute again (0 while the agent's KV stayed resident)."""

    agent: int
    round: int
    tokens: int
    start: float
    first_token: float | None
    end: float
    finish_reason: str
    recomputed_tokens: int


@dataclass
class RoundRobinResult:
    """Each agent's whole generation (`outputs`, in prompt order: the slices concatenated, as
    one uninterrupted generation) and every slice, in the order they ended (`slices`)."""

    outputs: list[GenerateOutput]
    slices: list[SliceRecord] = field(default_factory=list)

    def rounds(self) -> list[dict[int, int]]:
        """Per round: tokens each agent that ran in it added, by agent."""
        out: list[dict[int, int]] = []
        for s in self.slices:
            while len(out) <= s.round:
                out.append({})
            out[s.round][s.agent] = s.tokens
        return out


async def run_round_robin(
    switching: SwitchingManager,
    prompts: Sequence[list[int]],
    params: SamplingParams,
    *,
    token_quantum: int | None,
    time_limit: float | None,
    slots: int,
) -> RoundRobinResult:
    """Run every prompt to its end in turns (see the module docstring). On an error or a
    cancellation, every agent's generation is discarded and the error raised."""
    if token_quantum is None and time_limit is None:
        raise InvalidRequestError("round robin needs a quantum: token_quantum and/or time_limit")
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
        raise InvalidRequestError(f"slots must be an integer >= 1, got {slots!r}")
    if not prompts:
        return RoundRobinResult([])
    owner = f"round-robin-{uuid.uuid4().hex}"  # its own pid namespace
    n = len(prompts)
    slices: list[list[SlicedOutput]] = [[] for _ in range(n)]
    records: list[SliceRecord] = []
    ready = [(0, a) for a in range(n)]  # (round, agent), a heap
    started = [-1] * n  # the latest round each agent started
    done = [False] * n
    wake = asyncio.Condition()
    t0 = time.perf_counter()

    def may_start(round_no: int) -> bool:
        return all(done[a] or started[a] >= round_no - 1 for a in range(n))

    async def worker() -> None:
        while True:
            async with wake:
                await wake.wait_for(lambda: all(done) or (bool(ready) and may_start(ready[0][0])))
                if all(done):
                    return
                round_no, agent = heapq.heappop(ready)
                started[agent] = round_no
            begin = time.perf_counter() - t0
            if round_no == 0:
                stream = switching.start(
                    list(prompts[agent]), params, time_limit=time_limit, token_quantum=token_quantum, pid=f"agent-{agent}", owner=owner
                )
            else:
                stream = switching.resume(f"agent-{agent}", owner=owner, time_limit=time_limit, token_quantum=token_quantum)
            first: list[float] = []
            out = await collect_slice(_timed(stream, first, t0))
            slices[agent].append(out)
            end = time.perf_counter() - t0
            record = SliceRecord(
                agent, round_no, len(out.token_ids), begin, first[0] if first else None, end, out.finish_reason, out.recomputed_tokens
            )
            records.append(record)
            async with wake:
                if out.finish_reason == FINISH_SUSPENDED:
                    heapq.heappush(ready, (round_no + 1, agent))
                else:
                    done[agent] = True
                wake.notify_all()

    tasks = [asyncio.create_task(worker()) for _ in range(min(slots, n))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for agent in range(n):
            with contextlib.suppress(Exception):  # finished ones are gone already
                switching.discard(f"agent-{agent}", owner)
    return RoundRobinResult([_joined(s) for s in slices], records)


async def _timed(stream: AsyncIterator[SliceDelta], first: list[float], t0: float) -> AsyncIterator[SliceDelta]:
    """`stream`, noting in `first` when its first token came."""
    async with contextlib.aclosing(stream):
        async for delta in stream:
            if delta.token_ids and not first:
                first.append(time.perf_counter() - t0)
            yield delta


def _joined(parts: list[SlicedOutput]) -> GenerateOutput:
    """An agent's slices as one generation."""
    logprobs: list[TokenLogprob] | None = None
    for p in parts:
        if p.logprobs is not None:
            logprobs = (logprobs or []) + p.logprobs
    last, first = parts[-1], parts[0]
    return GenerateOutput(
        "".join(p.text for p in parts),
        [t for p in parts for t in p.token_ids],
        last.finish_reason,
        first.prompt_tokens,
        first.cached_tokens,
        logprobs,
        first.prompt_logprobs,
        last.stop_token_id,
    )
