"""vLLM's chat `prompt_logprobs` (on the response, matching the model; a 400 with stream) and
`/tokenize` with `continue_final_message` and `tools`, over a real server on the tiny model."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import client_for, settle
from tests.server.test_logprobs import model_logprobs
from tests.server.test_vllm_fields import CONVERSATION, open_rendering


@pytest.fixture
def served(tiny_runtime, start_server):
    server = start_server(tiny_runtime)
    return tiny_runtime, client_for(server), server.url


def test_chat_prompt_logprobs_match_the_model(served):
    rt, client, _ = served
    messages = CONVERSATION[:1]
    ids = rt.tokenize(rt.apply_chat_template(messages))
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 2})
    got = out.model_extra["prompt_logprobs"]
    # the same as completions' for the rendered prompt (which test_vllm_fields checks against the model)
    same = client.completions.create(model="tiny", prompt=ids, max_tokens=1, extra_body={"prompt_logprobs": 2})
    expected = same.choices[0].model_extra["prompt_logprobs"]
    assert len(got) == len(ids) and got[0] is None and got == expected
    ref = model_logprobs(rt, ids)
    assert all(abs(got[i][str(ids[i])]["logprob"] - float(ref[i - 1][ids[i]])) < 1e-4 for i in range(1, len(ids)))
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0)
    assert "prompt_logprobs" not in plain.model_extra
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, stream=True, extra_body={"prompt_logprobs": 1})
    assert e.value.body["param"] == "prompt_logprobs"
    settle(rt)


def test_tokenize_continue_final_message_cuts_after_the_last_message(served):
    rt, _, url = served
    body = {"messages": CONVERSATION, "add_generation_prompt": False, "continue_final_message": True}
    r = httpx.post(url + "/tokenize", json=body)
    assert r.status_code == 200 and r.json()["tokens"] == rt.tokenize(open_rendering(rt, CONVERSATION))
    for change in ({"add_generation_prompt": True}, {"messages": CONVERSATION[:1]}):
        r = httpx.post(url + "/tokenize", json={**body, **change})
        assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message", r.text
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
    with_tools = httpx.post(url + "/tokenize", json={"messages": CONVERSATION[:1], "tools": tools}).json()
    assert '"name": "lookup"' in rt.detokenize(with_tools["tokens"])
    bad = httpx.post(url + "/tokenize", json={"messages": CONVERSATION[:1], "tools": [{"type": "function"}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tools"
    settle(rt)
