"""`n` and `best_of` with the official `openai` client: a prompt's samples fork one context
that holds it, so the engine computes the prompt once (its `prompt_tokens_computed` grows by
the prompt's length, not n times), usage counts it once, seeded samples differ and repeat,
greedy ones agree, best_of keeps the samples of highest cumulative logprob, and a JSON
schema's grammar holds in every fork."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from tests.server.conftest import client_for, settle

PROMPT = "The quick brown fox jumps over the lazy dog and runs into the forest " * 2
SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green"]}, "count": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["colour", "count"],
    "additionalProperties": False,
}


@pytest.fixture
def served(tiny_runtime, start_server):
    server = start_server(tiny_runtime)
    return tiny_runtime, client_for(server), server.url


def computed(rt) -> int:
    rt.engine.wait_idle()
    return int(rt.stats()["prompt_tokens_computed"])


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(m) for m in re.findall(rf"^parrot_core:{name}\{{[^}}]*\}} (\S+)$", text, re.M))


def test_n_samples_compute_the_prompt_once_and_count_it_once(served):
    rt, client, url = served
    length = len(rt.tokenize(PROMPT))
    before, forks, counted = computed(rt), rt.stats()["context_forks"], metric(url, "prompt_tokens_total")
    sampled = dict(model="tiny", prompt=PROMPT, n=4, max_tokens=6, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    out = client.completions.create(**sampled)
    assert computed(rt) - before == length  # not 4 x length
    assert rt.stats()["context_forks"] - forks == 4
    assert metric(url, "prompt_tokens_total") - counted == length
    assert out.usage.prompt_tokens == length and out.usage.completion_tokens == 24
    assert out.usage.prompt_tokens_details.cached_tokens == 0
    assert [c.index for c in out.choices] == [0, 1, 2, 3] and all(c.finish_reason == "length" for c in out.choices)
    texts = [c.text for c in out.choices]
    assert len(set(texts)) > 1  # seeded samples differ ...
    again = client.completions.create(**sampled)
    assert [c.text for c in again.choices] == texts  # ... and repeat
    assert again.usage.prompt_tokens_details.cached_tokens == length // 16 * 16  # the full blocks come from the cache
    settle(rt)


def test_greedy_samples_are_identical_and_equal_one_generation(served):
    rt, client, _ = served
    out = client.completions.create(model="tiny", prompt=PROMPT, n=3, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    alone = rt.generate(PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True)
    assert [c.text for c in out.choices] == [alone.text] * 3
    settle(rt)


def test_chat_n_streams_each_choice_with_its_index(served):
    rt, client, _ = served
    messages = [{"role": "user", "content": PROMPT}]
    length = len(rt.tokenize(rt.apply_chat_template(messages)))
    before = computed(rt)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, n=3, max_tokens=5, temperature=1.0, seed=3, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    texts, reasons, usage = ["", "", ""], [None] * 3, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert computed(rt) - before == length
    assert reasons == ["length"] * 3 and all(texts) and len(set(texts)) > 1
    assert usage.prompt_tokens == length and usage.completion_tokens == 15
    out = client.chat.completions.create(model="tiny", messages=messages, n=3, max_tokens=5, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert [c.message.content for c in out.choices] == texts  # streamed or not, the same samples
    settle(rt)


def test_best_of_keeps_the_samples_of_highest_cumulative_logprob(served):
    rt, client, _ = served
    sampled = dict(model="tiny", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    every = client.completions.create(**sampled, n=5, logprobs=0)
    scores = [sum(c.logprobs.token_logprobs) for c in every.choices]
    ranked = sorted(range(5), key=lambda i: -scores[i])
    before = computed(rt)
    best = client.completions.create(**sampled, n=2, best_of=5)
    assert computed(rt) - before == len(rt.tokenize(PROMPT)) - len(rt.tokenize(PROMPT)) // 16 * 16  # one prompt, cache-hit blocks skipped
    assert [c.text for c in best.choices] == [every.choices[i].text for i in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1] and all(c.logprobs is None for c in best.choices)  # not asked for
    assert best.usage.completion_tokens == 5 * 6  # every sample generated
    with_lp = client.completions.create(**sampled, n=2, best_of=5, logprobs=1)
    assert [sum(c.logprobs.token_logprobs) for c in with_lp.choices] == pytest.approx([scores[i] for i in ranked[:2]], abs=1e-4)
    settle(rt)


def test_best_of_refusals(served):
    rt, client, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", n=3, best_of=2)
    assert e.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", n=1, best_of=2, stream=True)
    assert e.value.body["param"] == "best_of"
    assert client.completions.create(model="tiny", prompt="x", n=2, best_of=2, max_tokens=2).usage.completion_tokens >= 2
    settle(rt)


def test_every_fork_follows_the_json_schema(served):
    rt, client, _ = served
    before = computed(rt)
    out = client.completions.create(
        model="tiny", prompt="Answer: " + PROMPT, n=6, max_tokens=40, temperature=1.0, seed=9,
        extra_body={"structured_outputs": {"json": SCHEMA}},
    )
    assert computed(rt) - before == len(rt.tokenize("Answer: " + PROMPT))
    values = [json.loads(c.text) for c in out.choices]
    for value in values:
        assert set(value) == {"colour", "count"} and value["colour"] in ("red", "green") and 0 <= value["count"] <= 9
    assert len({json.dumps(v) for v in values}) > 1  # the forks sampled apart
    settle(rt)


def test_prompt_logprobs_with_n_are_computed_for_each_sample(served):
    rt, client, _ = served
    out = client.completions.create(model="tiny", prompt="one two three", n=2, max_tokens=2, echo=True, logprobs=1, temperature=0)
    first, second = (c.logprobs.token_logprobs for c in out.choices)
    assert first[0] is None and second[0] is None and len(first) == len(second) == len(rt.tokenize("one two three")) + 2
    assert first[1:] == pytest.approx(second[1:], abs=1e-4)  # batched apart: float noise only
    settle(rt)


def test_a_stream_of_forks_closed_early_frees_everything(served):
    rt, client, _ = served
    stream = client.completions.create(model="tiny", prompt=PROMPT, n=4, max_tokens=100, temperature=1.0, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    settle(rt)
    assert rt.stats()["contexts_live"] == 0
