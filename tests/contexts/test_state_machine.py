"""Hypothesis state machine: ServeCoreContextManager against a model derived from the tasks.

The model knows only what callers did: each task's nodes (variable ids, Fill or Gen,
constant-prefix flag), its fuse flag and parent context, the handles, retains, pins (with
their last use on an injected clock), fills, reservations and failures. It copies none of the
manager's counters or flags and derives, after every step:
- what must be cached: a context is cached under the variable ids from the root when it and
  each of its ancestors hold exactly one leading Fill of a root task (no parent context), no
  fused run and no Gen, and neither it nor an ancestor failed (design.md R2, R3);
- what a task must reuse: the cached contexts of its leading Fills, up to the first miss; the
  rest are new contexts (consecutive session Fills share one when the task fuses Fills);
- what is alive: the least fixpoint of "held by a live holder (task, handle, retain), pinned,
  or the parent of an alive context" (R1), and each context's reference count from that;
- tokens (R4), pins and their expiry / pressure release / failure (R5, R3), session and
  engine removal.
Context ids are the manager's: the model learns each new id once, checks it is fresh, and
from then on requires that exact id wherever the context must be reused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import settings, strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, multiple, rule

from parrot_core.contexts import ContextScope, ContextTask, NodeSpec, ServeCoreContextManager
from parrot_core.contexts.prefix_cache import ROOT_KEY
from parrot_core.errors import UnknownContextError

from .fakes import RecordingEngine

TIMEOUT = 100.0
SESSIONS = ["s1", "s2"]
GLOBALS = ["global:c:p0", "global:c:p1"]  # constant prefixes shared by every session


@dataclass
class MCtx:
    engine: str
    parent: int | None
    session: str | None
    is_global: bool
    key: tuple[str, ...] | None  # variable ids from the root, if it may be cached under them
    tokens: int = 0
    reserved: int = 0
    failed: bool = False


@dataclass
class Plan:
    """What `set_task_contexts` must do for one task."""

    hits: list[int]  # reused contexts, one per leading node
    groups: list[list[int]]  # the other nodes, by new context (indices into the nodes)
    is_global: list[bool]  # per group


@dataclass
class Model:
    ctxs: dict[int, MCtx] = field(default_factory=dict)  # alive
    dead: dict[int, MCtx] = field(default_factory=dict)
    holders: dict[tuple, list[int]] = field(default_factory=dict)
    holder_session: dict[tuple, str | None] = field(default_factory=dict)
    pins: dict[str, set[int]] = field(default_factory=dict)  # var -> pinned context ids
    pin_used: dict[str, tuple[float, int]] = field(default_factory=dict)  # var -> (time, use number)
    uses: int = 0
    freed: dict[str, set[int]] = field(default_factory=dict)  # engine -> ids it was told to free

    # -- derived state -------------------------------------------------------------------
    def failed_line(self, cid: int) -> bool:
        while cid is not None:
            if self.ctxs[cid].failed:
                return True
            cid = self.ctxs[cid].parent
        return False

    def cached(self, engine: str) -> dict[tuple[str, ...], int]:
        out: dict[tuple[str, ...], int] = {}
        for cid, m in self.ctxs.items():
            if m.engine == engine and m.key is not None and not self.failed_line(cid):
                assert m.key not in out, f"model: two live contexts for key {m.key}"
                out[m.key] = cid
        return out

    def pinned(self) -> set[int]:
        return {c for cs in self.pins.values() for c in cs}

    def refs(self, cid: int) -> int:
        children = sum(1 for m in self.ctxs.values() if m.parent == cid)
        held = sum(cids.count(cid) for cids in self.holders.values())
        return children + held + int(cid in self.pinned())

    def load(self, engine: str) -> int:
        return sum(m.tokens for m in self.ctxs.values() if m.engine == engine)

    def session_tokens(self, session: str) -> int:
        reached: set[int] = set()
        for key, cids in self.holders.items():
            if self.holder_session[key] == session:
                for cid in cids:
                    while cid is not None and cid not in reached:
                        reached.add(cid)
                        cid = self.ctxs[cid].parent
        return sum(self.ctxs[c].tokens for c in reached)

    def collect(self) -> None:
        """Liveness as a least fixpoint: held or pinned, or the parent of an alive context."""
        alive = {c for cids in self.holders.values() for c in cids} | self.pinned()
        while True:
            grown = alive | {self.ctxs[c].parent for c in alive if self.ctxs[c].parent is not None}
            if grown == alive:
                break
            alive = grown
        for cid in set(self.ctxs) - alive:
            m = self.ctxs.pop(cid)
            self.dead[cid] = m
            self.freed[m.engine].add(cid)

    # -- tasks ---------------------------------------------------------------------------
    def plan(self, engine: str, nodes: list[NodeSpec], parent: int | None, fuse: bool) -> Plan:
        cached = self.cached(engine) if parent is None else {}
        hits: list[int] = []
        prefix: tuple[str, ...] = ()
        for node in nodes:
            prefix += (node.var_id,)
            if not node.is_fill or prefix not in cached:
                break
            hits.append(cached[prefix])
        prev = hits[-1] if hits else parent
        after_global = prev is None or self.ctxs[prev].is_global  # a prefix may only extend a prefix
        groups: list[list[int]] = []
        is_global: list[bool] = []
        for i in range(len(hits), len(nodes)):
            node = nodes[i]
            glob = node.is_fill and node.is_constant_prefix and after_global
            if fuse and node.is_fill and not glob and groups and not is_global[-1] and nodes[groups[-1][0]].is_fill:
                groups[-1].append(i)
            else:
                groups.append([i])
                is_global.append(glob)
            after_global = glob
        return Plan(hits, groups, is_global)

    def add_task(self, key, session, engine, nodes, parent, plan: Plan, new_ids: list[int], now: float) -> None:
        prev = parent
        prev_key: tuple[str, ...] | None = () if parent is None else None  # only chains from the root are cached
        for i, cid in enumerate(plan.hits):
            if self.ctxs[cid].is_global:
                self.pin(nodes[i].var_id, cid, now)
            prev, prev_key = cid, self.ctxs[cid].key
        for group, glob, cid in zip(plan.groups, plan.is_global, new_ids):
            first = nodes[group[0]]
            single_fill = len(group) == 1 and first.is_fill
            prev_key = prev_key + (first.var_id,) if single_fill and prev_key is not None else None
            self.ctxs[cid] = MCtx(engine, prev, None if glob else session, glob, prev_key)
            if glob:
                self.pin(first.var_id, cid, now)
            prev = cid
        self.holders[key] = list(dict.fromkeys(plan.hits + new_ids))
        self.holder_session[key] = session

    # -- pins ----------------------------------------------------------------------------
    def pin(self, var: str, cid: int, now: float) -> None:
        self.pins.setdefault(var, set()).add(cid)
        self.uses += 1
        self.pin_used[var] = (now, self.uses)

    def unpin(self, var: str, cids: set[int]) -> None:
        self.pins[var] -= cids
        if not self.pins[var]:
            del self.pins[var], self.pin_used[var]

    def fail(self, cid: int) -> None:
        """R3 + defect 4: the context and its subtree leave the cache, and lose their pins."""
        self.ctxs[cid].failed = True
        subtree, frontier = {cid}, {cid}
        while frontier:
            frontier = {c for c, m in self.ctxs.items() if m.parent in frontier}
            subtree |= frontier
        for var in list(self.pins):
            self.unpin(var, self.pins[var] & subtree)
        self.collect()

    def release(self, key) -> None:
        self.holders.pop(key)
        self.holder_session.pop(key)
        self.collect()


def task_nodes(session: str, prefix: tuple[str, ...], body: list[str], tail: list[str], serial: int) -> list[NodeSpec]:
    """Constant prefixes, then session Fills (a constant prefix among them too), a Gen, and
    optionally more Fills and a second Gen (a Fill after a Gen is never cached)."""

    def fill(name: str) -> NodeSpec:
        if name in GLOBALS:
            return NodeSpec(name, is_constant_prefix=True)
        return NodeSpec(f"{session}:c:{name}")

    nodes = [fill(v) for v in (*prefix, *body)] + [NodeSpec(f"{session}:v:{serial}a", is_fill=False)]
    if tail:
        nodes += [fill(v) for v in tail] + [NodeSpec(f"{session}:v:{serial}b", is_fill=False)]
    return nodes


prefixes = st.sampled_from([(), (GLOBALS[0],), (GLOBALS[1],), tuple(GLOBALS)])
bodies = st.lists(st.sampled_from(["a", "b", GLOBALS[0]]), max_size=2)
tails = st.lists(st.sampled_from(["a", GLOBALS[1]]), max_size=2)
picks = st.integers(0, 1000)
maybe_session = st.sampled_from([None, *SESSIONS])


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
        self.serial = 0
        self.objs = {}  # context id -> the manager's Context, as callers keep it
        self.specs: dict[int, tuple[str, tuple[str, ...], list[str]]] = {}  # root task -> engine, prefix, body
        for _ in range(2):
            self._add_engine()
        for s in SESSIONS:
            self.mgr.register_session(s)

    def _add_engine(self) -> None:
        name = f"e{len(self.engines)}"
        self.engines[name] = RecordingEngine()
        self.mgr.register_engine(name, self.engines[name])
        self.model.freed[name] = set()

    def _engine(self, index: int) -> str:
        live = sorted(e for e in self.engines if e not in self.removed_engines)
        return live[index % len(live)]

    def _alive(self, pick: int) -> int | None:
        alive = sorted(self.model.ctxs)
        return alive[pick % len(alive)] if alive else None

    def _fresh(self, ids: list[int]) -> None:
        assert len(set(ids)) == len(ids), f"new contexts share ids: {ids}"
        known = self.model.ctxs.keys() | self.model.dead.keys()
        assert not set(ids) & known, f"ids {ids} reused (known: {sorted(known)})"

    # -- tasks ---------------------------------------------------------------------------
    @rule(target=tasks, engine_index=st.integers(0, 3), session=st.sampled_from(SESSIONS), prefix=prefixes, body=bodies, tail=tails, fuse=st.booleans())
    def run_task(self, engine_index, session, prefix, body, tail, fuse):
        self.serial += 1
        nodes = task_nodes(session, prefix, body, tail, self.serial)
        engine = self._engine(engine_index)
        tid = self._set_task(engine, session, nodes, None, fuse)
        self.specs[tid] = (engine, prefix, body)
        return tid

    @rule(target=tasks, tid=tasks, session=st.sampled_from(SESSIONS), extra=bodies, fuse=st.booleans())
    def rerun_task(self, tid, session, extra, fuse):
        """The same leading Fills again on the same engine, in the same session (its session
        Fills hit too) or another one (only the shared constant prefixes hit), then more."""
        if tid not in self.specs or self.specs[tid][0] in self.removed_engines:
            return multiple()
        engine, prefix, body = self.specs[tid]
        self.serial += 1
        tid = self._set_task(engine, session, task_nodes(session, prefix, body + extra, [], self.serial), None, fuse)
        self.specs[tid] = (engine, prefix, body + extra)
        return tid

    @rule(target=tasks, pick=picks, session=st.sampled_from(SESSIONS), body=bodies, fuse=st.booleans())
    def continue_task(self, pick, session, body, fuse):
        """A chain forked from a live context (output k+1 from output k's context)."""
        parent = self._alive(pick)
        if parent is None:
            return multiple()
        self.serial += 1
        nodes = task_nodes(session, (), body, [], self.serial)
        return self._set_task(self.model.ctxs[parent].engine, session, nodes, parent, fuse)

    def _set_task(self, engine, session, nodes, parent, fuse):
        self.serial += 1
        tid = self.serial
        plan = self.model.plan(engine, nodes, parent, fuse)
        if parent is None:  # the scheduler's view of the same hits, on every engine
            for match in self.mgr.query_prefixes_in_engines(ContextTask("probe", engine, nodes)):
                hits = self.model.plan(match.engine_id, nodes, None, False).hits
                assert (match.nodes, match.tokens) == (len(hits), sum(self.model.ctxs[c].tokens for c in hits))
        task = ContextTask(tid, engine, nodes, session_id=session, parent_context=self.objs.get(parent), fuse_fill=fuse)
        got = self.mgr.set_task_contexts(task)
        ids = [c.context_id for c in got]
        assert len(ids) == len(nodes)
        assert ids[: len(plan.hits)] == plan.hits, f"{nodes}: must reuse {plan.hits}, got {ids}"
        new_ids = [ids[g[0]] for g in plan.groups]
        for group, cid in zip(plan.groups, new_ids):
            assert [ids[i] for i in group] == [cid] * len(group), f"{nodes} fuse={fuse}: groups {plan.groups}, got {ids}"
        self._fresh(new_ids)
        self.objs.update((c.context_id, c) for c in got)
        self.model.add_task(("task", tid), session, engine, nodes, parent, plan, new_ids, self.now)
        return tid

    @rule(tid=consumes(tasks))
    def free_task(self, tid):
        key = ("task", tid)
        task = ContextTask(tid, None, [])
        if key not in self.model.holders:  # its session was removed meanwhile
            try:
                self.mgr.free_task_contexts(task)
            except UnknownContextError:
                return
            raise AssertionError("freeing a released task must raise")
        self.mgr.free_task_contexts(task)
        self.model.release(key)

    # -- handles and retains -------------------------------------------------------------
    @rule(target=handles, engine_index=st.integers(0, 3), session=maybe_session)
    def new_handle(self, engine_index, session):
        engine = self._engine(engine_index)
        ctx = self.mgr.new_context(engine, session_id=session)
        return self._add_handle(ctx, MCtx(engine, None, session, False, None))

    @rule(target=handles, pick=picks, session=maybe_session)
    def fork_handle(self, pick, session):
        parent = self._alive(pick)
        if parent is None:
            return multiple()
        ctx = self.mgr.fork_context(self.objs[parent], session_id=session)
        return self._add_handle(ctx, MCtx(self.model.ctxs[parent].engine, parent, session, False, None))

    def _add_handle(self, ctx, m: MCtx) -> int:
        self._fresh([ctx.context_id])
        self.objs[ctx.context_id] = ctx
        self.model.ctxs[ctx.context_id] = m
        self.model.holders[("handle", ctx.context_id)] = [ctx.context_id]
        self.model.holder_session[("handle", ctx.context_id)] = m.session
        return ctx.context_id

    @rule(handle=consumes(handles))
    def free_handle(self, handle):
        key = ("handle", handle)
        if key not in self.model.holders:
            try:
                self.mgr.free_context(self.objs[handle])
            except UnknownContextError:
                return
            raise AssertionError("freeing a released handle must raise")
        self.mgr.free_context(self.objs[handle])
        self.model.release(key)

    @rule(target=retained, pick=picks, session=maybe_session)
    def retain(self, pick, session):
        cid = self._alive(pick)
        if cid is None:
            return multiple()
        key = self.mgr.retain(self.objs[cid], session)
        assert key not in self.model.holders
        self.model.holders[key] = [cid]
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

    # -- tokens and failures -------------------------------------------------------------
    @rule(pick=picks, n=st.integers(0, 50))
    def record_fill(self, pick, n):
        cid = self._alive(pick)
        if cid is not None:
            self.mgr.record_fill(self.objs[cid], n)
            self.model.ctxs[cid].tokens += n

    @rule(pick=picks, max_tokens=st.integers(1, 32), produced=st.integers(0, 32))
    def generate(self, pick, max_tokens, produced):
        cid = self._alive(pick)
        if cid is None:
            return
        m = self.model.ctxs[cid]
        self.mgr.reserve_generate(self.objs[cid], max_tokens)
        m.tokens += max_tokens
        m.reserved += max_tokens
        self.check()
        produced = min(produced, max_tokens)
        self.mgr.reconcile_generate(self.objs[cid], produced)
        m.tokens += produced - m.reserved
        m.reserved = 0

    @rule(pick=picks)
    def fail_fill(self, pick):
        cid = self._alive(pick)
        if cid is not None:
            self.mgr.fail_context(self.objs[cid], RuntimeError("fill failed"))
            assert self.objs[cid].is_failed
            self.model.fail(cid)

    # -- pins ----------------------------------------------------------------------------
    @rule(dt=st.integers(0, 120))
    def expire(self, dt):
        self.now += dt
        expired = self.mgr.free_expired_constant_prefixes()
        want = [v for v, (t, _) in self.model.pin_used.items() if t < self.now - TIMEOUT]
        assert sorted(expired) == sorted(want)
        for var in want:
            self.model.unpin(var, set(self.model.pins[var]))
        self.model.collect()

    @rule()
    def expire_at_first_deadline(self):
        """Jump to the first moment a pin may expire by the model (idle exactly the timeout):
        nothing expires yet. A pin whose last use the manager dated too early goes here."""
        if self.model.pin_used:
            self.now = max(self.now, min(t for t, _ in self.model.pin_used.values()) + TIMEOUT)
        self.expire(0)

    @rule(var=st.sampled_from(GLOBALS))
    def unpin_variable(self, var):
        assert self.mgr.free_constant_prefix_contexts(var) == len(self.model.pins.get(var, ()))
        if var in self.model.pins:
            self.model.unpin(var, set(self.model.pins[var]))
        self.model.collect()

    @rule(engine_index=st.integers(0, 3), need=st.integers(0, 120))
    def memory_pressure(self, engine_index, need):
        """Unpin this engine's prefixes, least recently used first, until `need` tokens died."""
        engine = self._engine(engine_index)
        model = self.model
        before = model.load(engine)
        freed = self.mgr.release_constant_prefixes(engine, need)
        for var in sorted(model.pin_used, key=lambda v: model.pin_used[v][1]):
            if before - model.load(engine) >= need:
                break
            model.unpin(var, {c for c in model.pins[var] if model.ctxs[c].engine == engine})
            model.collect()
        assert freed == before - model.load(engine)

    # -- sessions and engines ------------------------------------------------------------
    @rule(session=st.sampled_from(SESSIONS))
    def remove_session(self, session):
        assert self.mgr.profile_session_tokens(session) == self.model.session_tokens(session)
        self.mgr.free_session_contexts(session)
        for key in [k for k, s in self.model.holder_session.items() if s == session]:
            self.model.holders.pop(key)
            self.model.holder_session.pop(key)
        self.model.collect()
        self.mgr.register_session(session)  # a new session under the same name

    @rule(engine_index=st.integers(0, 3))
    def remove_engine(self, engine_index):
        """Drop an engine and register a fresh one in its place (there are always two)."""
        engine = self._engine(engine_index)
        gone = {c for c, m in self.model.ctxs.items() if m.engine == engine}
        assert self.mgr.remove_engine(engine) == sorted(gone)
        for c in gone:  # the engine is gone: it is not told to free them
            self.model.dead[c] = self.model.ctxs.pop(c)
        for held in self.model.holders.values():
            held[:] = [c for c in held if c not in gone]
        for var in list(self.model.pins):
            self.model.unpin(var, self.model.pins[var] & gone)
        self.removed_engines.add(engine)
        self._add_engine()

    # -- the comparison --------------------------------------------------------------------
    @invariant()
    def check(self):
        mgr, model = self.mgr, self.model
        mgr.check_invariants()
        assert set(mgr.contexts) == set(model.ctxs), "alive contexts differ"
        pinned = model.pinned()
        for cid, m in model.ctxs.items():
            ctx = mgr.contexts[cid]
            assert ctx.ref_count == model.refs(cid), (ctx, model.refs(cid))
            assert (ctx.parent_context_id, ctx.engine_id, ctx.session_id) == (m.parent, m.engine, m.session), ctx
            assert (ctx.scope is ContextScope.GLOBAL) == m.is_global, ctx
            assert (ctx.tokens_num, ctx.reserved_tokens) == (m.tokens, m.reserved), ctx
            assert ctx.pinned == (cid in pinned), ctx
        assert {v: {c.context_id for c in cs} for v, cs in mgr.constant_prefix_contexts.items()} == model.pins
        for engine, cache in mgr.prefix_caches.items():
            assert mgr.engine_load(engine) == model.load(engine)
            entries = dict(cache.items())
            got = {}
            for key, cid in entries.items():
                chain = []
                while key != ROOT_KEY:
                    assert key in entries, "a cached key whose parent key is not cached"
                    chain.append(cache.var_id(key))
                    key = cache.parent_key(key)
                got[tuple(reversed(chain))] = cid
            assert got == model.cached(engine), f"{engine} cache {got} != expected {model.cached(engine)}"
        for engine, recorder in self.engines.items():
            assert set(recorder.freed) == model.freed[engine]
            order = {cid: i for i, cid in enumerate(recorder.freed)}
            for cid in recorder.freed:  # children before parents
                parent = model.dead[cid].parent
                assert parent not in order or order[cid] < order[parent]
        for session in SESSIONS:
            assert mgr.profile_session_tokens(session) == model.session_tokens(session)

    def teardown(self):
        for key in list(self.model.holders):
            if key[0] == "task":
                self.mgr.free_task_contexts(ContextTask(key[1], None, []))
            elif key[0] == "handle":
                self.mgr.free_context(self.objs[key[1]])
            else:
                self.mgr.release(key)
            self.model.release(key)
        for var in GLOBALS:
            self.unpin_variable(var)
        assert self.model.ctxs == {}
        self.check()
        assert self.mgr.contexts == {} and self.mgr.holder_count() == 0
        assert all(len(c) == 0 for c in self.mgr.prefix_caches.values())


TestContextManager = ContextManagerMachine.TestCase
TestContextManager.settings = settings(max_examples=200, stateful_step_count=50, deadline=None, derandomize=True)
