"""Regression tests of the context tree (issue 9): a block registered in the prefix-cache hash
map is never written in place (defect 5), and a prefix is carved out of a context's tokens,
whether or not their KV is still held (defect 10)."""

import pytest

from parrot_core.engines.builtin.kv_contexts import KVContextTree
from parrot_core.errors import InvalidRequestError
from tests.engines.test_kv_contexts import compute, content, expected, fill, make, snapshot

SOURCE = [1, 2, 3, 4, 5, 6, 7, 8]  # two full blocks of 4


def carve_and_free_source(tree: KVContextTree, kv, keep: int = 6):
    """Fill a source, carve out its first `keep` tokens and free the source: the carved
    context is then the only holder of the source's registered boundary block."""
    fill(tree, kv, tree.create(1), SOURCE)
    carved = tree.create_prefix(2, 1, keep)
    tree.free(1)
    return carved


def test_a_write_that_never_commits_leaves_the_registered_block_intact():
    """The engine's step failure path: slots allocated and written by the forward pass, then
    the context released without a commit. A later hit must still read the source's KV."""
    pool, tree, kv = make(num_blocks=8, block_size=4)
    carved = carve_and_free_source(tree, kv)
    boundary = carved.blocks[1]
    assert boundary.ref_count == 1 and boundary.token_ids == (5, 6, 7, 8)
    tree.append_tokens(carved, [70, 80])
    for p, s in zip(range(6, 8), tree.allocate_slots(carved, 2)):
        kv.store[s] = (carved.token_ids[p], p)
    tree.release(carved)
    tree.free(2)

    probe = tree.create(3)
    assert fill(tree, kv, probe, SOURCE + [9]) == 8
    assert content(tree, kv, probe) == expected(probe)
    tree.check_invariants()


def test_a_carved_context_written_after_its_source_is_freed_commits_and_both_chains_hit_exactly():
    pool, tree, kv = make(num_blocks=8, block_size=4)
    carved = carve_and_free_source(tree, kv)
    fill(tree, kv, carved, [70, 80])
    assert content(tree, kv, carved) == expected(carved)
    tree.free(2)
    for i, tokens in enumerate([SOURCE + [9], SOURCE[:6] + [70, 80, 9]]):
        probe = tree.create(10 + i)
        assert fill(tree, kv, probe, tokens) == 8
        assert content(tree, kv, probe) == expected(probe)
        tree.free(10 + i)
    tree.check_invariants()


@pytest.mark.parametrize("keep", [5, 6, 7])
def test_blocks_needed_counts_the_copy_of_a_registered_block(keep):
    pool, tree, kv = make(num_blocks=8, block_size=4)
    carved = carve_and_free_source(tree, kv, keep)
    tree.append_tokens(carved, [70] * (8 - keep))  # up to the end of the boundary block
    need = tree.blocks_needed(carved, 8 - keep)
    assert need == 1
    available = pool.num_available
    tree.allocate_slots(carved, 8 - keep)
    assert pool.num_available == available - need + 1  # the old boundary block went to the cache


def test_recomputing_an_uncomputed_token_copies_its_registered_block():
    pool, tree, kv = make(num_blocks=8, block_size=4)
    ctx = tree.create(1)
    fill(tree, kv, ctx, SOURCE)
    registered = ctx.blocks[1]
    tree.uncompute_last(ctx)
    assert tree.blocks_needed(ctx, 1) == 1
    (slot,) = tree.allocate_slots(ctx, 1)
    assert slot // 4 != registered.block_id
    kv.store[slot] = (ctx.token_ids[7], 7)
    tree.commit(ctx, 1)
    assert content(tree, kv, ctx) == expected(ctx)
    assert registered.token_ids == (5, 6, 7, 8) and registered.ref_count == 0  # cached-free, intact
    tree.check_invariants()


def test_create_prefix_of_a_released_source_takes_its_tokens_and_recomputes_on_demand():
    """Idle eviction may release the source between a fill and a split."""
    pool, tree, kv = make(num_blocks=8, block_size=4)
    source = tree.create(1)
    fill(tree, kv, source, list(range(10, 20)))
    tree.release(source)
    carved = tree.create_prefix(2, 1, 7)
    assert carved.token_ids == list(range(10, 17))
    assert carved.num_computed == 0 and carved.blocks == [] and carved.last_hidden is None
    assert tree.match_prefix(carved) == 4  # the first block is still cached
    compute(tree, kv, carved)
    assert content(tree, kv, carved) == expected(carved)
    tree.check_invariants()


@pytest.mark.parametrize(("keep", "computed", "shared"), [(9, 6, 2), (6, 6, 2), (5, 5, 2), (3, 3, 1)])
def test_create_prefix_of_a_partially_computed_source_shares_what_is_computed(keep, computed, shared):
    pool, tree, kv = make(num_blocks=8, block_size=4)
    source = tree.create(1)
    tree.append_tokens(source, list(range(10, 20)))
    compute(tree, kv, source, 6)  # block 0 full, block 1 holds 2 of 4
    carved = tree.create_prefix(2, 1, keep)
    assert carved.token_ids == list(range(10, 10 + keep)) and carved.num_computed == computed
    assert tree.block_table(carved) == tree.block_table(source)[:shared]
    assert [b.ref_count for b in carved.blocks] == [2] * shared
    compute(tree, kv, carved)
    compute(tree, kv, source)
    for ctx in (carved, source):
        assert content(tree, kv, ctx) == expected(ctx)
    tree.check_invariants()


@pytest.mark.parametrize("keep", [0, -1, 11])
def test_create_prefix_outside_the_source_tokens_is_refused_and_changes_nothing(keep):
    pool, tree, kv = make(num_blocks=8, block_size=4)
    source = tree.create(1)
    tree.append_tokens(source, list(range(10, 20)))
    compute(tree, kv, source, 6)
    before = snapshot(tree)
    with pytest.raises(InvalidRequestError, match="1..10"):
        tree.create_prefix(2, 1, keep)
    assert snapshot(tree) == before and 2 not in tree
