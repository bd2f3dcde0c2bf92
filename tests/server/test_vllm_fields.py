"""vLLM's extra request fields on the OpenAI routes, driven by the official `openai` client
(`extra_body`) and httpx against a real server on the tiny model: chat
`continue_final_message` and `echo`, `return_token_ids` while streaming,
`stream_options.continuous_usage_stats`, completions `prompt_logprobs` and the legacy
`guided_*` fields."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from tests.server.conftest import client_for, settle

CONVERSATION = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "My favourite colour is"},
]



def open_rendering(rt, messages) -> str:
    """The chat rendered without a generation prompt, cut right after the last message's
    content (what `continue_final_message` must send)."""
    rendered = rt.apply_chat_template(messages, add_generation_prompt=False)
    content = messages[-1]["content"]
    end = rendered.rindex(content) + len(content)
    assert rendered[end:].strip(), "the template closes the turn after the content: the cut must remove that"
    return rendered[:end]


def test_continue_final_message_leaves_the_last_message_open_and_continues_it(served):
    rt, _, client = served
    expected_ids = rt.tokenize(open_rendering(rt, CONVERSATION))
    out = client.chat.completions.create(
        model="tiny",
        messages=CONVERSATION,
        max_tokens=8,
        temperature=0,
        extra_body={"add_generation_prompt": False, "continue_final_message": True, "return_token_ids": True, "ignore_eos": True},
    )
    assert out.model_extra["prompt_token_ids"] == expected_ids
    assert out.usage.prompt_tokens == len(expected_ids)
    # the reply is the continuation of exactly that text
    plain = client.completions.create(model="tiny", prompt=expected_ids, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == plain.choices[0].text
    closed = rt.tokenize(rt.apply_chat_template(CONVERSATION, add_generation_prompt=False))
    assert closed[: len(expected_ids)] == expected_ids and len(closed) > len(expected_ids)
    settle(rt)


@pytest.mark.parametrize(
    ("change", "contains"),
    [
        ({"continue_final_message": True}, "add_generation_prompt"),
        ({"continue_final_message": True, "add_generation_prompt": False, "messages": CONVERSATION[:1]}, "assistant"),
    ],
)
def test_continue_final_message_misuse_is_a_400_naming_it(served, change, contains):
    rt, server, _ = served
    body = {"model": "tiny", "messages": CONVERSATION, "max_tokens": 2, **change}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "continue_final_message" and contains in error["message"], error
    settle(rt)


def test_chat_echo_prefixes_the_last_assistant_message_streaming_and_not(served):
    rt, _, client = served
    kw = {"model": "tiny", "messages": CONVERSATION, "max_tokens": 6, "temperature": 0}
    cont = {"add_generation_prompt": False, "continue_final_message": True, "ignore_eos": True}
    plain = client.chat.completions.create(**kw, extra_body=cont).choices[0].message.content
    assert plain
    echoed = client.chat.completions.create(**kw, n=2, extra_body={**cont, "echo": True})
    assert [c.message.content for c in echoed.choices] == ["My favourite colour is" + plain] * 2
    chunks = list(client.chat.completions.create(**kw, stream=True, extra_body={**cont, "echo": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "My favourite colour is" + plain
    # the last message is the user's: nothing to echo (as vLLM), the reply is as without echo
    user_only = {"model": "tiny", "messages": CONVERSATION[:1], "max_tokens": 4, "temperature": 0}
    alone = client.chat.completions.create(**user_only).choices[0].message.content
    assert client.chat.completions.create(**user_only, extra_body={"echo": True}).choices[0].message.content == alone
    settle(rt)


def test_streamed_return_token_ids_equal_the_unstreamed_ones(served):
    rt, _, client = served
    kw = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0, "n": 2}
    whole = client.completions.create(**kw, extra_body={"return_token_ids": True, "ignore_eos": True})
    ids = whole.choices[0].model_extra["token_ids"]
    assert len(ids) == 10
    # stop on the 6th token: the stop token id ends the last chunk's token_ids, as unstreamed
    stop = {"return_token_ids": True, "ignore_eos": True, "stop_token_ids": [ids[5]]}
    whole = client.completions.create(**kw, extra_body=stop)
    chunks = list(client.completions.create(**kw, stream=True, extra_body=stop))
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
        assert mine[0].model_extra["prompt_token_ids"] == choice.model_extra["prompt_token_ids"] == rt.tokenize_prompt(kw["prompt"])
        assert all("prompt_token_ids" not in c.model_extra for c in mine[1:])
        assert [t for c in mine for t in c.model_extra["token_ids"]] == choice.model_extra["token_ids"] == ids[: ids.index(ids[5]) + 1]
    messages = [{"role": "user", "content": "Tell me a story."}]
    chat = {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0, "extra_body": {"return_token_ids": True, "ignore_eos": True}}
    whole = client.chat.completions.create(**chat)
    chunks = list(client.chat.completions.create(**chat, stream=True))
    assert chunks[0].model_extra["prompt_token_ids"] == whole.model_extra["prompt_token_ids"]
    assert all("prompt_token_ids" not in c.model_extra for c in chunks[1:])
    assert [t for c in chunks for t in c.choices[0].model_extra["token_ids"]] == whole.choices[0].model_extra["token_ids"]
    assert len(whole.choices[0].model_extra["token_ids"]) == 8
    settle(rt)


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(served):
    rt, _, client = served
    options = {"include_usage": True, "continuous_usage_stats": True}
    prompt_len = len(rt.tokenize_prompt("Once upon a time"))
    kw = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "stream": True}
    chunks = list(client.completions.create(**kw, stream_options=options, extra_body={"ignore_eos": True, "return_token_ids": True}))
    *content, final = chunks
    assert final.choices == [] and final.usage.completion_tokens == 6 and final.usage.prompt_tokens == prompt_len
    generated = 0
    for chunk in content:
        generated += len(chunk.choices[0].model_extra["token_ids"])
        assert (chunk.usage.prompt_tokens, chunk.usage.completion_tokens, chunk.usage.total_tokens) == (prompt_len, generated, prompt_len + generated)
    assert generated == 6
    messages = [{"role": "user", "content": "Hi"}]
    chat = {"model": "tiny", "messages": messages, "max_tokens": 5, "temperature": 0, "stream": True, "extra_body": {"ignore_eos": True}}
    chunks = list(client.chat.completions.create(**chat, stream_options=options))
    assert chunks[0].usage.completion_tokens == 0 and chunks[0].usage.prompt_tokens == chunks[-1].usage.prompt_tokens > 0
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-2] == counts[-1] == 5
    # as vLLM: without include_usage, no chunk carries usage
    chunks = list(client.chat.completions.create(**chat, stream_options={"continuous_usage_stats": True}))
    assert all(c.usage is None for c in chunks)
    settle(rt)


def check_prompt_logprobs(rt, ids: list[int], got: list, k: int) -> None:
    """`got` (vLLM's prompt_logprobs) against the model's own log-softmax."""
    from tests.server.test_logprobs import model_logprobs

    ref = model_logprobs(rt, ids)
    assert len(got) == len(ids) and got[0] is None
    for i in range(1, len(ids)):
        row = ref[i - 1]
        top = row.topk(k).indices.tolist()
        entry = got[i]
        assert set(entry) == {str(t) for t in [ids[i], *top]}, (i, entry)
        own = entry[str(ids[i])]
        assert abs(own["logprob"] - float(row[ids[i]])) < 1e-5
        assert own["rank"] == 1 + int((row > row[ids[i]]).sum()) and own["decoded_token"] == rt.engine.tokenizer.token_text(ids[i])
        for place, t in enumerate(top, start=1):
            assert abs(entry[str(t)]["logprob"] - float(row[t])) < 1e-5
            if t != ids[i]:
                assert entry[str(t)]["rank"] == place


def test_completions_prompt_logprobs_match_the_model_streaming_and_not(served):
    rt, server, client = served
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = rt.tokenize_prompt(prompt)
    rt.generate(prompt, max_tokens=1)  # the prompt is in the prefix cache: its logprobs are computed anyway
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0, n=2, extra_body={"prompt_logprobs": 3})
    for choice in out.choices:
        check_prompt_logprobs(rt, ids, choice.model_extra["prompt_logprobs"], 3)
        assert choice.logprobs is None
    # with echo and logprobs=1 as well: the echoed prompt's top_logprobs keep 1 (+ the token itself)
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, echo=True, logprobs=1, extra_body={"prompt_logprobs": 4})
    check_prompt_logprobs(rt, ids, out.choices[0].model_extra["prompt_logprobs"], 4)
    assert all(len(top) <= 2 for top in out.choices[0].logprobs.top_logprobs[1:])
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=3, stream=True, extra_body={"prompt_logprobs": 0}))
    check_prompt_logprobs(rt, ids, chunks[0].choices[0].model_extra["prompt_logprobs"], 0)
    assert all("prompt_logprobs" not in c.choices[0].model_extra for c in chunks[1:])
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=2)
    assert "prompt_logprobs" not in plain.choices[0].model_extra
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "prompt_logprobs": 21}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text
    settle(rt)


def test_legacy_guided_fields_constrain_like_structured_outputs(served):
    rt, _, client = served
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"], "additionalProperties": False}
    kw = {"model": "tiny", "prompt": "Answer:", "temperature": 1.0, "seed": 7, "max_tokens": 20, "n": 4}
    cases = [
        ({"guided_json": schema}, {"json": schema}),
        ({"guided_json": json.dumps(schema)}, {"json": schema}),  # vLLM also takes the schema as JSON text
        ({"guided_regex": r"\d{2}-[xy]"}, {"regex": r"\d{2}-[xy]"}),
        ({"guided_choice": ["yes", "no"]}, {"choice": ["yes", "no"]}),
        ({"guided_grammar": 'start: "a" ("b")* "c"'}, {"grammar": 'start: "a" ("b")* "c"'}),
    ]
    for guided, structured in cases:
        out = client.completions.create(**kw, extra_body=guided)
        same = client.completions.create(**kw, extra_body={"structured_outputs": structured})
        assert [c.text for c in out.choices] == [c.text for c in same.choices], guided
    texts = [c.text for c in client.completions.create(**kw, extra_body={"guided_json": schema}).choices]
    assert all(set(json.loads(t)) == {"n"} and 0 <= json.loads(t)["n"] <= 9 for t in texts), texts
    texts = [c.text for c in client.completions.create(**kw, extra_body={"guided_regex": r"\d{2}-[xy]"}).choices]
    assert all(re.fullmatch(r"\d{2}-[xy]", t) for t in texts), texts
    messages = [{"role": "user", "content": "Yes or no?"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, extra_body={"guided_choice": ["yes", "no"]})
    assert out.choices[0].message.content in ("yes", "no")
    settle(rt)
