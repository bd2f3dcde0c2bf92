"""Stateful test of BlockPool + KVContextTree against a plain model: context id -> tokens and
how many of them are computed, and every token sequence ever computed. Refcounts, KV content
and conservation are checked after every step from the model's view, never from the
implementation against itself; so is every block the hash map can serve (in use or
cached-free): it must hold, in the fake KV store, the tokens of the chain its hash names, at
the positions of that chain. How much a lookup hits is the cache's policy (LRU eviction): the
model bounds it (whole blocks, only what was computed, the last token never a hit) and the content
check proves what was hit."""

from collections import Counter

import hypothesis.strategies as st
import pytest
from hypothesis import event, note, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, multiple, rule

from parrot_core.engines.builtin.block_pool import BlockPool, hash_block
from parrot_core.engines.builtin.kv_contexts import KVContextTree
from parrot_core.errors import OutOfBlocksError

TOKENS = st.lists(st.integers(0, 2), max_size=10)  # a small alphabet, so prefixes repeat


def lcp(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def start_block(ctx, bs):
    """The block a step's first write goes to, if the context already holds it."""
    i = ctx.num_computed // bs
    return ctx.blocks[i] if i < len(ctx.blocks) else None


class KVMachine(RuleBasedStateMachine):
    ctxs = Bundle("ctxs")

    @initialize(target=ctxs, num_blocks=st.integers(2, 24), block_size=st.sampled_from([1, 2, 4]), tokens=TOKENS)
    def setup(self, num_blocks, block_size, tokens):
        """A pool, a tree and a first root (so that rules on contexts can run from the start)."""
        self.bs = block_size
        self.pool = BlockPool(num_blocks, block_size)
        self.kv: list[tuple[int, int] | None] = [None] * (num_blocks * block_size)
        self.tree = KVContextTree(self.pool, copy_block=self.copy_block)
        self.tokens: dict[int, list[int]] = {}  # the model: live context -> all its tokens
        self.computed: dict[int, int] = {}  # ... and how many have KV
        self.history: set[tuple[int, ...]] = set()  # every token sequence ever computed
        self.chains: dict[int, tuple[int, ...]] = {}  # chained hash of each full-block prefix of them
        self.next_id = 0
        return self.new_root(tokens)

    def copy_block(self, src, dst, n):
        event("copy-on-write")
        bs = self.bs
        self.kv[dst * bs : dst * bs + n] = self.kv[src * bs : src * bs + n]

    def snapshot(self):
        pool = self.pool
        return (
            {c.context_id: (self.tree.block_table(c), c.num_computed) for c in self.tree.contexts()},
            [b.ref_count for b in pool.blocks],
            pool.free_queue(),
            (pool.num_free, pool.num_cached_free),
            list(self.kv),
        )

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    @rule(target=ctxs, tokens=TOKENS)
    def new_root(self, tokens):
        c = self.new_id()
        self.tree.append_tokens(self.tree.create(c), tokens)
        self.tokens[c], self.computed[c] = list(tokens), 0
        return c

    def computed_now(self, c):
        """Record that context c has its current computed prefix: it is the truth a registered
        block is checked against."""
        seq = tuple(self.tokens[c][: self.computed[c]])
        if seq in self.history:
            return
        self.history.add(seq)
        parent = None
        for i in range(len(seq) // self.bs):
            parent = hash_block(parent, seq[i * self.bs : (i + 1) * self.bs])
            self.chains[parent] = seq[: (i + 1) * self.bs]

    def step(self, c, tokens, chunk, commit=True):
        """One engine step for context c: append, look up the cache, allocate, write KV, and
        commit (or, for a step that fails after the forward pass wrote KV, release)."""
        ctx = self.tree.get(c)
        self.tree.append_tokens(ctx, tokens)
        self.tokens[c] += tokens
        toks, n0 = self.tokens[c], self.computed[c]
        hit = self.tree.match_prefix(ctx)
        if hit:
            event("prefix hit")
            # blocks covering the whole context: the last token is still computed (into a copy)
            whole = n0 + hit == len(toks) - 1 and hit % self.bs != 0
            taken = hit + 1 if whole else hit  # tokens whose blocks the lookup took
            if whole:
                event("prefix hit of every token: the last one computed again")
            assert n0 % self.bs == 0 and taken % self.bs == 0  # whole blocks only
            assert n0 + hit <= len(toks) - 1  # the last token is never a hit
            assert n0 + taken <= max(lcp(toks, h) for h in self.history)  # only what was computed
        self.computed[c] += hit
        remaining = len(toks) - self.computed[c]
        n = remaining if chunk is None else min(chunk, remaining)
        if n and (block := start_block(ctx, self.bs)) is not None and block.block_hash is not None:
            event("write into a registered block" + (" held alone" if block.ref_count == 1 else ""))
        before = self.snapshot()
        held = set(self.tree.block_table(ctx))
        needed = self.tree.blocks_needed(ctx, n)
        try:
            slots = self.tree.allocate_slots(ctx, n)
        except OutOfBlocksError:
            event("fill: out of blocks")
            assert needed > self.pool.num_available
            assert self.snapshot() == before
            return
        assert len(set(self.tree.block_table(ctx)) - held) == needed  # blocks_needed agrees
        assert len(set(slots)) == n
        start = self.computed[c]
        for p, s in zip(range(start, start + n), slots):
            self.kv[s] = (toks[p], p)
        if not commit:
            event("failed step: written, released")
            self.tree.release(ctx)
            self.computed[c] = 0
            return
        self.tree.commit(ctx, n)
        self.computed[c] += n
        self.computed_now(c)

    @rule(c=ctxs, tokens=TOKENS, chunk=st.none() | st.integers(1, 12))
    def fill(self, c, tokens, chunk):
        self.step(c, tokens, chunk)

    @rule(c=ctxs, tokens=TOKENS, chunk=st.none() | st.integers(1, 12))
    def failed_step(self, c, tokens, chunk):
        """The engine's failed step: the forward pass wrote KV, then the context is released
        without a commit. Nothing registered may have been written."""
        self.step(c, tokens, chunk, commit=False)

    @rule(target=ctxs, parent=ctxs)
    def fork(self, parent):
        c = self.new_id()
        self.tree.create(c, parent)
        self.tokens[c], self.computed[c] = list(self.tokens[parent]), self.computed[parent]
        return c

    @rule(target=ctxs, parent=ctxs, tokens=TOKENS)
    def fork_and_fill(self, parent, tokens):
        """The common engine path (a fork then a Fill): writes right after sharing."""
        c = self.fork(parent)
        self.fill(c, tokens, None)
        return c

    @rule(target=ctxs, source=ctxs, keep=st.integers(1, 40))
    def carve_prefix(self, source, keep):
        """The engine's split: a new context holding a prefix of the source's tokens, computed
        or not (the source may have been released or only partly filled). It shares the
        source's blocks over the computed part, the boundary block too."""
        if not self.tokens[source]:
            return multiple()
        n = 1 + (keep - 1) % len(self.tokens[source])  # any length, boundary blocks included
        c = self.new_id()
        computed = min(n, self.computed[source])
        if computed < n:
            event("carve: beyond the computed tokens")
        event("carve: boundary block shared" if computed % self.bs else "carve: block-aligned")
        ctx = self.tree.create_prefix(c, source, n)
        assert ctx.last_hidden is None
        self.tokens[c], self.computed[c] = list(self.tokens[source][:n]), computed
        return c

    @rule(target=ctxs, source=ctxs, keep=st.integers(1, 40), tokens=TOKENS)
    def carve_prefix_and_fill(self, source, keep, tokens):
        """A carve then a write at once: copy-on-write must keep the source's slots past the
        prefix intact."""
        c = self.carve_prefix(source, keep)
        if isinstance(c, int):
            self.fill(c, tokens, None)
        return c

    @rule(
        target=ctxs, source=consumes(ctxs), keep=st.integers(1, 40), tokens=TOKENS, chunk=st.none() | st.integers(1, 12)
    )
    def carve_free_source_and_fill(self, source, keep, tokens, chunk):
        """The engine protocol of issue 9 defect 5: split, free the source, then write into the
        carved context, which may now alone hold a boundary block registered for the source's
        tokens: that block must be copied, not overwritten."""
        self.fill(source, [], None)  # the split follows a fill of the source
        c = self.carve_prefix(source, keep)
        self.free(source)
        if isinstance(c, int):
            self.fill(c, tokens, chunk)
        return c

    @rule(
        target=ctxs,
        leader=ctxs,
        keep=st.integers(0, 40),
        own=TOKENS,
        first=st.integers(1, 12),
        more=st.integers(0, 12),
        commit=st.booleans(),
    )
    def follow_in_the_same_step(self, leader, keep, own, first, more, commit):
        """The scheduler's in-step sharing: the leader's chunk gets slots for `first` tokens; a
        new context (the leader's first `keep` tokens, then its own) takes every whole block
        of the same tokens that this chunk fills, never its own last token's; the leader gets
        `more` slots after that (no copy may move the blocks taken); the step writes all of it
        and commits the leader, then the follower, or fails and releases both."""
        bs, lctx, ltoks = self.bs, self.tree.get(leader), self.tokens[leader]
        self.computed[leader] += self.tree.match_prefix(lctx)
        n0 = self.computed[leader]
        n1 = min(first, len(ltoks) - n0)
        if n1 == 0:
            return multiple()
        try:
            lslots = self.tree.allocate_slots(lctx, n1)
        except OutOfBlocksError:
            return multiple()
        c = self.new_id()
        fctx = self.tree.create(c)
        ftoks = ltoks[:keep] + own
        self.tree.append_tokens(fctx, ftoks)
        self.tokens[c] = list(ftoks)
        self.computed[c] = self.tree.match_prefix(fctx)
        while True:  # the blocks the model says it may take
            at = self.computed[c]
            i = at // bs
            same = ftoks[at : at + bs] == ltoks[at : at + bs]
            if at % bs or not n0 // bs <= i < (n0 + n1) // bs or at + bs >= len(ftoks) or not same:
                break
            event("follower took a block computed in this step")
            self.tree.take_computing(fctx, lctx.blocks[i])
            self.computed[c] += bs
        n2 = min(more, len(ltoks) - n0 - n1)
        if n2:
            try:
                lslots += self.tree.allocate_more(lctx, n1, n2)
                event("leader got more room after the take")
            except OutOfBlocksError:
                n2 = 0
        fn = len(ftoks) - self.computed[c]
        try:
            fslots = self.tree.allocate_slots(fctx, fn)
        except OutOfBlocksError:  # the scheduler gives the follower up for this step
            self.tree.release(fctx)
            self.computed[c] = fn = 0
            fslots = []
        assert len(set(lslots)) == n1 + n2
        for p, slot in zip(range(n0, n0 + n1 + n2), lslots):
            self.kv[slot] = (ltoks[p], p)
        for p, slot in zip(range(self.computed[c], self.computed[c] + fn), fslots):
            self.kv[slot] = (ftoks[p], p)
        if not commit:
            event("failed step with a follower")
            self.tree.release(lctx)
            self.tree.release(fctx)
            self.computed[leader] = self.computed[c] = 0
            return c
        self.tree.commit(lctx, n1 + n2)
        self.computed[leader] += n1 + n2
        self.computed_now(leader)
        if fn:
            self.tree.commit(fctx, fn)
            self.computed[c] += fn
            self.computed_now(c)
        return c

    @rule(c=ctxs)
    def uncompute_last(self, c):
        """A generation from a context without a kept hidden state recomputes its last token."""
        if self.computed[c] == 0:
            return
        event("uncompute: inside a shared block" if self.tree.get(c).blocks[-1].ref_count > 1 else "uncompute")
        self.tree.uncompute_last(self.tree.get(c))
        self.computed[c] -= 1
        self.fill(c, [], None)  # compute it again (or stay uncomputed if out of blocks)

    @rule(c=ctxs, tokens=TOKENS)
    def append(self, c, tokens):
        self.tree.append_tokens(self.tree.get(c), tokens)
        self.tokens[c] += tokens

    @rule(c=consumes(ctxs))
    def free(self, c):
        assert self.tree.free(c) is True
        del self.tokens[c], self.computed[c]
        assert self.tree.free(c) is False

    @rule(c=ctxs)
    def release(self, c):
        """Idle eviction or preemption: the tokens stay, the blocks go."""
        self.tree.release(self.tree.get(c))
        self.computed[c] = 0

    @rule(c=ctxs, chunk=st.none() | st.integers(1, 12))
    def release_and_recompute(self, c, chunk):
        had = self.computed[c]
        self.release(c)
        self.fill(c, [], chunk)
        if had and self.computed[c]:
            event("recomputed after release")

    @rule(k=st.integers(1, 24))
    def evict_by_pressure(self, k):
        before = self.snapshot()
        if k > self.pool.num_available:
            with pytest.raises(OutOfBlocksError):
                self.pool.allocate_many(k)
            assert self.snapshot() == before
            return
        held = {b for c in self.tree.contexts() for b in self.tree.block_table(c)}
        blocks = self.pool.allocate_many(k)
        assert all(b.ref_count == 1 and b.block_hash is None and b.block_id not in held for b in blocks)
        for b in blocks:
            self.pool.decref(b)
        free, cached = before[3]
        if k > free and cached:
            event("evicted cached blocks")
        # Unhashed free blocks are reused first; only the rest comes out of the cache.
        assert self.pool.num_cached_free == cached - max(0, k - free)
        assert self.pool.num_used == sum(1 for r in before[1] if r)

    @invariant()
    def consistent(self):
        note(f"model: {self.tokens} computed: {self.computed}")
        pool, tree, bs = self.pool, self.tree, self.bs
        tree.check_invariants()
        assert pool.num_free + pool.num_cached_free + pool.num_used == pool.num_blocks
        assert len(tree) == len(self.tokens) and all(c in tree for c in self.tokens)
        expected: Counter[int] = Counter()
        for c, toks in self.tokens.items():
            ctx, n = tree.get(c), self.computed[c]
            assert ctx.token_ids == toks and ctx.num_computed == n
            table = tree.block_table(ctx)
            assert len(table) == -(-n // bs)
            expected.update(table)
            assert [self.kv[s] for s in tree.slots(ctx, 0, n)] == [(t, i) for i, t in enumerate(toks[:n])]
        assert [b.ref_count for b in pool.blocks] == [expected[i] for i in range(pool.num_blocks)]
        assert pool.num_used == len(expected)
        self.check_registered_blocks()

    def check_registered_blocks(self):
        """Every hashed block (the hash map's, in use or cached-free, and in-use duplicates)
        carries the hash of a chain the model computed, and the fake KV store holds exactly
        that chain's last block of tokens at that chain's positions: a lookup hit reads the KV of
        exactly the tokens it asked for."""
        bs = self.bs
        for block in self.pool.blocks:
            if block.block_hash is None:
                continue
            chain = self.chains.get(block.block_hash)
            assert chain is not None, f"block {block.block_id} is registered under a hash nothing computed"
            first = len(chain) - bs
            assert block.token_ids == chain[first:]
            stored = self.kv[block.block_id * bs : (block.block_id + 1) * bs]
            assert stored == [(t, first + j) for j, t in enumerate(chain[first:])], (
                f"block {block.block_id} is registered for {chain[first:]} at {first} but holds {stored}"
            )

    def teardown(self):
        if not hasattr(self, "tree"):
            return
        for c in list(self.tokens):
            assert self.tree.free(c)
        assert len(self.tree) == 0 and self.pool.num_used == 0
        assert self.pool.num_free + self.pool.num_cached_free == self.pool.num_blocks
        assert sorted(self.pool.free_queue()) == list(range(self.pool.num_blocks))
        self.tree.check_invariants()
        self.check_registered_blocks()


KVMachine.TestCase.settings = settings(derandomize=True, max_examples=200, stateful_step_count=50, deadline=None)
TestKVStateMachine = KVMachine.TestCase
