"""The global scheduler: which engine runs each piece of work.

One path: every request (a program's completion chain, `Runtime.generate`, an OpenAI request,
a fill or generate through the context API) is placed here, and holds its place until it
finishes (`admit(...)` or `place` / `finish`). Event-driven: the queue is scanned when work
arrives and when work finishes (the only events that change what it counts), never in a busy
loop.

What it counts: the tokens that placed, unfinished work adds to an engine (its prompt tokens
not already cached there, plus `max_tokens`). KV that no running work needs (pinned constant
prefixes, retained outputs, contexts held by callers) is a cache the engine evicts under
pressure, so it is not counted: a task never waits for memory that only a cache holds. An
engine with no placed work takes any task that fits it alone, so nothing that fits waits
forever.

Policy, for the task (or task group) at the head of the queue:
- Order (app-FIFO): deeper chains first, so an application already under way finishes before
  new ones start; then arrival order.
- A task group (all the producers feeding one consumer) is placed together, on one engine:
  its members arrive one by one, and once the group has an engine the rest follow it; the
  group counts as one unit against the latency cap.
- An engine qualifies if it serves the model, has room for the tokens the task adds (or has no
  placed work at all), and keeps every LATENCY task on it within `latency_cap` tasks.
- Among qualifying engines, the one holding the longest cached prefix wins (affinity beats
  any capacity tie-break); then LATENCY tasks and plain requests (work without serve-layer
  contexts) go to the least loaded engine and THROUGHPUT program tasks pack onto the busiest
  one that still has room. A task's cached prefix on an engine is
  what the context manager's prefix cache says (programs), or, for work without serve-layer
  contexts (plain requests), what `PrefixAffinity` remembers of the prompts sent there.

Engine health (failure isolation): the outcome of every placed task is reported when it
finishes. An engine is down while it is closed, after a call failed with
`EngineUnavailableError`, or after `FAILURES_TO_DOWN` engine failures in a row with no success
between; a down engine gets no new work for `DOWN_COOLDOWN_S`, then one task tries it again.
Only the work on it fails, and new work goes to the engines that are up; a down engine still
gets the work that can only run there (a continuation of its contexts, or any work when no
other engine is up), since it may have recovered. Work that only closed (or removed) engines
could run fails at once with `EngineUnavailableError` instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import dataclass, field

from parrot_core.contexts import ContextTask, ServeCoreContextManager
from parrot_core.errors import EngineError, EngineUnavailableError, InvalidRequestError, OutOfBlocksError, RequestTooLargeError, RuntimeClosedError
from parrot_core.graph import PerfCriteria, TaskGroup
from parrot_core.serve.affinity import PrefixAffinity

log = logging.getLogger(__name__)
FAILURES_TO_DOWN = 3  # engine failures in a row that take an engine out of placement
DOWN_COOLDOWN_S = 30.0  # how long a down engine gets no new work before it is tried again


@dataclass(eq=False)
class EngineSlot:
    """What the scheduler knows of one engine."""

    engine_id: Hashable
    model_name: str
    capacity_tokens: int
    max_model_len: int
    # A unit is a task, or a whole task group (its members count as one against the cap).
    units: dict[tuple, int] = field(default_factory=dict)  # unit -> tasks of it placed here
    latency_units: set[tuple] = field(default_factory=set)
    pending_tokens: dict[int, int] = field(default_factory=dict)  # task seq -> tokens it adds until it finishes
    is_closed: Callable[[], bool] = lambda: False  # the engine was closed (it went away)
    failures_in_a_row: int = 0
    down_until: float = 0.0  # no new work before this time (clock of the scheduler)
    down_reason: str = ""
    placed_total: int = 0


@dataclass(eq=False)
class SchedTask:
    """Work waiting for an engine. `fill_tokens[i]` is the token count of the i-th node of
    `context_task` (0 for the Gen); work with no `context_task` (a plain generate) has no
    prefix the serve layer caches, so nothing of it counts as cached."""

    context_task: ContextTask | None
    fill_tokens: list[int]
    max_tokens: int
    criteria: PerfCriteria = PerfCriteria.THROUGHPUT
    depth: int = 1
    group: TaskGroup | None = None
    models: tuple[str, ...] = ()
    required_engine: Hashable | None = None  # a continuation runs where its parent context is
    prior_tokens: int = 0  # tokens the work's context already holds (a continuation, a handle)
    prefix_keys: Sequence[int] = ()  # `PrefixAffinity` keys of the prompt of work without a context task
    seq: int = field(default_factory=itertools.count().__next__)
    placed: asyncio.Future[Hashable] | None = None
    engine_id: Hashable | None = None

    @property
    def unit(self) -> tuple:
        return ("group", id(self.group)) if self.group is not None else ("task", self.seq)


def check_balance_thresholds(abs_threshold: int, rel_threshold: float) -> None:
    """`InvalidRequestError` unless abs_threshold >= 0 tasks and rel_threshold >= 1."""
    if abs_threshold < 0 or rel_threshold < 1:
        raise InvalidRequestError(
            f"balance_abs_threshold must be >= 0 and balance_rel_threshold >= 1, got {abs_threshold} and {rel_threshold}"
        )


class GlobalScheduler:
    def __init__(
        self,
        contexts: ServeCoreContextManager,
        *,
        latency_cap: int = 4,
        app_fifo: bool = True,
        clock: Callable[[], float] = time.monotonic,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
    ) -> None:
        check_balance_thresholds(balance_abs_threshold, balance_rel_threshold)
        self.contexts = contexts
        self.latency_cap = latency_cap
        # Spread work leaves prefix affinity for load when engines' task counts differ by more
        # than both (SGLang's gateway's cache-aware rule and defaults: 64 tasks and 1.5x).
        self.balance_abs_threshold, self.balance_rel_threshold = balance_abs_threshold, balance_rel_threshold
        self.app_fifo = app_fifo
        self.clock = clock
        self.engines: dict[Hashable, EngineSlot] = {}
        self.queue: list[SchedTask] = []
        self.affinity = PrefixAffinity()
        self.closed = False
        self._pass_pending = False

    def close(self) -> None:
        """The core is shutting down: queued and later work fails with `RuntimeClosedError`
        (not as an engine failure, though the engines close next)."""
        self.closed = True
        for task in self.queue:
            if task.placed is not None and not task.placed.done():
                task.placed.set_exception(RuntimeClosedError("the runtime was closed before this work was placed"))
        self.queue.clear()

    def add_engine(
        self,
        engine_id: Hashable,
        model_name: str,
        capacity_tokens: int,
        max_model_len: int | None = None,
        is_closed: Callable[[], bool] | None = None,
    ) -> None:
        """`capacity_tokens`: the KV slots of the engine's pool; `max_model_len`: the longest
        sequence it runs (default: no limit beyond the pool); `is_closed`: whether the engine
        went away (then it takes no work)."""
        slot = EngineSlot(engine_id, model_name, capacity_tokens, max_model_len or capacity_tokens)
        if is_closed is not None:
            slot.is_closed = is_closed
        self.engines[engine_id] = slot
        self._schedule()

    def remove_engine(self, engine_id: Hashable) -> None:
        self.engines.pop(engine_id, None)
        self.affinity.forget_engine(engine_id)
        self._schedule()

    # -- engine health -------------------------------------------------------------------
    def is_up(self, slot: EngineSlot) -> bool:
        return not slot.is_closed() and self.clock() >= slot.down_until

    def down_engines(self) -> dict[Hashable, str]:
        """The engines that take no new work now, with why."""
        return {e.engine_id: ("closed" if e.is_closed() else e.down_reason) for e in self.engines.values() if not self.is_up(e)}

    def report(self, engine_id: Hashable | None, error: BaseException | None) -> None:
        """A task placed on `engine_id` finished, with `error` or fine. Only engine failures
        count against the engine: a bad request, a cancellation or a full pool do not."""
        slot = self.engines.get(engine_id)
        if slot is None:
            return
        if error is None:
            slot.failures_in_a_row = 0
            return
        if isinstance(error, EngineUnavailableError):
            self._take_down(slot, str(error))
        elif isinstance(error, EngineError) and not isinstance(error, OutOfBlocksError):
            slot.failures_in_a_row += 1
            if slot.failures_in_a_row >= FAILURES_TO_DOWN:
                self._take_down(slot, f"{slot.failures_in_a_row} failures in a row, the last: {error}")

    def _take_down(self, slot: EngineSlot, reason: str) -> None:
        log.warning("engine %r is down for %.0f s: %s", slot.engine_id, DOWN_COOLDOWN_S, reason)
        slot.down_until = self.clock() + DOWN_COOLDOWN_S
        slot.down_reason = reason
        self._schedule_soon()

    @contextlib.asynccontextmanager
    async def admit(self, task: SchedTask) -> AsyncIterator[Hashable]:
        """Place `task` and hold its place while the block runs: `async with
        scheduler.admit(task) as engine_id: ...`. Leaving the block (also by an error or a
        cancellation) finishes the task, which may let queued work in."""
        engine_id = await self.place(task)
        error: BaseException | None = None
        try:
            yield engine_id
        except BaseException as e:
            error = e
            raise
        finally:
            self.finish(task, error)

    async def place(self, task: SchedTask) -> Hashable:
        """Queue `task`; returns the engine it was placed on. Raises a typed error at once for
        work that no engine could ever take (unknown model, too long for every engine)."""
        if self.closed:
            raise RuntimeClosedError("the runtime is closed")
        if task.models and not any(e.model_name in task.models for e in self.engines.values()):
            raise InvalidRequestError(f"no engine serves any of the models {list(task.models)}")
        fitting = [e for e in self.engines.values() if not task.models or e.model_name in task.models]
        unavailable = self._unavailable(task)
        if unavailable is not None:
            raise unavailable
        needed = sum(task.fill_tokens) + task.prior_tokens + task.max_tokens
        biggest = max((e.capacity_tokens for e in fitting), default=0)
        if needed > biggest:
            raise RequestTooLargeError(f"the call needs {needed} tokens of KV cache; the largest engine holds {biggest}")
        longest = max((e.max_model_len for e in fitting), default=0)
        if needed > longest:
            raise RequestTooLargeError(
                f"This model's maximum context length is {longest} tokens. However, you requested {needed} tokens"
                f" ({needed - task.max_tokens} in the prompt, {task.max_tokens} to generate)."
            )
        task.placed = asyncio.get_running_loop().create_future()
        self.queue.append(task)
        self._schedule()
        try:
            return await task.placed
        except asyncio.CancelledError:
            if task in self.queue:
                self.queue.remove(task)
            elif task.engine_id is not None:
                self.finish(task)
            raise

    def pick(self, prefix_keys: Sequence[int] = (), models: tuple[str, ...] = ()) -> Hashable:
        """The engine a new root context (a handle, a chat session's prefix) goes to, now: the
        one that ran the longest prefix (`PrefixAffinity` keys), then the least loaded, among
        the engines that are up. Places no work. `EngineUnavailableError` if none is up."""
        probe = SchedTask(None, [0], 0, models=models, prefix_keys=prefix_keys)
        error = self._unavailable(probe)
        if error is not None:
            raise error
        cached = {probe.seq: self._cached_by_engine(probe)}
        slot = self._choose([probe], cached)
        if slot is None:  # every engine is full: the least loaded one that is up
            usable = [e for e in self.engines.values() if self._usable(e, models) and (not models or e.model_name in models)]
            slot = min(usable, key=self._load)
        if prefix_keys:
            self.affinity.record(slot.engine_id, prefix_keys)
        slot.placed_total += 1
        return slot.engine_id

    def finish(self, task: SchedTask, error: BaseException | None = None) -> None:
        """The task left its engine, fine or with `error` (see `report`): its load is gone;
        queued tasks may fit now."""
        if task.engine_id is not None and not isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            self.report(task.engine_id, error)
        slot = self.engines.get(task.engine_id)
        if slot is not None and task.seq in slot.pending_tokens:
            del slot.pending_tokens[task.seq]
            slot.units[task.unit] -= 1
            if not slot.units[task.unit]:
                del slot.units[task.unit]
                slot.latency_units.discard(task.unit)
        self._schedule_soon()

    def _schedule_soon(self) -> None:
        """Schedule on the next loop turn, so the tasks a finishing task unblocks (deeper
        chains of the same app) are queued before its capacity is handed out (app-FIFO)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._schedule()
            return
        if not self._pass_pending:
            self._pass_pending = True
            loop.call_soon(self._deferred_pass)

    def _deferred_pass(self) -> None:
        self._pass_pending = False
        self._schedule()

    # -- the policy ----------------------------------------------------------------------
    def _usable(self, slot: EngineSlot, models: tuple[str, ...]) -> bool:
        """Up, or down but not closed while no other engine for `models` is up (then trying
        it is better than failing: it may have recovered)."""
        if slot.is_closed():
            return False
        if self.clock() >= slot.down_until:
            return True
        return not any(self.is_up(e) for e in self.engines.values() if e is not slot and (not models or e.model_name in models))

    def _unavailable(self, task: SchedTask) -> EngineUnavailableError | None:
        """The error for work that no engine could run now (closed or removed), or None."""
        if task.required_engine is not None:
            slot = self.engines.get(task.required_engine)
            if slot is None or slot.is_closed():
                why = "removed" if slot is None else "closed"
                return EngineUnavailableError(f"engine {task.required_engine!r}, which holds this work's context, is {why}")
            return None
        fitting = [e for e in self.engines.values() if not task.models or e.model_name in task.models]
        if fitting and all(e.is_closed() for e in fitting):  # a down one that is not closed is still tried
            return EngineUnavailableError(f"every engine that could run this is gone: {self.down_engines()}")
        return None

    def _fail_unplaceable(self) -> None:
        for task in list(self.queue):
            error = self._unavailable(task)
            if error is not None:
                self.queue.remove(task)
                if task.placed is not None and not task.placed.done():
                    task.placed.set_exception(error)

    def _schedule(self) -> None:
        self._fail_unplaceable()
        if self.app_fifo:
            self.queue.sort(key=lambda t: (-t.depth, t.seq))
        placed_any = True
        while placed_any and self.queue:
            placed_any = False
            for head in list(self.queue):
                group = self._group_of(head)
                cached = {t.seq: self._cached_by_engine(t) for t in group}
                engine = self._choose(group, cached)
                if engine is None:
                    continue
                for task in group:
                    self._assign(task, engine, self._new_tokens(task, cached[task.seq][engine.engine_id]))
                placed_any = True
                break

    def _group_of(self, task: SchedTask) -> list[SchedTask]:
        if task.group is None:
            return [task]
        return [t for t in self.queue if t.group is task.group]

    def _choose(self, group: list[SchedTask], cached: dict[int, dict[Hashable, int]]) -> EngineSlot | None:
        """`cached[task.seq][engine_id]`: tokens of the task's leading Fills already cached there."""
        candidates = []
        for slot in self.engines.values():
            here = [cached[t.seq][slot.engine_id] for t in group]
            if not self._qualifies(slot, group, here):
                continue
            candidates.append((sum(here), slot))
        if not candidates:
            return None
        # LATENCY work and plain work (no serve-layer contexts: a request, not a program) spread
        # by load; THROUGHPUT program work packs.
        spread = any(t.criteria is PerfCriteria.LATENCY or t.context_task is None for t in group)
        if spread and self._imbalanced([slot for _, slot in candidates]):
            candidates = [(0, slot) for _, slot in candidates]  # the least loaded, as if nothing were cached

        def rank(item: tuple[int, EngineSlot]) -> tuple:
            affinity, slot = item
            tasks, free = len(slot.units), slot.capacity_tokens - self._load(slot)
            if not spread:
                return (affinity, tasks, -free)
            # ties: less KV held by live contexts, then fewer placements so far (round robin)
            return (affinity, -tasks, free, -self.contexts.engine_load(slot.engine_id), -slot.placed_total)

        return max(candidates, key=rank)[1]

    def _imbalanced(self, slots: list[EngineSlot]) -> bool:
        """Whether the engines' task counts differ by more than both balance thresholds."""
        loads = [len(slot.units) for slot in slots]
        most, least = max(loads), min(loads)
        return most - least > self.balance_abs_threshold and most > self.balance_rel_threshold * least

    def _qualifies(self, slot: EngineSlot, group: list[SchedTask], cached_here: list[int]) -> bool:
        models = group[0].models
        required = group[0].required_engine == slot.engine_id
        if not (self._usable(slot, models) or (required and not slot.is_closed())):
            return False
        if models and slot.model_name not in models:
            return False
        if any(t.required_engine is not None and t.required_engine != slot.engine_id for t in group):
            return False
        needed = sum(self._new_tokens(t, c) for t, c in zip(group, cached_here))
        if slot.pending_tokens and self._load(slot) + needed > slot.capacity_tokens:
            return False
        unit = group[0].unit
        if unit in slot.units:
            return True  # the rest of a group follows its first members
        if any(unit in other.units for other in self.engines.values()):
            return False
        latency = any(t.criteria is PerfCriteria.LATENCY for t in group)
        if (latency or slot.latency_units) and len(slot.units) + 1 > self.latency_cap:
            return False  # a LATENCY task (here or arriving) keeps its engine lightly loaded
        return True

    @staticmethod
    def _load(slot: EngineSlot) -> int:
        return sum(slot.pending_tokens.values())

    def _cached_by_engine(self, task: SchedTask) -> dict[Hashable, int]:
        """One prefix-cache query (it covers every engine) per task and decision."""
        if task.context_task is None:
            known = self.affinity.match(task.prefix_keys) if task.prefix_keys else {}
            prompt = sum(task.fill_tokens)
            return {e: min(known.get(e, 0), prompt) for e in self.engines}
        return {
            m.engine_id: sum(task.fill_tokens[: m.nodes]) for m in self.contexts.query_prefixes_in_engines(task.context_task)
        }

    @staticmethod
    def _new_tokens(task: SchedTask, cached_tokens: int) -> int:
        """Tokens the task adds to an engine that already holds `cached_tokens` of its prompt."""
        return sum(task.fill_tokens) - cached_tokens + task.max_tokens

    def _assign(self, task: SchedTask, slot: EngineSlot, new_tokens: int) -> None:
        self.queue.remove(task)
        task.engine_id = slot.engine_id
        if task.prefix_keys:
            self.affinity.record(slot.engine_id, task.prefix_keys)
        slot.pending_tokens[task.seq] = new_tokens
        slot.placed_total += 1
        slot.units[task.unit] = slot.units.get(task.unit, 0) + 1
        if task.criteria is PerfCriteria.LATENCY:
            slot.latency_units.add(task.unit)
        assert task.placed is not None
        if not task.placed.done():
            task.placed.set_result(slot.engine_id)
