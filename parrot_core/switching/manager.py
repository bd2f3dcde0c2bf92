"""`SwitchingManager`: a runtime's suspendable generations (`rt.generate(..., time_limit=,
token_quantum=, pid=)`, `rt.resume(pid)`), seeds 000 and 001 (AIOS's context manager) built on
parrot-core's contexts.

A suspendable generation is one serve-layer context that the manager holds: the prompt, then
every token generated so far. A *slice* is one engine generate in that context. It ends when
the generation does, or is suspended after `token_quantum` new tokens (the engine's own
`max_tokens` for the slice, so the point is exact) or once `time_limit` seconds have passed
since the slice started (after at least one new token, so every slice makes progress). The
context stays: its KV is a cache of its tokens, evicted by the engine under pressure like any
idle context's, and recomputed exactly on resume.

What carries over a suspension, so that the slices together are the uninterrupted generation:
- the token budget: the original `max_tokens` bounds the whole output;
- the text: one incremental detokenizer over the whole output, and stop-string matching over
  that text (held-back characters that might start a stop string, and bytes of an unfinished
  character, are handed out by a later slice or cut), so a stop string spanning a suspension
  point stops the generation and the concatenated text equals the uninterrupted text;
- logit processing and the random stream: `SamplingParams.prior_output_tokens` tells the engine
  which context tokens are output (penalties, `min_tokens`) and how far a seeded generator has
  advanced.

Any engine with the reads `context_tokens` and `kv_residency` (engines/base.py) runs them. On
an engine of text contexts (`OpenAIEngine`, text-based switching) a slice is one streamed
request: a suspension closes the stream, the context keeps exactly the text handed out, and a
resume sends the prompt plus that text (the server re-tokenizes it; its prefix cache, if any,
supplies what it still holds); the engine's `check_resumable(params)` refuses at the start
what a text resume cannot carry over.

Pids are per owner (`None` for in-process callers; the server uses the caller's API key), so
one owner never sees, resumes or discards another's generations, whatever pids they choose.
Suspended generations are bounded: at most `max_suspended` (the least recently suspended are
dropped first) and none idle for more than `max_age` seconds. A generation whose caller
abandons a slice (closes the stream, is cancelled) is discarded, as a plain generation would
be. All methods run on the runtime's loop; `Runtime` wraps them for other threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import re
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from parrot_core.contexts import Context
from parrot_core.engines.base import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, SamplingParams, TokenLogprob, capability, find_stop
from parrot_core.errors import InvalidRequestError, RuntimeClosedError, UnknownGenerationError
from parrot_core.frontend.runtime import GenerateOutput, Runtime, StreamDelta
from parrot_core.serve.scheduler import SchedTask

FINISH_SUSPENDED = "suspended"
_DEFAULT_SLOTS = 64  # round robin on an engine that does not say how many sequences it runs
_PID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


@dataclass(frozen=True)
class SliceDelta(StreamDelta):
    """A `StreamDelta` of a suspendable generation. `pid`: its id. On the last delta of a
    slice: `output_tokens`, the generation's output so far (all slices), and
    `recomputed_tokens`, the tokens of the context the slice had to compute again before
    sampling (0 while its KV stayed resident; the last token sampled before a suspension was
    never computed and is not counted). On an engine of text contexts: the context's tokens
    (its own count) less those its server reported cached (its usage), less that last token
    (the server's own figure when the text tokenizes back to its ids); a slice cut
    short here (its time limit, a stop string) closes the stream before the usage comes and
    counts every token but that one."""

    pid: str = ""
    output_tokens: int = 0
    recomputed_tokens: int = 0


@dataclass(frozen=True)
class SlicedOutput(GenerateOutput):
    """One slice of a suspendable generation: what it added (`text`, `token_ids`), and
    `finish_reason` "suspended" while the generation is not over. Concatenating the slices'
    texts and token ids gives the uninterrupted generation. `output_tokens`: the output so
    far; `recomputed_tokens`: see `SliceDelta`."""

    pid: str = ""
    output_tokens: int = 0
    recomputed_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason != FINISH_SUSPENDED


@dataclass(frozen=True)
class SuspendedInfo:
    """A suspended generation: its output so far (`tokens` of `max_tokens`), seconds since it
    was created (`age`) and since it was suspended (`idle`), and whether its KV is resident
    (False: evicted, to be recomputed on resume)."""

    pid: str
    tokens: int
    max_tokens: int
    prompt_tokens: int
    age: float
    idle: float
    resident: bool
    meta: dict[str, Any] = field(default_factory=dict)  # what its creator noted with it


@dataclass(eq=False)
class _Generation:
    pid: str
    owner: str | None
    params: SamplingParams  # as asked: max_tokens is the whole budget
    prompt_ids: list[int]
    created: float
    meta: dict[str, Any] = field(default_factory=dict)  # the creator's (e.g. the HTTP API's shape)
    ctx: Context | None = None
    output_ids: list[int] = field(default_factory=list)
    detokenizer: Any = None  # IncrementalDetokenizer over the whole output
    text: str = ""  # the whole output's text so far (cut at a stop string once found)
    sent_chars: int = 0  # of `text`, handed out already
    suspended_at: float = 0.0
    busy: bool = True  # a slice is running (or about to)

    @property
    def key(self) -> tuple[str | None, str]:
        return (self.owner, self.pid)


@dataclass
class _Slice:
    """What the slice's deltas report besides tokens and text."""

    resumed: bool
    recomputed: int = 0
    cached: int = 0  # the tokens the engine's (or its server's) prefix cache supplied
    uncomputed: int = 0  # resumed: the context's tokens without KV when the slice started
    first: bool = True


class SwitchingManager:
    """The suspendable generations of one runtime (`rt.switching`). See the module docstring."""

    def __init__(
        self, runtime: Runtime, *, max_suspended: int = 1024, max_age: float = 600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._runtime = weakref.ref(runtime)  # the runtime owns this manager, not the other way round
        self.clock = clock
        self.max_suspended, self.max_age = 0, 0.0
        self.configure(max_suspended=max_suspended, max_age=max_age)
        self._gens: dict[tuple[str | None, str], _Generation] = {}
        self.dropped_total = 0  # suspended generations dropped by the bounds (count or age)

    @property
    def rt(self) -> Runtime:
        rt = self._runtime()
        if rt is None:
            raise RuntimeClosedError("the Runtime of these generations is gone")
        return rt

    def configure(self, *, max_suspended: int | None = None, max_age: float | None = None) -> None:
        """Change the bounds (None keeps one); they apply at the next suspension or expiry."""
        if max_suspended is not None:
            if not isinstance(max_suspended, int) or isinstance(max_suspended, bool) or max_suspended < 1:
                raise InvalidRequestError(f"max_suspended must be an integer >= 1, got {max_suspended!r}")
            self.max_suspended = max_suspended
        if max_age is not None:
            if not _positive(max_age):
                raise InvalidRequestError(f"max_age must be a number of seconds > 0, got {max_age!r}")
            self.max_age = float(max_age)

    # -- starting and resuming ---------------------------------------------------------------
    def start(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        time_limit: float | None = None,
        token_quantum: int | None = None,
        pid: str | None = None,
        owner: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> AsyncIterator[SliceDelta]:
        """The first slice of a new generation of `params.max_tokens` tokens at most. `pid`:
        its id (one this owner has in use is an error); None makes one up. Checks everything
        at once (a typed error before any KV is taken)."""
        _check_limits(time_limit, token_quantum)
        _check_engine(self.rt.engine, params, "suspending and resuming a generation")
        if params.structured is not None:
            raise InvalidRequestError("structured output cannot be suspended (its grammar state is not kept): leave out time_limit/token_quantum/pid")
        if params.stop and self.rt.engine.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        if params.logprobs is not None and time_limit is not None:
            raise InvalidRequestError("logprobs cannot be combined with time_limit (use token_quantum)")
        if pid is None:
            pid = f"gen-{uuid.uuid4().hex[:16]}"
        elif not isinstance(pid, str) or not _PID.fullmatch(pid):
            raise InvalidRequestError(f"pid must be 1-128 characters of letters, digits and ._:@-, got {pid!r}")
        self.expire()
        self._check_free(owner, pid)
        tok = self.rt.engine.tokenizer
        gen = _Generation(pid, owner, params, list(prompt_ids), self.clock(), dict(meta or {}))
        gen.detokenizer = tok.detokenizer() if tok is not None else None
        return self._start(gen, time_limit, token_quantum)

    def _check_free(self, owner: str | None, pid: str) -> None:
        if (owner, pid) in self._gens:
            raise InvalidRequestError(f"pid {pid!r} is in use: resume or discard it first")

    async def _start(self, gen: _Generation, time_limit: float | None, token_quantum: int | None) -> AsyncIterator[SliceDelta]:
        # Registered when the stream starts (not when it is made), so a stream never iterated
        # leaves nothing behind.
        self._check_free(gen.owner, gen.pid)
        self._gens[gen.key] = gen
        async with contextlib.aclosing(self._run(gen, time_limit, token_quantum)) as deltas:
            async for delta in deltas:
                yield delta

    def resume(
        self, pid: str, *, owner: str | None = None, time_limit: float | None = None, token_quantum: int | None = None
    ) -> AsyncIterator[SliceDelta]:
        """The next slice of a suspended generation (None limits: to its end). Unknown to this
        owner: `UnknownGenerationError`; running right now: `InvalidRequestError`."""
        _check_limits(time_limit, token_quantum)
        self._resumable(pid, owner, time_limit)
        return self._resume(pid, owner, time_limit, token_quantum)

    def _resumable(self, pid: str, owner: str | None, time_limit: float | None) -> _Generation:
        gen = self.get(pid, owner)
        if gen.params.logprobs is not None and time_limit is not None:
            raise InvalidRequestError("logprobs cannot be combined with time_limit (use token_quantum)")
        if gen.busy:
            raise InvalidRequestError(f"generation {pid!r} is running; resume it once it is suspended")
        return gen

    async def _resume(self, pid: str, owner: str | None, time_limit: float | None, token_quantum: int | None) -> AsyncIterator[SliceDelta]:
        gen = self._resumable(pid, owner, time_limit)  # again: the stream may start later
        gen.busy = True
        async with contextlib.aclosing(self._run(gen, time_limit, token_quantum)) as deltas:
            async for delta in deltas:
                yield delta

    async def generate(self, prompt_ids: list[int], params: SamplingParams, **options: Any) -> SlicedOutput:
        """`start(...)` drained: the first slice as one `SlicedOutput`."""
        return await collect_slice(self.start(prompt_ids, params, **options))

    async def generate_batch(self, prompts: Sequence[list[int]], params: SamplingParams, **options: Any) -> list[SlicedOutput]:
        """The first slices of one generation per prompt (each its own pid), run concurrently.
        Every prompt is checked before any runs; if one fails, the others are discarded."""
        if options.get("pid") is not None:
            raise InvalidRequestError("a pid names one generation: give one prompt, or no pid (each prompt gets its own)")
        streams = [self.start(p, params, **options) for p in prompts]
        tasks = [asyncio.ensure_future(collect_slice(s)) for s in streams]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()  # an unfinished slice is abandoned: its generation is discarded
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is None:
                    with contextlib.suppress(UnknownGenerationError, InvalidRequestError):
                        self.discard(task.result().pid, options.get("owner"))
            raise

    async def resume_slice(self, pid: str, **options: Any) -> SlicedOutput:
        """`resume(...)` drained: the next slice as one `SlicedOutput`."""
        return await collect_slice(self.resume(pid, **options))

    def get(self, pid: str, owner: str | None = None) -> _Generation:
        """This owner's generation `pid` (suspended or running); `UnknownGenerationError` if none."""
        self.expire()
        gen = self._gens.get((owner, pid))
        if gen is None or (gen.ctx is not None and not gen.ctx.alive):  # dropped by reset()
            self._gens.pop((owner, pid), None)
            raise UnknownGenerationError(f"no suspended generation {pid!r} (unknown, finished, discarded or expired)")
        return gen

    async def round_robin(
        self,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        *,
        token_quantum: int | None = None,
        time_limit: float | None = None,
        slots: int | None = None,
    ) -> Any:
        """`round_robin.run_round_robin` on this runtime; `slots` defaults to the engine's
        `max_num_seqs`. Returns a `RoundRobinResult`."""
        from parrot_core.switching.round_robin import run_round_robin

        _check_limits(time_limit, token_quantum)
        _check_engine(self.rt.engine, params, "round-robin generation (suspending and resuming)")
        slots = getattr(self.rt.engine, "max_num_seqs", _DEFAULT_SLOTS) if slots is None else slots
        return await run_round_robin(self, prompts, params, token_quantum=token_quantum, time_limit=time_limit, slots=slots)

    # -- listing and freeing -------------------------------------------------------------------
    async def suspended(self, owner: str | None = None) -> list[SuspendedInfo]:
        """This owner's suspended generations, least recently suspended first."""
        self.expire()
        gens = sorted((g for g in self._gens.values() if g.owner == owner and not g.busy), key=lambda g: g.suspended_at)
        resident = await self._resident([g.ctx.context_id for g in gens if g.ctx is not None])
        now = self.clock()
        return [
            SuspendedInfo(
                g.pid,
                len(g.output_ids),
                g.params.max_tokens,
                len(g.prompt_ids),
                now - g.created,
                now - g.suspended_at,
                g.ctx is not None and resident.get(g.ctx.context_id, False),
                dict(g.meta),
            )
            for g in gens
        ]

    def discard(self, pid: str, owner: str | None = None) -> None:
        """Free a suspended generation and its KV. Unknown: `UnknownGenerationError`; running:
        `InvalidRequestError` (close its stream instead)."""
        gen = self.get(pid, owner)
        if gen.busy:
            raise InvalidRequestError(f"generation {pid!r} is running; it can be discarded once suspended")
        self._drop(gen)

    def expire(self) -> int:
        """Drop the suspended generations idle for more than `max_age`, then the least recently
        suspended beyond `max_suspended`. Returns how many were dropped."""
        now = self.clock()
        idle = sorted((g for g in self._gens.values() if not g.busy), key=lambda g: g.suspended_at)
        dropped = [g for g in idle if now - g.suspended_at > self.max_age]
        kept = [g for g in idle if g not in dropped]
        dropped += kept[: max(0, len(kept) - self.max_suspended)]
        for gen in dropped:
            self._drop(gen)
        self.dropped_total += len(dropped)
        return len(dropped)

    def clear(self) -> int:
        """Free every suspended generation of every owner and its context (`Runtime.reset()`,
        `Runtime.clear_suspended()`); returns how many."""
        gens = [g for g in self._gens.values() if not g.busy]
        for gen in gens:
            self._drop(gen)
        return len(gens)

    def __len__(self) -> int:
        return sum(1 for g in self._gens.values() if not g.busy)

    def _drop(self, gen: _Generation) -> None:
        self._gens.pop(gen.key, None)
        if gen.ctx is not None and gen.ctx.alive:
            self.rt.contexts.free_context(gen.ctx)
        gen.ctx = None

    async def _resident(self, context_ids: Sequence[int]) -> dict[int, bool]:
        """Whether each context's KV is in the engine: every token but the last sampled one
        (which a resume computes anyway) computed. (Never, on an engine of text contexts.)"""
        if not context_ids:
            return {}
        residency = await self.rt.engine.kv_residency(context_ids)
        return {cid: computed >= tokens - 1 for cid, (tokens, computed) in residency.items()}

    async def _uncomputed(self, read: Awaitable[dict[int, tuple[int, int]]], context_id: int) -> int:
        """How many of the context's tokens lacked KV when `read` (`kv_residency`, called
        before the slice's generate starts) was taken."""
        tokens, computed = (await read).get(context_id, (0, 0))  # gone (reset): the generate aborts
        return tokens - computed

    async def _tail(self, context_id: int, start: int) -> list[int]:
        """The context's tokens from position `start` (after an aborted slice: what the engine
        sampled that the slice did not read; nothing, on an engine whose context only takes
        what it handed out)."""
        return (await self.rt.engine.context_tokens(context_id))[start:]

    # -- one slice -------------------------------------------------------------------------------
    async def _run(self, gen: _Generation, time_limit: float | None, token_quantum: int | None) -> AsyncIterator[SliceDelta]:
        """Run one slice, yielding its deltas; afterwards the generation is suspended or gone."""
        rt = self.rt
        suspended = False
        try:
            first = gen.ctx is None
            prompt = gen.prompt_ids if first else []
            budget = gen.params.max_tokens - len(gen.output_ids)
            if token_quantum is not None:
                budget = min(budget, token_quantum)
            prior = len(gen.output_ids)
            params = dataclasses.replace(
                gen.params,
                max_tokens=budget,
                stop=(),  # matched here, over the whole output's text
                min_tokens=min(gen.params.min_tokens, prior + budget),
                prior_output_tokens=prior,
                prompt_logprobs=gen.params.prompt_logprobs if first else None,
            )
            engine_id = rt.engine_id if gen.ctx is None else gen.ctx.engine_id
            prior_tokens = 0 if gen.ctx is None else gen.ctx.chain_tokens
            work = SchedTask(None, [len(prompt)], budget, required_engine=engine_id, prior_tokens=prior_tokens)
            async with rt.core.scheduler.admit(work):
                if gen.ctx is None:
                    gen.ctx = rt.contexts.new_context(rt.engine_id)
                    rt.contexts.record_fill(gen.ctx, len(prompt))
                elif not gen.ctx.alive:
                    raise UnknownGenerationError(f"generation {gen.pid!r} was dropped (reset)")
                async with contextlib.aclosing(self._slice(gen, params, prompt, time_limit)) as deltas:
                    async for delta in deltas:
                        if delta.finish_reason == FINISH_SUSPENDED:
                            suspended = True
                        yield delta
        finally:
            if suspended:
                gen.busy = False
                gen.suspended_at = self.clock()
                self.expire()
            else:  # finished, failed or abandoned: nothing to resume
                self._drop(gen)

    async def _slice(self, gen: _Generation, params: SamplingParams, prompt: list[int], time_limit: float | None) -> AsyncIterator[SliceDelta]:
        rt, ctx = self.rt, gen.ctx
        assert ctx is not None
        loop = asyncio.get_running_loop()
        start_len = len(gen.prompt_ids) + len(gen.output_ids)
        # Read now, before the generate is posted (at its first iteration), with no wait for
        # the engine's current step.
        residency = None if prompt else rt.engine.kv_residency([ctx.context_id])
        rt.contexts.reserve_generate(ctx, params.max_tokens)
        produced = 0
        info = _Slice(resumed=not prompt)
        deadline = None if time_limit is None else loop.time() + time_limit
        stream = rt.engine.generate(ctx.context_id, ctx.parent_context_id, params, prompt)
        try:
            async with contextlib.aclosing(stream):
                while True:
                    try:
                        if deadline is not None and produced:
                            delta = await asyncio.wait_for(anext(stream), max(0.0, deadline - loop.time()))
                        else:
                            delta = await anext(stream)
                    except TimeoutError:  # time is up: the engine request was aborted
                        break
                    if info.first and residency is not None:
                        info.uncomputed = await self._uncomputed(residency, ctx.context_id)
                    info.first = False
                    # The slice's cached tokens: every delta of a KV engine carries the figure; a
                    # text engine's last one carries its server's (none if the slice is cut first).
                    info.cached = max(info.cached, delta.cached_tokens if delta.reused_tokens is None else delta.reused_tokens)
                    if info.resumed:  # the pending token a resume always computes is no recompute
                        info.recomputed = max(0, info.uncomputed - info.cached - 1)
                    ids = list(delta.token_ids)
                    cut = self._take(gen, ids)
                    produced += len(ids) if cut is None else cut
                    if cut is not None:  # a stop string, possibly begun in an earlier slice
                        yield self._last(gen, ids[:cut], FINISH_STOP, delta, info, logprobs=_head(delta.logprobs, cut))
                        return
                    reason = delta.finish_reason
                    if reason is None:
                        yield self._delta(gen, ids, None, delta, info)
                    elif reason == FINISH_STOP:  # EOS or a stop token id
                        yield self._last(gen, ids, self._end(gen), delta, info, stop_token_id=delta.stop_token_id)
                        return
                    elif reason == FINISH_LENGTH and len(gen.output_ids) < gen.params.max_tokens:
                        yield self._delta(gen, ids, FINISH_SUSPENDED, delta, info)
                        return
                    elif reason == FINISH_LENGTH:
                        yield self._last(gen, ids, self._end(gen), delta, info)
                        return
                    else:  # aborted from outside (reset, a freed context)
                        yield self._last(gen, ids, FINISH_ABORT, delta, info)
                        return
                    if deadline is not None and loop.time() >= deadline:
                        break
            # Suspended by the time limit: the request is aborted; the engine may have sampled
            # tokens the slice did not read. The context is the truth.
            extra = await self._tail(ctx.context_id, start_len + produced)
            cut = self._take(gen, extra)
            produced += len(extra) if cut is None else cut
            if cut is not None:
                yield self._last(gen, extra[:cut], FINISH_STOP, None, info)
            elif len(gen.output_ids) >= gen.params.max_tokens:
                yield self._last(gen, extra, self._end(gen), None, info)
            else:
                yield self._delta(gen, extra, FINISH_SUSPENDED, None, info)
        finally:
            rt.contexts.reconcile_generate(ctx, produced)

    def _take(self, gen: _Generation, ids: list[int]) -> int | None:
        """Add `ids` to the output, token by token; if one completes a stop string, stop there
        (the text cut before it) and return how many of `ids` were taken."""
        for i, token in enumerate(ids):
            gen.output_ids.append(token)
            if gen.detokenizer is not None:
                gen.text += gen.detokenizer.push([token])
            if gen.params.stop and self._cut_at_stop(gen):
                return i + 1
        return None

    def _end(self, gen: _Generation) -> str:
        """The generation ends without a stop string so far: flush held-back bytes; "stop" if
        that completes a stop string (EOS / stop ids / length callers decide otherwise)."""
        if gen.detokenizer is not None:
            gen.text += gen.detokenizer.flush()
        stopped = bool(gen.params.stop) and self._cut_at_stop(gen)
        return FINISH_STOP if stopped or len(gen.output_ids) < gen.params.max_tokens else FINISH_LENGTH

    @staticmethod
    def _cut_at_stop(gen: _Generation) -> bool:
        """As the engine matches stop strings, over the whole output's text."""
        at = find_stop(gen.text, gen.params.stop, gen.sent_chars)
        if at is None:
            return False
        gen.text = gen.text[:at]
        return True

    def _delta(self, gen: _Generation, ids: list[int], reason: str | None, delta: Any, info: _Slice) -> SliceDelta:
        """A delta that hands out only text no stop string can still cut (and, suspended,
        nothing of an unfinished character: the detokenizer keeps it)."""
        hold = max((len(s) - 1 for s in gen.params.stop), default=0)
        safe = max(gen.sent_chars, len(gen.text) - hold)
        piece = gen.text[gen.sent_chars : safe]
        gen.sent_chars = safe
        return self._make(gen, ids, piece, reason, delta, info, delta.logprobs if delta is not None else None)

    def _last(
        self,
        gen: _Generation,
        ids: list[int],
        reason: str,
        delta: Any,
        info: _Slice,
        logprobs: list[TokenLogprob] | None = None,
        stop_token_id: int | None = None,
    ) -> SliceDelta:
        piece = gen.text[gen.sent_chars :]
        gen.sent_chars = len(gen.text)
        if logprobs is None and delta is not None:
            logprobs = delta.logprobs
        return self._make(gen, ids, piece, reason, delta, info, logprobs, stop_token_id)

    def _make(
        self,
        gen: _Generation,
        ids: list[int],
        text: str,
        reason: str | None,
        delta: Any,
        info: _Slice,
        logprobs: list[TokenLogprob] | None,
        stop_token_id: int | None = None,
    ) -> SliceDelta:
        if info.resumed:  # of the prompt's tokens, those the resume did not compute again
            cached = max(0, len(gen.prompt_ids) - info.recomputed)
        else:
            cached = info.cached
        prompt_lp = delta.prompt_logprobs if delta is not None else None
        if gen.params.logprobs is not None and logprobs is None:
            logprobs = []
        return SliceDelta(
            ids,
            text,
            reason,
            len(gen.prompt_ids),
            cached,
            logprobs,
            prompt_lp,
            stop_token_id,
            pid=gen.pid,
            output_tokens=len(gen.output_ids),
            recomputed_tokens=info.recomputed,
        )


async def collect_slice(stream: AsyncIterator[SliceDelta]) -> SlicedOutput:
    """Drain one slice's deltas into a `SlicedOutput`."""
    ids: list[int] = []
    pieces: list[str] = []
    last: SliceDelta | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs = None
    async with contextlib.aclosing(stream):
        async for delta in stream:
            ids.extend(delta.token_ids)
            pieces.append(delta.text)
            if delta.logprobs is not None:
                logprobs = (logprobs or []) + delta.logprobs
            if delta.prompt_logprobs is not None:
                prompt_logprobs = delta.prompt_logprobs
            last = delta
    if last is None:
        raise InvalidRequestError("the slice produced nothing")  # unreachable: every slice ends with a delta
    return SlicedOutput(
        "".join(pieces),
        ids,
        last.finish_reason or FINISH_ABORT,
        last.prompt_tokens,
        last.cached_tokens,
        logprobs,
        prompt_logprobs,
        last.stop_token_id,
        pid=last.pid,
        output_tokens=last.output_tokens,
        recomputed_tokens=last.recomputed_tokens,
    )


def _head(logprobs: list[TokenLogprob] | None, n: int) -> list[TokenLogprob] | None:
    return None if logprobs is None else logprobs[:n]


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _check_engine(engine: Any, params: SamplingParams, purpose: str) -> None:
    """The engine has the reads suspension needs (`UnsupportedByEngineError`), and can resume
    a generation of these params (its `check_resumable`, when it has one)."""
    for name in ("context_tokens", "kv_residency"):
        capability(engine, name, purpose)
    check = getattr(engine, "check_resumable", None)
    if check is not None:
        check(params)


def _check_limits(time_limit: float | None, token_quantum: int | None) -> None:
    if time_limit is not None and not _positive(time_limit):
        raise InvalidRequestError(f"time_limit must be a number of seconds > 0, got {time_limit!r}")
    if token_quantum is not None and (not isinstance(token_quantum, int) or isinstance(token_quantum, bool) or token_quantum < 1):
        raise InvalidRequestError(f"token_quantum must be an integer >= 1, got {token_quantum!r}")
