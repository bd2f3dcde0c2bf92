"""Bad requests (ecosystem.md 3.6) are each answered with the right 4xx in OpenAI's error
shape, and the server stays healthy: `/health` is 200 and a normal request succeeds."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from parrot_core.server.app import create_app
from parrot_core.server.settings import ServeSettings
from tests.server.conftest import TINY_MAX_LEN

GOOD_COMPLETION = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
GOOD_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def assert_error(response, status: int, contains: str = "") -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert contains.lower() in body["error"]["message"].lower(), body
    return body["error"]


def assert_healthy(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    r = client.post("/v1/completions", json=GOOD_COMPLETION)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1 or r.json()["choices"][0]["finish_reason"] == "stop"


@pytest.fixture
def client(tiny_runtime):
    app = create_app(tiny_runtime, ServeSettings(served_model_name="tiny", log_stats_interval=0))
    with TestClient(app) as c:
        yield c


COMPLETION_CASES = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 10**9}, f"maximum context length is {TINY_MAX_LEN} tokens. However, you requested"),
    ({"max_tokens": TINY_MAX_LEN}, f"maximum context length is {TINY_MAX_LEN} tokens. However, you requested"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"n": -1}, "n"),
    ({"n": 0}, "n"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [[], [1, 2]]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [10**7]}, "token ids must be in [0,"),
    ({"prompt": [[1, 2], [49152 * 4]]}, "token ids must be in [0,"),
    ({"prompt": [-1, 2]}, "prompt"),
    ({"prompt": [1.5]}, "prompt"),
    ({"prompt": [True]}, "prompt"),
    ({"prompt": ["ok", 3]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": "word " * 300}, f"maximum context length is {TINY_MAX_LEN} tokens"),
    ({"stop": ["x"] * 1000}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stop_token_ids": [-3]}, "stop_token_ids"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": "ten"}, "top_k"),
    ({"top_k": -5}, "top_k"),
    ({"seed": 2**70}, "seed"),
    ({"seed": "s"}, "seed"),
    ({"stream_options": {"include_usage": "yes"}, "stream": True}, "include_usage"),
    ({"stream_options": {"include_usage": True, "bogus": 1}, "stream": True}, "bogus"),
    ({"stream_options": 5, "stream": True}, "stream_options"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": "sometimes"}, "stream"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"max_tokens": 0}, "0 is only allowed with echo"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"n": 100, "prompt": [[1]] * 10}, "admits at most 264"),
]


@pytest.mark.parametrize(("change", "contains"), COMPLETION_CASES, ids=[str(c[0])[:60] for c in COMPLETION_CASES])
def test_bad_completion_is_a_400(client, change, contains):
    body = {**GOOD_COMPLETION, **change}
    if change.get("prompt", 0) is None:
        del body["prompt"]
    assert_error(client.post("/v1/completions", json=body), 400, contains)


CHAT_CASES = [
    ({"messages": []}, "messages"),
    ({"messages": None}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": [{"content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]}, "messages.1.content"),
    ({"max_tokens": 10**6}, f"maximum context length is {TINY_MAX_LEN} tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "word " * 300}]}, "maximum context length"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools"),
    ({"top_logprobs": 2}, "top_logprobs needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"echo": True, "add_generation_prompt": False}, "echo with add_generation_prompt false needs"),
    ({"continue_final_message": True}, "continue_final_message"),
    ({"return_token_ids": True, "prompt_cache_key": "k"}, "return_token_ids"),
    ({"temperature": float("inf")}, "temperature"),
]


@pytest.mark.parametrize(("change", "contains"), CHAT_CASES, ids=[str(c[0])[:60] for c in CHAT_CASES])
def test_bad_chat_is_a_400(client, change, contains):
    import json

    body = {**GOOD_CHAT, **change}
    raw = json.dumps(body)  # allow_nan: Infinity reaches the server as JSON's extension
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, contains)


# Sampling values out of range and vLLM fields that are not supported: a 400 on both
# endpoints whose `param` names the field.
SAMPLING_CASES = [
    ({"presence_penalty": 2.01}, "presence_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"frequency_penalty": "lots"}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": -1.2}, "repetition_penalty"),
    ({"logit_bias": {"5": 100.5}}, "logit_bias"),
    ({"logit_bias": {"5": -101}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"-3": 1}}, "logit_bias"),
    ({"logit_bias": {"49152": 1}}, "logit_bias"),  # the vocabulary is 49152 tokens
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 3}, "min_tokens"),  # more than max_tokens (2)
    ({"min_p": 1.5}, "min_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"stop_token_ids": [49152]}, "stop_token_ids"),
    ({"structured_outputs": {"regex": "[ab"}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"json": {"type": "bogus"}}}, "structured_outputs"),
    ({"structured_outputs": ["a"]}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
    ({"guided_json": {"type": "bogus"}}, "guided_json"),
    ({"guided_regex": "[ab"}, "guided_regex"),
    ({"guided_choice": "ab"}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),  # the second of guided_json, _regex, _choice, _grammar
    ({"structured_outputs": {"regex": "a"}, "guided_json": {"type": "object"}}, "guided_json"),
    ({"allowed_token_ids": [1, 2]}, "allowed_token_ids"),
    ({"skip_special_tokens": False}, "skip_special_tokens"),
    ({"include_stop_str_in_output": True}, "include_stop_str_in_output"),
]


@pytest.mark.parametrize(("change", "param"), SAMPLING_CASES, ids=[str(c[0])[:60] for c in SAMPLING_CASES])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_bad_sampling_value_or_unsupported_field_is_a_400_naming_it(client, path, change, param):
    body = {**(GOOD_COMPLETION if path == "/v1/completions" else GOOD_CHAT), **change}
    assert assert_error(client.post(path, json=body), 400, param)["param"] == param


def test_harmless_values_of_unsupported_vllm_fields_are_accepted(client):
    harmless = {"structured_outputs": None, "skip_special_tokens": True, "include_stop_str_in_output": False, "echo": False}
    for path, good in (("/v1/completions", GOOD_COMPLETION), ("/v1/chat/completions", GOOD_CHAT)):
        assert client.post(path, json={**good, **harmless}).status_code == 200
    assert_healthy(client)


@pytest.mark.parametrize(
    ("raw", "contains"),
    [
        ("[1, 2, 3]", "must be a JSON object"),
        ('"just a string"', "must be a JSON object"),
        ("42", "must be a JSON object"),
        ("null", "must be a JSON object"),
        ("", "must be a JSON object"),
        ("{not json", "not valid JSON"),
        ('{"prompt": [NaN], "tokens": [NaN], "messages": NaN}', ""),
    ],
    ids=["list", "string", "number", "null", "empty", "malformed", "nan"],
)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
def test_non_object_or_malformed_body_is_a_400(client, path, raw, contains):
    assert_error(client.post(path, content=raw, headers={"content-type": "application/json"}), 400, contains)


def test_unknown_model_is_a_404(client):
    for path, body in (("/v1/completions", GOOD_COMPLETION), ("/v1/chat/completions", GOOD_CHAT)):
        err = assert_error(client.post(path, json={**body, "model": "gpt-17"}), 404, "gpt-17")
        assert err["code"] == "model_not_found" and err["param"] == "model"
    assert client.post("/v1/completions", json={k: v for k, v in GOOD_COMPLETION.items() if k != "model"}).status_code == 200
    assert_healthy(client)


def test_tokenize_and_detokenize_bad_inputs(client):
    assert_error(client.post("/tokenize", json={}), 400, "exactly one")
    assert_error(client.post("/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "b"}]}), 400)
    assert_error(client.post("/tokenize", json={"messages": []}), 400)
    assert_error(client.post("/detokenize", json={"tokens": [10**8]}), 400, "token ids must be in")
    assert_error(client.post("/detokenize", json={"tokens": [-1]}), 400)
    assert_error(client.post("/detokenize", json={"tokens": "abc"}), 400)
    assert_error(client.post("/tokenize", json={"prompt": "a", "model": "other"}), 404)


def test_unknown_route_and_wrong_method_have_the_error_shape(client):
    assert_error(client.get("/v1/nothing-here"), 404)
    assert_error(client.get("/v1/completions"), 405)


def test_server_stays_healthy_after_every_bad_request(client):
    for change, _ in COMPLETION_CASES:
        body = {**GOOD_COMPLETION, **change}
        assert 400 <= client.post("/v1/completions", json=body).status_code < 500
    for change, _ in CHAT_CASES[:-1]:
        assert 400 <= client.post("/v1/chat/completions", json={**GOOD_CHAT, **change}).status_code < 500
    for change, _ in SAMPLING_CASES:
        assert client.post("/v1/completions", json={**GOOD_COMPLETION, **change}).status_code == 400
    assert_healthy(client)
    r = client.post("/v1/chat/completions", json=GOOD_CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_unexpected_exception_is_a_500_and_the_server_keeps_serving(client, tiny_runtime, monkeypatch):
    real = tiny_runtime.tokenize_prompt
    calls = {"n": 0}

    def flaky(text: str) -> list[int]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(text)

    monkeypatch.setattr(tiny_runtime, "tokenize_prompt", flaky)
    err = assert_error(client.post("/v1/completions", json=GOOD_COMPLETION), 500)
    assert err["type"] == "server_error" and "boom" not in err["message"]
    assert_healthy(client)


def test_api_key(tiny_runtime):
    app = create_app(tiny_runtime, ServeSettings(served_model_name="tiny", api_key="s3cret", log_stats_interval=0))
    with TestClient(app) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
            err = assert_error(c.post("/v1/completions", json=GOOD_COMPLETION, headers=headers), 401, "api key")
            assert err["type"] == "authentication_error"
            assert_error(c.get("/v1/models", headers=headers), 401)
            assert_error(c.post("/flush_cache", headers=headers), 401)
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/completions", json=GOOD_COMPLETION, headers=ok).status_code == 200
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


def test_health_is_503_until_a_runtime_is_attached(tiny_runtime):
    app = create_app(None, ServeSettings(log_stats_interval=0))
    with TestClient(app) as c:
        assert_error(c.get("/health"), 503, "loading")
        assert_error(c.post("/v1/completions", json={"prompt": "x"}), 503)
        assert c.get("/metrics").status_code == 200
        app.state.serve.attach(tiny_runtime)
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_error_after_the_stream_started_is_a_data_event(client, tiny_runtime, monkeypatch, path):
    import contextlib
    import json

    from parrot_core.errors import EngineError

    real = tiny_runtime.astream

    async def failing(*args, **kwargs):
        async with contextlib.aclosing(real(*args, **kwargs)) as stream:
            seen = 0
            async for delta in stream:
                yield delta
                seen += 1
                if seen == 2:
                    raise EngineError("engine step failed: simulated")

    monkeypatch.setattr(tiny_runtime, "astream", failing)
    base = GOOD_COMPLETION if path == "/v1/completions" else GOOD_CHAT
    r = client.post(path, json={**base, "max_tokens": 10, "ignore_eos": True, "stream": True})
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))
    assert set(error) == {"error"} and error["error"]["type"] == "server_error"
    assert all("error" not in json.loads(e.removeprefix("data: ")) for e in events[:-2])
    monkeypatch.undo()
    assert_healthy(client)
