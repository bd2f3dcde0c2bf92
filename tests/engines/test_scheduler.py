"""The builtin engine's step scheduler alone (no model): which requests compute how many tokens
in each step, driven the way the engine's step loop drives it (commit what was scheduled,
remove finished fills)."""

from __future__ import annotations

import random

import hypothesis.strategies as st
from hypothesis import given, settings

from parrot_core.engines.builtin.block_pool import BlockPool
from parrot_core.engines.builtin.kv_contexts import KVContextTree
from parrot_core.engines.builtin.request import EngineRequest, Kind
from parrot_core.engines.builtin.scheduler import Scheduler

BS = 4


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 101) for _ in range(n)]


def fills(tree: KVContextTree, prompts: list[list[int]]) -> list[EngineRequest]:
    out = []
    for i, p in enumerate(prompts):
        ctx = tree.create(i)
        tree.append_tokens(ctx, p)
        out.append(EngineRequest(i, Kind.FILL, ctx, emit=lambda event: None))
    return out


def run_to_end(tree: KVContextTree, scheduler: Scheduler) -> list[list[tuple[int, int]]]:
    """Steps until no work is left: per step, (request id, tokens computed) pairs."""
    steps = []
    while scheduler.has_work:
        plan = scheduler.schedule()
        assert plan.compute, "a step with work left must compute something"
        for req, n in plan.compute:
            tree.commit(req.context, n)
            if req.num_uncomputed == 0:
                scheduler.remove(req)
        steps.append([(req.request_id, n) for req, n in plan.compute])
        assert len(steps) < 100
    tree.check_invariants()
    for ctx in tree.contexts():  # leak check: with every context freed, no block is in use
        tree.free(ctx.context_id)
    assert tree.pool.num_used == 0
    return steps


def test_leaders_stop_at_their_shared_prefix_so_every_groups_prefix_fits_the_first_step():
    """4 groups x 4 requests, each group sharing a 32-token prefix, 8 own tokens each, a budget
    of 128 tokens (the 4 prefixes exactly). The first request of a group computes only the part
    others wait for, so step 1 computes the 4 prefixes and step 2 every request's own tokens:
    2 steps, each prefix and each own part computed once. (Whole prompts first would spend
    step 1 on 3 whole prompts and a piece of the 4th, and need a 3rd step.)"""
    tree = KVContextTree(BlockPool(256, BS, enable_prefix_caching=True))
    scheduler = Scheduler(tree, max_num_seqs=32, max_num_batched_tokens=128)
    heads = [tokens(g, 32) for g in range(4)]
    for req in fills(tree, [heads[g] + tokens(100 + 10 * g + i, 8) for g in range(4) for i in range(4)]):
        scheduler.add(req)
    steps = run_to_end(tree, scheduler)
    assert steps[0] == [(0, 32), (4, 32), (8, 32), (12, 32)]
    assert sorted(steps[1]) == [(i, 8) for i in range(16)]
    assert len(steps) == 2


def test_a_leader_with_no_follower_waiting_computes_its_whole_prompt():
    """Nothing shares the first prompt's blocks: it is not held at any boundary; a request that
    shares only a partial block with it is not a follower either."""
    tree = KVContextTree(BlockPool(256, BS, enable_prefix_caching=True))
    scheduler = Scheduler(tree, max_num_seqs=32, max_num_batched_tokens=128)
    first = tokens(1, 40)
    for req in fills(tree, [first, first[:2] + tokens(2, 30)]):
        scheduler.add(req)
    assert run_to_end(tree, scheduler) == [[(0, 40), (1, 32)]]


def test_without_prefix_caching_nothing_is_held_back():
    tree = KVContextTree(BlockPool(256, BS, enable_prefix_caching=False))
    scheduler = Scheduler(tree, max_num_seqs=32, max_num_batched_tokens=128)
    head = tokens(3, 32)
    for req in fills(tree, [head + tokens(4, 8), head + tokens(5, 8)]):
        scheduler.add(req)
    assert run_to_end(tree, scheduler) == [[(0, 40), (1, 40)]]


def test_followers_take_the_prefix_the_same_step_computes_and_the_rest_goes_back_to_the_leader():
    """One group: its first request is held at the 32-token prefix; the followers take the
    prefix's blocks as this step computes them (written before any query of the step reads
    them) and compute their own tokens in the same step, then the budget left goes back to
    the held request. One step; the prefix and every own part computed once, and the
    followers' 32 tokens reported as cached."""
    tree = KVContextTree(BlockPool(256, BS, enable_prefix_caching=True))
    scheduler = Scheduler(tree, max_num_seqs=32, max_num_batched_tokens=128)
    head = tokens(7, 32)
    requests = fills(tree, [head + tokens(20 + i, 8) for i in range(4)])
    for req in requests:
        scheduler.add(req)
    plan = scheduler.schedule()
    leader_table = tree.block_table(requests[0].context)
    for follower in requests[1:]:  # the same 8 blocks of KV, not copies
        assert tree.block_table(follower.context)[:8] == leader_table[:8]
    assert [b.ref_count for b in requests[0].context.blocks[:8]] == [4] * 8
    for req, n in plan.compute:
        tree.commit(req.context, n)
        scheduler.remove(req)
    assert [(req.request_id, n) for req, n in plan.compute] == [(0, 40), (1, 8), (2, 8), (3, 8)]
    assert [req.cached_tokens for req in requests] == [0, 32, 32, 32]
    assert (tree.queries, tree.hits) == (4 * 40, 3 * 32)  # each prompt looked up once
    tree.check_invariants()  # the taken blocks are registered by the leader's commit
    assert not scheduler.has_work
    for req in requests:
        tree.free(req.context.context_id)
    assert tree.pool.num_used == 0


def test_followers_of_several_prefixes_join_them_in_the_same_step_once_every_prefix_is_placed():
    """Two groups of three (32-token prefixes, 8 own tokens), a budget of 112: both prefixes
    are placed first (64), then the four followers' own tokens (32), then the leaders' own
    (16): everyone's first token after one step, each prefix computed once."""
    tree = KVContextTree(BlockPool(256, BS, enable_prefix_caching=True))
    scheduler = Scheduler(tree, max_num_seqs=32, max_num_batched_tokens=112)
    heads = [tokens(11, 32), tokens(12, 32)]
    for req in fills(tree, [heads[g] + tokens(40 + 3 * g + i, 8) for g in range(2) for i in range(3)]):
        scheduler.add(req)
    steps = run_to_end(tree, scheduler)
    assert steps == [[(0, 40), (3, 40), (1, 8), (2, 8), (4, 8), (5, 8)]]


def test_a_follower_takes_only_whole_blocks_of_the_same_tokens():
    """The prefix is 30 tokens: 7 whole blocks (28) are shared; the follower computes from
    token 28 on. A request that shares the first block only in part takes nothing."""
    tree = KVContextTree(BlockPool(256, BS, enable_prefix_caching=True))
    scheduler = Scheduler(tree, max_num_seqs=32, max_num_batched_tokens=128)
    head = tokens(13, 30)
    requests = fills(tree, [head + tokens(50, 8), head + tokens(51, 8), head[:3] + tokens(52, 20)])
    for req in requests:
        scheduler.add(req)
    assert run_to_end(tree, scheduler) == [[(0, 38), (2, 23), (1, 10)]]
    assert [req.cached_tokens for req in requests] == [0, 28, 0]


def test_a_prefix_longer_than_a_step_is_held_at_its_end_while_it_continues():
    """A budget of 24 tokens, two groups of two sharing 32-token prefixes. The first request's
    prefix takes two steps; in the second it computes only the prefix's last 8 tokens, and the
    second group's first request gets the other 16 for its own prefix. Each prefix is computed
    once, and every own part once (a follower joins once the prefix is cached)."""
    tree = KVContextTree(BlockPool(256, BS, enable_prefix_caching=True))
    scheduler = Scheduler(tree, max_num_seqs=32, max_num_batched_tokens=24)
    heads = [tokens(8, 32), tokens(9, 32)]
    for req in fills(tree, [heads[g] + tokens(30 + 2 * g + i, 8) for g in range(2) for i in range(2)]):
        scheduler.add(req)
    steps = run_to_end(tree, scheduler)
    assert steps == [[(0, 24)], [(0, 8), (2, 16)], [(0, 8), (2, 16)], [(2, 8), (1, 8), (3, 8)]]
    assert sum(n for step in steps for _, n in step) == 2 * 32 + 4 * 8
    # a follower's lookups while it waits are given back uncounted: each prompt counts once
    assert (tree.queries, tree.hits) == (4 * 40, 2 * 32)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    head_lens=st.lists(st.integers(0, 40), min_size=1, max_size=3),
    shapes=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 12), st.integers(0, 3)), min_size=1, max_size=10),
    budget=st.integers(4, 64),
    max_num_seqs=st.integers(1, 8),
    spare_blocks=st.integers(0, 30),
    failed_steps=st.sets(st.integers(0, 20), max_size=3),
)
def test_every_step_reads_only_kv_that_is_written_on_any_pool_and_budget(
    head_lens, shapes, budget, max_num_seqs, spare_blocks, failed_steps
):
    """Requests sharing (or not) a few heads arrive together: a random budget, sequence
    limit and pool (from just enough for the largest request alone to roomy), and steps that
    fail after the forward pass. After every step's writes, every token that a scheduled
    request attends to holds its own KV, in a fake KV store fed only by those writes and by
    copy-on-write: so a request never takes a block that no step computes, and no copy
    moves a block from under a request that took it. Each step keeps to the budget and the
    sequence limit, every request ends (done or failed), a request admitted once reports as
    cached exactly the prompt tokens it did not compute, and no block leaks. Finished
    contexts stay until the end, their KV evictable as in the engine."""
    kv: dict[int, tuple[int, int]] = {}

    def copy_block(src: int, dst: int, n: int) -> None:
        for j in range(n):
            if src * BS + j in kv:
                kv[dst * BS + j] = kv[src * BS + j]

    heads = [tokens(200 + h, n) for h, n in enumerate(head_lens)]
    prompts = [heads[h % len(heads)][: len(heads[h % len(heads)]) - cut] + tokens(300 + i, own) for i, (h, own, cut) in enumerate(shapes)]
    largest = max(-(-len(p) // BS) for p in prompts) + 1  # its blocks and a copy
    tree = KVContextTree(BlockPool(largest + spare_blocks, BS, enable_prefix_caching=True), copy_block=copy_block)

    def evict_idle(needed: int) -> int:  # the engine's rule: drop the KV of contexts nobody runs
        running = scheduler.running_context_ids()
        for ctx in tree.contexts():
            if tree.pool.num_available >= needed:
                break
            if ctx.context_id not in running:
                tree.release(ctx)
        return tree.pool.num_available

    scheduler = Scheduler(tree, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, evict_idle=evict_idle)
    requests = fills(tree, prompts)
    for req in requests:
        scheduler.add(req)
    computed = {req.request_id: 0 for req in requests}
    ended: dict[int, str] = {}
    step = 0
    while scheduler.has_work:
        plan = scheduler.schedule()
        assert plan.compute or plan.sample_only
        assert sum(n for _, n in plan.compute) <= budget and len(scheduler.running) <= max_num_seqs
        assert len({req.request_id for req, _ in plan.compute}) == len(plan.compute)
        for req, n in plan.compute:  # the forward pass writes every scheduled token's KV...
            ctx, table = req.context, tree.block_table(req.context)
            for p in range(ctx.num_computed, ctx.num_computed + n):
                kv[table[p // BS] * BS + p % BS] = (ctx.token_ids[p], p)
        for req, n in plan.compute:  # ...then each query reads its whole context
            ctx, table = req.context, tree.block_table(req.context)
            for p in range(ctx.num_computed + n):
                assert kv.get(table[p // BS] * BS + p % BS) == (ctx.token_ids[p], p), (req.request_id, p)
        if step in failed_steps:
            for req in [r for r, _ in plan.compute] + plan.sample_only:
                scheduler.remove(req)
                tree.release(req.context)
                ended[req.request_id] = "failed"
        else:
            for req, n in plan.compute:
                tree.commit(req.context, n)
                computed[req.request_id] += n
            for req in [r for r, _ in plan.compute] + plan.sample_only:
                if req.num_uncomputed == 0:
                    scheduler.remove(req)
                    ended[req.request_id] = "done"
        tree.check_invariants()
        step += 1
        assert step < 500, "no progress"
    assert len(ended) == len(requests)
    for req in requests:
        if ended[req.request_id] == "done" and req.num_admissions == 1:
            assert req.cached_tokens + computed[req.request_id] == len(req.context.token_ids)
        tree.free(req.context.context_id)
    assert tree.pool.num_used == 0
