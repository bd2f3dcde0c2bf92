"""One test (at least) per rule of design.md section 3.2, plus Parrot's scenarios."""

import asyncio
import copy

import pytest

from parrot_core.contexts import ContextScope, ContextTask, NodeSpec, ServeCoreContextManager
from parrot_core.contexts import prefix_cache as prefix_cache_module
from parrot_core.errors import (
    ContextFailedError,
    EngineNotFoundError,
    InvalidRequestError,
    UnknownContextError,
    UnknownSessionError,
)

from .fakes import RecordingEngine, assert_children_freed_first

SYS = NodeSpec("global:c:sys", is_constant_prefix=True)
MID = NodeSpec("s1:c:mid")
DOC = NodeSpec("s1:c:doc")


def gen(name: str) -> NodeSpec:
    return NodeSpec(f"s1:v:{name}", is_fill=False)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def env():
    clock = Clock()
    mgr = ServeCoreContextManager(constant_prefix_timeout=600.0, clock=clock)
    engines = {"e0": RecordingEngine(), "e1": RecordingEngine()}
    for name, engine in engines.items():
        mgr.register_engine(name, engine)
    mgr.register_session("s1")
    mgr.register_session("s2")
    yield mgr, engines, clock
    mgr.check_invariants()


def task(task_id, nodes, engine="e0", session="s1", **kw) -> ContextTask:
    return ContextTask(task_id=task_id, engine_id=engine, nodes=nodes, session_id=session, **kw)


def refs(mgr) -> dict[int, int]:
    return {cid: c.ref_count for cid, c in mgr.contexts.items()}


def snapshot(mgr):
    return (refs(mgr), {e: sorted(c.items()) for e, c in mgr.prefix_caches.items()}, mgr.holder_count())


# -- R1 ---------------------------------------------------------------------------------
def test_r1_fork_adds_one_to_parent_and_free_cascades_children_first(env):
    mgr, engines, _ = env
    root = mgr.new_context("e0")
    a = mgr.fork_context(root)
    b = mgr.fork_context(a)
    assert (root.ref_count, a.ref_count, b.ref_count) == (2, 2, 1)
    mgr.free_context(root)  # the handle goes; the child keeps the root alive
    assert root.alive and root.ref_count == 1 and engines["e0"].freed == []
    mgr.free_context(a)
    assert a.alive and a.ref_count == 1
    mgr.free_context(b)  # last handle: the whole chain dies, leaf first
    assert engines["e0"].freed == [b.context_id, a.context_id, root.context_id]
    assert mgr.contexts == {} and not root.alive


def test_parrot_scenario_two_tasks_share_sys_and_mid(env):
    """Parrot §3.5: two concurrent tasks [SYS, mid, Gen] on one engine."""
    mgr, engines, _ = env
    t1 = task("t1", [SYS, MID, gen("a")])
    t2 = task("t2", [SYS, MID, gen("b")])
    c1 = mgr.set_task_contexts(t1)
    c2 = mgr.set_task_contexts(t2)
    sys_ctx, mid_ctx, gen1 = c1
    assert c2[0] is sys_ctx and c2[1] is mid_ctx and c2[2] is not gen1
    gen2 = c2[2]
    # R1 exactly: SYS = 2 tasks + 1 child (mid) + 1 pin; mid = 2 tasks + 2 children; gens = 1 task
    assert refs(mgr) == {sys_ctx.context_id: 4, mid_ctx.context_id: 4, gen1.context_id: 1, gen2.context_id: 1}
    assert sys_ctx.scope is ContextScope.GLOBAL and sys_ctx.pinned and mid_ctx.scope is ContextScope.SESSION
    mgr.check_invariants()
    mgr.free_task_contexts(t1)
    mgr.free_task_contexts(t2)
    assert list(mgr.contexts) == [sys_ctx.context_id] and sys_ctx.ref_count == 1  # only the pin
    assert engines["e0"].freed == [gen1.context_id, gen2.context_id, mid_ctx.context_id]
    assert_children_freed_first(engines["e0"].freed, c1 + c2)


# -- R2 ---------------------------------------------------------------------------------
def test_r2_gen_contexts_are_never_cached_and_dead_contexts_leave_no_key(env):
    mgr, _, _ = env
    t1 = task("t1", [SYS, DOC, gen("a")])
    sys_ctx, doc_ctx, gen_ctx = mgr.set_task_contexts(t1)
    cached = {cid for _, cid in mgr.prefix_caches["e0"].items()}
    assert cached == {sys_ctx.context_id, doc_ctx.context_id}
    assert mgr.prefix_caches["e1"].items() == []  # one cache per engine
    mgr.free_task_contexts(t1)
    assert {cid for _, cid in mgr.prefix_caches["e0"].items()} == {sys_ctx.context_id}
    # the same chain again gets a new doc context (the old one died with its key)
    c = mgr.set_task_contexts(task("t2", [SYS, DOC, gen("b")]))
    assert c[0] is sys_ctx and c[1].context_id not in (doc_ctx.context_id, gen_ctx.context_id)


def test_r2_only_the_leading_fill_run_is_cached(env):
    mgr, _, _ = env
    first = mgr.set_task_contexts(task("t1", [SYS, gen("a")]))
    cont = mgr.set_task_contexts(task("t2", [MID, gen("b")], parent_context=first[1]))
    cached = {cid for _, cid in mgr.prefix_caches["e0"].items()}
    assert cached == {first[0].context_id}  # nothing after a Gen is cached
    assert cont[0].parent_context is first[1]


def test_r2_prefix_is_per_engine(env):
    mgr, _, _ = env
    a = mgr.set_task_contexts(task("t1", [SYS, DOC, gen("a")], engine="e0"))
    b = mgr.set_task_contexts(task("t2", [SYS, DOC, gen("b")], engine="e1"))
    assert {c.context_id for c in a}.isdisjoint(c.context_id for c in b)
    assert all(c.engine_id == "e1" for c in b)


def test_r2_hash_collision_is_a_miss_not_a_wrong_context(env, monkeypatch):
    mgr, _, _ = env
    monkeypatch.setattr(prefix_cache_module, "child_key", lambda parent, var: "same-key")
    monkeypatch.setattr("parrot_core.contexts.manager.child_key", lambda parent, var: "same-key")
    a = mgr.set_task_contexts(task("t1", [SYS, gen("a")]))
    b = mgr.set_task_contexts(task("t2", [DOC, gen("b")]))
    assert b[0] is not a[0] and b[0].parent_context is None  # DOC did not "hit" SYS's context


def test_r2_fused_fills_leave_no_stale_keys(env):
    mgr, engines, _ = env
    fused = task("t1", [SYS, DOC, MID, gen("a")], fuse_fill=True)
    sys_ctx, doc_ctx, mid_ctx, gen_ctx = mgr.set_task_contexts(fused)
    assert doc_ctx is mid_ctx and doc_ctx.parent_context is sys_ctx
    cached = {cid for _, cid in mgr.prefix_caches["e0"].items()}
    assert cached == {sys_ctx.context_id}  # the fused run holds DOC+MID: no key may name it
    # a request sharing only [SYS, DOC] must not land on the fused DOC+MID context
    other = mgr.set_task_contexts(task("t2", [SYS, DOC, gen("b")]))
    assert other[1] is not doc_ctx
    mgr.free_task_contexts(fused)
    mgr.free_task_contexts(task("t2", []))
    assert all(mgr.contexts.get(cid) is not None for _, cid in mgr.prefix_caches["e0"].items())
    assert set(mgr.contexts) == {sys_ctx.context_id}
    assert len(engines["e0"].freed) == len(set(engines["e0"].freed)) == 4


# -- R3 ---------------------------------------------------------------------------------
def test_r3_first_claim_fills_and_failure_reaches_every_waiter(env):
    mgr, _, _ = env
    a = mgr.set_task_contexts(task("t1", [SYS, DOC, gen("a")]))
    b = mgr.set_task_contexts(task("t2", [SYS, DOC, gen("b")]))
    doc = a[1]
    assert doc is b[1]
    assert doc.claim() is True and doc.claim() is False

    async def waiter():
        await doc.wait_ready()

    async def main():
        w = asyncio.create_task(waiter())
        await asyncio.sleep(0)
        mgr.fail_context(doc, RuntimeError("engine exploded"))
        with pytest.raises(ContextFailedError, match="engine exploded"):
            await asyncio.wait_for(w, 5)

    asyncio.run(main())
    assert doc.is_failed
    assert doc.context_id not in {cid for _, cid in mgr.prefix_caches["e0"].items()}
    mgr.free_task_contexts(task("t1", []))
    mgr.free_task_contexts(task("t2", []))
    fresh = mgr.set_task_contexts(task("t3", [SYS, DOC, gen("c")]))
    assert fresh[1] is not doc and not fresh[1].is_claimed


def test_r3_failed_constant_prefix_fill_leaves_no_ghost(env):
    """Defect 4: a pinned constant prefix whose fill failed was never computed by the engine,
    so the pin must not keep it alive; it dies with the last task that holds it."""
    mgr, engines, _ = env
    sys2 = NodeSpec("global:c:sys2", is_constant_prefix=True)
    t1 = task("t1", [SYS, sys2, DOC, gen("a")])
    contexts = mgr.set_task_contexts(t1)
    sys_ctx, sys2_ctx = contexts[0], contexts[1]
    assert sys_ctx.pinned and sys2_ctx.pinned and sys2_ctx.scope is ContextScope.GLOBAL
    assert sys_ctx.claim()
    mgr.fail_context(sys_ctx, RuntimeError("fill failed"))
    # the failed context and the pinned prefix forked from it: no pin, no key, still held
    assert not sys_ctx.pinned and not sys2_ctx.pinned and mgr.constant_prefix_contexts == {}
    assert mgr.prefix_caches["e0"].items() == [] and sys_ctx.alive
    mgr.check_invariants()
    mgr.free_task_contexts(t1)
    assert mgr.contexts == {} and mgr.constant_prefix_contexts == {}
    assert sorted(engines["e0"].freed) == sorted(c.context_id for c in contexts)
    assert_children_freed_first(engines["e0"].freed, contexts)


def test_r3_an_abandoned_fill_hands_the_context_to_the_next_waiter(env):
    """A claimer that gives up without a verdict (cancelled, or its fused run failed) does not
    fail the context: its tokens are taken back, the pin goes (nothing was computed), the key
    stays, and a waiter claims the context and fills it alone."""
    mgr, engines, _ = env
    t1 = task("t1", [SYS, DOC, gen("a")])
    a = mgr.set_task_contexts(t1)
    b = mgr.set_task_contexts(task("t2", [SYS, gen("b")]))
    sys_ctx = a[0]
    assert b[0] is sys_ctx and sys_ctx.claim()
    mgr.record_fill(sys_ctx, 30)

    async def main():
        waiter = asyncio.create_task(sys_ctx.wait_ready())
        await asyncio.sleep(0)
        mgr.abandon_fill(sys_ctx, 30)
        assert await asyncio.wait_for(waiter, 5) is False  # not failed: claim it now
        assert sys_ctx.claim()
        mgr.record_fill(sys_ctx, 30)
        sys_ctx.mark_ready()
        assert await sys_ctx.wait_ready() is True

    asyncio.run(main())
    assert sys_ctx.tokens_num == 30 and not sys_ctx.pinned and not sys_ctx.is_failed
    assert sys_ctx.context_id in {cid for _, cid in mgr.prefix_caches["e0"].items()}
    mgr.check_invariants()
    mgr.free_task_contexts(t1)
    mgr.free_task_contexts(task("t2", []))
    assert mgr.contexts == {}  # no pin kept the never-pinned-again context alive
    mgr.check_invariants()


def test_r3_failed_fill_unpins_only_its_own_subtree(env):
    mgr, _, _ = env
    on_e0 = mgr.set_task_contexts(task("t1", [SYS, DOC, gen("a")], engine="e0"))
    on_e1 = mgr.set_task_contexts(task("t2", [SYS, DOC, gen("b")], engine="e1"))
    mgr.fail_context(on_e0[1], RuntimeError("doc fill failed"))  # below SYS: SYS stays pinned
    assert on_e0[0].pinned and {c.context_id for c in mgr.constant_prefix_contexts[SYS.var_id]} == {on_e0[0].context_id, on_e1[0].context_id}
    mgr.fail_context(on_e0[0], RuntimeError("sys fill failed"))  # the same variable on e1 keeps its pin
    assert not on_e0[0].pinned and on_e1[0].pinned
    assert mgr.constant_prefix_contexts == {SYS.var_id: [on_e1[0]]}
    mgr.free_task_contexts(task("t1", []))
    mgr.free_task_contexts(task("t2", []))
    assert set(mgr.contexts) == {on_e1[0].context_id}


def test_r3_ready_context_releases_waiters(env):
    mgr, _, _ = env
    ctx = mgr.set_task_contexts(task("t1", [SYS, gen("a")]))[0]
    assert ctx.claim()
    ctx.mark_ready()
    asyncio.run(asyncio.wait_for(ctx.wait_ready(), 5))
    assert ctx.is_ready


# -- R4 ---------------------------------------------------------------------------------
def test_r4_tokens_are_real_and_shared_contexts_count_once(env):
    mgr, _, _ = env
    a = mgr.set_task_contexts(task("t1", [SYS, DOC, gen("a")]))
    b = mgr.set_task_contexts(task("t2", [SYS, DOC, gen("b")]))
    mgr.record_fill(a[0], 100)
    mgr.record_fill(a[1], 20)
    mgr.reserve_generate(a[2], 16)
    mgr.reserve_generate(b[2], 16)
    assert (a[0].tokens_num, a[1].tokens_num, a[2].tokens_num) == (100, 20, 16)
    assert mgr.engine_load("e0") == 100 + 20 + 16 + 16  # SYS and DOC counted once
    mgr.reconcile_generate(a[2], 5)
    assert a[2].tokens_num == 5 and a[2].reserved_tokens == 0
    assert mgr.engine_load("e0") == 100 + 20 + 5 + 16
    assert mgr.profile_session_tokens("s1") == 100 + 20 + 5 + 16
    assert mgr.profile_session_tokens("s2") == 0
    mgr.free_task_contexts(task("t1", []))
    assert mgr.engine_load("e0") == 100 + 20 + 16
    mgr.free_task_contexts(task("t2", []))
    assert mgr.engine_load("e0") == 100  # the pinned SYS


# -- R5 ---------------------------------------------------------------------------------
def test_r5_constant_prefix_pins_expire_after_idle_timeout(env):
    mgr, engines, clock = env
    sys_ctx = mgr.set_task_contexts(task("t1", [SYS, gen("a")]))[0]
    mgr.free_task_contexts(task("t1", []))
    clock.now = 500.0
    mgr.set_task_contexts(task("t2", [SYS, gen("b")]))  # a hit refreshes the pin
    mgr.free_task_contexts(task("t2", []))
    clock.now = 1000.0
    assert mgr.free_expired_constant_prefixes() == []
    clock.now = 1100.5
    assert mgr.free_expired_constant_prefixes() == [SYS.var_id]
    assert not sys_ctx.alive and engines["e0"].freed[-1] == sys_ctx.context_id


def test_r5_expiry_of_a_prefix_in_use_keeps_it_until_the_task_ends(env):
    mgr, _, clock = env
    sys_ctx = mgr.set_task_contexts(task("t1", [SYS, gen("a")]))[0]
    clock.now = 700.0
    assert mgr.free_expired_constant_prefixes() == [SYS.var_id]
    assert sys_ctx.alive and not sys_ctx.pinned  # the running task still holds it
    mgr.free_task_contexts(task("t1", []))
    assert not sys_ctx.alive


def test_r5_never_fetched_constant_prefix_expiry_does_not_crash(env):
    mgr, _, _ = env
    # Parrot asserted here and took the whole server down 600 s later.
    assert mgr.free_constant_prefix_contexts("global:c:never-scheduled") == 0
    mgr.check_invariants()


def test_r5_pins_released_under_memory_pressure_lru_first(env):
    mgr, _, clock = env
    old = NodeSpec("global:c:old", is_constant_prefix=True)
    new = NodeSpec("global:c:new", is_constant_prefix=True)
    c_old = mgr.set_task_contexts(task("t1", [old, gen("a")]))[0]
    mgr.record_fill(c_old, 300)
    clock.now = 10.0
    c_new = mgr.set_task_contexts(task("t2", [new, gen("b")]))[0]
    mgr.record_fill(c_new, 300)
    mgr.free_task_contexts(task("t1", []))
    mgr.free_task_contexts(task("t2", []))
    assert mgr.release_constant_prefixes("e0", tokens_needed=200) == 300
    assert not c_old.alive and c_new.alive and c_new.pinned


def test_r5_session_removal_frees_its_tasks_and_handles(env):
    mgr, _, _ = env
    shared = mgr.set_task_contexts(task("t1", [SYS, DOC, gen("a")], session="s1"))
    handle = mgr.new_context("e0", session_id="s1")
    other = mgr.set_task_contexts(task("t2", [SYS, NodeSpec("s2:c:x"), gen("z")], session="s2"))
    mgr.free_session_contexts("s1")
    assert not handle.alive and not shared[1].alive and not shared[2].alive
    assert shared[0].alive and other[1].alive  # the global prefix and s2's contexts stay
    with pytest.raises(UnknownSessionError):
        mgr.set_task_contexts(task("t3", [DOC, gen("q")], session="s1"))


def test_r5_engine_removal_frees_its_contexts_and_later_tasks_get_a_typed_error(env):
    mgr, engines, _ = env
    t1 = task("t1", [SYS, DOC, gen("a")], engine="e1")
    on_e1 = mgr.set_task_contexts(t1)
    on_e0 = mgr.set_task_contexts(task("t2", [SYS, DOC, gen("b")], engine="e0"))
    removed = mgr.remove_engine("e1")
    assert removed == sorted(c.context_id for c in on_e1)
    assert all(not c.alive for c in on_e1) and all(c.alive for c in on_e0)
    assert engines["e1"].freed == []  # the engine is gone; it is not called
    mgr.check_invariants()
    before = snapshot(mgr)
    with pytest.raises(EngineNotFoundError):
        mgr.set_task_contexts(task("t3", [SYS, gen("c")], engine="e1"))
    assert snapshot(mgr) == before
    mgr.free_task_contexts(t1)  # its contexts are already gone: nothing left to free
    assert snapshot(mgr)[2] == before[2] - 1


def test_multi_output_request_continues_from_previous_output_context(env):
    mgr, _, _ = env
    first = task("t1", [SYS, DOC, gen("b")])
    c1 = mgr.set_task_contexts(first)
    second = task("t2", [NodeSpec("s1:c:more"), gen("c")], parent_context=c1[2])
    c2 = mgr.set_task_contexts(second)
    assert c2[0].parent_context is c1[2] and c2[1].parent_context is c2[0]
    mgr.free_task_contexts(first)  # output b's context must survive for output c
    assert c1[2].alive and c1[2].ref_count == 1
    mgr.free_task_contexts(second)
    assert not c1[2].alive and not c1[1].alive


# -- bad input ---------------------------------------------------------------------------
def test_bad_input_is_a_typed_error_and_changes_nothing(env):
    mgr, _, _ = env
    root = mgr.new_context("e0")
    child = mgr.fork_context(root)
    mgr.set_task_contexts(task("t1", [SYS, gen("a")]))
    mgr.free_context(child)
    before = snapshot(mgr)
    with pytest.raises(UnknownContextError, match="not open"):
        mgr.free_context(child)  # already freed
    fake = copy.copy(root)
    fake.context_id = 999
    with pytest.raises(UnknownContextError):
        mgr.free_context(fake)  # never existed
    with pytest.raises(UnknownContextError, match="not alive"):
        mgr.fork_context(child)  # dead
    with pytest.raises(InvalidRequestError, match="already holds"):
        mgr.set_task_contexts(task("t1", [SYS, gen("a")]))
    with pytest.raises(UnknownContextError):
        mgr.free_task_contexts(task("nope", []))
    with pytest.raises(EngineNotFoundError):
        mgr.new_context("e9")
    with pytest.raises(UnknownSessionError):
        mgr.new_context("e0", session_id="s9")
    with pytest.raises(InvalidRequestError):
        mgr.set_task_contexts(task("t9", [gen("x")], parent_context=root, engine="e1"))
    assert snapshot(mgr) == before
    mgr.free_context(root)


def test_query_prefixes_prefers_the_engine_holding_more_tokens(env):
    mgr, _, _ = env
    a = mgr.set_task_contexts(task("t1", [SYS, DOC, gen("a")], engine="e1"))
    mgr.record_fill(a[0], 50)
    mgr.record_fill(a[1], 10)
    probe = task("probe", [SYS, DOC, MID, gen("x")])
    matches = mgr.query_prefixes_in_engines(probe)
    assert [(m.engine_id, m.nodes, m.tokens) for m in matches] == [("e1", 2, 60), ("e0", 0, 0)]


def test_check_invariants_catches_a_broken_refcount(env):
    mgr, _, _ = env
    root = mgr.new_context("e0")
    mgr.fork_context(root)
    root.ref_count -= 1  # a fork that "forgot" to add to its parent
    from parrot_core.errors import InvariantError

    with pytest.raises(InvariantError, match="expected 2"):
        mgr.check_invariants()
    root.ref_count += 1
