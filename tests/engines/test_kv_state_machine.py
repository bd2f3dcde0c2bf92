"""Stateful test of BlockPool + KVContextTree against a plain model: context id -> tokens and
how many of them are computed. Refcounts, KV content and conservation are checked after
every step from the model's view, never from the implementation against itself."""

from collections import Counter

import hypothesis.strategies as st
import pytest
from hypothesis import event, note, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, multiple, rule

from parrot_core.engines.builtin.block_pool import BlockPool
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


class KVMachine(RuleBasedStateMachine):
    ctxs = Bundle("ctxs")

    @initialize(num_blocks=st.integers(2, 24), block_size=st.sampled_from([1, 2, 4]))
    def setup(self, num_blocks, block_size):
        self.bs = block_size
        self.pool = BlockPool(num_blocks, block_size)
        self.kv: list[tuple[int, int] | None] = [None] * (num_blocks * block_size)
        self.tree = KVContextTree(self.pool, copy_block=self.copy_block)
        self.tokens: dict[int, list[int]] = {}  # the model: live context -> all its tokens
        self.computed: dict[int, int] = {}  # ... and how many have KV
        self.history: set[tuple[int, ...]] = set()  # every token sequence ever computed
        self.next_id = 0

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

    @rule(c=ctxs, tokens=TOKENS, chunk=st.none() | st.integers(1, 12))
    def fill(self, c, tokens, chunk):
        ctx = self.tree.get(c)
        self.tree.append_tokens(ctx, tokens)
        self.tokens[c] += tokens
        toks, n0 = self.tokens[c], self.computed[c]
        hit = self.tree.match_prefix(ctx)
        if hit:
            event("prefix hit")
            assert n0 % self.bs == 0 and hit % self.bs == 0
            assert n0 + hit <= len(toks) - 1  # never the last token
            assert n0 + hit <= max(lcp(toks, h) for h in self.history)  # only what was computed
        self.computed[c] += hit
        remaining = len(toks) - self.computed[c]
        n = remaining if chunk is None else min(chunk, remaining)
        before = self.snapshot()
        try:
            slots = self.tree.allocate_slots(ctx, n)
        except OutOfBlocksError:
            event("fill: out of blocks")
            assert self.tree.blocks_needed(ctx, n) > self.pool.num_available
            assert self.snapshot() == before
            return
        assert len(set(slots)) == n
        start = self.computed[c]
        for p, s in zip(range(start, start + n), slots):
            self.kv[s] = (toks[p], p)
        self.tree.commit(ctx, n)
        self.computed[c] += n
        self.history.add(tuple(toks[: self.computed[c]]))

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

    @rule(target=ctxs, source=ctxs, keep=st.integers(1, 40), tokens=TOKENS)
    def carve_prefix_and_fill(self, source, keep, tokens):
        """The engine's split: a new context holding a prefix of the source's computed tokens,
        sharing its blocks (the boundary block too), then written to: copy-on-write must keep
        the source's slots past the prefix intact."""
        n = min(keep, self.computed[source])
        if n == 0:
            return multiple()
        c = self.new_id()
        event("carve: boundary block shared" if n % self.bs else "carve: block-aligned")
        self.tree.create_prefix(c, source, n)
        self.tokens[c], self.computed[c] = list(self.tokens[source][:n]), n
        self.fill(c, tokens, None)
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
        self.tree.release(self.tree.get(c))
        self.computed[c] = 0

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

    def teardown(self):
        if not hasattr(self, "tree"):
            return
        for c in list(self.tokens):
            assert self.tree.free(c)
        assert len(self.tree) == 0 and self.pool.num_used == 0
        assert self.pool.num_free + self.pool.num_cached_free == self.pool.num_blocks
        self.tree.check_invariants()


KVMachine.TestCase.settings = settings(derandomize=True, max_examples=200, stateful_step_count=50, deadline=None)
TestKVStateMachine = KVMachine.TestCase
