"""The KV block pool: fixed-size blocks, reference counts, an LRU free queue and the
hash map of automatic prefix caching.

Contract (who owns what):
- The pool owns every `Block` object and its free/cached state. Callers (the context tree)
  own block *references*: each `allocate`/`incref` must be balanced by exactly one `decref`.
- A block with `ref_count > 0` is used. A block with `ref_count == 0` sits in the free queue:
  - *cached-free* if it still carries a hash: its KV stays valid and a `lookup` hit can revive
    it (`incref`) until `allocate` reuses it (eviction is lazy, at the moment of reuse);
  - *free* otherwise.
- Eviction order is LRU: `allocate` pops the head. A block whose ref drops to 0 with a
  reusable hash goes to the tail; an unhashed one goes to the head so that it is reused
  before any cached prefix is evicted.
- Duplicates are tolerated: `register` keeps an existing mapping for the same hash, so two
  blocks may carry the same hash while in use. When a duplicate (not the mapped block) is
  freed it drops its hash and goes to the head; so every cached-free block is reachable
  through the map, and `num_cached_free` counts only blocks a lookup can really hit.
- `lookup` hits only when the stored tokens equal the asked ones (collision guard). It does
  not take a reference: the caller `incref`s the hit before anything else can allocate.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from parrot_core.errors import InvariantError, OutOfBlocksError

TOKEN_DTYPE = np.dtype("<i8")
_MASK128 = (1 << 128) - 1

HashFn = Callable[[int | None, Sequence[int], bytes], int]


def hash_block(parent_hash: int | None, token_ids: Sequence[int] | np.ndarray, namespace: bytes = b"") -> int:
    """Chained block hash: xxh3_128 over the parent's hash (or, for the first block of a chain,
    the length-prefixed namespace, so two namespaces never share a chain) and the tokens as one
    contiguous int64 buffer. Pass an int64 array (or a slice of one) to skip the conversion.

    128 bits because the token-equality guard in `lookup` checks only the block's own tokens;
    the prefix before it is vouched for by the chained hash alone.
    """
    h = xxhash.xxh3_128()
    if parent_hash is None:
        h.update(b"\x00" + len(namespace).to_bytes(4, "little") + namespace)
    else:
        h.update(b"\x01" + (parent_hash & _MASK128).to_bytes(16, "little"))
    if not (isinstance(token_ids, np.ndarray) and token_ids.dtype == TOKEN_DTYPE):
        token_ids = np.asarray(token_ids, dtype=TOKEN_DTYPE)
    h.update(np.ascontiguousarray(token_ids))
    return h.intdigest()


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # the tokens of a full, hashed block


class BlockPool:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, hash_fn: HashFn | None = None
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_fn: HashFn = hash_fn or hash_block
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._hash_to_block: dict[int, Block] = {}
        self._num_cached_free = 0

    # ---- counts ----
    @property
    def num_free(self) -> int:
        return len(self._free) - self._num_cached_free

    @property
    def num_cached_free(self) -> int:
        return self._num_cached_free

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_available(self) -> int:
        return len(self._free)

    def free_queue(self) -> list[int]:
        """Block ids in eviction order (head first). For tests and debugging."""
        return list(self._free)

    # ---- allocation and references ----
    def allocate(self) -> Block:
        """Pop the LRU free block (evicting its cached prefix if any); it returns with ref 1."""
        if not self._free:
            raise OutOfBlocksError(f"no free KV block (all {self.num_blocks} in use)")
        _, block = self._free.popitem(last=False)
        if block.block_hash is not None:
            self._num_cached_free -= 1
            if self._hash_to_block.get(block.block_hash) is block:
                del self._hash_to_block[block.block_hash]
            block.block_hash = block.token_ids = None
        block.ref_count = 1
        return block

    def allocate_many(self, n: int) -> list[Block]:
        """Allocate n blocks, or raise OutOfBlocksError and change nothing."""
        if n > len(self._free):
            raise OutOfBlocksError(
                f"need {n} KV blocks but only {len(self._free)} of {self.num_blocks} are available"
            )
        return [self.allocate() for _ in range(n)]

    def incref(self, block: Block) -> None:
        if block.ref_count == 0:  # a cached-free block revived by a hit
            del self._free[block.block_id]
            if block.block_hash is not None:
                self._num_cached_free -= 1
        block.ref_count += 1

    def decref(self, block: Block) -> None:
        if block.ref_count <= 0:
            raise InvariantError(f"decref of block {block.block_id} with ref_count {block.ref_count}")
        block.ref_count -= 1
        if block.ref_count:
            return
        h = block.block_hash
        if h is not None:
            # NOTE: the mapped block may have been evicted while this duplicate was in use;
            # then this one takes over the entry. A duplicate of a still-mapped block is redundant.
            owner = self._hash_to_block.setdefault(h, block)
            if owner is block:
                self._free[block.block_id] = block
                self._num_cached_free += 1
                return
            block.block_hash = block.token_ids = None
        self._free[block.block_id] = block
        self._free.move_to_end(block.block_id, last=False)

    # ---- prefix caching ----
    def hash_block(self, parent_hash: int | None, token_ids: Sequence[int] | np.ndarray, namespace: bytes = b"") -> int:
        return self.hash_fn(parent_hash, token_ids, namespace)

    def register(self, block: Block, block_hash: int, token_ids: Sequence[int]) -> None:
        """Record that a used block just became full with these tokens. If the hash already
        maps to another block the existing mapping is kept (this block is a tolerated
        duplicate, still carrying the hash so that later blocks can chain from it)."""
        if not self.enable_prefix_caching:
            return
        if block.ref_count <= 0:
            raise InvariantError(f"register of free block {block.block_id}")
        if block.block_hash is not None and block.block_hash != block_hash:
            raise InvariantError(f"block {block.block_id} is already registered under another hash")
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self._hash_to_block.setdefault(block_hash, block)

    def lookup(self, block_hash: int, token_ids: Sequence[int]) -> Block | None:
        """The block cached under this hash if it holds exactly these tokens (no reference taken)."""
        if not self.enable_prefix_caching:
            return None
        block = self._hash_to_block.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def reset_prefix_cache(self) -> int:
        """Forget the prefixes of all free blocks (used blocks keep theirs). Returns how many."""
        n = 0
        for block in self._free.values():
            if block.block_hash is not None:
                if self._hash_to_block.get(block.block_hash) is block:
                    del self._hash_to_block[block.block_hash]
                block.block_hash = block.token_ids = None
                n += 1
        self._num_cached_free = 0
        return n

    # ---- checking ----
    def check_invariants(self, expected_refs: dict[int, int] | None = None) -> None:
        """Raise InvariantError if the bookkeeping is inconsistent; `expected_refs` maps block
        id to the exact ref_count it must have (absent ids must have ref 0)."""

        def fail(msg: str) -> None:
            raise InvariantError(msg)

        free = cached = used = 0
        for i, block in enumerate(self.blocks):
            if block.block_id != i:
                fail(f"block at index {i} has id {block.block_id}")
            in_free = self._free.get(i) is block
            if block.ref_count < 0:
                fail(f"block {i} has negative ref_count {block.ref_count}")
            if in_free and block.ref_count:
                fail(f"block {i} is in the free queue with ref_count {block.ref_count}")
            if not in_free and not block.ref_count:
                fail(f"block {i} has ref_count 0 but is not in the free queue (leaked)")
            if (block.block_hash is None) != (block.token_ids is None):
                fail(f"block {i} has a hash without tokens or tokens without a hash")
            if block.token_ids is not None and len(block.token_ids) != self.block_size:
                fail(f"block {i} is hashed but holds {len(block.token_ids)} tokens")
            if block.ref_count:
                used += 1
            elif block.block_hash is None:
                free += 1
            else:
                cached += 1
                if self._hash_to_block.get(block.block_hash) is not block:
                    fail(f"cached-free block {i} is unreachable through the hash map")
            if expected_refs is not None and block.ref_count != expected_refs.get(i, 0):
                fail(f"block {i} has ref_count {block.ref_count}, expected {expected_refs.get(i, 0)}")
        # Keys are unique by construction; a block filed under a foreign key would be a duplicate.
        if any(not 0 <= k < self.num_blocks or self.blocks[k] is not b for k, b in self._free.items()):
            fail("the free queue has duplicates or foreign blocks")
        if free + cached + used != self.num_blocks or len(self._free) != free + cached:
            fail(f"free {free} + cached {cached} + used {used} != total {self.num_blocks}")
        if cached != self._num_cached_free:
            fail(f"cached-free counter {self._num_cached_free} != actual {cached}")
        for h, block in self._hash_to_block.items():
            if block.block_hash != h or self.blocks[block.block_id] is not block:
                fail(f"hash entry points to block {block.block_id} whose hash differs")
        if expected_refs is not None:
            unknown = set(expected_refs) - set(range(self.num_blocks))
            if unknown:
                fail(f"expected_refs names unknown blocks {sorted(unknown)}")
