"""LlamaModel over a paged KV pool against transformers' LlamaForCausalLM (float64 oracle)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parrot_core.engines.builtin.model import ForwardBatch, KVCache, LlamaModel

import transformers  # noqa: E402 - the test oracle, installed by the test extra
from transformers.models.llama import modeling_llama  # noqa: E402
from .hf_oracle import hf_llama_config

ATOL = 1e-6
BS = 4  # block size of every test here: small, so sequences span many blocks


@contextmanager
def _oracle_precision() -> Iterator[None]:
    """transformers computes RMSNorm and the eager softmax in float32 whatever the model dtype; for
    a float64 model that is a downcast (~1e-7 error). Keep both in float64 while the oracle runs."""
    norm_forward = modeling_llama.LlamaRMSNorm.forward
    softmax = torch.nn.functional.softmax

    def norm64(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def softmax64(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim)

    modeling_llama.LlamaRMSNorm.forward = norm64
    torch.nn.functional.softmax = softmax64
    try:
        yield
    finally:
        modeling_llama.LlamaRMSNorm.forward = norm_forward
        torch.nn.functional.softmax = softmax


def hf_logits(model: LlamaModel, tokens: list[int]) -> torch.Tensor:
    """transformers' logits [len(tokens), vocab] for one sequence, eager attention, float64."""
    c = model.config
    hf_config = hf_llama_config(c, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_config).to(torch.float64).eval()
    hf.load_state_dict(model.state_dict_hf(), strict=True)
    with torch.no_grad(), _oracle_precision():
        return hf(torch.tensor([tokens])).logits[0]


def random_tokens(n: int, seed: int, vocab: int = 101) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def scattered_table(n_blocks: int, pool_blocks: int, seed: int) -> list[int]:
    table = random.Random(seed).sample(range(pool_blocks), n_blocks)
    assert table != sorted(table)
    return table


def step(model: LlamaModel, kv: KVCache, seqs: list[tuple[list[int], int, list[int]]]) -> torch.Tensor:
    """One forward over (new_tokens, context_len, block_table) per sequence -> logits [n, vocab]."""
    batch = ForwardBatch.build([s[0] for s in seqs], [s[1] for s in seqs], [s[2] for s in seqs], kv.block_size)
    return model.compute_logits(model.forward(batch, kv))


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> bool:
    return (a - b).abs().max().item() < atol


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_kv_heads": 4, "tie_word_embeddings": True}, {"num_kv_heads": 1}],
    ids=["gqa", "mha-tied", "mqa"],
)
def test_prefill_over_scattered_blocks_matches_hf(tiny_llama, overrides):
    model = tiny_llama(**overrides)
    tokens = random_tokens(21, seed=1)
    ref = hf_logits(model, tokens)
    kv = KVCache.allocate(model.config, 16, BS, torch.float64)
    logits = step(model, kv, [(tokens, 21, scattered_table(6, 16, seed=2))])
    assert logits.shape == (1, 101)
    assert close(logits[0], ref[-1])


@pytest.mark.parametrize("contiguous", [False, True], ids=["scattered", "contiguous"])
def test_decode_step_by_step_matches_hf(tiny_llama, contiguous):
    model = tiny_llama()
    tokens = random_tokens(20, seed=3)
    ref = hf_logits(model, tokens)
    kv = KVCache.allocate(model.config, 12, BS, torch.float64)
    table = [7, 8, 9, 10, 11] if contiguous else scattered_table(5, 12, seed=4)
    assert close(step(model, kv, [(tokens[:3], 3, table)])[0], ref[2])
    for pos in range(3, 20):
        assert close(step(model, kv, [([tokens[pos]], pos + 1, table)])[0], ref[pos]), pos


@pytest.mark.parametrize("contiguous", [False, True], ids=["scattered", "contiguous"])
def test_chunked_prefill_matches_hf(tiny_llama, contiguous):
    model = tiny_llama()
    tokens = random_tokens(20, seed=5)
    ref = hf_logits(model, tokens)
    kv = KVCache.allocate(model.config, 12, BS, torch.float64)
    table = [4, 5, 6, 7, 8] if contiguous else scattered_table(5, 12, seed=6)
    end = 0
    for size in (7, 6, 7):
        logits = step(model, kv, [(tokens[end : end + size], end + size, table)])
        end += size
        assert close(logits[0], ref[end - 1]), end


def test_mixed_batch_matches_hf(tiny_llama):
    """Decodes, a chunk over a cached context and a fresh prefill in one forward, interleaved."""
    model = tiny_llama()
    kv = KVCache.allocate(model.config, 40, BS, torch.float64)
    free = scattered_table(40, 40, seed=7)
    lens = {"a": 15, "b": 11, "c": 9, "d": 14}
    toks = {name: random_tokens(n, seed=10 + i) for i, (name, n) in enumerate(lens.items())}
    tables = {name: [free.pop() for _ in range(-(-n // BS))] for name, n in lens.items()}
    refs = {name: hf_logits(model, t) for name, t in toks.items()}
    cached = {"a": 9, "c": 8, "d": 13}  # b starts fresh
    for name, n in cached.items():
        step(model, kv, [(toks[name][:n], n, tables[name])])
    order = ["c", "a", "d", "b"]
    logits = step(
        model,
        kv,
        [(toks[n][cached.get(n, 0) :], lens[n], tables[n]) for n in order],
    )
    for i, name in enumerate(order):
        assert close(logits[i], refs[name][-1]), name


def test_fresh_prefills_of_equal_length_attended_together_match_hf(tiny_llama):
    """Back-to-back fresh prefills of one length are attended in one batched call; a run broken
    by another length or a decode starts a new one. Each sequence's last logits match HF's."""
    model = tiny_llama()
    kv = KVCache.allocate(model.config, 48, BS, torch.float64)
    free = scattered_table(48, 48, seed=9)
    lens = [7, 7, 7, 5, 7, 7]
    toks = [random_tokens(n, seed=40 + i) for i, n in enumerate(lens)]
    tables = [[free.pop() for _ in range(-(-n // BS))] for n in lens]
    logits = step(model, kv, [(t, n, tb) for t, n, tb in zip(toks, lens, tables)])
    for i, t in enumerate(toks):
        assert close(logits[i], hf_logits(model, t)[-1]), i
    plan = model._plan(ForwardBatch.build(toks, lens, tables, BS), BS)
    assert [(c.q_len, c.count) for c in plan.chunks] == [(7, 3), (5, 1), (7, 2)]


def _shared_prefix_setup(model: LlamaModel, suffix_lens: list[int], prefix_blocks: int = 3, contiguous: bool = False):
    """Sequences sharing `prefix_blocks` blocks (same ids, prefilled once), each with its own
    suffix prefilled except its last token. Returns kv, per-seq tokens and tables."""
    kv = KVCache.allocate(model.config, 64, BS, model.dtype)
    free = scattered_table(64, 64, seed=8)
    prefix = random_tokens(prefix_blocks * BS, seed=20)
    shared = list(range(10, 10 + prefix_blocks)) if contiguous else [free.pop() for _ in range(prefix_blocks)]
    free = [b for b in free if b not in shared]
    step(model, kv, [(prefix, len(prefix), shared)])
    seqs = []
    for i, n in enumerate(suffix_lens):
        tokens = prefix + random_tokens(n, seed=30 + i)
        table = shared + [free.pop() for _ in range(-(-n // BS))]
        if n > 1:
            step(model, kv, [(tokens[len(prefix) : -1], len(tokens) - 1, table)])
        seqs.append((tokens, table))
    return kv, seqs


@pytest.mark.parametrize("contiguous", [False, True], ids=["scattered", "contiguous"])
def test_shared_prefix_decode_equals_plain_path_and_hf(tiny_llama, contiguous):
    model = tiny_llama()
    model.shared_prefix_min_tokens, model.shared_prefix_min_batch, model.shared_prefix_min_work = 4, 2, 0
    kv, seqs = _shared_prefix_setup(model, [1, 2, 4, 5, 9], contiguous=contiguous)
    batch_seqs = [([t[-1]], len(t), table) for t, table in seqs]
    batch = ForwardBatch.build(*zip(*batch_seqs), BS)
    plan = model._plan(batch, BS)
    assert len(plan.shared) == 1 and plan.decode is None

    shared = step(model, kv, batch_seqs)
    model.enable_shared_prefix = False
    plain = step(model, kv, batch_seqs)
    assert close(shared, plain, atol=1e-10)
    for i, (tokens, _) in enumerate(seqs):
        assert close(shared[i], hf_logits(model, tokens)[-1])


def test_shared_prefix_group_next_to_other_work(tiny_llama):
    """A shared group, a decode with a different prefix and a prefill chunk in the same batch."""
    model = tiny_llama()
    model.shared_prefix_min_tokens, model.shared_prefix_min_batch, model.shared_prefix_min_work = 8, 3, 0
    kv, seqs = _shared_prefix_setup(model, [3, 6, 2, 7])
    other = random_tokens(10, seed=50)
    other_table = [60, 61, 62]
    step(model, kv, [(other[:9], 9, other_table)])
    fresh = random_tokens(6, seed=51)
    batch_seqs = [([t[-1]], len(t), table) for t, table in seqs[:2]]
    batch_seqs += [([other[-1]], 10, other_table), (fresh, 6, [63, 59])]
    batch_seqs += [([t[-1]], len(t), table) for t, table in seqs[2:]]
    plan = model._plan(ForwardBatch.build(*zip(*batch_seqs), BS), BS)
    assert len(plan.shared) == 1 and plan.decode is not None and len(plan.chunks) == 1

    shared = step(model, kv, batch_seqs)
    model.enable_shared_prefix = False
    plain = step(model, kv, batch_seqs)
    assert close(shared, plain, atol=1e-10)
    assert close(shared[2], hf_logits(model, other)[-1])
    assert close(shared[3], hf_logits(model, fresh)[-1])


def _cascade_rows_equal_plain_rows(model: LlamaModel, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
    """Every query row of `batch` through the cascade and through the plain paths (shared
    prefix off) must agree; returns the logits of each sequence's last row."""
    every_row = torch.arange(batch.token_ids.shape[0])
    shared = model.forward(batch, kv, every_row)
    model.enable_shared_prefix = False
    plain = model.forward(batch, kv, every_row)
    model.enable_shared_prefix = True
    assert close(shared, plain, atol=1e-10)
    return model.compute_logits(shared[torch.tensor(batch.query_lens).cumsum(0) - 1])


@pytest.mark.parametrize("contiguous", [False, True], ids=["scattered", "contiguous"])
def test_shared_prefix_chunks_equal_plain_path_and_hf(tiny_llama, contiguous):
    """Chunks of several new tokens over a cached context that shares a block prefix attend the
    prefix once for the whole group; every query row (not only the last) must equal the plain
    path's, with unequal query counts (padding) and unequal cached suffixes (causal masks)."""
    model = tiny_llama()
    model.shared_prefix_min_tokens, model.shared_prefix_min_batch, model.shared_prefix_min_work = 4, 2, 0
    cached_then_new = [(0, 5), (3, 4), (6, 3), (2, 5)]  # own tokens already cached, then computed now
    kv, seqs = _shared_prefix_setup(model, [c + n + 1 for c, n in cached_then_new], contiguous=contiguous)
    batch_seqs = []
    for (tokens, table), (cached, new) in zip(seqs, cached_then_new):
        own_start = 3 * BS
        done = own_start + cached  # the setup computed more: those tokens are computed again, the same
        batch_seqs.append((tokens[done : done + new], done + new, table))
    batch = ForwardBatch.build(*zip(*batch_seqs), BS)
    plan = model._plan(batch, BS)
    assert len(plan.shared) == 1 and plan.shared[0].max_query == 5 and not plan.chunks and plan.decode is None
    model.enable_shared_prefix = False
    assert model._plan(batch, BS).shared == [] and len(model._plan(batch, BS).chunks) == 4
    model.enable_shared_prefix = True
    last = _cascade_rows_equal_plain_rows(model, batch, kv)
    for i, ((tokens, _), (cached, new)) in enumerate(zip(seqs, cached_then_new)):
        assert close(last[i], hf_logits(model, tokens[: 3 * BS + cached + new])[-1]), i


def _shared_prefix_groups_setup(model: LlamaModel, groups: list[list[int]], prefix_blocks: int = 3):
    """Like `_shared_prefix_setup`, for several groups, each sharing a prefix of its own (all of
    `prefix_blocks` blocks). Returns kv and, per group, its sequences' tokens and tables."""
    kv = KVCache.allocate(model.config, 160, BS, model.dtype)
    free = scattered_table(160, 160, seed=8)
    out = []
    for g, suffix_lens in enumerate(groups):
        prefix = random_tokens(prefix_blocks * BS, seed=200 + g)
        shared = [free.pop() for _ in range(prefix_blocks)]
        step(model, kv, [(prefix, len(prefix), shared)])
        seqs = []
        for i, n in enumerate(suffix_lens):
            tokens = prefix + random_tokens(n, seed=300 + 10 * g + i)
            table = shared + [free.pop() for _ in range(-(-n // BS))]
            if n > 1:
                step(model, kv, [(tokens[len(prefix) : -1], len(tokens) - 1, table)])
            seqs.append((tokens, table))
        out.append(seqs)
    return kv, out


@pytest.mark.parametrize("queries", [1, 3], ids=["decodes", "chunks"])
def test_shared_prefix_groups_attend_their_prefixes_in_one_call(tiny_llama, queries):
    """Groups that each share a prefix of their own, all of the same length, are attended in one
    cascade: one kernel call over every group's prefix, the smaller groups padded to the
    largest. Members of different groups interleave in the batch. Every query row equals the
    plain path's, and each sequence's last logits equal HF's."""
    model = tiny_llama()
    model.shared_prefix_min_tokens, model.shared_prefix_min_batch, model.shared_prefix_min_work = 4, 2, 0
    sizes = [[queries + n for n in lens] for lens in ([1, 2, 4], [3, 5], [2, 6, 1, 3])]
    kv, groups = _shared_prefix_groups_setup(model, sizes)
    seqs = [s for row in itertools.zip_longest(*groups) for s in row if s is not None]  # interleaved
    batch_seqs = [(t[len(t) - 1 - queries : -1] if queries > 1 else [t[-1]], len(t) - (1 if queries > 1 else 0), table) for t, table in seqs]
    batch = ForwardBatch.build(*zip(*batch_seqs), BS)
    plan = model._plan(batch, BS)
    assert len(plan.shared) == 1 and plan.shared[0].num_groups == 3 and not plan.chunks and plan.decode is None
    last = _cascade_rows_equal_plain_rows(model, batch, kv)
    for i, (tokens, _) in enumerate(seqs):
        assert close(last[i], hf_logits(model, tokens[: len(tokens) - (1 if queries > 1 else 0)])[-1]), i


def test_shared_prefix_groups_of_other_lengths_or_sizes_attend_apart(tiny_llama):
    """Groups merge only when their shared prefixes have the same length and padding the
    smaller groups to the largest costs at most half again the real rows."""
    model = tiny_llama()
    model.shared_prefix_min_tokens, model.shared_prefix_min_batch, model.shared_prefix_min_work = 4, 2, 0
    kv, groups = _shared_prefix_groups_setup(model, [[1, 2], [1, 2], [1] * 6])
    seqs = [s for g in groups for s in g]
    batch = ForwardBatch.build(*zip(*[([t[-1]], len(t), table) for t, table in seqs]), BS)
    # the two groups of 2 merge; the group of 6 would pad them to 3 x 6 rows for 10 real ones
    assert sorted(sh.num_groups for sh in model._plan(batch, BS).shared) == [1, 2]
    tables = [[0, 1, 2, 20 + i] for i in range(3)] + [[10, 11, 12, 13, 30 + i] for i in range(3)]
    batch = ForwardBatch.build([[1]] * 6, [3 * BS + 2] * 3 + [4 * BS + 2] * 3, tables, BS)
    assert [sh.num_groups for sh in model._plan(batch, BS).shared] == [1, 1]


def test_shared_prefix_chunks_that_are_mostly_padding_attend_on_their_own(tiny_llama):
    model = tiny_llama()
    model.shared_prefix_min_tokens, model.shared_prefix_min_batch, model.shared_prefix_min_work = 4, 2, 0
    kv, seqs = _shared_prefix_setup(model, [13, 3, 3, 3])
    batch_seqs = [(t[3 * BS : 3 * BS + n], 3 * BS + n, table) for (t, table), n in zip(seqs, [12, 2, 2, 2])]
    plan = model._plan(ForwardBatch.build(*zip(*batch_seqs), BS), BS)
    assert plan.shared == [] and len(plan.chunks) == 4  # 4 x 12 padded query rows for 18 real ones


def test_shared_prefix_thresholds_gate_the_path(tiny_llama):
    model = tiny_llama()  # default thresholds: far more shared work than this
    kv, seqs = _shared_prefix_setup(model, [1, 2, 3, 4, 5])
    batch = ForwardBatch.build(*zip(*[([t[-1]], len(t), table) for t, table in seqs]), BS)
    assert model._plan(batch, BS).shared == []


_HYP_TOKENS = random_tokens(24, seed=60)
_hyp_cache: dict[str, tuple[LlamaModel, torch.Tensor]] = {}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(1, 23), max_size=6, unique=True), seed=st.integers(0, 10_000))
def test_any_chunk_schedule_matches_hf(tiny_llama, cuts, seed):
    if "model" not in _hyp_cache:  # the factory is stateless: build the model and its oracle once
        model = tiny_llama()
        _hyp_cache["model"] = (model, hf_logits(model, _HYP_TOKENS))
    model, ref = _hyp_cache["model"]
    kv = KVCache.allocate(model.config, 10, BS, torch.float64)
    table = random.Random(seed).sample(range(10), 6)
    bounds = [0, *sorted(cuts), 24]
    for a, b in zip(bounds, bounds[1:]):
        assert close(step(model, kv, [(_HYP_TOKENS[a:b], b, table)])[0], ref[b - 1])


def test_copy_block_copies_prefix_slots_in_every_layer(tiny_llama):
    model = tiny_llama()
    kv = KVCache.allocate(model.config, 4, BS, torch.float64)
    for pool in (*kv.k, *kv.v):
        pool.normal_()
    before = [p.clone() for p in (*kv.k, *kv.v)]
    kv.copy_block(1, 3, num_slots=3)
    for old, new in zip(before, (*kv.k, *kv.v)):
        assert torch.equal(new[3 * BS : 3 * BS + 3], old[BS : BS + 3])
        assert torch.equal(new[3 * BS + 3 :], old[3 * BS + 3 :])
        assert torch.equal(new[: 3 * BS], old[: 3 * BS])


def test_forward_rejects_inconsistent_batches(tiny_llama):
    model = tiny_llama()
    kv = KVCache.allocate(model.config, 4, BS, torch.float64)
    good = ForwardBatch.build([[1, 2, 3]], [3], [[0]], BS)
    bad_sum = ForwardBatch(good.token_ids, good.positions, good.slot_mapping, [2], [3], [[0]])
    with pytest.raises(ValueError):
        model.forward(bad_sum, kv)
    short_table = ForwardBatch.build([[1, 2, 3, 4, 5]], [5], [[0, 1]], BS)
    short_table.block_tables = [[0]]
    with pytest.raises(ValueError):
        model.forward(short_table, kv)


def test_float32_model_is_close_to_float64(tiny_llama):
    m64 = tiny_llama()
    m32 = LlamaModel(m64.config, m64.state_dict_hf(), dtype=torch.float32)
    tokens = random_tokens(12, seed=70)
    out = []
    for m, dt in ((m64, torch.float64), (m32, torch.float32)):
        kv = KVCache.allocate(m.config, 4, BS, dt)
        out.append(step(m, kv, [(tokens, 12, [3, 1, 2])])[0].double())
    assert close(out[0], out[1], atol=1e-4)


# ---------------------------------------------------------------------------- Linear (oneDNN)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_rows_do_not_depend_on_the_batch(dtype):
    """On CPU the product runs on a oneDNN-prepacked weight; each row's result must be bitwise
    the same whatever the other rows, or greedy ids would change with the batch."""
    from parrot_core.engines.builtin.model import Linear

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 40, generator=g).to(dtype)
    x = torch.randn(300, 40, generator=g).to(dtype)
    linear = Linear(weight)
    assert linear.packed == torch.backends.mkldnn.is_available()
    full = linear(x)
    for rows in (slice(0, 1), slice(0, 7), slice(5, 37), slice(100, 300)):
        assert torch.equal(linear(x[rows].contiguous()), full[rows])
    expected = torch.nn.functional.linear(x.double(), weight.double())
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    assert (full.double() - expected).abs().max().item() < tolerance


def test_linear_falls_back_to_the_plain_product(monkeypatch):
    from parrot_core.engines.builtin.model import Linear

    weight, x = torch.randn(8, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    assert not Linear(weight).packed  # float64 (the oracle models): F.linear, exactly
    assert torch.equal(Linear(weight)(x), torch.nn.functional.linear(x, weight))
    monkeypatch.setenv("PARROT_CORE_ONEDNN", "0")
    assert not Linear(weight.float()).packed


def test_half_precision_decode_attention_equals_sdpa():
    """`_attend_decodes` (the bfloat16/float16 decode path, which gathers each KV head's rows
    from the pool itself) against SDPA over the same keys, with GQA, masks and scattered slots."""
    from parrot_core.engines.builtin.model import _attend_decodes, _Workspace

    g = torch.Generator().manual_seed(3)
    b, n_q, n_kv, length, d = 5, 6, 2, 11, 8
    q = torch.randn(b, n_q, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, length, n_kv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, length, n_kv, d, generator=g, dtype=torch.float64)
    slots = torch.randperm(b * length + 9, generator=g)[: b * length]  # where each key row lies in the pool
    k_pool = torch.zeros(b * length + 9, n_kv, d, dtype=torch.float64).index_copy_(0, slots, k.reshape(-1, n_kv, d))
    v_pool = torch.zeros(b * length + 9, n_kv, d, dtype=torch.float64).index_copy_(0, slots, v.reshape(-1, n_kv, d))
    lens = torch.tensor([11, 3, 7, 1, 10])
    mask = (torch.arange(length)[None, :] < lens[:, None])[:, None, None, :]
    ws = _Workspace()
    for m in (None, mask):
        want = torch.nn.functional.scaled_dot_product_attention(
            q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=m, enable_gqa=True
        )[:, :, 0]
        assert close(_attend_decodes(q, k_pool, v_pool, slots, m, ws), want, atol=1e-12)
    got = _attend_decodes(q.bfloat16(), k_pool.bfloat16(), v_pool.bfloat16(), slots, mask, ws).double()
    want = _attend_decodes(q, k_pool, v_pool, slots, mask, ws)
    assert (got - want).abs().max().item() < 0.05  # and it runs in bfloat16


def test_bfloat16_model_with_every_attention_path_tracks_float32(tiny_llama):
    """One bfloat16 step mixing a fresh prefill, a chunk over a cached context and plain decodes
    stays close to the float64 model (bfloat16 rounding only)."""
    ref_model = tiny_llama()
    model = LlamaModel(ref_model.config, ref_model.state_dict_hf(), dtype=torch.bfloat16)
    toks = {name: random_tokens(n, seed=80 + i) for i, (name, n) in enumerate({"a": 9, "b": 7, "c": 6, "d": 5}.items())}
    tables = {"a": [0, 1, 2], "b": [3, 4], "c": [5, 6], "d": [7, 8]}
    for mdl, dtype in ((model, torch.bfloat16), (ref_model, torch.float64)):
        kv = KVCache.allocate(mdl.config, 10, BS, dtype)
        step(mdl, kv, [(toks["a"][:8], 8, tables["a"]), (toks["b"][:4], 4, tables["b"]), (toks["d"][:4], 4, tables["d"])])
        batch = [(toks["a"][8:], 9, tables["a"]), (toks["b"][4:], 7, tables["b"]), (toks["c"], 6, tables["c"])]
        out = step(mdl, kv, batch + [(toks["d"][4:], 5, tables["d"])])  # two decodes (a, d) of unequal lengths
        if mdl is model:
            got = out.double()
        else:
            want = out
    assert (got - want).abs().max().item() < 0.1 * want.abs().max().item()


@pytest.mark.parametrize("queries", [1, 3], ids=["decodes", "chunks"])
def test_bfloat16_shared_prefix_path_tracks_the_plain_path(tiny_llama, queries):
    """Half precisions attend the shared prefix in float32 (the flash kernel with its
    log-sum-exp): the cascade result stays within bfloat16 rounding of the plain path's."""
    ref = tiny_llama()
    model = LlamaModel(ref.config, ref.state_dict_hf(), dtype=torch.bfloat16)
    model.shared_prefix_min_tokens, model.shared_prefix_min_batch, model.shared_prefix_min_work = 4, 2, 0
    kv, seqs = _shared_prefix_setup(model, [queries + 2 * i + 1 for i in range(4)])
    batch_seqs = [(t[len(t) - 1 - queries : -1] if queries > 1 else [t[-1]], len(t) - (1 if queries > 1 else 0), table) for t, table in seqs]
    batch = ForwardBatch.build(*zip(*batch_seqs), BS)
    assert len(model._plan(batch, BS).shared) == 1
    shared = step(model, kv, batch_seqs).double()
    model.enable_shared_prefix = False
    plain = step(model, kv, batch_seqs).double()
    assert (shared - plain).abs().max().item() < 0.05 * plain.abs().max().item()


def test_layer_elementwise_steps_equal_their_formulas_and_each_row_is_its_own():
    """The residual add + RMS norm (torch's fused kernel, x updated in place), RoPE and SiLU-
    times-up give exactly what their formulas give, and a row's bits never depend on the other
    rows of its step (greedy ids identical with caching on or off, forked or not, need it)."""
    from parrot_core.engines.builtin.model import _add_rms_norm, _rope, _silu_mul

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(300, 64, generator=g), torch.randn(300, 64, generator=g)
    w = torch.randn(64, generator=g)
    qk = torch.randn(300, 6, 16, generator=g)
    cos, sin = torch.randn(300, 1, 8, generator=g), torch.randn(300, 1, 8, generator=g)
    gate_up = torch.randn(300, 96, generator=g)
    s = x + y
    summed, normed = _add_rms_norm(x.clone(), y, w, 1e-5)
    assert torch.equal(summed, s)
    assert torch.equal(normed, s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * w)
    x1, x2 = qk[..., :8], qk[..., 8:]
    assert torch.equal(_rope(qk, cos, sin), torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1))
    assert torch.equal(_silu_mul(gate_up), torch.nn.functional.silu(gate_up[:, :48]) * gate_up[:, 48:])
    for rows in (slice(17, 18), slice(100, 107)):
        assert torch.equal(_add_rms_norm(x[rows].clone(), y[rows], w, 1e-5)[1], normed[rows])
        assert torch.equal(_rope(qk[rows], cos[rows], sin[rows]), _rope(qk, cos, sin)[rows])
        assert torch.equal(_silu_mul(gate_up[rows]), _silu_mul(gate_up)[rows])


def test_one_model_serves_several_engine_threads_at_once(tiny_llama):
    """Two engines may share one LlamaModel (one set of weights): its forward keeps per-call
    scratch (gather buffers) per thread, so concurrent forwards never see each other's."""
    import threading

    model = tiny_llama(seed=0)
    bs = 4

    def scattered_decode(seed: int) -> tuple[ForwardBatch, KVCache]:
        g = torch.Generator().manual_seed(seed)
        kv = KVCache.allocate(model.config, 64, bs, dtype=model.dtype)
        for layer in range(len(kv.k)):
            kv.k[layer].copy_(torch.randn(kv.k[layer].shape, generator=g, dtype=model.dtype))
            kv.v[layer].copy_(torch.randn(kv.v[layer].shape, generator=g, dtype=model.dtype))
        tables = [torch.randperm(64, generator=g)[:8].tolist() for _ in range(6)]  # not consecutive: gathered
        lens = [20 + 2 * i + seed for i in range(6)]
        tokens = torch.randint(1, 100, (6,), generator=g).tolist()
        return ForwardBatch.build([[t] for t in tokens], lens, tables, bs), kv

    work = [scattered_decode(s) for s in (0, 1)]
    expected = [model.forward(b, kv).clone() for b, kv in work]
    mismatches = []

    def run(i: int) -> None:
        batch, kv = work[i]
        for _ in range(40):
            if not torch.equal(model.forward(batch, kv), expected[i]):
                mismatches.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert mismatches == []
