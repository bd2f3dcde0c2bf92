"""`ServeCoreContextManager`: the lifetime of every serve-layer Context.

Rules (design.md section 3.2), checked by `check_invariants()`:
- R1  ref(ctx) = live children + holder references (tasks, handles) + 1 if pinned. A fork
      adds one to the parent. Freeing subtracts one; at zero the context leaves every map,
      the engine is told to free it, and its parent loses one (children die before parents).
- R2  One prefix cache per engine, keyed by the chain of variable ids of the leading run of
      Fills; Gen contexts are never cached; a dead context leaves no key behind.
- R3  The first task to need a context fills it; a failed fill fails every waiter and drops
      the context from the cache.
- R4  `tokens_num` is real: fills add their tokens; a Generate reserves `max_tokens` and is
      reconciled to what it produced. Engine load counts each context once.
- R5  Global constant-prefix contexts are pinned while used and unpinned after an idle
      timeout or under memory pressure; session contexts go with their tasks and at the latest
      with the session; removing an engine drops its contexts.

Holders: every reference that is not a child or a pin belongs to a *holder*: a task (all the
distinct contexts of its chain, one reference each) or a handle (one context opened through
`new_context` / `fork_context`). A holder may belong to a session; removing the session
releases its holders.

Bad input raises a typed error and changes nothing. The manager is not thread-safe: it
lives on the serve layer's event loop.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

from parrot_core.contexts.context import Context, ContextScope
from parrot_core.contexts.prefix_cache import ROOT_KEY, PrefixCache, child_key, hash_var_id
from parrot_core.contexts.task import ContextTask
from parrot_core.errors import (
    EngineNotFoundError,
    InvalidRequestError,
    InvariantError,
    UnknownContextError,
    UnknownSessionError,
)

log = logging.getLogger(__name__)

HolderKey = tuple[str, Hashable]


class FreesContexts(Protocol):
    """The one engine call the manager makes (engines/base.py: never blocks or raises)."""

    def free_context(self, context_id: int) -> None: ...


@dataclass(frozen=True)
class PrefixMatch:
    engine_id: Hashable
    nodes: int  # leading nodes of the task found in this engine's cache
    tokens: int  # tokens those cached contexts hold


class ServeCoreContextManager:
    def __init__(self, *, constant_prefix_timeout: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.constant_prefix_timeout = constant_prefix_timeout
        self._clock = clock
        self._next_id = 0  # context ids only grow: never recycled
        self.contexts: dict[int, Context] = {}
        self.prefix_caches: dict[Hashable, PrefixCache] = {}
        self._engines: dict[Hashable, FreesContexts | None] = {}
        self._engine_tokens: dict[Hashable, int] = {}
        self._holders: dict[HolderKey, list[Context]] = {}
        self._holder_session: dict[HolderKey, str | None] = {}
        self._sessions: dict[str, set[HolderKey]] = {}
        self.constant_prefix_contexts: dict[str, list[Context]] = {}  # var id -> pinned contexts
        self._pin_last_used: OrderedDict[str, float] = OrderedDict()  # LRU order, oldest first
        self.forks_total = 0
        self.contexts_created_total = 0
        self.cache_hits_total = 0  # contexts reused from a prefix cache instead of created
        self._retain_counter = 0

    # -- engines -------------------------------------------------------------------------
    def register_engine(self, engine_id: Hashable, engine: FreesContexts | None = None) -> None:
        """Create the engine's prefix cache. `engine` receives `free_context` calls."""
        if engine_id in self.prefix_caches:
            raise InvalidRequestError(f"engine {engine_id!r} is already registered")
        self.prefix_caches[engine_id] = PrefixCache()
        self._engines[engine_id] = engine
        self._engine_tokens[engine_id] = 0

    # The seed's name for the same operation.
    register_engine_prefix_cache = register_engine

    def remove_engine(self, engine_id: Hashable) -> list[int]:
        """Drop the engine, its prefix cache and every context on it (the engine is gone, so
        it is not called). Holders lose their references to those contexts. Returns the ids."""
        self._require_engine(engine_id)
        doomed = [c for c in self.contexts.values() if c.engine_id == engine_id]
        doomed_ids = {c.context_id for c in doomed}
        for ctx in doomed:
            ctx.alive = False
            ctx.ref_count = 0
            ctx._mark_failed(EngineNotFoundError(f"engine {engine_id!r} was removed"))
            del self.contexts[ctx.context_id]
        for key, held in self._holders.items():
            held[:] = [c for c in held if c.context_id not in doomed_ids]
        for var_id, pinned in list(self.constant_prefix_contexts.items()):
            pinned[:] = [c for c in pinned if c.context_id not in doomed_ids]
            if not pinned:
                del self.constant_prefix_contexts[var_id]
                self._pin_last_used.pop(var_id, None)
        del self.prefix_caches[engine_id], self._engines[engine_id], self._engine_tokens[engine_id]
        return sorted(doomed_ids)

    remove_engine_prefix_cache = remove_engine

    def engine_load(self, engine_id: Hashable) -> int:
        """Tokens held by the engine's live contexts, each context counted once (R4)."""
        self._require_engine(engine_id)
        return self._engine_tokens[engine_id]

    # -- the seed's primitives -----------------------------------------------------------
    @staticmethod
    def _hash_var_id(var_id: str) -> str:
        return hash_var_id(var_id)

    def _new_context(self, engine_id: Hashable, scope: ContextScope, session_id: str | None) -> Context:
        """A root context with no references yet; the caller adds one."""
        ctx = Context(self._next_id, engine_id, None, scope=scope, session_id=session_id)
        self._next_id += 1
        self.contexts[ctx.context_id] = ctx
        self.contexts_created_total += 1
        return ctx

    def _fork_context(self, parent: Context, scope: ContextScope, session_id: str | None) -> Context:
        """A child of `parent` on the same engine; the child's existence is one reference on
        the parent (R1). The child itself starts with no references; the caller adds one."""
        ctx = self._new_context(parent.engine_id, scope, session_id)
        ctx.parent_context = parent
        parent.children.add(ctx.context_id)
        parent.ref_count += 1
        self.forks_total += 1
        return ctx

    def _free_context(self, ctx: Context) -> None:
        """Drop one reference; at zero, destroy the context and drop the reference it held on
        its parent, and so on up the chain."""
        while ctx is not None:
            if ctx.ref_count <= 0 or not ctx.alive:
                raise InvariantError(f"freeing {ctx!r} with no reference left")
            ctx.ref_count -= 1
            if ctx.ref_count > 0:
                return
            parent = ctx.parent_context
            self._destroy(ctx)
            if parent is not None:
                parent.children.discard(ctx.context_id)
            ctx = parent

    def _destroy(self, ctx: Context) -> None:
        ctx.alive = False
        del self.contexts[ctx.context_id]
        self.prefix_caches[ctx.engine_id].remove_context(ctx.context_id)
        self._engine_tokens[ctx.engine_id] -= ctx.tokens_num
        ctx._mark_failed(UnknownContextError(f"context {ctx.context_id} was freed"))
        engine = self._engines[ctx.engine_id]
        if engine is not None:
            try:
                engine.free_context(ctx.context_id)
            except Exception:  # the engine's failure must not corrupt the serve layer's books
                log.exception("engine %r failed to free context %d", ctx.engine_id, ctx.context_id)

    # -- handles: the forkable-context API -----------------------------------------------
    def new_context(self, engine_id: Hashable, session_id: str | None = None) -> Context:
        """A new empty root context held by one handle reference."""
        self._require_engine(engine_id)
        self._require_session(session_id)
        ctx = self._new_context(engine_id, ContextScope.SESSION, session_id)
        self._hold(("handle", ctx.context_id), [ctx], session_id)
        return ctx

    def fork_context(self, parent: Context, session_id: str | None = None) -> Context:
        """A child of a live `parent`, held by one handle reference."""
        self._require_live(parent)
        self._require_session(session_id)
        ctx = self._fork_context(parent, ContextScope.SESSION, session_id)
        self._hold(("handle", ctx.context_id), [ctx], session_id)
        return ctx

    def free_context(self, ctx: Context) -> None:
        """Release the handle opened by `new_context` / `fork_context`. The KV goes when
        nothing else references the context (children keep their parent alive)."""
        key = ("handle", ctx.context_id)
        if key not in self._holders:
            raise UnknownContextError(f"context {ctx.context_id} is not open (unknown or already freed)")
        self._release(key)

    def retain(self, ctx: Context, session_id: str | None = None) -> HolderKey:
        """Hold one more reference on a live context (e.g. output k's context until output
        k+1 has forked from it). Returns the key to `release` it with."""
        self._require_live(ctx)
        self._require_session(session_id)
        self._retain_counter += 1
        key: HolderKey = ("retain", self._retain_counter)
        self._hold(key, [ctx], session_id)
        return key

    def release(self, key: HolderKey) -> None:
        if key not in self._holders:
            raise UnknownContextError(f"{key} holds no context (unknown or already released)")
        self._release(key)

    # -- tasks ---------------------------------------------------------------------------
    def set_task_contexts(self, task: ContextTask) -> list[Context]:
        """Give every node of the task a context on the task's engine (one per node, in
        order), reusing cached prefix contexts and forking the rest. The task holds one
        reference on each distinct context. Raises (and changes nothing) for an unknown
        engine or session, a task that already has contexts, or a dead parent context.

        Cache lookups run while the leading Fills keep hitting; after the first miss every
        node gets a new context, forked from the previous one. Leading-Fill contexts are
        cached; a Gen context never is. With `fuse_fill`, consecutive session Fills after a
        miss share one context (one Fill call instead of several); a fused run is not cached,
        since its content runs past any key that could name it.
        """
        self._require_engine(task.engine_id)
        self._require_session(task.session_id)
        holder: HolderKey = ("task", task.task_id)
        if holder in self._holders:
            raise InvalidRequestError(f"task {task.task_id!r} already holds contexts")
        if task.parent_context is not None:
            self._require_live(task.parent_context)
            if task.parent_context.engine_id != task.engine_id:
                raise InvalidRequestError("a task's parent context must live on the task's engine")
        if not task.nodes:
            raise InvalidRequestError(f"task {task.task_id!r} has no nodes")

        cache = self.prefix_caches[task.engine_id]
        contexts: list[Context] = []
        held: list[Context] = []
        prev = task.parent_context
        key = ROOT_KEY
        cacheable = prev is None  # only a chain's leading Fills from the root are cached
        hitting = cacheable
        fused: Context | None = None  # the context the current fused run extends
        for node in task.nodes:
            cacheable = cacheable and node.is_fill
            node_key = child_key(key, node.var_id) if cacheable else ""
            if hitting and cacheable:
                hit_id = cache.get(node_key, key, node.var_id)
                if hit_id is not None:
                    ctx = self.contexts[hit_id]
                    self.cache_hits_total += 1
                    ctx.ref_count += 1
                    held.append(ctx)
                    contexts.append(ctx)
                    if ctx.scope is ContextScope.GLOBAL:
                        self._pin(ctx, node.var_id)
                    prev, key = ctx, node_key
                    continue
            hitting = False
            is_global = node.is_fill and node.is_constant_prefix and (prev is None or prev.scope is ContextScope.GLOBAL)
            if task.fuse_fill and node.is_fill and not is_global and fused is not None:
                ctx = fused
                # Its content now runs past the key it was cached under, and lookups walk key
                # by key, so a fused run (and what follows it) is not cached at all.
                cache.remove_context(ctx.context_id)
                cacheable = False
            else:
                scope = ContextScope.GLOBAL if is_global else ContextScope.SESSION
                session = None if is_global else task.session_id
                ctx = self._new_context(task.engine_id, scope, session) if prev is None else self._fork_context(prev, scope, session)
                ctx.ref_count += 1
                held.append(ctx)
                if cacheable and not cache.put(node_key, ctx.context_id, key, node.var_id):
                    cacheable = False  # key taken (a collision): children could not be found under it
                if is_global:
                    self._pin(ctx, node.var_id)
                fused = ctx if node.is_fill and not is_global else None
            contexts.append(ctx)
            prev, key = ctx, node_key
        self._hold(holder, held, task.session_id, already_counted=True)
        task.contexts = contexts
        return contexts

    def free_task_contexts(self, task: ContextTask) -> None:
        """Drop the task's references, last context first (children before parents)."""
        holder: HolderKey = ("task", task.task_id)
        if holder not in self._holders:
            raise UnknownContextError(f"task {task.task_id!r} holds no contexts (unknown or already freed)")
        self._release(holder)

    def fail_context(self, ctx: Context, error: BaseException) -> None:
        """R3: the fill of `ctx` failed. Waiters get the error, and neither it nor anything
        forked from it (whose KV builds on it) can be hit by a new task. Every pin in that
        subtree is dropped too: the engine never computed that KV, so the context dies as soon
        as its holders release it instead of lingering for the pin timeout (a ghost). Pins of
        the same variable elsewhere (other engines, other contexts) stay."""
        ctx._mark_failed(error)
        if not ctx.alive:
            return
        cache = self.prefix_caches[ctx.engine_id]
        pinned_ids: set[int] = set()
        stack = [ctx]
        while stack:
            node = stack.pop()
            cache.remove_context(node.context_id)
            if node.pinned:
                pinned_ids.add(node.context_id)
            stack.extend(self.contexts[c] for c in node.children)
        self._drop_pins(pinned_ids)

    def abandon_fill(self, ctx: Context, num_tokens: int) -> None:
        """R3: the claimer of `ctx` gave up without a verdict (it was cancelled, or its fill
        ran together with other contexts and failed). Takes back the `num_tokens` it recorded
        and drops the pin (a context nobody filled is not kept; the next hit pins it again);
        the context is not failed: the next task that needs it claims it and fills it alone."""
        self.record_fill(ctx, -num_tokens)
        if ctx.pinned:
            self._drop_pins({ctx.context_id})
        ctx.unclaim()

    def _drop_pins(self, context_ids: set[int]) -> None:
        """Unpin these contexts (every variable they are pinned for)."""
        if not context_ids:
            return
        for var_id, pinned in list(self.constant_prefix_contexts.items()):
            unpinned = [c for c in pinned if c.context_id in context_ids]
            if not unpinned:
                continue
            pinned[:] = [c for c in pinned if c.context_id not in context_ids]
            if not pinned:
                del self.constant_prefix_contexts[var_id]
                del self._pin_last_used[var_id]
            # Each pin holds its own reference, so every context here is alive at its turn.
            for c in unpinned:
                self._unpin(c)

    def query_prefixes_in_engines(self, task: ContextTask) -> list[PrefixMatch]:
        """For each engine, how much of the task's leading Fills it already caches; the
        engines sorted by cached tokens (then nodes), most first."""
        matches = []
        for engine_id, cache in self.prefix_caches.items():
            key, nodes, tokens = ROOT_KEY, 0, 0
            if task.parent_context is None:
                for node in task.nodes:
                    if not node.is_fill:
                        break
                    node_key = child_key(key, node.var_id)
                    hit = cache.get(node_key, key, node.var_id)
                    if hit is None:
                        break
                    nodes, tokens, key = nodes + 1, tokens + self.contexts[hit].tokens_num, node_key
            matches.append(PrefixMatch(engine_id, nodes, tokens))
        return sorted(matches, key=lambda m: (m.tokens, m.nodes), reverse=True)

    # -- tokens (R4) ---------------------------------------------------------------------
    def record_fill(self, ctx: Context, num_tokens: int) -> None:
        """Count a fill's tokens (a negative count takes back a fill that was not done)."""
        self._require_live(ctx)
        if ctx.tokens_num - ctx.reserved_tokens + num_tokens < 0:
            raise InvalidRequestError(f"a fill cannot take {-num_tokens} tokens from {ctx!r}")
        ctx.tokens_num += num_tokens
        self._engine_tokens[ctx.engine_id] += num_tokens

    def reserve_generate(self, ctx: Context, max_tokens: int) -> None:
        self._require_live(ctx)
        if max_tokens < 0:
            raise InvalidRequestError(f"cannot reserve {max_tokens} tokens")
        ctx.reserved_tokens += max_tokens
        ctx.tokens_num += max_tokens
        self._engine_tokens[ctx.engine_id] += max_tokens

    def reconcile_generate(self, ctx: Context, produced: int) -> None:
        """Replace the reservation by the number of tokens actually generated."""
        if not ctx.alive:
            return  # freed (or its engine removed) while generating: nothing left to count
        delta = produced - ctx.reserved_tokens
        ctx.tokens_num += delta
        ctx.reserved_tokens = 0
        self._engine_tokens[ctx.engine_id] += delta

    def profile_session_tokens(self, session_id: str) -> int:
        """Tokens kept alive by the session: its holders' contexts and their ancestors, each
        context once."""
        self._require_session(session_id)
        seen: set[int] = set()
        total = 0
        for holder in self._sessions[session_id]:
            for ctx in self._holders[holder]:
                while ctx is not None and ctx.context_id not in seen:
                    seen.add(ctx.context_id)
                    total += ctx.tokens_num
                    ctx = ctx.parent_context
        return total

    # -- sessions and pins (R5) ----------------------------------------------------------
    def register_session(self, session_id: str) -> None:
        if session_id in self._sessions:
            raise InvalidRequestError(f"session {session_id!r} is already registered")
        self._sessions[session_id] = set()

    register_session_contexts = register_session

    def free_session_contexts(self, session_id: str) -> None:
        """Release every holder of the session (its tasks and handles) and forget it."""
        self._require_session(session_id)
        for holder in list(self._sessions[session_id]):
            self._release(holder)
        del self._sessions[session_id]

    def free_constant_prefix_contexts(self, var_id: str) -> int:
        """Unpin every context pinned for `var_id`. A variable that never got a context (its
        request never ran) is a no-op, not an error. Returns how many were unpinned."""
        pinned = self.constant_prefix_contexts.pop(var_id, [])
        self._pin_last_used.pop(var_id, None)
        for ctx in pinned:
            self._unpin(ctx)
        return len(pinned)

    def free_expired_constant_prefixes(self) -> list[str]:
        """Unpin the constant prefixes idle for longer than the timeout; returns their ids."""
        deadline = self._clock() - self.constant_prefix_timeout
        expired = [var_id for var_id, t in self._pin_last_used.items() if t < deadline]
        for var_id in expired:
            self.free_constant_prefix_contexts(var_id)
        return expired

    def release_constant_prefixes(self, engine_id: Hashable, tokens_needed: int) -> int:
        """Memory pressure: unpin this engine's constant prefixes, least recently used first,
        until contexts holding `tokens_needed` tokens were actually freed (or none is left).
        Returns the tokens freed."""
        self._require_engine(engine_id)
        before = self._engine_tokens[engine_id]
        for var_id in list(self._pin_last_used):
            if before - self._engine_tokens[engine_id] >= tokens_needed:
                break
            pinned = self.constant_prefix_contexts[var_id]
            for ctx in [c for c in pinned if c.engine_id == engine_id]:
                pinned.remove(ctx)
                self._unpin(ctx)
            if not pinned:
                del self.constant_prefix_contexts[var_id]
                del self._pin_last_used[var_id]
        return before - self._engine_tokens[engine_id]

    def _pin(self, ctx: Context, var_id: str) -> None:
        if not ctx.pinned:
            ctx.pinned = True
            ctx.ref_count += 1
            self.constant_prefix_contexts.setdefault(var_id, []).append(ctx)
            self._tell_engine_pinned(ctx, True)
        self._pin_last_used[var_id] = self._clock()
        self._pin_last_used.move_to_end(var_id)

    def _unpin(self, ctx: Context) -> None:
        """Drop the pin's reference (the caller already took `ctx` out of the pin map)."""
        ctx.pinned = False
        self._tell_engine_pinned(ctx, False)
        self._free_context(ctx)

    def _tell_engine_pinned(self, ctx: Context, pinned: bool) -> None:
        """Engines that can (optional `set_pinned`) evict a pinned prefix's KV last."""
        engine = self._engines.get(ctx.engine_id)
        if ctx.alive and hasattr(engine, "set_pinned"):
            engine.set_pinned(ctx.context_id, pinned)

    # -- holders -------------------------------------------------------------------------
    def _hold(self, key: HolderKey, contexts: list[Context], session_id: str | None, *, already_counted: bool = False) -> None:
        if not already_counted:
            for ctx in contexts:
                ctx.ref_count += 1
        self._holders[key] = contexts
        self._holder_session[key] = session_id
        if session_id is not None:
            self._sessions[session_id].add(key)

    def _release(self, key: HolderKey) -> None:
        contexts = self._holders.pop(key)
        session_id = self._holder_session.pop(key)
        if session_id is not None:
            self._sessions[session_id].discard(key)
        for ctx in reversed(contexts):
            if ctx.alive:
                self._free_context(ctx)

    # -- checks --------------------------------------------------------------------------
    def _require_engine(self, engine_id: Hashable) -> None:
        if engine_id not in self.prefix_caches:
            raise EngineNotFoundError(f"engine {engine_id!r} is not registered (or was removed)")

    def _require_session(self, session_id: str | None) -> None:
        if session_id is not None and session_id not in self._sessions:
            raise UnknownSessionError(f"session {session_id!r} is not registered (or was removed)")

    def _require_live(self, ctx: Context) -> None:
        if not ctx.alive or self.contexts.get(ctx.context_id) is not ctx:
            raise UnknownContextError(f"context {ctx.context_id} is not alive (unknown or already freed)")

    def holder_count(self) -> int:
        return len(self._holders)

    def check_invariants(self) -> None:
        """Raise `InvariantError` if any rule is broken. Recomputes every count from the
        structure (children, holders, pins) instead of trusting the stored counters."""
        held_refs: dict[int, int] = {}
        for key, contexts in self._holders.items():
            if len({c.context_id for c in contexts}) != len(contexts):
                raise InvariantError(f"holder {key} references a context twice")
            for ctx in contexts:
                if not ctx.alive:
                    raise InvariantError(f"holder {key} references dead {ctx!r}")
                held_refs[ctx.context_id] = held_refs.get(ctx.context_id, 0) + 1
        pinned_ids = {c.context_id for cs in self.constant_prefix_contexts.values() for c in cs}
        if set(self.constant_prefix_contexts) != set(self._pin_last_used):
            raise InvariantError("pinned variables and their LRU order disagree")
        engine_tokens = dict.fromkeys(self.prefix_caches, 0)
        for cid, ctx in self.contexts.items():
            if ctx.context_id != cid or not ctx.alive:
                raise InvariantError(f"context map entry {cid} holds {ctx!r}")
            if ctx.engine_id not in self.prefix_caches:
                raise InvariantError(f"{ctx!r} lives on an unregistered engine")
            live_children = [self.contexts.get(c) for c in ctx.children]
            if any(ch is None or ch.parent_context is not ctx for ch in live_children):
                raise InvariantError(f"{ctx!r} lists a child that is dead or not its own")
            if ctx.pinned != (cid in pinned_ids) or (ctx.pinned and ctx.scope is not ContextScope.GLOBAL):
                raise InvariantError(f"{ctx!r} pin state is inconsistent")
            expected = len(ctx.children) + held_refs.get(cid, 0) + int(ctx.pinned)
            if ctx.ref_count != expected or expected == 0:
                raise InvariantError(f"{ctx!r} has ref {ctx.ref_count}, expected {expected}")
            parent = ctx.parent_context
            if parent is not None:
                if self.contexts.get(parent.context_id) is not parent or cid not in parent.children:
                    raise InvariantError(f"{ctx!r} has a dead or unlinked parent")
                if parent.engine_id != ctx.engine_id:
                    raise InvariantError(f"{ctx!r} and its parent live on different engines")
            if not 0 <= ctx.reserved_tokens <= ctx.tokens_num:
                raise InvariantError(f"{ctx!r} token counts are inconsistent")
            engine_tokens[ctx.engine_id] += ctx.tokens_num
        if engine_tokens != self._engine_tokens:
            raise InvariantError(f"engine loads {self._engine_tokens} != recomputed {engine_tokens}")
        for engine_id, cache in self.prefix_caches.items():
            cache.check_consistent()
            for key, cid in cache.items():
                ctx = self.contexts.get(cid)
                if ctx is None or ctx.engine_id != engine_id:
                    raise InvariantError(f"prefix key {key} of engine {engine_id!r} points to dead context {cid}")
                # the cached chain is the context chain: key(i-1) names this context's parent
                parent_key = cache.parent_key(key)
                parent_id = cache.get(parent_key, cache.parent_key(parent_key), cache.var_id(parent_key)) if parent_key else None
                if parent_id != ctx.parent_context_id:
                    raise InvariantError(f"prefix key {key} names {ctx!r} but its parent key names {parent_id}")
        for session_id, holders in self._sessions.items():
            if any(self._holder_session.get(h) != session_id for h in holders):
                raise InvariantError(f"session {session_id!r} holder index is inconsistent")

