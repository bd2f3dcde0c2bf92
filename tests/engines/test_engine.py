"""The builtin engine's step loop on a tiny seeded float64 Llama (no tokenizer: token ids)."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time

import pytest

from parrot_core.engines.base import FINISH_LENGTH, FINISH_STOP, SamplingParams
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine
from parrot_core.errors import EngineError, InvalidRequestError, ModelLoadError, RequestTooLargeError

GREEDY = dict(temperature=0.0, ignore_eos=True)


async def run(engine, cid, tokens, n, parent=None, **kw):
    """Fill `tokens` into context `cid` (a fork of `parent` if given), then generate `n`."""
    fill = await engine.fill(cid, parent, tokens)
    out, reasons = [], []
    async for delta in engine.generate(cid, None, SamplingParams(max_tokens=n, **{**GREEDY, **kw})):
        out.extend(delta.token_ids)
        reasons.append(delta.finish_reason)
    return out, reasons[-1], fill


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 101) for _ in range(n)]


def test_greedy_identical_caching_off_cold_warm(make_engine):
    shared = prompt(1, 22)
    a, b = shared + prompt(2, 5), shared + prompt(3, 7)
    c = shared + prompt(4, 2)  # 24 tokens, 6 whole blocks: warm, every block is cached

    async def all_three(engine, first_id):
        return [await run(engine, first_id + i, p, 12) for i, p in enumerate((a, b, c))]

    off = asyncio.run(all_three(make_engine(enable_prefix_caching=False), 0))
    on = make_engine()
    cold = asyncio.run(all_three(on, 0))
    warm = asyncio.run(all_three(on, 10))
    for i in range(3):
        assert off[i][0] == cold[i][0] == warm[i][0]
    assert cold[1][2].cached_tokens == 20  # the second prompt hits the shared full blocks (5 x 4)
    assert warm[0][2].cached_tokens == 24 and off[1][2].cached_tokens == 0
    assert warm[2][2].cached_tokens == 23  # all but the last token, computed into a block copy


def test_second_request_computes_only_uncached_tokens_and_never_the_last(make_engine):
    engine = make_engine()
    p = prompt(5, 40)
    asyncio.run(engine.fill(0, None, p))
    before = engine.runtime_info().prompt_tokens_computed
    result = asyncio.run(engine.fill(1, None, p))  # the same 40 tokens, 10 full blocks
    computed = engine.runtime_info().prompt_tokens_computed - before
    assert result.cached_tokens == 39 and computed == 1  # only the last token, not its block
    partial = asyncio.run(engine.fill(2, None, p[:10] + prompt(6, 10)))
    assert partial.cached_tokens == 8  # full-block granularity: 10 shared tokens = 2 blocks


def test_fork_equals_fresh_context_with_the_same_tokens(make_engine):
    engine = make_engine()
    head, tail = prompt(7, 13), prompt(8, 6)  # 13 is not block aligned: the fork copies on write

    async def go():
        await engine.fill(0, None, head)
        forked = await run(engine, 1, tail, 10, parent=0)
        fresh = await run(engine, 2, head + tail, 10)
        sibling = await run(engine, 3, prompt(9, 3), 10, parent=0)  # the parent is untouched
        again = await run(engine, 4, tail, 10, parent=0)
        return forked, fresh, sibling, again

    forked, fresh, sibling, again = asyncio.run(go())
    assert forked[0] == fresh[0] == again[0]
    assert sibling[0] != forked[0]


def test_parent_freed_while_child_lives(make_engine):
    engine = make_engine()

    async def go():
        await engine.fill(0, None, prompt(10, 17))
        await engine.fill(1, 0, [])  # fork
        engine.free_context(0)
        return await run(engine, 1, prompt(11, 2), 6)

    out = asyncio.run(go())
    fresh = asyncio.run(run(engine, 2, prompt(10, 17) + prompt(11, 2), 6))
    assert out[0] == fresh[0]


def test_preempted_run_equals_undisturbed_run(make_engine):
    prompts = [prompt(20 + i, 9) for i in range(4)]

    async def all_at_once(engine):
        return await asyncio.gather(*(run(engine, i, p, 24) for i, p in enumerate(prompts)))

    calm = asyncio.run(all_at_once(make_engine()))
    tight = make_engine(num_kv_blocks=16, enable_prefix_caching=False)  # 4 x 33 tokens need 36 blocks
    squeezed = asyncio.run(all_at_once(tight))
    assert tight.runtime_info().num_preemptions > 0
    assert [r[0] for r in squeezed] == [r[0] for r in calm]


def test_a_request_that_can_never_fit_is_refused_and_the_engine_goes_on(make_engine):
    engine = make_engine(num_kv_blocks=8)  # 32 slots
    with pytest.raises(RequestTooLargeError, match="KV blocks"):
        asyncio.run(run(engine, 0, prompt(1, 20), 20))
    engine.free_context(0)
    with pytest.raises(RequestTooLargeError, match="maximum context length"):
        asyncio.run(engine.fill(1, None, prompt(1, 300)))
    out, reason, _ = asyncio.run(run(engine, 2, prompt(1, 8), 4))
    assert len(out) == 4 and reason == FINISH_LENGTH


def test_finish_reasons_and_stop_token_ids(make_engine):
    engine = make_engine()
    out, reason, _ = asyncio.run(run(engine, 0, prompt(3, 6), 5))
    assert reason == FINISH_LENGTH and len(out) == 5
    stop_at = out[2]
    first = out.index(stop_at)
    out2, reason2, _ = asyncio.run(run(engine, 1, prompt(3, 6), 5, stop_token_ids=[stop_at]))
    assert reason2 == FINISH_STOP and out2 == out[:first]  # the stop token is not included


def test_generated_tokens_join_the_context(make_engine):
    engine = make_engine()

    async def go():
        first, _, _ = await run(engine, 0, prompt(4, 5), 4)
        # continuing the same context equals a fresh context holding prompt + first output
        second = [t async for d in engine.generate(0, None, SamplingParams(max_tokens=3, **GREEDY)) for t in d.token_ids]
        fresh, _, _ = await run(engine, 1, prompt(4, 5) + first, 3)
        return second, fresh

    second, fresh = asyncio.run(go())
    assert second == fresh


def test_abort_when_the_consumer_stops_reading(make_engine):
    engine = make_engine()

    async def go():
        await engine.fill(0, None, prompt(12, 8))
        stream = engine.generate(0, None, SamplingParams(max_tokens=100, **GREEDY))
        got = []
        async for delta in stream:
            got.extend(delta.token_ids)
            if len(got) >= 2:
                break
        await stream.aclose()
        return got

    got = asyncio.run(go())
    assert len(got) == 2
    engine.wait_idle()
    assert engine.runtime_info().num_running == 0
    # the context stays usable after the abort
    assert len(asyncio.run(run(engine, 1, [], 3, parent=0))[0]) == 3


def test_busy_context_and_bad_tokens_are_typed_errors(make_engine):
    engine = make_engine()

    async def go():
        await engine.fill(0, None, prompt(1, 4))
        stream = engine.generate(0, None, SamplingParams(max_tokens=200, **GREEDY))
        await stream.__anext__()  # the generation is now running on context 0
        with pytest.raises(InvalidRequestError, match="busy"):
            await engine.fill(0, None, [1, 2])
        await stream.aclose()
        with pytest.raises(InvalidRequestError, match="token ids"):
            await engine.fill(1, None, [5, 1000])
        with pytest.raises(InvalidRequestError, match="parent context"):
            await engine.fill(2, 99, [5])
        with pytest.raises(InvalidRequestError, match="empty context"):
            await run(engine, 3, [], 2)

    asyncio.run(go())


def test_a_failing_step_fails_its_requests_and_the_engine_survives(make_engine, monkeypatch):
    engine = make_engine()
    real_forward = engine.model.forward
    calls = {"n": 0}

    def flaky(batch, kv):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")
        return real_forward(batch, kv)

    monkeypatch.setattr(engine.model, "forward", flaky)
    with pytest.raises(EngineError, match="simulated kernel failure"):
        asyncio.run(engine.fill(0, None, prompt(1, 6)))
    out, reason, _ = asyncio.run(run(engine, 1, prompt(1, 6), 3))
    assert len(out) == 3 and reason == FINISH_LENGTH


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(make_engine):
    engine = make_engine()
    params = dict(temperature=1.0, ignore_eos=True, seed=1234)

    async def alone():
        return (await run(engine, 0, prompt(2, 7), 8, **params))[0]

    async def crowded():
        results = await asyncio.gather(
            run(engine, 1, prompt(2, 7), 8, **params), *(run(engine, 2 + i, prompt(30 + i, 5), 8, temperature=1.0) for i in range(3))
        )
        return results[0][0]

    assert asyncio.run(alone()) == asyncio.run(crowded())


def test_in_batch_prefix_sharing_computes_the_shared_prefix_once(make_engine):
    engine = make_engine(num_kv_blocks=128)
    shared = prompt(40, 32)
    prompts = [shared + prompt(41 + i, 4) for i in range(6)]

    async def go():
        return await asyncio.gather(*(engine.fill(i, None, p) for i, p in enumerate(prompts)))

    results = asyncio.run(go())
    computed = engine.runtime_info().prompt_tokens_computed
    assert computed == 32 + 4 * 6  # the optimum: the prefix once, each question once
    assert sorted(r.cached_tokens for r in results) == [0] + [32] * 5


def test_a_shared_prefix_longer_than_a_step_is_still_computed_once(make_engine):
    """Groups of requests arriving together, each group sharing a prefix, with a token budget
    that cuts a group's prefix across steps: a member admitted while the prefix's later blocks
    are still being computed waits for them instead of computing them again."""
    engine = make_engine(num_kv_blocks=256, max_num_batched_tokens=40)
    groups = [prompt(60 + g, 32) for g in range(3)]
    prompts = [head + prompt(70 + 10 * g + i, 4) for g, head in enumerate(groups) for i in range(4)]
    params = SamplingParams(max_tokens=2, **GREEDY)

    async def go():
        async def one(i, p):
            return [t async for d in engine.generate(i, None, params, p) for t in d.token_ids]

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    outs = asyncio.run(go())
    assert all(len(o) == 2 for o in outs)
    # the optimum: each prefix once, each question once
    assert engine.runtime_info().prompt_tokens_computed == 3 * 32 + 12 * 4


def test_a_forced_hash_collision_never_produces_a_wrong_hit(make_engine):
    """Every block hashes to the same value: only the token check stands between a request
    and another prompt's KV. Outputs must equal those of an engine without prefix caching."""
    prompts = [prompt(50 + i, 14) for i in range(3)] + [prompt(50, 14)]
    colliding = make_engine()
    colliding.pool.hash_fn = lambda parent, tokens, namespace=b"": 7
    reference = make_engine(enable_prefix_caching=False)

    async def each(engine):
        return [await run(engine, i, p, 6) for i, p in enumerate(prompts)]

    got, want = asyncio.run(each(colliding)), asyncio.run(each(reference))
    assert [r[0] for r in got] == [r[0] for r in want]
    assert got[1][2].cached_tokens == 0 and got[2][2].cached_tokens == 0  # different tokens: no hit


def test_idle_contexts_give_their_blocks_to_a_request_that_needs_them(make_engine):
    engine = make_engine(num_kv_blocks=12, enable_prefix_caching=False)  # 48 slots

    async def go():
        idle, _, _ = await run(engine, 0, prompt(70, 20), 4)  # context 0 stays, idle, holding 6 blocks
        busy, _, _ = await run(engine, 1, prompt(71, 24), 16)  # needs 10 blocks: context 0 must yield
        again = [t async for d in engine.generate(0, None, SamplingParams(max_tokens=3, **GREEDY)) for t in d.token_ids]
        return idle, busy, again

    idle, busy, again = asyncio.run(go())
    assert len(busy) == 16
    fresh = asyncio.run(run(make_engine(), 0, prompt(70, 20) + idle, 3))[0]
    assert again == fresh  # the released context was recomputed, not corrupted


def test_any_failure_at_submission_reaches_the_caller(make_engine, monkeypatch):
    """A non-ParrotError raised while accepting a request is reported, never left hanging."""
    engine = make_engine()
    monkeypatch.setattr(engine, "_validate", lambda *a: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(EngineError, match="ValueError: boom"):
        asyncio.run(asyncio.wait_for(engine.fill(0, None, [1, 2]), 10))
    engine.free_context(0)


@pytest.mark.parametrize("len_a", [7, 8])  # 8: the recomputed last token closes a full, cached block
def test_split_carves_out_prefixes_that_generate_like_fresh_contexts(make_engine, len_a):
    engine = make_engine()
    a, b, c = prompt(80, len_a), prompt(81, 6), prompt(82, 5)

    async def go():
        await engine.fill(2, None, a + b + c)  # one fill for the whole run
        before = engine.runtime_info().prompt_tokens_computed
        await engine.split(0, 2, len(b) + len(c))  # holds a
        await engine.split(1, 2, len(c))  # holds a + b
        assert engine.runtime_info().prompt_tokens_computed == before  # nothing recomputed
        from_prefix = (await run(engine, 3, [], 6, parent=1))[0]  # fork of a carved-out prefix
        direct = [t async for d in engine.generate(0, None, SamplingParams(max_tokens=6, **GREEDY)) for t in d.token_ids]
        return from_prefix, direct

    from_prefix, direct = asyncio.run(go())
    assert from_prefix == asyncio.run(run(engine, 10, a + b, 6))[0]
    assert direct == asyncio.run(run(engine, 11, a, 6))[0]
    engine.check_invariants()


@pytest.mark.parametrize("end", ["eos", "stop_token"])
def test_text_held_back_for_an_incomplete_character_is_flushed_when_a_generation_ends(tiny_text_llama, real_model, end):
    """Issue 9: the detokenizer was not flushed on EOS or a stop token, so a trailing
    multi-byte character in progress was lost; the text must equal the decoded output ids."""
    from parrot_core.engines.builtin.request import EngineRequest, Kind

    tok = real_model.tokenizer
    partial = next(ids[:1] for ch in "中文€😀" if len(ids := tok.encode(ch)) > 1)
    assert tok.decode(partial).endswith("\ufffd")  # on its own it is an incomplete character
    engine = BuiltinEngine(tiny_text_llama, tok, EngineConfig(num_kv_blocks=16))
    try:
        events = []
        stop = 7
        params = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(stop,) if end == "stop_token" else ())

        def scenario():
            ctx = engine.tree.create(10**6)
            req = EngineRequest(0, Kind.GENERATE, ctx, events.append, params=params, detokenizer=tok.detokenizer())
            engine._accept_token(req, partial[0])
            engine._accept_token(req, engine.eos_token_id if end == "eos" else stop)
            engine.tree.free(ctx.context_id)
            return req

        req = engine.call(scenario)
        text = "".join(e.text for e in events)
        assert events[-1].finish_reason == FINISH_STOP
        assert req.output_ids == partial and text == tok.decode(partial) != ""
    finally:
        engine.close()


def test_carved_prefix_of_a_freed_source_never_corrupts_the_cache(make_engine):
    """Issue 9 defect 5 through the protocol: split, free the source, generate in the carved
    context (it writes at a position inside a full, registered block), then a request with the
    source's tokens hits the cache: every output equals the caching-off run."""
    source = prompt(40, 10)

    async def scenario(engine):
        await engine.fill(0, None, source)
        await engine.split(1, 0, 4)  # the first 6 tokens: it shares the full, registered block of tokens 4..7
        engine.free_context(0)
        carved = [t async for d in engine.generate(1, None, SamplingParams(max_tokens=6, **GREEDY)) for t in d.token_ids]
        again, _, fill = await run(engine, 2, source, 6)
        return carved, again, fill.cached_tokens

    carved, again, cached = asyncio.run(scenario(make_engine()))
    off_carved, _, _ = asyncio.run(run(make_engine(enable_prefix_caching=False), 0, source[:6], 6))
    off_again, _, _ = asyncio.run(run(make_engine(enable_prefix_caching=False), 0, source, 6))
    assert carved == off_carved and again == off_again
    assert cached == 8  # the source's blocks were still in the cache, with their own KV


def test_split_works_after_the_source_was_evicted(make_engine):
    """Issue 9 defect 10: idle eviction may drop the just-filled source's KV before the split."""
    source = prompt(41, 10)
    engine = make_engine()

    async def scenario():
        await engine.fill(0, None, source)
        engine.call(lambda: engine.tree.release(engine.tree.get(0)))  # what _evict_idle does
        await engine.split(1, 0, 3)
        out = [t async for d in engine.generate(1, None, SamplingParams(max_tokens=6, **GREEDY)) for t in d.token_ids]
        engine.free_context(0)
        return out

    out = asyncio.run(scenario())
    fresh, _, _ = asyncio.run(run(make_engine(enable_prefix_caching=False), 0, source[:7], 6))
    assert out == fresh


async def fused_then_free(engine, cid, tokens, n) -> list[int]:
    """A fused request (prompt in the generate call) of `n` greedy tokens; then its context is freed."""
    out = []
    async for d in engine.generate(cid, None, SamplingParams(max_tokens=n, **GREEDY), tokens):
        out.extend(d.token_ids)
    engine.free_context(cid)
    return out


@pytest.mark.parametrize("caching", [True, False])
def test_concurrent_requests_that_fit_alone_all_finish_on_a_tiny_pool(make_engine, caching, caplog):
    """KV pressure inside the engine (no global scheduler in front): 12 fused requests of 10
    blocks each on a pool of 24 blocks all finish, by preemption and recompute, with the greedy
    ids of a roomy pool; preempted requests keep their place in line."""
    shared = prompt(50, 8)
    prompts = [shared + prompt(60 + i, 12) for i in range(12)]

    async def all_of(engine):
        return await asyncio.gather(*(fused_then_free(engine, i, prompts[i], 20) for i in range(12)))

    roomy = asyncio.run(all_of(make_engine(enable_prefix_caching=caching, num_kv_blocks=256)))
    tight_engine = make_engine(enable_prefix_caching=caching, num_kv_blocks=24)
    tight = asyncio.run(all_of(tight_engine))
    assert tight == roomy and all(len(o) == 20 for o in tight)
    assert tight_engine.runtime_info().num_preemptions > 0  # the pressure was real
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []  # preemption is routine, not a warning


def test_idle_contexts_are_evicted_least_recently_used_first_and_pinned_ones_last(make_engine):
    engine = make_engine(num_kv_blocks=12)

    async def scenario():
        for cid, seed in ((0, 70), (1, 71), (2, 72)):  # 3 blocks each; 0 is the least recently used
            await engine.fill(cid, None, prompt(seed, 12))
        engine.set_pinned(0, True)
        await run(engine, 3, prompt(73, 12), 4)  # needs 4 blocks: 3 free, one more evicted
        computed = engine.call(lambda: {c: engine.tree.get(c).num_computed for c in (0, 1, 2)})
        for cid in (0, 1, 2, 3):
            engine.free_context(cid)
        return computed

    computed = asyncio.run(scenario())
    assert computed == {0: 12, 1: 0, 2: 12}  # the pinned LRU context was kept; the next LRU went


@pytest.mark.parametrize("penalty", ["frequency_presence", "repetition"])
def test_penalties_see_the_prompt_and_the_output_of_the_running_generation(make_engine, penalty):
    """A greedy generation with penalties equals a token-by-token reference in fresh contexts
    (prompt + output so far, nothing generated yet) where each step's penalty is spelled out:
    frequency/presence penalties as a logit_bias of -(frequency * count + presence) over the
    output; repetition_penalty alike over prompt + output."""
    engine = make_engine()
    p, n = prompt(7, 6), 12
    penalties = dict(frequency_penalty=0.7, presence_penalty=0.4) if penalty != "repetition" else dict(repetition_penalty=1.7)

    async def go():
        got, _, _ = await run(engine, 0, p, n, **penalties)
        ref: list[int] = []
        for step in range(n):
            if penalty == "repetition":
                kw = penalties
            else:
                kw = dict(logit_bias={t: -(0.7 * ref.count(t) + 0.4) for t in set(ref)})
            tok, _, _ = await run(engine, 100 + step, p + ref, 1, **kw)
            ref += tok
        plain, _, _ = await run(engine, 50, p, n)
        return got, ref, plain

    got, ref, plain = asyncio.run(go())
    assert got == ref
    assert got != plain  # the penalty changed this generation


def test_a_penalized_request_leaves_the_others_in_its_batch_unchanged(make_engine):
    engine = make_engine()

    async def go():
        alone, _, _ = await run(engine, 0, prompt(8, 5), 10)
        together = await asyncio.gather(
            run(engine, 1, prompt(8, 5), 10), run(engine, 2, prompt(9, 5), 10, frequency_penalty=2.0, logit_bias={3: 5.0})
        )
        return alone, together[0][0]

    alone, batched = asyncio.run(go())
    assert batched == alone


def test_min_tokens_holds_back_stop_token_ids_and_bad_ids_are_refused(make_engine):
    engine = make_engine()
    out, _, _ = asyncio.run(run(engine, 0, prompt(3, 6), 6))
    stop = out[0]
    early, reason, _ = asyncio.run(run(engine, 1, prompt(3, 6), 6, stop_token_ids=[stop]))
    assert early == [] and reason == FINISH_STOP
    held, _, _ = asyncio.run(run(engine, 2, prompt(3, 6), 6, stop_token_ids=[stop], min_tokens=3))
    assert len(held) >= 3 and stop not in held[:3]
    vocab = engine.model.config.vocab_size
    for bad in (dict(logit_bias={vocab: 1.0}), dict(stop_token_ids=[vocab + 5])):
        with pytest.raises(InvalidRequestError, match=next(iter(bad))):
            asyncio.run(run(engine, 3, prompt(3, 6), 2, **bad))


def _thread_recorder():
    """(seen, on_thread): `on_thread(name, fn)` wraps fn to record in seen[name] the thread it ran on."""
    seen: dict[str, threading.Thread] = {}

    def on_thread(name, fn):
        def wrapped(*args, **kwargs):
            seen[name] = threading.current_thread()
            return fn(*args, **kwargs)

        return wrapped

    return seen, on_thread


def test_the_engine_loads_its_model_and_kv_pool_on_its_own_thread(tiny_gguf, monkeypatch):
    """Every large torch op of the engine runs on its step-loop thread, load included: with
    the CPU build's OpenMP, a second thread that ever ran parallel work keeps a worker pool of
    its own, and more pool threads than cores make every worker sleep between ops (each step
    25-40% slower). Loading on the caller's thread was that second thread."""
    import parrot_core.engines.builtin.engine as engine_module
    from parrot_core.engines.builtin import gguf_loader

    seen, on_thread = _thread_recorder()
    monkeypatch.setattr(gguf_loader, "load_gguf", on_thread("load", gguf_loader.load_gguf))
    monkeypatch.setattr(engine_module, "LlamaModel", on_thread("model", engine_module.LlamaModel))
    monkeypatch.setattr(engine_module, "allocate_kv_cache", on_thread("kv", engine_module.allocate_kv_cache))
    engine = BuiltinEngine(tiny_gguf, num_kv_blocks=16)
    try:
        assert set(seen) == {"load", "model", "kv"}
        assert all(t is engine._thread for t in seen.values()), seen
        assert threading.current_thread() is not engine._thread
        out = engine.call(lambda: None)  # the loop runs after the build
        assert out is None
        engine.check_invariants()
        assert engine.context_ids() == set() and engine.pool.num_available == engine.pool.num_blocks
    finally:
        engine.close()
    assert not engine._thread.is_alive()


def test_load_model_builds_a_shareable_model_off_the_callers_thread(tiny_gguf, monkeypatch):
    """`load_model` (for engines sharing one set of weights) loads and builds on a thread that
    has ended when it returns, never on the caller's; the model then serves an engine, and a
    load error reaches the caller typed."""
    import parrot_core.engines.builtin.engine as engine_module
    from parrot_core.engines.builtin import gguf_loader
    from parrot_core.engines.builtin.engine import load_model

    seen, on_thread = _thread_recorder()
    monkeypatch.setattr(gguf_loader, "load_gguf", on_thread("load", gguf_loader.load_gguf))
    monkeypatch.setattr(engine_module, "LlamaModel", on_thread("model", engine_module.LlamaModel))
    model, loaded = load_model(tiny_gguf)
    assert set(seen) == {"load", "model"} and seen["load"] is seen["model"]
    assert seen["load"] is not threading.current_thread() and not seen["load"].is_alive()
    assert loaded.weights == {} and loaded.tokenizer is not None
    engine = BuiltinEngine(model, loaded.tokenizer, EngineConfig(num_kv_blocks=16), loaded.model_name)
    try:
        out, reason, _ = asyncio.run(run(engine, 1, [5, 6, 7], 3))
        assert len(out) == 3 and reason == FINISH_LENGTH
        engine.free_context(1)
        engine.wait_idle()
        engine.check_invariants()
        assert engine.context_ids() == set() and engine.pool.num_available == engine.pool.num_blocks
    finally:
        engine.close()
    with pytest.raises(ModelLoadError):
        load_model(tiny_gguf + ".missing")


def test_a_model_that_fails_to_load_raises_in_the_constructor_and_leaves_no_thread(tmp_path):
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"this is not a GGUF file")
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(ModelLoadError):
        BuiltinEngine(str(bad))
    deadline = time.monotonic() + 5
    while {t.ident for t in threading.enumerate()} - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not {t.name for t in threading.enumerate() if t.ident not in before}
