"""Logprobs and echo: `Runtime.generate(logprobs=, prompt_logprobs=)` and the OpenAI routes
driven by the official `openai` client, on the tiny model and on the real one (against
transformers on the same weights)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from parrot_core import Runtime
from tests.engines.hf_oracle import hf_llama_from
from tests.server.conftest import settle

PROMPT = "The quick brown fox jumps over the lazy dog because"
LONG = " ".join(["The quick brown fox jumps over the lazy dog."] * 4)  # > 2 blocks of 16 tokens



def model_logprobs(rt: Runtime, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: log_softmax of our model's logits after each prefix, in one plain
    forward per prefix (nothing shared with the engine's batching or caching)."""
    from parrot_core.engines.builtin.model import ForwardBatch, KVCache

    model = rt.engine.model
    rows = []
    for i in range(len(ids)):
        kv = KVCache.allocate(model.config, 16, 16, torch.float32)
        batch = ForwardBatch.build([ids[: i + 1]], [i + 1], [list(range(16))], 16)
        rows.append(torch.log_softmax(model.compute_logits(model.forward(batch, kv))[0].double(), dim=-1))
    return torch.stack(rows)


def test_runtime_generate_returns_logprobs_of_the_model(tiny_runtime):
    rt = tiny_runtime
    ids = rt.tokenize_prompt(LONG)
    rt.generate(LONG, max_tokens=1, temperature=0.0)  # warms the prefix cache with the prompt
    out = rt.generate(LONG, max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=3)
    plain = rt.generate(LONG, max_tokens=5, temperature=0.0, ignore_eos=True)
    assert out.token_ids == plain.token_ids and out.text == plain.text
    assert out.cached_tokens == 0 and plain.cached_tokens > 0  # the prompt was computed, not taken from the cache
    ref = model_logprobs(rt, ids + out.token_ids)
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    for i in range(1, len(ids)):
        e = out.prompt_logprobs[i]
        assert e.token_id == ids[i] and abs(e.logprob - float(ref[i - 1, ids[i]])) < 1e-5 and len(e.top) == 3
    assert [e.token_id for e in out.logprobs] == out.token_ids
    for j, e in enumerate(out.logprobs):
        assert abs(e.logprob - float(ref[len(ids) - 1 + j, e.token_id])) < 1e-5 and e.rank == 1 and len(e.top) == 2
    deltas = []

    async def stream():
        async for d in rt.astream(LONG, max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=1):
            deltas.append(d)

    import asyncio

    asyncio.run(stream())
    assert [e.token_id for d in deltas for e in d.logprobs] == out.token_ids[:3]
    settle(rt)


def test_echo_with_logprobs_and_no_tokens_scores_the_prompt(served):
    rt, _, client = served
    ids = rt.tokenize_prompt(PROMPT)
    out = client.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=5, max_tokens=0)
    choice = out.choices[0]
    assert choice.text == PROMPT and out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == PROMPT
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    ref = model_logprobs(rt, ids)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - float(ref[i - 1, ids[i]])) < 1e-5
        assert 5 <= len(lp.top_logprobs[i]) <= 6  # the 5 most likely plus the token itself
        assert lp.top_logprobs[i][lp.tokens[i]] == pytest.approx(lp.token_logprobs[i])
    settle(rt)


def test_echo_and_logprobs_with_generated_tokens_stream_and_not(served):
    rt, server, client = served
    kw = dict(model="tiny", prompt=PROMPT, echo=True, logprobs=2, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    out = client.completions.create(**kw)
    gen = rt.generate(PROMPT, max_tokens=4, temperature=0.0, ignore_eos=True)
    n_prompt = len(rt.tokenize_prompt(PROMPT))
    choice = out.choices[0]
    assert choice.text == PROMPT + gen.text
    lp = choice.logprobs
    assert len(lp.tokens) == n_prompt + 4 and lp.token_logprobs[0] is None
    assert all(v is not None for v in lp.token_logprobs[1:])
    assert lp.text_offset[n_prompt] == len(PROMPT)  # generated tokens are offset into the echoed text
    chunks = list(client.completions.create(**kw, stream=True))
    text = "".join(c.choices[0].text for c in chunks)
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    values = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    offsets = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.text_offset]
    assert text == choice.text and tokens == lp.tokens and offsets == lp.text_offset
    assert values[0] is None and values[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)
    plain = client.completions.create(model="tiny", prompt=PROMPT, logprobs=0, max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert len(plain.choices[0].logprobs.tokens) == 3 and plain.choices[0].logprobs.text_offset[0] == 0
    assert all(len(d) == 1 for d in plain.choices[0].logprobs.top_logprobs)
    settle(rt)


def test_chat_logprobs_and_top_logprobs(served):
    rt, _, client = served
    messages = [{"role": "user", "content": "Name a colour."}]
    kw = dict(model="tiny", messages=messages, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    out = client.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
    plain = client.chat.completions.create(**kw)
    assert out.choices[0].message.content == plain.choices[0].message.content and plain.choices[0].logprobs is None
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 5
    ids = rt.tokenize(rt.apply_chat_template(messages))
    gen = rt.generate(ids, max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3)
    for item, entry in zip(content, gen.logprobs):
        assert item.token == rt.engine.tokenizer.token_text(entry.token_id)
        assert item.logprob == pytest.approx(entry.logprob, abs=1e-6) and item.bytes == list(item.token.encode())
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert item.top_logprobs[0].token == item.token  # greedy: the top token was sampled
    chunks = list(client.chat.completions.create(**kw, logprobs=True, top_logprobs=3, stream=True))
    streamed = [i for c in chunks if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert [i.token for i in streamed] == [i.token for i in content]
    assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in content], abs=1e-6)
    settle(rt)


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_bad_logprob_requests_are_400_naming_the_field(served, route, body, param):
    rt, server, _ = served
    r = httpx.post(server.url + route, json={"model": "tiny", **body}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert param in json.dumps(error)
    settle(rt)


@pytest.mark.real_model
def test_real_model_prompt_logprobs_match_transformers(real_served, real_llama):
    rt, _, client = real_served(block_size=16, num_kv_blocks=64, max_model_len=512)
    text = "The history of the Roman Empire spans many centuries, and historians still argue about why it fell. " * 2
    ids = rt.tokenize_prompt(text)
    hf = hf_llama_from(real_llama)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)
    rt.generate(text, max_tokens=1, temperature=0.0)  # the prompt's blocks are now in the prefix cache
    assert rt.generate(text, max_tokens=1, temperature=0.0).cached_tokens >= 16
    for max_tokens in (0, 1):
        out = client.completions.create(model="real", prompt=text, echo=True, logprobs=5, max_tokens=max_tokens, temperature=0)
        lp = out.choices[0].logprobs
        assert out.usage.prompt_tokens_details.cached_tokens == 0  # computed, not taken from the cache
        assert len(lp.token_logprobs) == len(ids) + max_tokens and lp.token_logprobs[0] is None
        ours = torch.tensor(lp.token_logprobs[1 : len(ids)], dtype=torch.float64)
        theirs = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert (ours - theirs).abs().max() < 1e-4
        for i in range(1, len(ids)):  # the top 5 are transformers' top 5
            top = torch.topk(ref[i - 1], 5)
            got = sorted(lp.top_logprobs[i].values(), reverse=True)[:5]
            assert got == pytest.approx(top.values.tolist(), abs=1e-4)
        if max_tokens:
            assert abs(lp.token_logprobs[-1] - float(ref[-1].max())) < 1e-4  # greedy: the top token
    settle(rt)


def test_echo_scoring_keeps_the_entry_of_a_generated_end_token(served):
    """lm-evaluation-harness scores `echo` + `logprobs` + `max_tokens=1` by dropping the last
    entry (the generated token): when that token ends the generation (EOS or a stop token id)
    its entry must still be there, or the choice's own last token is dropped instead."""
    rt, _, client = served
    prompt_ids = rt.tokenize("The answer is")
    end = rt.generate(prompt_ids, max_tokens=1, temperature=0.0, ignore_eos=True).token_ids[0]
    out = client.completions.create(
        model="tiny", prompt=prompt_ids, echo=True, logprobs=1, max_tokens=1, temperature=0,
        extra_body={"stop_token_ids": [end], "return_token_ids": True},
    )  # fmt: skip
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and choice.text == rt.detokenize(prompt_ids)  # the end token is not text
    lps = choice.logprobs
    assert len(lps.token_logprobs) == len(prompt_ids) + 1 and lps.token_logprobs[0] is None
    assert lps.tokens[-1] == rt.engine.tokenizer.token_text(end) and lps.token_logprobs[-1] <= 0
    assert out.usage.completion_tokens == 1 and choice.model_extra["token_ids"] == [end]
    settle(rt)
