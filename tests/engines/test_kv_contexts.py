import pytest

from parrot_core.engines.builtin.block_pool import BlockPool
from parrot_core.engines.builtin.kv_contexts import ContextExistsError, KVContext, KVContextTree
from parrot_core.errors import InvariantError, OutOfBlocksError, UnknownContextError


class FakeKV:
    """A KV store with one entry per slot: computing token i of a context writes (token, i)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.bs = block_size
        self.store: list[tuple[int, int] | None] = [None] * (num_blocks * block_size)
        self.copies: list[tuple[int, int, int]] = []

    def copy_block(self, src: int, dst: int, n: int) -> None:
        self.copies.append((src, dst, n))
        self.store[dst * self.bs : dst * self.bs + n] = self.store[src * self.bs : src * self.bs + n]


def make(num_blocks=8, block_size=4, **kw):
    pool = BlockPool(num_blocks, block_size, **kw)
    kv = FakeKV(num_blocks, block_size)
    return pool, KVContextTree(pool, copy_block=kv.copy_block), kv


def compute(tree: KVContextTree, kv: FakeKV, ctx: KVContext, n: int | None = None) -> None:
    start = ctx.num_computed
    n = len(ctx.token_ids) - start if n is None else n
    for p, s in zip(range(start, start + n), tree.allocate_slots(ctx, n)):
        kv.store[s] = (ctx.token_ids[p], p)
    tree.commit(ctx, n)


def fill(tree, kv, ctx, tokens) -> int:
    tree.append_tokens(ctx, tokens)
    hit = tree.match_prefix(ctx)
    compute(tree, kv, ctx)
    return hit


def content(tree, kv, ctx):
    return [kv.store[s] for s in tree.slots(ctx, 0, ctx.num_computed)]


def expected(ctx):
    return [(t, i) for i, t in enumerate(ctx.token_ids[: ctx.num_computed])]


def snapshot(tree: KVContextTree):
    pool = tree.pool
    return (
        {c.context_id: (tree.block_table(c), c.num_computed, list(c.token_ids)) for c in tree.contexts()},
        [b.ref_count for b in pool.blocks],
        pool.free_queue(),
        (pool.num_free, pool.num_cached_free, pool.num_used),
    )


def test_fill_uses_blocks_in_order_and_exact_slots():
    pool, tree, kv = make()
    a = tree.create(1)
    fill(tree, kv, a, range(10, 20))
    assert tree.block_table(a) == [0, 1, 2]
    assert tree.slots(a, 3, 6) == [3, 4, 5]
    assert content(tree, kv, a) == expected(a)
    assert [pool.blocks[i].block_hash is not None for i in range(3)] == [True, True, False]
    tree.check_invariants()


def test_fork_shares_blocks_and_copies_shared_partial_block_on_write():
    pool, tree, kv = make()
    parent = tree.create(1)
    fill(tree, kv, parent, [1, 2, 3, 4, 5, 6])  # blocks 0 (full) and 1 (2 of 4 slots)
    parent.last_hidden = hidden = object()
    child = tree.create(2, parent_id=1)
    assert tree.block_table(child) == [0, 1] and child.num_computed == 6 and child.last_hidden is hidden
    assert child.token_ids == parent.token_ids and child.token_ids is not parent.token_ids
    assert [pool.blocks[0].ref_count, pool.blocks[1].ref_count] == [2, 2]
    tree.check_invariants()

    tree.append_tokens(child, [70])
    assert tree.blocks_needed(child, 1) == 1
    compute(tree, kv, child)
    assert kv.copies == [(1, 2, 2)]
    assert tree.block_table(child) == [0, 2] and tree.block_table(parent) == [0, 1]
    assert [pool.blocks[i].ref_count for i in range(3)] == [2, 1, 1]
    assert content(tree, kv, parent) == expected(parent)
    assert content(tree, kv, child) == expected(child)

    tree.append_tokens(parent, [80])  # the parent's block is no longer shared: written in place
    compute(tree, kv, parent)
    assert kv.copies == [(1, 2, 2)] and tree.block_table(parent) == [0, 1]
    assert content(tree, kv, parent) == expected(parent)
    assert content(tree, kv, child) == expected(child)
    tree.check_invariants()


def test_parent_freed_while_child_lives_keeps_shared_blocks():
    pool, tree, kv = make()
    parent = tree.create(1)
    fill(tree, kv, parent, range(9))
    child = tree.create(2, 1)
    assert tree.free(1) is True
    assert len(tree) == 1 and 1 not in tree
    assert [b.ref_count for b in child.blocks] == [1, 1, 1] and pool.num_used == 3
    fill(tree, kv, child, [100])
    assert content(tree, kv, child) == expected(child)
    tree.check_invariants()
    assert tree.free(2) is True
    assert pool.num_used == 0 and pool.num_free + pool.num_cached_free == pool.num_blocks
    assert tree.free(2) is False and tree.free(99) is False
    tree.check_invariants()


def test_match_prefix_takes_whole_blocks_and_computes_only_the_last_token_again():
    pool, tree, kv = make()
    a = tree.create(1)
    fill(tree, kv, a, range(8))
    b = tree.create(2)
    # every token is cached: both blocks are taken, the last token (never a hit: its hidden
    # state is needed) is computed again into a copy of its block, not its whole block
    assert fill(tree, kv, b, range(8)) == 7
    assert b.blocks[0] is a.blocks[0] and b.blocks[1] is not a.blocks[1]
    assert a.blocks[1].ref_count == 1 and b.blocks[1].ref_count == 1
    assert (tree.queries, tree.hits) == (8 + 8, 7)  # a looked up too, and missed
    c = tree.create(3)
    assert fill(tree, kv, c, [*range(8), 99]) == 8
    d = tree.create(4)
    assert fill(tree, kv, d, [0, 1, 2, 3, 4, 5, 99, 99, 99]) == 4  # first miss stops the walk
    e = tree.create(5)
    assert fill(tree, kv, e, [0, 1, 2]) == 0  # less than one block
    assert a.blocks[0].ref_count == 4 and e.blocks[0] is not a.blocks[0]
    for ctx in (a, b, c, d, e):
        assert content(tree, kv, ctx) == expected(ctx)
    assert (tree.queries, tree.hits) == (16 + 9 + 9 + 3, 7 + 8 + 4)
    tree.check_invariants()


def test_match_prefix_ignores_partial_blocks_and_unaligned_contexts():
    pool, tree, kv = make()
    a = tree.create(1)
    fill(tree, kv, a, range(6))  # block 1 is partial: not cached
    b = tree.create(2)
    assert fill(tree, kv, b, [*range(8), 50]) == 4
    c = tree.create(3)
    fill(tree, kv, c, [0, 1])
    tree.append_tokens(c, range(2, 12))
    assert tree.match_prefix(c) == 0  # not block-aligned
    assert c.num_computed == 2


def test_release_then_match_prefix_rehits_cached_blocks():
    pool, tree, kv = make()
    a = tree.create(1)
    fill(tree, kv, a, range(9))
    table = tree.block_table(a)
    a.last_hidden = object()
    tree.release(a)
    assert (a.num_computed, a.blocks, a.last_hidden, a.token_ids) == (0, [], None, list(range(9)))
    assert (pool.num_used, pool.num_cached_free) == (0, 2)
    assert tree.match_prefix(a) == 8
    assert tree.block_table(a) == table[:2]
    compute(tree, kv, a)
    assert content(tree, kv, a) == expected(a)
    tree.check_invariants()


def test_evicted_blocks_are_not_hit():
    pool, tree, kv = make(num_blocks=3, block_size=2)
    a = tree.create(1)
    fill(tree, kv, a, [1, 2, 3, 4, 5])
    tree.free(1)
    assert pool.num_cached_free == 2
    for b in pool.allocate_many(3):  # pressure evicts every cached block
        pool.decref(b)
    assert pool.num_cached_free == 0
    b = tree.create(2)
    assert fill(tree, kv, b, [1, 2, 3, 4, 5]) == 0
    assert content(tree, kv, b) == expected(b)


def test_out_of_blocks_leaves_state_unchanged():
    pool, tree, kv = make(num_blocks=3, block_size=4)
    parent = tree.create(1)
    fill(tree, kv, parent, range(6))
    child = tree.create(2, 1)
    tree.append_tokens(child, [7, 8, 9])  # copy-on-write + one more block, with one free
    assert tree.blocks_needed(child, 3) == 2
    before = snapshot(tree)
    with pytest.raises(OutOfBlocksError):
        tree.allocate_slots(child, 3)
    assert snapshot(tree) == before and kv.copies == []
    compute(tree, kv, child, 2)  # fits: only the copy-on-write
    assert kv.copies == [(1, 2, 2)] and content(tree, kv, child) == expected(child)
    tree.check_invariants()


def test_create_errors_change_nothing():
    pool, tree, kv = make()
    a = tree.create(1)
    fill(tree, kv, a, range(5))
    before = snapshot(tree)
    with pytest.raises(UnknownContextError):
        tree.create(2, parent_id=7)
    with pytest.raises(ContextExistsError):
        tree.create(1)
    with pytest.raises(ContextExistsError):
        tree.create(1, parent_id=1)
    assert snapshot(tree) == before and 2 not in tree
    with pytest.raises(UnknownContextError):
        tree.get(2)


def test_fork_does_not_share_uncommitted_room():
    pool, tree, kv = make()
    a = tree.create(1)
    fill(tree, kv, a, range(4))
    tree.append_tokens(a, range(4))
    tree.allocate_slots(a, 4)
    b = tree.create(2, 1)
    assert tree.block_table(b) == [0] and tree.block_table(a) == [0, 1]
    tree.check_invariants()


def test_namespaces_do_not_share_prefixes():
    pool, tree, kv = make()
    other = KVContextTree(pool, namespace=b"tenant-b", copy_block=kv.copy_block)
    a = tree.create(1)
    fill(tree, kv, a, range(9))
    b = other.create(1)
    assert fill(other, kv, b, range(9)) == 0
    c = tree.create(2)
    assert fill(tree, kv, c, range(9)) == 8


def test_prefix_caching_off_never_hits():
    pool, tree, kv = make(enable_prefix_caching=False)
    a = tree.create(1)
    fill(tree, kv, a, range(9))
    b = tree.create(2)
    assert fill(tree, kv, b, range(9)) == 0
    tree.free(1)
    assert pool.num_cached_free == 0
    tree.check_invariants()


def test_check_invariants_catches_a_foreign_block_in_a_table():
    pool, tree, kv = make()
    a = tree.create(1)
    fill(tree, kv, a, range(5))
    b = tree.create(2)
    b.blocks.append(a.blocks[0])  # shared without incref
    with pytest.raises(InvariantError):
        tree.check_invariants()


def test_check_invariants_catches_tokens_that_disagree_with_a_hashed_block():
    pool, tree, kv = make()
    a = tree.create(1)
    fill(tree, kv, a, range(5))
    a.token_ids[0] = 99
    with pytest.raises(InvariantError, match="mismatch"):
        tree.check_invariants()


def test_free_order_evicts_the_most_specific_block_first():
    pool, tree, kv = make()
    a = tree.create(1)
    fill(tree, kv, a, range(9))  # blocks 0, 1 full and hashed, 2 partial
    tree.free(1)
    # The partial block is reused first; of the cached ones the deepest (1) is evicted first.
    assert pool.free_queue() == [2, 3, 4, 5, 6, 7, 1, 0]
