"""Continuous batching: which requests compute how many tokens in the next step.

KV is a cache of tokens: only the contexts that running requests work on must keep their
blocks. The blocks of every other context (held by a caller, waiting, finished but not freed)
can be dropped by `evict_idle` and recomputed, exactly, when the context is next used.

Policy (one step):
1. Running requests in arrival order, each up to its uncomputed tokens (a decode needs 1, a
   prefill continues with a chunk), within `max_num_batched_tokens`.
2. Then, unless this step preempted someone, waiting requests in arrival order while fewer
   than `max_num_seqs` run. On admission a request takes what the prefix cache holds for it.
   A request whose next block after its cache hit another request is computing does not
   compute it again (in-batch prefix sharing): once every other admission is placed, it
   takes the blocks that this very step computes (`take_computing`: each layer writes the
   whole step's KV before any query attends) and computes its own tokens; if the prefix
   goes on past this step, it waits for it instead, and hits it later. A request that
   cannot get its blocks gives back what it took and stays at the head of the line; admission
   never preempts a running request.
   Prefix first: a request whose next full blocks other waiting requests also need (a
   shared prefix) computes only up to the end of that shared part at first; once every
   admission is placed, the budget left goes back to such requests, in arrival order. So the
   prefixes that followers wait for come before anyone's own tokens do (4 groups whose
   prefixes fill one step: the prefixes in step 1, every request's own tokens in step 2; one
   group whose prefix and own tokens fit one step: all of it in step 1). A held request
   keeps the blocks its followers took: the budget given back only adds room after them
   (`allocate_more`), never a copy of them.
3. When a running request needs blocks and none are free: first evict idle contexts (least
   recently used first), then preempt the latest-arrived running request that arrived after
   it and is not yet scheduled in this step; if there is none, the request preempts itself.
   A preempted request gives back its blocks and returns to the waiting line in arrival order
   (its tokens are recomputed, mostly re-hit in the prefix cache).

So the earliest-arrived request is never preempted by a later one: it always progresses, and
since the engine refuses at submission what can never fit the pool alone, every accepted
request eventually runs.
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from parrot_core.engines.builtin.block_pool import TOKEN_DTYPE
from parrot_core.engines.builtin.kv_contexts import KVContext, KVContextTree
from parrot_core.engines.builtin.request import EngineRequest
from parrot_core.errors import OutOfBlocksError


@dataclass
class StepPlan:
    """`compute`: (request, number of tokens) pairs for the model. `sample_only`: requests
    with nothing to compute but a token to sample (a Generate on a fully computed context)."""

    compute: list[tuple[EngineRequest, int]] = field(default_factory=list)
    sample_only: list[EngineRequest] = field(default_factory=list)
    preempted: list[EngineRequest] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.compute and not self.sample_only


class Scheduler:
    def __init__(
        self,
        tree: KVContextTree,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        evict_idle: Callable[[int], int] | None = None,
    ) -> None:
        self.tree = tree
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.evict_idle = evict_idle  # drop idle contexts' KV until n blocks are available; returns how many are
        self.waiting: deque[EngineRequest] = deque()  # arrival (request id) order
        self.running: list[EngineRequest] = []
        self.num_preemptions = 0
        # request id -> (request, state of its context, `_future_block_hashes` in that state)
        self._chains: dict[int, tuple[EngineRequest, tuple[int, int, int], list[int]]] = {}

    def add(self, request: EngineRequest) -> None:
        self._enqueue(request)

    def remove(self, request: EngineRequest) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def running_context_ids(self) -> set[int]:
        return {r.context.context_id for r in self.running}

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        self.running.sort(key=lambda r: r.request_id)
        live = {r.request_id for r in self.running} | {r.request_id for r in self.waiting}
        self._chains = {rid: c for rid, c in self._chains.items() if rid in live}
        wanted = self._blocks_waiting_requests_need()
        held: list[tuple[int, EngineRequest]] = []  # (index in plan.compute, request) stopped at a shared prefix
        i = 0
        while i < len(self.running):
            req = self.running[i]
            if req.num_uncomputed == 0:
                plan.sample_only.append(req)
                scheduled.add(id(req))
                i += 1
                continue
            if budget == 0:
                break
            n = min(req.num_uncomputed, budget)
            shared = self._shared_tokens(req, wanted, 1)
            n = shared if 0 < shared < n else n
            if not self._allocate(req, n, plan, scheduled):
                self._preempt(req, plan)
                continue  # the list shifted under i
            if n == shared and n < req.num_uncomputed:
                held.append((len(plan.compute), req))
            plan.compute.append((req, n))
            scheduled.add(id(req))
            budget -= n
            i += 1

        inflight = self._inflight_block_hashes()
        deferred: list[EngineRequest] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not plan.preempted:
            req = self.waiting.popleft()
            counts = self.tree.queries, self.tree.hits
            hits = self.tree.match_prefix(req.context) if req.uses_prefix_cache else 0
            if self._next_block_hash(req) in inflight:
                # another request computes the block after the hit: join it in pass 2 or wait
                self._give_back_lookup(req, counts)
                deferred.append(req)
                continue
            n = self._admit(req, hits, budget, plan, scheduled, wanted, held)
            if n is None:
                self.waiting.appendleft(req)  # stay first in line
                break
            budget -= n
            inflight.update(self._chain(req))
        # pass 2: a request waiting for blocks that this step computes takes them now (their
        # KV is written before any query of the step reads it) and computes its own tokens
        computing = self._blocks_computed_in(plan) if deferred else {}
        waiting_still: list[EngineRequest] = []
        for req in deferred:
            if budget == 0 or len(self.running) >= self.max_num_seqs or not req.uses_prefix_cache:
                waiting_still.append(req)
                continue
            counts = self.tree.queries, self.tree.hits
            hits = self.tree.match_prefix(req.context)
            taken = self._take_computing(req, computing)
            if not taken or self._next_block_hash(req) in inflight:  # the rest comes in a later step
                self._give_back_lookup(req, counts)
                waiting_still.append(req)
                continue
            n = self._admit(req, hits + taken, budget, plan, scheduled, wanted, held)
            if n is None:
                waiting_still.append(req)
                continue
            budget -= n
            computing.update(self._blocks_computed_in(plan, plan.compute[-1:]))
        for req in waiting_still:
            self._enqueue(req)
        for index, req in held:  # the budget left goes back to the requests held at a prefix
            if budget == 0:
                break
            n = plan.compute[index][1]
            more = min(req.num_uncomputed - n, budget)
            if req in self.running and self._allocate(req, n + more, plan, scheduled, may_preempt=False, allocated=n):
                plan.compute[index] = (req, n + more)
                budget -= more
        return plan

    def _give_back_lookup(self, req: EngineRequest, counts: tuple[int, int]) -> None:
        """Release what a prefix-cache lookup took for a request that waits: the lookup is
        made again when it is admitted, so it does not count (`counts`: the tree's query and
        hit counts before it) towards the hit rate either."""
        self.tree.release(req.context)
        self.tree.queries, self.tree.hits = counts

    def _admit(
        self,
        req: EngineRequest,
        hits: int,
        budget: int,
        plan: StepPlan,
        scheduled: set[int],
        wanted: Counter[int],
        held: list[tuple[int, EngineRequest]],
    ) -> int | None:
        """Start a waiting request whose context took `hits` cached tokens: it computes up to
        `budget` tokens (held at the end of a prefix that others wait for). Returns the tokens
        scheduled, or None when its blocks cannot be had (then it holds nothing and is not
        running)."""
        if req.num_admissions == 0:  # a recompute after preemption is not a cache hit
            req.cached_tokens = hits
        self.running.append(req)
        if req.num_uncomputed == 0:
            req.num_admissions += 1
            plan.sample_only.append(req)
            scheduled.add(id(req))
            return 0
        n = min(req.num_uncomputed, budget)
        shared = self._shared_tokens(req, wanted, 2)  # its own chain is among the wanted ones
        n = shared if 0 < shared < n else n
        if not self._allocate(req, n, plan, scheduled, may_preempt=False):
            self.running.remove(req)
            self.tree.release(req.context)  # give back what the lookup took
            return None
        req.num_admissions += 1
        if n == shared and n < req.num_uncomputed:
            held.append((len(plan.compute), req))
        plan.compute.append((req, n))
        scheduled.add(id(req))
        return n

    def _allocate(
        self, req: EngineRequest, n: int, plan: StepPlan, scheduled: set[int], may_preempt: bool = True, allocated: int = 0
    ) -> bool:
        """Get slots for `req`'s next n tokens (the first `allocated` of which already have
        theirs in this step): evicting idle contexts first, then (if `may_preempt`)
        preempting later-arrived running requests not yet scheduled in this step. Returns
        False if there is still no room (nothing changed for `req`)."""
        while True:
            try:
                if allocated:
                    req.slots = req.slots[:allocated] + self.tree.allocate_more(req.context, allocated, n - allocated)
                else:
                    req.slots = self.tree.allocate_slots(req.context, n)
                return True
            except OutOfBlocksError:
                needed = self.tree.blocks_needed(req.context, n)
                if self.evict_idle is not None and self.evict_idle(needed) >= needed:
                    continue
                victims = [
                    r for r in self.running if id(r) not in scheduled and r is not req and r.request_id > req.request_id
                ]
                if not may_preempt or not victims:
                    return False
                self._preempt(max(victims, key=lambda r: r.request_id), plan)

    def _preempt(self, req: EngineRequest, plan: StepPlan) -> None:
        self.running.remove(req)
        self.tree.release(req.context)
        self._enqueue(req)
        plan.preempted.append(req)
        self.num_preemptions += 1

    def _enqueue(self, req: EngineRequest) -> None:
        """Into the waiting line at its arrival position."""
        ids = [r.request_id for r in self.waiting]
        self.waiting.insert(bisect.bisect(ids, req.request_id), req)

    # -- in-batch prefix sharing ---------------------------------------------------------
    def _blocks_waiting_requests_need(self) -> Counter[int]:
        """For each full block that waiting requests will compute (by chained hash), how many
        of them will."""
        wanted: Counter[int] = Counter()
        for req in self.waiting:
            if req.uses_prefix_cache:
                wanted.update(self._chain(req))
        return wanted

    def _shared_tokens(self, req: EngineRequest, wanted: Counter[int], holders: int) -> int:
        """How many of `req`'s next tokens end its longest run of next full blocks that at
        least `holders` waiting requests need; 0 if its next block is its own."""
        if not wanted or not req.uses_prefix_cache:
            return 0
        hashes = self._chain(req)
        shared = 0
        while shared < len(hashes) and wanted[hashes[shared]] >= holders:
            shared += 1
        if shared == 0:
            return 0
        bs = self.tree.block_size
        return (req.context.num_computed // bs + shared) * bs - req.context.num_computed

    def _blocks_computed_in(
        self, plan: StepPlan, compute: list[tuple[EngineRequest, int]] | None = None
    ) -> dict[int, tuple[KVContext, int]]:
        """Chained hash -> (context, block index) of every block that becomes full in this
        step's computations (`plan.compute`, or the given part of it)."""
        bs, blocks = self.tree.block_size, {}
        for req, n in plan.compute if compute is None else compute:
            ctx = req.context
            first = ctx.num_computed // bs
            chain = self._chain(req)
            for j in range(min((ctx.num_computed + n) // bs - first, len(chain))):
                blocks.setdefault(chain[j], (ctx, first + j))
        return blocks

    def _take_computing(self, req: EngineRequest, computing: dict[int, tuple[KVContext, int]]) -> int:
        """Give `req` the run of its next blocks that this step computes (same tokens, never
        its last token's block). Returns the tokens taken."""
        ctx, bs = req.context, self.tree.block_size
        if ctx.num_computed % bs:
            return 0
        taken = 0
        for h in self._chain(req):
            source = computing.get(h)
            start = ctx.num_computed
            if source is None or start + bs >= len(ctx.token_ids):
                break
            other, index = source
            if index * bs != start or other.token_ids[start : start + bs] != ctx.token_ids[start : start + bs]:
                break  # a hash collision: never take another prompt's KV
            self.tree.take_computing(ctx, other.blocks[index])
            taken += bs
        return taken

    def _inflight_block_hashes(self) -> set[int]:
        hashes: set[int] = set()
        for req in self.running:
            if req.num_uncomputed > self.tree.block_size:
                hashes.update(self._chain(req))
        return hashes

    def _future_block_hashes(self, ctx: KVContext) -> list[int]:
        """Chained hashes of the full blocks `ctx` is about to compute (empty if the prefix
        cache is off or the chain is broken by an unhashed block)."""
        tree, bs = self.tree, self.tree.block_size
        if not tree.pool.enable_prefix_caching:
            return []
        first = ctx.num_computed // bs
        parent = None
        if first > 0:
            parent = ctx.blocks[first - 1].block_hash
            if parent is None:
                return []
        full = len(ctx.token_ids) // bs  # blocks that can be hit (`match_prefix`)
        tokens = np.asarray(ctx.token_ids[first * bs : full * bs], dtype=TOKEN_DTYPE)
        hashes = []
        for b in range(full - first):
            parent = tree.pool.hash_block(parent, tokens[b * bs : (b + 1) * bs], tree.namespace)
            hashes.append(parent)
        return hashes

    def _chain(self, req: EngineRequest) -> list[int]:
        """`_future_block_hashes` of the request's context, hashed once per state of the
        context (a waiting request's chain is not hashed again every step)."""
        ctx, bs = req.context, self.tree.block_size
        first = ctx.num_computed // bs
        parent = id(ctx.blocks[first - 1]) if 0 < first <= len(ctx.blocks) else 0
        state = (ctx.num_computed, len(ctx.token_ids), parent)
        known = self._chains.get(req.request_id)
        if known is not None and known[0] is req and known[1] == state:
            return known[2]
        hashes = self._future_block_hashes(ctx)
        self._chains[req.request_id] = (req, state, hashes)
        return hashes

    def _next_block_hash(self, req: EngineRequest) -> int | None:
        hashes = self._chain(req) if req.context.num_computed % self.tree.block_size == 0 else []
        return hashes[0] if hashes else None
