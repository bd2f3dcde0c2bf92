import numpy as np
import pytest
import xxhash

from parrot_core.engines.builtin.block_pool import BlockPool, hash_block
from parrot_core.errors import InvariantError, OutOfBlocksError


def full(pool: BlockPool, tokens, parent=None, ns=b""):
    """Allocate a block and register it as full with `tokens`; returns (block, hash)."""
    b = pool.allocate()
    h = pool.hash_block(parent, tokens, ns)
    pool.register(b, h, tokens)
    return b, h


def test_allocate_gives_exact_ids_in_order():
    pool = BlockPool(6, 4)
    assert [b.block_id for b in pool.allocate_many(3)] == [0, 1, 2]
    assert pool.allocate().block_id == 3
    assert all(pool.blocks[i].ref_count == 1 for i in range(4))
    assert (pool.num_used, pool.num_free, pool.num_cached_free, pool.num_available) == (4, 2, 0, 2)
    pool.check_invariants({0: 1, 1: 1, 2: 1, 3: 1})


def test_lru_order_hashed_to_tail_unhashed_to_head():
    pool = BlockPool(6, 2)
    b0, _ = full(pool, [1, 2])
    b1, _ = full(pool, [3, 4])
    b2, b3 = pool.allocate_many(2)
    pool.decref(b1)
    pool.decref(b0)
    pool.decref(b2)
    pool.decref(b3)
    assert pool.free_queue() == [3, 2, 4, 5, 1, 0]
    assert (pool.num_free, pool.num_cached_free) == (4, 2)
    assert [b.block_id for b in pool.allocate_many(6)] == [3, 2, 4, 5, 1, 0]
    assert pool.num_cached_free == 0


def test_cached_free_block_is_reusable_until_reallocated():
    pool = BlockPool(2, 2)
    b, h = full(pool, [7, 8])
    pool.decref(b)
    assert pool.num_cached_free == 1 and pool.lookup(h, [7, 8]) is b
    pool.incref(b)  # revived by a hit
    assert b.ref_count == 1 and pool.num_cached_free == 0 and b.block_id not in pool.free_queue()
    pool.decref(b)
    assert pool.allocate().block_id == 1  # the never-used block goes first
    assert pool.lookup(h, [7, 8]) is b
    assert pool.allocate() is b  # evicted now
    assert b.block_hash is None and b.token_ids is None
    assert pool.lookup(h, [7, 8]) is None
    pool.check_invariants({0: 1, 1: 1})


def test_equal_hash_with_different_tokens_misses():
    pool = BlockPool(4, 2, hash_fn=lambda parent, tokens, ns: 42)
    b, h = full(pool, [1, 2])
    assert h == 42
    assert pool.lookup(42, [3, 4]) is None
    assert pool.lookup(42, [1, 2]) is b
    dup, _ = full(pool, [3, 4])  # same hash: the existing mapping is kept
    assert pool.lookup(42, [3, 4]) is None and pool.lookup(42, [1, 2]) is b
    assert dup.block_hash == 42
    pool.check_invariants({0: 1, 1: 1})


def test_namespaces_and_depths_never_share():
    t = [5, 6, 7, 8]
    assert hash_block(None, t, b"a") != hash_block(None, t, b"b")
    assert hash_block(None, t, b"") != hash_block(None, t, b"x")
    assert hash_block(None, [0x62, 2], b"a") != hash_block(None, [2], b"ab")  # length-prefixed namespace
    root = hash_block(None, t)
    assert hash_block(root, t) != root  # the same tokens deeper in the chain
    assert hash_block(root, t) == hash_block(root, np.array(t, dtype=np.int64))
    pool = BlockPool(4, 4)
    b, h = full(pool, t, ns=b"tenant-a")
    assert pool.lookup(pool.hash_block(None, t, b"tenant-b"), t) is None
    assert pool.lookup(pool.hash_block(None, t, b"tenant-a"), t) is b


def test_hash_matches_independent_recomputation():
    t = [1, 150_000, 3]
    expect = xxhash.xxh3_128(b"\x00" + (2).to_bytes(4, "little") + b"ns" + np.array(t, "<i8").tobytes()).intdigest()
    assert hash_block(None, t, b"ns") == expect
    child = xxhash.xxh3_128(b"\x01" + expect.to_bytes(16, "little") + np.array(t, "<i8").tobytes()).intdigest()
    assert hash_block(expect, t, b"ns") == child


def test_allocate_many_is_atomic():
    pool = BlockPool(4, 2)
    pool.allocate_many(2)
    before = (pool.free_queue(), [b.ref_count for b in pool.blocks])
    with pytest.raises(OutOfBlocksError, match="need 3 KV blocks but only 2 of 4"):
        pool.allocate_many(3)
    assert (pool.free_queue(), [b.ref_count for b in pool.blocks]) == before
    assert pool.num_available == 2


def test_decref_below_zero_raises():
    pool = BlockPool(2, 2)
    b = pool.allocate()
    pool.decref(b)
    with pytest.raises(InvariantError):
        pool.decref(b)
    assert b.ref_count == 0 and pool.free_queue() == [0, 1]


def test_duplicate_freed_drops_hash_and_takes_over_when_original_evicted():
    pool = BlockPool(3, 2)
    a, h = full(pool, [1, 2])
    d, _ = full(pool, [1, 2])
    assert pool.lookup(h, [1, 2]) is a
    pool.decref(d)  # a duplicate of a live mapped block: nothing to cache
    assert d.block_hash is None and pool.free_queue() == [1, 2] and pool.num_cached_free == 0
    # The original is evicted while a new duplicate is in use: that one takes over on free.
    d2, _ = full(pool, [1, 2])
    pool.decref(a)
    assert pool.allocate_many(2)[-1] is a and pool.lookup(h, [1, 2]) is None
    pool.decref(d2)
    assert pool.lookup(h, [1, 2]) is d2 and pool.num_cached_free == 1
    pool.check_invariants({0: 1, 2: 1})


def test_reset_prefix_cache_forgets_only_free_blocks():
    pool = BlockPool(3, 2)
    a, ha = full(pool, [1, 2])
    b, hb = full(pool, [3, 4])
    pool.decref(a)
    assert pool.reset_prefix_cache() == 1
    assert pool.lookup(ha, [1, 2]) is None and pool.lookup(hb, [3, 4]) is b
    assert (pool.num_free, pool.num_cached_free, pool.num_used) == (2, 0, 1)
    pool.check_invariants({b.block_id: 1})


def test_prefix_caching_disabled():
    pool = BlockPool(2, 2, enable_prefix_caching=False)
    b, h = full(pool, [1, 2])
    assert b.block_hash is None and pool.lookup(h, [1, 2]) is None
    pool.decref(b)
    assert (pool.num_free, pool.num_cached_free) == (2, 0)


def _tamper_ref(pool, a, c):
    pool.blocks[2].ref_count = 1  # free block with a ref


def _tamper_leak(pool, a, c):
    a.ref_count = 0  # ref 0 but not in the free queue


def _tamper_hash(pool, a, c):
    a.block_hash ^= 1  # hash entry points to a block whose hash differs


def _tamper_dup(pool, a, c):
    pool._free[a.block_id] = pool.blocks[2]  # a block filed twice in the free queue


def _tamper_cached_counter(pool, a, c):
    pool._num_cached_free += 1


@pytest.mark.parametrize(
    "tamper, msg",
    [
        (_tamper_ref, "in the free queue with ref_count"),
        (_tamper_leak, "leaked"),
        (_tamper_hash, "hash differs"),
        (_tamper_dup, "duplicates"),
        (_tamper_cached_counter, "counter"),
    ],
)
def test_check_invariants_catches_corruption(tamper, msg):
    pool = BlockPool(4, 2)
    a, _ = full(pool, [1, 2])
    c, _ = full(pool, [3, 4])
    pool.decref(c)
    pool.check_invariants({a.block_id: 1})
    tamper(pool, a, c)
    with pytest.raises(InvariantError, match=msg):
        pool.check_invariants()


def test_check_invariants_compares_expected_refs():
    pool = BlockPool(3, 2)
    a = pool.allocate()
    pool.incref(a)
    pool.check_invariants({a.block_id: 2})
    with pytest.raises(InvariantError, match="expected 1"):
        pool.check_invariants({a.block_id: 1})  # a double incref must not pass
    with pytest.raises(InvariantError):
        pool.check_invariants({})  # a used block absent from expected_refs
