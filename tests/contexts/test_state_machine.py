"""Hypothesis state machine: ServeCoreContextManager against a plain reference model.

The model keeps no counters: a context is alive while something reaches it (a holder, a pin
or a live child), computed by a fixpoint; prefix keys are tuples of variable ids. Every step
compares the manager with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import settings, strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, multiple, precondition, rule

from parrot_core.contexts import ContextTask, NodeSpec, ServeCoreContextManager
from parrot_core.contexts.prefix_cache import ROOT_KEY, child_key
from parrot_core.errors import UnknownContextError

from .fakes import RecordingEngine

TIMEOUT = 100.0
SESSIONS = ["s1", "s2"]


@dataclass
class MCtx:
    parent: int | None
    engine: str
    is_global: bool
    tokens: int = 0
    reserved: int = 0


@dataclass
class Model:
    ctxs: dict[int, MCtx] = field(default_factory=dict)
    next_id: int = 0
    holders: dict[tuple, list[int]] = field(default_factory=dict)
    holder_session: dict[tuple, str | None] = field(default_factory=dict)
    cache: dict[str, dict[tuple[str, ...], int]] = field(default_factory=dict)
    pins: dict[str, list[int]] = field(default_factory=dict)  # var -> pinned context ids
    pin_time: dict[str, float] = field(default_factory=dict)
    freed: dict[str, set[int]] = field(default_factory=dict)

    def refs(self, cid: int) -> int:
        children = sum(1 for c in self.ctxs.values() if c.parent == cid)
        held = sum(cids.count(cid) for cids in self.holders.values())
        pinned = sum(cids.count(cid) for cids in self.pins.values())
        return children + held + pinned

    def collect(self) -> None:
        while True:
            dead = [cid for cid in self.ctxs if self.refs(cid) == 0]
            if not dead:
                return
            for cid in dead:
                engine = self.ctxs.pop(cid).engine
                self.freed[engine].add(cid)
                self.cache[engine] = {k: v for k, v in self.cache[engine].items() if v != cid}

    def new(self, parent: int | None, engine: str, is_global: bool) -> int:
        cid = self.next_id
        self.next_id += 1
        self.ctxs[cid] = MCtx(parent, engine, is_global)
        return cid

    def pin(self, cid: int, var: str, now: float) -> None:
        if not any(cid in cids for cids in self.pins.values()):
            self.pins.setdefault(var, []).append(cid)
        self.pin_time[var] = now

    def unpin_var(self, var: str) -> None:
        self.pins.pop(var, None)
        self.pin_time.pop(var, None)

    def set_task(self, key, engine, session, nodes, parent, fuse, now) -> list[int]:
        cache = self.cache[engine]
        held: list[int] = []
        prefix: tuple[str, ...] = ()
        prev = parent
        cacheable = hitting = parent is None
        fused = None
        for node in nodes:
            cacheable = cacheable and node.is_fill
            if cacheable:
                prefix = prefix + (node.var_id,)
            if hitting and cacheable and prefix in cache:
                cid = cache[prefix]
                held.append(cid)
                if self.ctxs[cid].is_global:
                    self.pin(cid, node.var_id, now)
                prev = cid
                continue
            hitting = False
            is_global = node.is_fill and node.is_constant_prefix and (prev is None or self.ctxs[prev].is_global)
            if fuse and node.is_fill and not is_global and fused is not None:
                cid = fused
                self.cache[engine] = cache = {k: v for k, v in cache.items() if v != cid}
                cacheable = False
            else:
                cid = self.new(prev, engine, is_global)
                held.append(cid)
                if cacheable:
                    assert prefix not in cache
                    cache[prefix] = cid
                if is_global:
                    self.pin(cid, node.var_id, now)
                fused = cid if node.is_fill and not is_global else None
            prev = cid
        self.holders[key] = held
        self.holder_session[key] = session
        return held

    def release(self, key) -> None:
        self.holders.pop(key)
        self.holder_session.pop(key)
        self.collect()


fills = st.lists(st.sampled_from(["s:c:a", "s:c:b", "s:c:c"]), max_size=3)


class ContextManagerMachine(RuleBasedStateMachine):
    tasks = Bundle("tasks")
    handles = Bundle("handles")
    retained = Bundle("retained")

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.mgr = ServeCoreContextManager(constant_prefix_timeout=TIMEOUT, clock=lambda: self.now)
        self.model = Model()
        self.engines: dict[str, RecordingEngine] = {}
        self.removed_engines: set[str] = set()
        self.engine_counter = 0
        self.task_counter = 0
        self.handle_objs = {}  # what the user holds, even after its engine is gone
        for _ in range(2):
            self._add_engine()
        for s in SESSIONS:
            self.mgr.register_session(s)

    def _add_engine(self) -> str:
        name = f"e{self.engine_counter}"
        self.engine_counter += 1
        self.engines[name] = RecordingEngine()
        self.mgr.register_engine(name, self.engines[name])
        self.model.cache[name] = {}
        self.model.freed[name] = set()
        return name

    def _live_engines(self) -> list[str]:
        return sorted(e for e in self.engines if e not in self.removed_engines)

    # -- rules ---------------------------------------------------------------------------
    @rule(target=handles, engine_index=st.integers(0, 3), session=st.sampled_from([None, *SESSIONS]))
    def new_handle(self, engine_index, session):
        engine = self._live_engines()[engine_index % len(self._live_engines())]
        ctx = self.mgr.new_context(engine, session_id=session)
        cid = self.model.new(None, engine, False)
        assert ctx.context_id == cid
        self.handle_objs[cid] = ctx
        self.model.holders[("handle", cid)] = [cid]
        self.model.holder_session[("handle", cid)] = session
        return cid

    @rule(target=handles, parent=handles, session=st.sampled_from([None, *SESSIONS]))
    def fork_handle(self, parent, session):
        if parent not in self.model.ctxs:
            ctx = self.mgr.contexts.get(parent)
            assert ctx is None
            return multiple()
        child = self.mgr.fork_context(self.mgr.contexts[parent], session_id=session)
        cid = self.model.new(parent, self.model.ctxs[parent].engine, False)
        assert child.context_id == cid
        self.handle_objs[cid] = child
        self.model.holders[("handle", cid)] = [cid]
        self.model.holder_session[("handle", cid)] = session
        return cid

    @rule(handle=consumes(handles))
    def free_handle(self, handle):
        key = ("handle", handle)
        ctx = self.handle_objs[handle]
        if key not in self.model.holders:
            try:
                self.mgr.free_context(ctx)
            except UnknownContextError:
                return
            raise AssertionError("freeing a released handle must raise")
        self.mgr.free_context(ctx)
        self.model.release(key)

    @rule(
        target=tasks,
        engine_index=st.integers(0, 3),
        session=st.sampled_from(SESSIONS),
        prefix=st.sampled_from([None, "global:c:p0", "global:c:p1"]),
        body=fills,
        fuse=st.booleans(),
    )
    def run_task(self, engine_index, session, prefix, body, fuse):
        engine = self._live_engines()[engine_index % len(self._live_engines())]
        nodes = ([NodeSpec(prefix, is_constant_prefix=True)] if prefix else []) + [
            NodeSpec(v.replace("s:", f"{session}:")) for v in body
        ]
        nodes.append(NodeSpec(f"{session}:v:{self.task_counter}", is_fill=False))
        return self._set_task(engine, session, nodes, None, fuse)

    @rule(target=tasks, previous=tasks)
    def continue_task(self, previous):
        """Output k+1 of a multi-output request forks from output k's context."""
        held = self.model.holders.get(("task", previous))
        if not held or held[-1] not in self.model.ctxs:
            return multiple()
        parent = held[-1]
        session = self.model.holder_session[("task", previous)]
        nodes = [NodeSpec(f"{session}:c:more"), NodeSpec(f"{session}:v:{self.task_counter}", is_fill=False)]
        return self._set_task(self.model.ctxs[parent].engine, session, nodes, parent, False)

    def _set_task(self, engine, session, nodes, parent, fuse):
        tid = self.task_counter
        self.task_counter += 1
        parent_ctx = self.mgr.contexts[parent] if parent is not None else None
        task = ContextTask(tid, engine, nodes, session_id=session, parent_context=parent_ctx, fuse_fill=fuse)
        got = self.mgr.set_task_contexts(task)
        held = self.model.set_task(("task", tid), engine, session, nodes, parent, fuse, self.now)
        assert len(got) == len(nodes)
        assert sorted({c.context_id for c in got}) == sorted(held)
        return tid

    @rule(target=retained, tid=tasks, session=st.sampled_from([None, *SESSIONS]))
    def retain(self, tid, session):
        """Keep a task's last context alive past the task (output k for output k+1)."""
        held = [c for c in self.model.holders.get(("task", tid), []) if c in self.model.ctxs]
        if not held:
            return multiple()
        key = self.mgr.retain(self.mgr.contexts[held[-1]], session)
        self.model.holders[key] = [held[-1]]
        self.model.holder_session[key] = session
        return key

    @rule(key=consumes(retained))
    def release(self, key):
        if key not in self.model.holders:  # its session was removed meanwhile
            try:
                self.mgr.release(key)
            except UnknownContextError:
                return
            raise AssertionError("releasing a released key must raise")
        self.mgr.release(key)
        self.model.release(key)

    @rule(tid=consumes(tasks))
    def free_task(self, tid):
        key = ("task", tid)
        task = ContextTask(tid, None, [])
        if key not in self.model.holders:
            try:
                self.mgr.free_task_contexts(task)
            except UnknownContextError:
                return
            raise AssertionError("freeing a released task must raise")
        self.mgr.free_task_contexts(task)
        self.model.release(key)

    @rule(tid=tasks, n=st.integers(0, 50), which=st.integers(0, 5))
    def record_fill(self, tid, n, which):
        held = [c for c in self.model.holders.get(("task", tid), []) if c in self.model.ctxs]
        if held:
            cid = held[which % len(held)]
            self.mgr.record_fill(self.mgr.contexts[cid], n)
            self.model.ctxs[cid].tokens += n

    @rule(tid=tasks, max_tokens=st.integers(1, 32), produced=st.integers(0, 32))
    def generate(self, tid, max_tokens, produced):
        held = [c for c in self.model.holders.get(("task", tid), []) if c in self.model.ctxs]
        if held:
            ctx = self.mgr.contexts[held[-1]]
            self.mgr.reserve_generate(ctx, max_tokens)
            self.model.ctxs[held[-1]].tokens += max_tokens
            self.check()
            produced = min(produced, max_tokens)
            self.mgr.reconcile_generate(ctx, produced)
            self.model.ctxs[held[-1]].tokens += produced - max_tokens

    @rule(tid=tasks, which=st.integers(0, 5))
    def fail_fill(self, tid, which):
        held = [c for c in self.model.holders.get(("task", tid), []) if c in self.model.ctxs]
        if held:
            cid = held[which % len(held)]
            self.mgr.fail_context(self.mgr.contexts[cid], RuntimeError("fill failed"))
            doomed, stack = set(), [cid]
            while stack:
                c = stack.pop()
                doomed.add(c)
                stack.extend(k for k, v in self.model.ctxs.items() if v.parent == c)
            engine = self.model.ctxs[cid].engine
            self.model.cache[engine] = {k: v for k, v in self.model.cache[engine].items() if v not in doomed}

    @rule(dt=st.floats(0, 80))
    def expire(self, dt):
        self.now += dt
        expired = self.mgr.free_expired_constant_prefixes()
        want = sorted(v for v, t in self.model.pin_time.items() if t < self.now - TIMEOUT)
        assert sorted(expired) == want
        for var in want:
            self.model.unpin_var(var)
        self.model.collect()

    @rule(engine_index=st.integers(0, 3), need=st.integers(0, 200))
    def memory_pressure(self, engine_index, need):
        engine = self._live_engines()[engine_index % len(self._live_engines())]
        before = sum(c.tokens for c in self.model.ctxs.values() if c.engine == engine)
        freed = self.mgr.release_constant_prefixes(engine, need)
        for var in sorted(self.model.pin_time, key=self.model.pin_time.get):
            now_tokens = sum(c.tokens for c in self.model.ctxs.values() if c.engine == engine)
            if before - now_tokens >= need:
                break
            self.model.pins[var] = [c for c in self.model.pins[var] if self.model.ctxs[c].engine != engine]
            if not self.model.pins[var]:
                self.model.unpin_var(var)
            self.model.collect()
        after = sum(c.tokens for c in self.model.ctxs.values() if c.engine == engine)
        assert freed == before - after

    @rule(session=st.sampled_from(SESSIONS))
    def remove_session(self, session):
        self.mgr.free_session_contexts(session)
        for key in [k for k, s in self.model.holder_session.items() if s == session]:
            self.model.holders.pop(key)
            self.model.holder_session.pop(key)
        self.model.collect()
        self.mgr.register_session(session)  # a new session under the same name

    @precondition(lambda self: len(self._live_engines()) > 1)
    @rule(engine_index=st.integers(0, 3))
    def remove_engine(self, engine_index):
        engine = self._live_engines()[engine_index % len(self._live_engines())]
        removed = self.mgr.remove_engine(engine)
        gone = sorted(c for c, m in self.model.ctxs.items() if m.engine == engine)
        assert removed == gone
        for c in gone:
            del self.model.ctxs[c]
        for key, held in self.model.holders.items():
            held[:] = [c for c in held if c not in gone]
        for var in list(self.model.pins):
            self.model.pins[var] = [c for c in self.model.pins[var] if c not in gone]
            if not self.model.pins[var]:
                self.model.unpin_var(var)
        self.removed_engines.add(engine)
        self._add_engine()

    # -- invariants ----------------------------------------------------------------------
    @invariant()
    def check(self):
        mgr, model = self.mgr, self.model
        mgr.check_invariants()
        assert set(mgr.contexts) == set(model.ctxs)
        for cid, m in model.ctxs.items():
            ctx = mgr.contexts[cid]
            assert ctx.ref_count == model.refs(cid), (cid, ctx.ref_count, model.refs(cid))
            assert ctx.parent_context_id == m.parent and ctx.engine_id == m.engine
            assert ctx.tokens_num == m.tokens
            assert ctx.pinned == any(cid in cs for cs in model.pins.values())
        for engine in self._live_engines():
            assert mgr.engine_load(engine) == sum(c.tokens for c in model.ctxs.values() if c.engine == engine)
            cache = mgr.prefix_caches[engine]
            assert len(cache) == len(model.cache[engine])
            for prefix, cid in model.cache[engine].items():
                key = ROOT_KEY
                for var in prefix:
                    key, parent = child_key(key, var), key
                assert cache.get(key, parent, prefix[-1]) == cid
            assert set(self.engines[engine].freed) == model.freed[engine]
        for engine in self.removed_engines:
            assert set(self.engines[engine].freed) == model.freed[engine]

    def teardown(self):
        for key in list(self.model.holders):
            if key[0] == "task":
                self.mgr.free_task_contexts(ContextTask(key[1], None, []))
            elif key[0] == "retain":
                self.mgr.release(key)
            else:
                self.mgr.free_context(self.handle_objs[key[1]])
            self.model.release(key)
        for var in list(self.mgr.constant_prefix_contexts):
            self.mgr.free_constant_prefix_contexts(var)
        for var in list(self.model.pins):
            self.model.unpin_var(var)
        self.model.collect()
        assert self.model.ctxs == {}
        self.mgr.check_invariants()
        assert self.mgr.contexts == {} and self.mgr.holder_count() == 0
        assert all(len(c) == 0 for c in self.mgr.prefix_caches.values())
        for e in self._live_engines():  # every context the engine saw was freed, exactly once
            assert sorted(self.engines[e].freed) == sorted(self.model.freed[e])


TestContextManager = ContextManagerMachine.TestCase
TestContextManager.settings = settings(max_examples=200, stateful_step_count=50, deadline=None, derandomize=True)
