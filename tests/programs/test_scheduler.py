"""Parrot's global-scheduler scenarios as asserting tests (no model: scheduling only)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from parrot_core.contexts import ContextTask, NodeSpec, ServeCoreContextManager
from parrot_core.graph import CompletionChain, PerfCriteria, PlaceholderGen, SemanticVariable, TaskGroup
from parrot_core.errors import InvalidRequestError
from parrot_core.frontend.runtime import Runtime
from parrot_core.serve.scheduler import GlobalScheduler, SchedTask
from parrot_core.server.settings import ServeSettings

pytestmark = pytest.mark.timeout(60)
LAT, THR = PerfCriteria.LATENCY, PerfCriteria.THROUGHPUT


def make(engines=("e0", "e1"), capacity=100_000, latency_cap=4):
    mgr = ServeCoreContextManager()
    sched = GlobalScheduler(mgr, latency_cap=latency_cap)
    for e in engines:
        mgr.register_engine(e)
        sched.add_engine(e, "model", capacity)
    return mgr, sched


def task(i, criteria=THR, prefix="p", fill=100, max_tokens=10, depth=1, group=None):
    nodes = [NodeSpec(f"global:c:{prefix}", is_constant_prefix=True), NodeSpec(f"s:v:{i}", is_fill=False)]
    return SchedTask(ContextTask(("t", i), None, nodes), [fill, 0], max_tokens, criteria, depth, group)


async def place_all(sched, tasks):
    return await asyncio.gather(*(sched.place(t) for t in tasks))


def test_throughput_tasks_pack_onto_one_engine():
    _, sched = make()
    engines = asyncio.run(place_all(sched, [task(i) for i in range(8)]))
    assert set(engines) == {"e0"}


def test_latency_tasks_respect_the_per_engine_cap():
    _, sched = make()
    engines = asyncio.run(place_all(sched, [task(i, LAT) for i in range(8)]))
    assert engines.count("e0") == 4 and engines.count("e1") == 4


def test_a_task_group_goes_to_one_engine_even_past_the_latency_cap():
    _, sched = make()
    gv = SemanticVariable("s:v:reduce")
    consumer = CompletionChain([], PlaceholderGen(gv))
    group = TaskGroup(consumer)
    maps = [task(i, LAT, group=group) for i in range(16)]
    engines = asyncio.run(place_all(sched, maps))
    assert len(set(engines)) == 1


def test_prefix_affinity_beats_the_capacity_tie_break():
    mgr, sched = make()
    # e0 already holds the prefix (and so has LESS free capacity than e1)
    held = ContextTask("holder", "e0", [NodeSpec("global:c:sys", is_constant_prefix=True), NodeSpec("s:v:x", is_fill=False)])
    ctxs = mgr.set_task_contexts(held)
    mgr.record_fill(ctxs[0], 500)
    for criteria in (LAT, THR):
        t = task(100 + (criteria is LAT), criteria, prefix="sys", fill=500)
        assert asyncio.run(sched.place(t)) == "e0"
        sched.finish(t)
    # without the prefix, a latency task goes to the engine with less placed work
    busy = task(300, prefix="other")
    busy.required_engine = "e0"
    assert asyncio.run(sched.place(busy)) == "e0"
    t = task(200, LAT, prefix="other")
    assert asyncio.run(sched.place(t)) == "e1"


def test_cached_kv_never_makes_work_wait():
    """Issue 9 defect 1: pinned constant prefixes, retained outputs and held contexts are a
    cache the engine evicts, so they never count against placement (before: a task waited
    forever for pins that expire after 600 s, and nothing woke it)."""
    mgr, sched = make(engines=("e0",), capacity=600)
    held = ContextTask("holder", "e0", [NodeSpec("global:c:sys", is_constant_prefix=True), NodeSpec("s:v:x", is_fill=False)])
    ctxs = mgr.set_task_contexts(held)
    mgr.record_fill(ctxs[0], 500)
    mgr.free_task_contexts(held)  # the system prompt stays pinned: 500 tokens of cache
    handle = mgr.new_context("e0")
    mgr.record_fill(handle, 90)
    assert mgr.engine_load("e0") == 590
    t = task(1, prefix="other", fill=300, max_tokens=50)
    assert asyncio.run(asyncio.wait_for(sched.place(t), 5)) == "e0"


def test_an_idle_engine_takes_any_task_that_fits_it_alone():
    _, sched = make(engines=("e0",), capacity=150)
    with pytest.raises(Exception, match="largest engine holds 150"):
        asyncio.run(sched.place(task(1, fill=150, max_tokens=1)))
    assert asyncio.run(asyncio.wait_for(sched.place(task(2, fill=140, max_tokens=10)), 5)) == "e0"


def test_work_longer_than_the_model_is_refused_at_placement():
    from parrot_core.errors import RequestTooLargeError

    mgr = ServeCoreContextManager()
    sched = GlobalScheduler(mgr)
    mgr.register_engine("e0")
    sched.add_engine("e0", "model", 10_000, max_model_len=256)
    with pytest.raises(RequestTooLargeError, match="maximum context length is 256 tokens"):
        asyncio.run(sched.place(task(1, fill=250, max_tokens=10)))
    assert sched.queue == []


def test_app_fifo_runs_deeper_chains_first():
    # one engine with room for one task at a time; 4 apps of two steps (A then B)
    _, sched = make(engines=("e0",), capacity=150)
    order = []

    async def app(i):
        a = task(i, fill=100, depth=1)
        await sched.place(a)
        order.append(f"A{i}")
        await asyncio.sleep(0)
        sched.finish(a)
        b = task(10 + i, fill=100, depth=2)
        await sched.place(b)
        order.append(f"B{i}")
        await asyncio.sleep(0)
        sched.finish(b)

    async def main():
        await asyncio.gather(*(app(i) for i in range(4)))

    asyncio.run(main())
    assert order[:4] == ["A0", "B0", "A1", "B1"]  # each app's B jumps ahead of the waiting As
    assert len(order) == 8


def test_a_task_waits_for_capacity_and_is_placed_when_another_finishes():
    _, sched = make(engines=("e0",), capacity=150)

    async def main():
        first = task(1, fill=100)
        await sched.place(first)
        second = asyncio.ensure_future(sched.place(task(2, fill=100)))
        await asyncio.sleep(0.01)
        assert not second.done()  # no busy loop: it simply waits
        sched.finish(first)
        return await asyncio.wait_for(second, 5)

    assert asyncio.run(main()) == "e0"


def test_model_mismatch_is_a_typed_error():
    from parrot_core.errors import InvalidRequestError

    _, sched = make()
    t = task(1)
    t.models = ("gpt-9",)
    with pytest.raises(InvalidRequestError, match="no engine serves"):
        asyncio.run(sched.place(t))


# -- plain requests: prefix affinity without serve-layer contexts ---------------------------
def plain(i, prompt, criteria=THR, max_tokens=10, sched=None):
    keys = sched.affinity.keys(prompt) if sched is not None else ()
    return SchedTask(None, [len(prompt)], max_tokens, criteria, prefix_keys=keys, seq=i)


def test_plain_requests_sharing_a_prefix_follow_it_to_one_engine_over_the_less_loaded_one():
    _, sched = make()
    shared = list(range(256))

    async def main():
        first = plain(1, shared + [1000], sched=sched)
        where = await sched.place(first)
        # plain work goes to the least loaded engine, unless another holds its prefix
        followers = [plain(10 + i, shared + [2000 + i], sched=sched) for i in range(3)]
        placed = [await sched.place(t) for t in followers]
        stranger = await sched.place(plain(20, list(range(5000, 5300)), sched=sched))
        return where, placed, stranger

    where, placed, stranger = asyncio.run(main())
    assert placed == [where] * 3
    assert stranger != where


def _two_engines(**thresholds):
    mgr = ServeCoreContextManager()
    sched = GlobalScheduler(mgr, **thresholds)
    for e in ("e0", "e1"):
        mgr.register_engine(e)
        sched.add_engine(e, "model", 100_000)
    return sched


def _followers_after_strangers(sched, strangers: int, followers: int):
    """`strangers` unrelated tasks pinned to e1, then a prefix's first request and its
    followers (none finishes): where the first went and where each follower went."""
    shared = list(range(256))

    async def main():
        for i in range(strangers):
            t = plain(500 + i, list(range(9000 + 300 * i, 9300 + 300 * i)), sched=sched)
            t.required_engine = "e1"
            await sched.place(t)
        holder = await sched.place(plain(1, shared + [1000], sched=sched))
        return holder, [await sched.place(plain(10 + i, shared + [2000 + i], sched=sched)) for i in range(followers)]

    return asyncio.run(main())


@pytest.mark.parametrize("abs_threshold", [0, 1, 3])
def test_affinity_gives_way_to_load_once_the_holder_leads_by_more_than_the_threshold(abs_threshold):
    holder, placed = _followers_after_strangers(_two_engines(balance_abs_threshold=abs_threshold), 0, 8)
    # the holder has k tasks before its k-th follower; the other none (so the ratio always passes)
    assert placed[:abs_threshold] == [holder] * abs_threshold
    assert placed[abs_threshold] != holder


def test_the_ratio_threshold_keeps_affinity_while_the_other_engine_is_busy_too():
    sched = _two_engines(balance_abs_threshold=1, balance_rel_threshold=1.5)
    holder, placed = _followers_after_strangers(sched, 4, 8)
    assert holder == "e0"  # e1 holds the 4 strangers
    # before follower k the holder has k tasks against e1's 4: past both thresholds (k - 4 > 1
    # and k > 6) only at k = 7; by the difference alone it would have left at k = 6
    assert placed[:6] == ["e0"] * 6 and placed[6] == "e1"


def test_with_the_default_thresholds_a_dozen_followers_stay_with_the_prefix():
    holder, placed = _followers_after_strangers(_two_engines(), 0, 12)
    assert placed == [holder] * 12


def test_balance_thresholds_are_checked_before_anything_is_built():
    with pytest.raises(InvalidRequestError, match="balance_rel_threshold >= 1"):
        GlobalScheduler(ServeCoreContextManager(), balance_rel_threshold=0.5)
    with pytest.raises(InvalidRequestError, match="balance_abs_threshold must be >= 0"):
        GlobalScheduler(ServeCoreContextManager(), balance_abs_threshold=-1)
    with pytest.raises(InvalidRequestError, match="balance_rel_threshold"):
        ServeSettings(balance_rel_threshold=0.9)
    settings = ServeSettings.from_env({"PARROT_CORE_BALANCE_ABS_THRESHOLD": "8", "PARROT_CORE_BALANCE_REL_THRESHOLD": "2"})
    assert (settings.balance_abs_threshold, settings.balance_rel_threshold) == (8, 2.0)
    threads = threading.active_count()
    with pytest.raises(InvalidRequestError, match="balance_abs_threshold"):
        Runtime(balance_abs_threshold=-1)  # refused before the default model loads
    assert threading.active_count() == threads  # no engine thread was started


# -- engine health: a failing engine fails only its own work --------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_with_clock(engines=("e0", "e1")):
    mgr = ServeCoreContextManager()
    clock = FakeClock()
    sched = GlobalScheduler(mgr, clock=clock)
    closed = dict.fromkeys(engines, False)
    for e in engines:
        mgr.register_engine(e)
        sched.add_engine(e, "model", 100_000, is_closed=lambda e=e: closed[e])
    return sched, clock, closed


def run_on(sched, engine, error):
    """Place a task on `engine` and finish it with `error` (None: fine)."""
    t = task(hash((engine, repr(error), id(error))) % 10**9)
    t.required_engine = engine
    assert asyncio.run(sched.place(t)) == engine
    sched.finish(t, error)


def test_engine_failures_in_a_row_take_it_down_and_new_work_goes_elsewhere_until_the_cooldown():
    from parrot_core.errors import EngineError, EngineUnavailableError
    from parrot_core.serve.scheduler import DOWN_COOLDOWN_S, FAILURES_TO_DOWN

    sched, clock, _ = make_with_clock()
    for _ in range(FAILURES_TO_DOWN - 1):
        run_on(sched, "e0", EngineError("step failed"))
    run_on(sched, "e0", None)  # a success in between: the count starts again
    for _ in range(FAILURES_TO_DOWN - 1):
        run_on(sched, "e0", EngineError("step failed"))
    assert sched.down_engines() == {}
    run_on(sched, "e0", EngineError("step failed"))
    assert "e0" in sched.down_engines() and "step failed" in sched.down_engines()["e0"]
    # THROUGHPUT work packs onto one engine: with e0 up it would go there (first, and tied)
    assert {asyncio.run(sched.place(task(100 + i))) for i in range(4)} == {"e1"}
    held = task(200)
    held.required_engine = "e0"  # a continuation of a context on e0 can only run there: it is tried
    assert asyncio.run(sched.place(held)) == "e0"
    sched.finish(held)
    clock.now += DOWN_COOLDOWN_S
    assert sched.down_engines() == {}  # tried again after the cooldown
    run_on(sched, "e0", None)


def test_request_errors_never_count_against_an_engine():
    from parrot_core.errors import InvalidRequestError, OutOfBlocksError, UnknownContextError
    from parrot_core.serve.scheduler import FAILURES_TO_DOWN

    sched, _, _ = make_with_clock()
    for error in [InvalidRequestError("bad"), OutOfBlocksError("full"), UnknownContextError("gone"), asyncio.CancelledError()]:
        for _ in range(FAILURES_TO_DOWN):
            run_on(sched, "e0", error)
    assert sched.down_engines() == {}


def test_an_unavailable_engine_is_down_at_once_and_work_that_only_closed_engines_could_run_fails_without_waiting():
    from parrot_core.errors import EngineUnavailableError

    sched, _, closed = make_with_clock()
    run_on(sched, "e0", EngineUnavailableError("connection refused"))
    assert sched.down_engines() == {"e0": "connection refused"}
    assert asyncio.run(sched.place(task(1))) == "e1"
    closed["e1"] = True
    assert sched.down_engines()["e1"] == "closed"
    # e0 is only cooling down and no other engine is up: it is tried rather than failing
    assert asyncio.run(sched.place(task(2))) == "e0"
    closed["e0"] = True
    with pytest.raises(EngineUnavailableError, match="gone"):
        asyncio.run(sched.place(task(3)))
    assert sched.queue == []


def test_queued_work_that_must_run_on_an_engine_fails_when_it_goes_down():
    from parrot_core.errors import EngineUnavailableError

    sched, _, closed = make_with_clock(engines=("e0",))
    sched.engines["e0"].capacity_tokens = 150

    async def main():
        first = task(1, fill=100)
        await sched.place(first)
        waiting = task(2, fill=100)
        waiting.required_engine = "e0"
        pending = asyncio.ensure_future(sched.place(waiting))
        await asyncio.sleep(0.01)
        assert not pending.done()  # waits for capacity
        closed["e0"] = True
        sched.finish(first, EngineUnavailableError("gone"))
        with pytest.raises(EngineUnavailableError):
            await asyncio.wait_for(pending, 5)

    asyncio.run(main())
    assert sched.queue == []
