"""Logprobs of sampled and prompt tokens in the builtin engine, against the model's own logits.

The reference runs the model on each prefix of the sequence alone, in a fresh KV cache, through
the plain forward (last row only), so it shares nothing with the engine's batching, caching,
chunking or row selection."""

from __future__ import annotations

import asyncio
import math
import random

import pytest
import torch

from parrot_core.engines.base import SamplingParams
from parrot_core.engines.builtin.model import ForwardBatch, KVCache, LlamaModel
from parrot_core.errors import InvalidRequestError

TOL = 1e-9


def ref_logprobs(model: LlamaModel, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab]: row i is log_softmax of the logits after tokens[: i + 1]."""
    rows = []
    for i in range(len(tokens)):
        kv = KVCache.allocate(model.config, 8, 64, torch.float64)
        batch = ForwardBatch.build([tokens[: i + 1]], [i + 1], [[0]], 64)
        rows.append(torch.log_softmax(model.compute_logits(model.forward(batch, kv))[0], dim=-1))
    return torch.stack(rows)


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 101) for _ in range(n)]


async def gen(engine, cid, params, prompt_ids=(), parent=None):
    deltas = [d async for d in engine.generate(cid, parent, params, prompt_ids)]
    ids = [t for d in deltas for t in d.token_ids]
    return ids, deltas


def check_entry(entry, ref_row: torch.Tensor, token: int, k: int) -> None:
    assert entry.token_id == token
    assert abs(entry.logprob - float(ref_row[token])) < TOL
    assert entry.rank == 1 + int((ref_row > ref_row[token] + TOL).sum())
    assert len(entry.top) == k
    ref_top = torch.topk(ref_row, k)
    assert [abs(lp - float(v)) < TOL for (_, lp), v in zip(entry.top, ref_top.values)] == [True] * k
    for tid, lp in entry.top:
        assert abs(lp - float(ref_row[tid])) < TOL


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("forked", [False, True])
def test_sampled_logprobs_are_the_models_and_greedy_ids_are_unchanged(make_engine, model, caching, forked):
    engine = make_engine(enable_prefix_caching=caching)
    p = prompt(1, 13)

    async def main():
        if forked:  # the prompt is filled into a parent; the generate runs in a fork of it
            await engine.fill(100, None, p[:9])
            plain, _ = await gen(engine, 1, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), p[9:], parent=100)
            with_lp, deltas = await gen(engine, 2, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=3), p[9:], parent=100)
        else:
            plain, _ = await gen(engine, 1, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), p)
            with_lp, deltas = await gen(engine, 2, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=3), p)
        for cid in (1, 2, 100):
            engine.free_context(cid)
        return plain, with_lp, deltas

    plain, with_lp, deltas = asyncio.run(main())
    assert with_lp == plain and len(plain) == 10
    entries = [e for d in deltas for e in d.logprobs]
    assert len(entries) == 10 and all(len(d.logprobs) == len(d.token_ids) for d in deltas)
    assert all(d.prompt_logprobs is None for d in deltas)
    ref = ref_logprobs(model, p + plain)
    for i, (entry, token) in enumerate(zip(entries, plain)):
        check_entry(entry, ref[len(p) - 1 + i], token, 3)
        assert entry.rank == 1  # greedy picks the top token


def test_logprobs_are_raw_not_tempered_and_do_not_change_seeded_samples(make_engine, model):
    engine = make_engine()
    p = prompt(2, 7)
    params = dict(max_tokens=8, temperature=0.7, top_k=20, seed=11, ignore_eos=True)

    async def main():
        a, _ = await gen(engine, 1, SamplingParams(**params), p)
        b, deltas = await gen(engine, 2, SamplingParams(**params, logprobs=0), p)
        engine.free_context(1)
        engine.free_context(2)
        return a, b, deltas

    a, b, deltas = asyncio.run(main())
    assert a == b
    ref = ref_logprobs(model, p + b)
    entries = [e for d in deltas for e in d.logprobs]
    for i, (entry, token) in enumerate(zip(entries, b)):
        check_entry(entry, ref[len(p) - 1 + i], token, 0)
    assert math.fsum(math.exp(v) for v in ref[len(p) - 1].tolist()) == pytest.approx(1.0)


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("max_batched", [2048, 5])
def test_prompt_logprobs_are_computed_even_when_the_prefix_is_cached(make_engine, model, caching, max_batched):
    engine = make_engine(enable_prefix_caching=caching, max_num_batched_tokens=max_batched)
    p = prompt(3, 21)

    async def main():
        warm = await engine.fill(0, None, p + [5])  # registers p's full blocks in the prefix cache
        engine.free_context(0)
        ids, deltas = await gen(engine, 1, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=2), p)
        again, _ = await gen(engine, 2, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), p)
        engine.free_context(1)
        engine.free_context(2)
        return warm, ids, deltas, again

    warm, ids, deltas, again = asyncio.run(main())
    assert ids == again
    first = deltas[0]
    assert first.cached_tokens == 0  # no cached prompt token was taken: they have no logits
    assert all(d.prompt_logprobs is None for d in deltas[1:]) and all(d.logprobs is None for d in deltas)
    entries = first.prompt_logprobs
    assert len(entries) == len(p) and entries[0] is None
    ref = ref_logprobs(model, p)
    for i in range(1, len(p)):
        check_entry(entries[i], ref[i - 1], p[i], 2)


@pytest.mark.parametrize("how", ["kept_hidden", "carved_prefix", "evicted"])
def test_prompt_logprobs_of_a_continuation_include_its_first_token(make_engine, model, how):
    engine = make_engine()
    head, tail = prompt(4, 10), prompt(5, 6)

    async def main():
        if how == "kept_hidden":  # the parent's last hidden state gives the first entry at once
            await engine.fill(0, None, head)
        elif how == "carved_prefix":  # no hidden state kept: the token before is recomputed
            await engine.fill(9, None, head + [7, 7])
            await engine.split(0, 9, 2)
            engine.free_context(9)
        else:
            await engine.fill(0, None, head)
            engine.call(lambda: engine.tree.release(engine.tree.get(0)))  # KV dropped, tokens kept
        ids, deltas = await gen(engine, 1, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=1, logprobs=1), tail, parent=0)
        engine.free_context(1)
        engine.free_context(0)
        return ids, deltas

    ids, deltas = asyncio.run(main())
    entries = deltas[0].prompt_logprobs
    ref = ref_logprobs(model, head + tail + ids)
    assert len(entries) == len(tail)
    for i, token in enumerate(tail):
        check_entry(entries[i], ref[len(head) - 1 + i], token, 1)
    for i, entry in enumerate(e for d in deltas for e in d.logprobs):
        check_entry(entry, ref[len(head) + len(tail) - 1 + i], ids[i], 1)


def test_a_batch_mixing_prompt_logprobs_and_plain_requests_keeps_every_id(make_engine, model):
    engine = make_engine(enable_prefix_caching=False)
    prompts = [prompt(10 + i, 6 + 3 * i) for i in range(4)]

    async def run_all(with_lp: bool):
        def params(i):
            lp = dict(prompt_logprobs=3, logprobs=2) if with_lp and i % 2 == 0 else {}
            return SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, **lp)

        out = await asyncio.gather(*(gen(engine, 10 * (1 + with_lp) + i, params(i), p) for i, p in enumerate(prompts)))
        for i in range(len(prompts)):
            engine.free_context(10 * (1 + with_lp) + i)
        return out

    plain = asyncio.run(run_all(False))
    mixed = asyncio.run(run_all(True))
    assert [ids for ids, _ in plain] == [ids for ids, _ in mixed]
    for i, (ids, deltas) in enumerate(mixed):
        if i % 2:
            assert deltas[0].prompt_logprobs is None
            continue
        ref = ref_logprobs(model, prompts[i] + ids)
        for j in range(1, len(prompts[i])):
            check_entry(deltas[0].prompt_logprobs[j], ref[j - 1], prompts[i][j], 3)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("value", [-1, 21, 2.0, True])
def test_out_of_range_logprob_counts_are_typed_errors(field, value):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("end", ["eos", "stop_token"])
def test_the_token_that_ends_a_generation_keeps_its_logprob(make_engine, model, end):
    """Like vLLM and OpenAI: an EOS or stop token id ends the generation without entering the
    output or the context, but its logprob is reported (lm-evaluation-harness scores the last
    entry of `echo` + `max_tokens=1`; a missing entry dropped a choice's own last token)."""
    p = prompt(90, 9)
    engine = make_engine()
    ids, _ = asyncio.run(gen(engine, 0, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True), p))
    first = ids[0]  # the greedy next token: made the EOS, or a stop token id
    engine.free_context(0)
    if end == "eos":
        engine.eos_token_id = first  # the tiny model has no EOS of its own
    params = SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, stop_token_ids=(first,) if end == "stop_token" else ())
    ids, deltas = asyncio.run(gen(engine, 1, params, p))
    assert ids == [] and deltas[-1].finish_reason == "stop"
    assert deltas[-1].stop_token_id == first
    assert [lp.token_id for d in deltas for lp in d.logprobs] == [first]
    check_entry(deltas[-1].logprobs[0], ref_logprobs(model, p)[-1], first, 2)
    assert engine.call(lambda: engine.tree.get(1).token_ids) == p  # the end token is not in the context
