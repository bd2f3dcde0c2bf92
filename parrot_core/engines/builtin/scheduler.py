"""Continuous batching: which requests compute how many tokens in the next step.

Policy (one step):
1. Running requests in admission order, each up to its uncomputed tokens (a decode needs 1,
   a prefill continues with a chunk), within `max_num_batched_tokens`.
2. Then waiting requests, first come first served, while fewer than `max_num_seqs` run. On
   admission a request takes what the prefix cache holds for it. A request whose next block is
   being computed right now by another running request waits a step and then hits it instead
   of computing it again (in-batch prefix sharing).
3. When blocks run out, the newest running request is preempted: its blocks go back and its
   tokens are recomputed later (the prefix cache usually gives most of them back). If nothing
   is left to preempt, `evict_idle` may release contexts no request is using.

A request that can never fit (more blocks than the pool has) is refused at submission by the
engine, so a lone running request always eventually gets its blocks.
"""

from __future__ import annotations

from collections import deque
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
        self.evict_idle = evict_idle  # release idle contexts until n blocks are available
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self.num_preemptions = 0

    def add(self, request: EngineRequest) -> None:
        self.waiting.append(request)

    def remove(self, request: EngineRequest) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
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
            if not self._allocate(req, n, plan, scheduled):
                continue  # `req` itself was preempted; the list shifted under i
            plan.compute.append((req, n))
            scheduled.add(id(req))
            budget -= n
            i += 1

        inflight = self._inflight_block_hashes()
        deferred: list[EngineRequest] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not plan.preempted:
            req = self.waiting.popleft()
            if not req.admitted:
                if self._next_block_hash(req.context) in inflight:
                    deferred.append(req)  # another request is computing this block right now
                    continue
                hits = self.tree.match_prefix(req.context)
                if req.num_admissions == 0:  # a recompute after preemption is not a cache hit
                    req.cached_tokens = hits
                req.num_admissions += 1
                req.admitted = True
            self.running.append(req)
            if req.num_uncomputed == 0:
                plan.sample_only.append(req)
                scheduled.add(id(req))
                continue
            n = min(req.num_uncomputed, budget)
            if not self._allocate(req, n, plan, scheduled):
                break
            plan.compute.append((req, n))
            scheduled.add(id(req))
            budget -= n
            inflight.update(self._future_block_hashes(req.context))
        self.waiting.extendleft(reversed(deferred))
        return plan

    def _allocate(self, req: EngineRequest, n: int, plan: StepPlan, scheduled: set[int]) -> bool:
        """Get slots for `req`, preempting newer running requests that are not in this step.
        Returns False if `req` had to be preempted itself."""
        while True:
            try:
                req.slots = self.tree.allocate_slots(req.context, n)
                return True
            except OutOfBlocksError:
                victims = [r for r in self.running if id(r) not in scheduled and r is not req]
                if victims:
                    self._preempt(victims[-1], plan)
                    continue
                needed = self.tree.blocks_needed(req.context, n)
                if self.evict_idle is not None and self.evict_idle(needed) >= needed:
                    continue
                self._preempt(req, plan)
                return False

    def _preempt(self, req: EngineRequest, plan: StepPlan) -> None:
        self.running.remove(req)
        self.tree.release(req.context)
        req.admitted = False
        self.waiting.appendleft(req)
        plan.preempted.append(req)
        self.num_preemptions += 1

    # -- in-batch prefix sharing ---------------------------------------------------------
    def _inflight_block_hashes(self) -> set[int]:
        hashes: set[int] = set()
        for req in self.running:
            if req.num_uncomputed > self.tree.block_size:
                hashes.update(self._future_block_hashes(req.context))
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
        full = (len(ctx.token_ids) - 1) // bs  # blocks that can ever be hit (never the last token)
        tokens = np.asarray(ctx.token_ids[first * bs : full * bs], dtype=TOKEN_DTYPE)
        hashes = []
        for b in range(full - first):
            parent = tree.pool.hash_block(parent, tokens[b * bs : (b + 1) * bs], tree.namespace)
            hashes.append(parent)
        return hashes

    def _next_block_hash(self, ctx: KVContext) -> int | None:
        hashes = self._future_block_hashes(ctx) if ctx.num_computed % self.tree.block_size == 0 else []
        return hashes[0] if hashes else None
