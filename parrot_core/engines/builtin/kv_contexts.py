"""Engine-side contexts over the block pool: block tables, fork with shared blocks,
copy-on-write, automatic prefix caching and preemption by release.

Contract (who owns what):
- The tree owns one reference to every block in every live context's table; `free`/`release`
  give them back. A block shared by k contexts has ref k (plus nothing else: cached-free
  blocks have ref 0).
- A context's `token_ids` are ALL its tokens, root to itself; the first `num_computed` have
  KV in `blocks`. The table covers them (ceil(num_computed / block_size) blocks) and may
  hold extra room between `allocate_slots` and `commit`.
- A block registered in the prefix-cache hash map is never written in place, nor is a shared
  one: the only block a context ever writes is the one holding position `num_computed`, and if
  that block is shared (ref > 1) or registered (hashed) it is copied first. So forks never see
  each other's writes, and a cache hit always reads the KV of the tokens it is registered under
  (a carved prefix or an uncomputed last token may leave a context's write position inside a
  registered block, even one it alone holds).
- The engine drives one step as: `append_tokens` -> `match_prefix` -> `allocate_slots`
  (write KV into the returned slots) -> `commit`. A context may also `take_computing` a block
  that another context of the same step fills: it counts as computed from then on, so the step
  must write it before any query reads it and commit its writer first (the writer's commit
  registers it); a failed step releases both.
- `copy_block(src_id, dst_id, num_slots)` copies real KV data; None means there is no KV
  store to copy (pure bookkeeping, e.g. tests of the tables alone).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from parrot_core.engines.builtin.block_pool import TOKEN_DTYPE, Block, BlockPool
from parrot_core.errors import InvalidRequestError, InvariantError, UnknownContextError

CopyBlockFn = Callable[[int, int, int], None]


class ContextExistsError(InvalidRequestError):
    """A context id is already live."""


@dataclass(slots=True, eq=False)
class KVContext:
    context_id: int
    parent_id: int | None  # informational only: a fork does not depend on its parent
    token_ids: list[int] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    num_computed: int = 0
    last_hidden: object | None = None  # opaque, owned by the engine


class KVContextTree:
    def __init__(self, pool: BlockPool, namespace: bytes = b"", copy_block: CopyBlockFn | None = None) -> None:
        self.pool = pool
        self.namespace = namespace
        self.copy_block = copy_block
        self.block_size = pool.block_size
        self._contexts: dict[int, KVContext] = {}
        self.queries = 0  # prefix-cache tokens looked up
        self.hits = 0  # of which were found

    # ---- lifetime ----
    def create(self, context_id: int, parent_id: int | None = None) -> KVContext:
        """A new root, or a fork of a live parent sharing its computed blocks (partial last
        block included; whoever writes to it first copies it)."""
        if context_id in self._contexts:
            raise ContextExistsError(f"context {context_id} already exists")
        if parent_id is None:
            ctx = KVContext(context_id, None)
        else:
            parent = self.get(parent_id)
            shared = parent.blocks[: self._num_blocks_for(parent.num_computed)]  # not the uncommitted room
            for block in shared:
                self.pool.incref(block)
            ctx = KVContext(
                context_id, parent_id, list(parent.token_ids), list(shared), parent.num_computed, parent.last_hidden
            )
        self._contexts[context_id] = ctx
        return ctx

    def create_prefix(self, context_id: int, source_id: int, num_tokens: int) -> KVContext:
        """A new context holding the first `num_tokens` tokens of `source` (1..all of them,
        computed or not: tokens are the truth). It shares the source's blocks covering the first
        min(num_tokens, source.num_computed) tokens, which are its computed ones, the partial
        boundary block too: the slots past them belong to the source and are never read here,
        and a write into a shared block copies it first. The rest is computed on demand, so a
        source released by eviction still works. It keeps no hidden state: a generation from it
        recomputes its last token."""
        if context_id in self._contexts:
            raise ContextExistsError(f"context {context_id} already exists")
        source = self.get(source_id)
        if not 1 <= num_tokens <= len(source.token_ids):
            raise InvalidRequestError(
                f"a prefix of context {source_id} must hold 1..{len(source.token_ids)} tokens, not {num_tokens}"
            )
        computed = min(num_tokens, source.num_computed)
        shared = source.blocks[: self._num_blocks_for(computed)]
        for block in shared:
            self.pool.incref(block)
        ctx = KVContext(context_id, source_id, source.token_ids[:num_tokens], list(shared), computed, None)
        self._contexts[context_id] = ctx
        return ctx

    def uncompute_last(self, ctx: KVContext) -> None:
        """Forget the KV of the last computed token, so the next step computes it again (and
        yields the hidden state a sample needs)."""
        if ctx.num_computed == 0:
            return
        ctx.num_computed -= 1
        keep = self._num_blocks_for(ctx.num_computed)
        for block in reversed(ctx.blocks[keep:]):
            self.pool.decref(block)
        del ctx.blocks[keep:]
        ctx.last_hidden = None

    def get(self, context_id: int) -> KVContext:
        ctx = self._contexts.get(context_id)
        if ctx is None:
            raise UnknownContextError(f"unknown context {context_id}")
        return ctx

    def __contains__(self, context_id: object) -> bool:
        return context_id in self._contexts

    def __len__(self) -> int:
        return len(self._contexts)

    def free(self, context_id: int) -> bool:
        """Drop a context and its block references; False (never an error) if it is unknown."""
        ctx = self._contexts.pop(context_id, None)
        if ctx is None:
            return False
        self._drop_blocks(ctx)
        return True

    def release(self, ctx: KVContext) -> None:
        """Preempt: give back all blocks but keep the tokens, to be recomputed (or re-hit) later."""
        self._drop_blocks(ctx)
        ctx.num_computed = 0
        ctx.last_hidden = None

    def _drop_blocks(self, ctx: KVContext) -> None:
        # Reversed, so the most specific block reaches the free tail first and is evicted first.
        for block in reversed(ctx.blocks):
            self.pool.decref(block)
        ctx.blocks.clear()

    # ---- tokens and KV ----
    def append_tokens(self, ctx: KVContext, token_ids: Sequence[int]) -> None:
        """Add tokens whose KV is still to be computed."""
        ctx.token_ids.extend(token_ids)

    def match_prefix(self, ctx: KVContext) -> int:
        """Take cached blocks for the uncomputed tokens, whole blocks only. The last token is
        never counted as hit (its hidden state is needed): if the blocks cover it, the context
        keeps its block but computes that one token again, into a copy of the block (the write
        rule above), instead of its whole block. Returns the number of tokens hit. Looks up
        nothing unless the context is block-aligned, holds no extra room and its last block is
        hashed."""
        if not self.pool.enable_prefix_caching:
            return 0
        bs, n = self.block_size, ctx.num_computed
        if n % bs or len(ctx.blocks) != n // bs:
            return 0
        parent = ctx.blocks[-1].block_hash if ctx.blocks else None
        if ctx.blocks and parent is None:
            return 0
        remaining = len(ctx.token_ids) - n
        if remaining <= 0:
            return 0
        self.queries += remaining
        max_blocks = remaining // bs
        arr = np.asarray(ctx.token_ids[n : n + max_blocks * bs], dtype=TOKEN_DTYPE)
        hit = 0
        for i in range(max_blocks):
            chunk = arr[i * bs : (i + 1) * bs]
            h = self.pool.hash_block(parent, chunk, self.namespace)
            block = self.pool.lookup(h, ctx.token_ids[n + i * bs : n + (i + 1) * bs])
            if block is None:
                break
            self.pool.incref(block)  # before anything else can allocate (and evict) it
            ctx.blocks.append(block)
            parent = h
            hit += bs
        ctx.num_computed += hit
        if hit and ctx.num_computed == len(ctx.token_ids):
            self.uncompute_last(ctx)
            hit -= 1
        self.hits += hit
        return hit

    def take_computing(self, ctx: KVContext, block: Block) -> None:
        """Take, as ctx's next full block, a block that another context computes in the current
        step with the same tokens (the caller checks them), like a cache hit that is registered
        only when that context commits (see the module docstring). ctx must be block-aligned
        with no extra room, and the block must not hold its last token (whose hidden state a
        sample needs)."""
        bs, n = self.block_size, ctx.num_computed
        if n % bs or len(ctx.blocks) != n // bs or n + bs >= len(ctx.token_ids):
            raise InvalidRequestError(
                f"context {ctx.context_id} cannot take a block at {n} of {len(ctx.token_ids)} tokens ({len(ctx.blocks)} blocks)"
            )
        self.pool.incref(block)
        ctx.blocks.append(block)
        ctx.num_computed += bs
        self.hits += bs

    def blocks_needed(self, ctx: KVContext, n: int) -> int:
        """New blocks that computing the next n tokens would take, copy-on-write included."""
        if n <= 0:
            return 0
        start = ctx.num_computed
        need = max(0, self._num_blocks_for(start + n) - len(ctx.blocks))
        return need + (self._write_block_to_copy(ctx) is not None)

    def allocate_slots(self, ctx: KVContext, n: int) -> list[int]:
        """Make room for the next n uncomputed tokens and return their slot ids in order.
        Atomic: on OutOfBlocksError nothing changes."""
        start, bs = ctx.num_computed, self.block_size
        if n < 0 or start + n > len(ctx.token_ids):
            raise InvalidRequestError(
                f"cannot allocate {n} slots: context {ctx.context_id} has {len(ctx.token_ids) - start} uncomputed tokens"
            )
        if n == 0:
            return []
        new = iter(self.pool.allocate_many(self.blocks_needed(ctx, n)))
        old = self._write_block_to_copy(ctx)
        if old is not None:
            fresh = next(new)
            if self.copy_block is not None:
                self.copy_block(old.block_id, fresh.block_id, start % bs)
            # The other holders keep it; if none, a registered block goes back to the cache intact.
            self.pool.decref(old)
            ctx.blocks[start // bs] = fresh
        ctx.blocks.extend(new)
        return self._slot_ids(ctx, start, start + n)

    def allocate_more(self, ctx: KVContext, allocated: int, more: int) -> list[int]:
        """Room for `more` tokens after the `allocated` that `allocate_slots` made room for in
        this step, and their slot ids. Only new blocks: the write block was copied (if it had
        to be) by that call, and may be shared since by `take_computing`. Atomic."""
        start = ctx.num_computed + allocated
        if allocated < 1 or more < 0 or start + more > len(ctx.token_ids) or start > len(ctx.blocks) * self.block_size:
            raise InvalidRequestError(
                f"cannot add {more} slots after {allocated} to context {ctx.context_id} ({len(ctx.blocks)} blocks)"
            )
        ctx.blocks.extend(self.pool.allocate_many(max(0, self._num_blocks_for(start + more) - len(ctx.blocks))))
        return self._slot_ids(ctx, start, start + more)

    def commit(self, ctx: KVContext, n: int) -> None:
        """Mark the next n tokens computed and register the blocks that became full."""
        start, bs = ctx.num_computed, self.block_size
        end = start + n
        if n < 0 or end > len(ctx.token_ids) or end > len(ctx.blocks) * bs:
            raise InvalidRequestError(f"cannot commit {n} tokens of context {ctx.context_id}: no slots or tokens")
        ctx.num_computed = end
        if not self.pool.enable_prefix_caching:
            return
        first, last = start // bs, end // bs  # blocks [first, last) just became full
        if first == last:
            return
        parent = ctx.blocks[first - 1].block_hash if first else None
        if first and parent is None:
            return
        arr = np.asarray(ctx.token_ids[first * bs : last * bs], dtype=TOKEN_DTYPE)
        for i in range(first, last):
            j = (i - first) * bs
            h = self.pool.hash_block(parent, arr[j : j + bs], self.namespace)
            self.pool.register(ctx.blocks[i], h, ctx.token_ids[i * bs : (i + 1) * bs])
            parent = h

    def _write_block_to_copy(self, ctx: KVContext) -> Block | None:
        """The block holding position `num_computed` if writing into it must copy it first:
        it is shared, or registered in the hash map (its KV must stay what its hash names)."""
        idx = ctx.num_computed // self.block_size
        if idx >= len(ctx.blocks):
            return None
        block = ctx.blocks[idx]
        return block if block.ref_count > 1 or block.block_hash is not None else None

    # ---- views ----
    def block_table(self, ctx: KVContext) -> list[int]:
        return [b.block_id for b in ctx.blocks]

    def slots(self, ctx: KVContext, start: int, end: int) -> list[int]:
        """Slot ids of computed tokens in [start, end)."""
        if not 0 <= start <= end <= ctx.num_computed:
            raise InvalidRequestError(f"slots [{start}, {end}) outside the {ctx.num_computed} computed tokens")
        return self._slot_ids(ctx, start, end)

    def _slot_ids(self, ctx: KVContext, start: int, end: int) -> list[int]:
        """Slot ids of positions [start, end) in ctx's table (which must cover them)."""
        bs, table = self.block_size, ctx.blocks
        return [table[p // bs].block_id * bs + p % bs for p in range(start, end)]

    def contexts(self) -> list[KVContext]:
        return list(self._contexts.values())

    def check_invariants(self) -> None:
        """Raise InvariantError if any table, token or refcount is inconsistent."""
        bs = self.block_size
        expected: dict[int, int] = {}
        for ctx in self._contexts.values():
            ids = self.block_table(ctx)
            if len(set(ids)) != len(ids):
                raise InvariantError(f"context {ctx.context_id} holds a block twice: {ids}")
            if not 0 <= ctx.num_computed <= len(ctx.token_ids):
                raise InvariantError(f"context {ctx.context_id}: num_computed {ctx.num_computed} out of range")
            if self._num_blocks_for(ctx.num_computed) > len(ids):
                raise InvariantError(f"context {ctx.context_id}: {len(ids)} blocks for {ctx.num_computed} tokens")
            for i in ids:
                expected[i] = expected.get(i, 0) + 1
            parent: int | None = None
            for i, block in enumerate(ctx.blocks[: ctx.num_computed // bs]):
                if block.block_hash is None:
                    if self.pool.enable_prefix_caching:
                        raise InvariantError(f"context {ctx.context_id}: full block {block.block_id} is not hashed")
                    break
                toks = tuple(ctx.token_ids[i * bs : (i + 1) * bs])
                if block.token_ids != toks or block.block_hash != self.pool.hash_block(parent, toks, self.namespace):
                    raise InvariantError(f"context {ctx.context_id}: block {block.block_id} hash/tokens mismatch")
                parent = block.block_hash
        self.pool.check_invariants(expected)

    def _num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
