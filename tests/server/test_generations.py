"""Suspendable generations over HTTP (issue 13, part 4), against a real uvicorn server with the
real `openai` client and httpx: `time_limit` / `token_quantum` / `pid` on both generation
endpoints, `finish_reason: "suspended"`, resume (streamed too), list and delete, and pids that
belong to the caller who made them. Each test's runtime is checked for leaks afterwards."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server.conftest import client_for

PROMPT = "Once upon a time, in a small village by the sea, there lived"
GREEDY = {"temperature": 0.0, "ignore_eos": True}


def _headers(key: str = "unused") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _resume(server, pid: str, key: str = "unused", **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/generations/{pid}/resume", json=body, headers=_headers(key), timeout=60)


def _sse(response: httpx.Response) -> list[dict]:
    lines = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_completion_suspended_and_resumed_equals_uninterrupted(served):
    rt, server, client = served
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, extra_body=GREEDY)
    first = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, extra_body={**GREEDY, "token_quantum": 8, "pid": "story"})
    assert first.choices[0].finish_reason == "suspended"
    assert first.to_dict()["pid"] == "story"
    texts, reasons = [first.choices[0].text], []
    while True:
        r = _resume(server, "story", token_quantum=8)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["pid"] == "story"
        texts.append(body["choices"][0]["text"])
        reasons.append(body["choices"][0]["finish_reason"])
        if reasons[-1] != "suspended":
            break
    assert reasons == ["suspended", "suspended", "length"]
    assert "".join(texts) == full.choices[0].text
    assert _resume(server, "story").status_code == 404  # finished: gone


def test_streamed_resume_and_a_made_up_pid(served):
    rt, server, client = served
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, extra_body=GREEDY)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, stream=True, extra_body={**GREEDY, "token_quantum": 9}))
    pid = chunks[0].to_dict()["pid"]
    assert pid.startswith("gen-") and all(c.to_dict()["pid"] == pid for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "suspended"
    text = "".join(c.choices[0].text for c in chunks)
    r = _resume(server, pid, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r)
    assert events[-1]["choices"][0]["finish_reason"] == "length" and all(e["pid"] == pid for e in events)
    assert text + "".join(e["choices"][0]["text"] for e in events) == full.choices[0].text


def test_chat_completion_suspended_and_resumed(served):
    rt, server, client = served
    messages = [{"role": "user", "content": "Tell me a story about a fox."}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, extra_body=GREEDY)
    first = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=24, extra_body={**GREEDY, "time_limit": 30.0, "token_quantum": 10, "pid": "fox"}
    )
    assert first.choices[0].finish_reason == "suspended" and first.to_dict()["pid"] == "fox"
    r = _resume(server, "fox")
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["finish_reason"] == "length"
    assert first.choices[0].message.content + body["choices"][0]["message"]["content"] == full.choices[0].message.content
    assert body["usage"]["completion_tokens"] == 14


def test_list_and_delete_free_everything(served):
    rt, server, client = served
    for pid in ("one", "two"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, extra_body={**GREEDY, "token_quantum": 5, "pid": pid})
    listed = httpx.get(f"{server.url}/v1/generations", headers=_headers(), timeout=30).json()
    assert [(g["id"], g["tokens"], g["max_tokens"], g["resident"], g["api"]) for g in listed["data"]] == [
        ("one", 5, 30, True, "completion"),
        ("two", 5, 30, True, "completion"),
    ]
    assert httpx.get(f"{server.url}/v1/generations/two", headers=_headers(), timeout=30).json()["tokens"] == 5
    assert rt.stats()["contexts_live"] == 2
    for pid in ("one", "two"):
        assert httpx.delete(f"{server.url}/v1/generations/{pid}", headers=_headers(), timeout=30).status_code == 204
    assert httpx.get(f"{server.url}/v1/generations", headers=_headers(), timeout=30).json()["data"] == []
    assert rt.stats()["contexts_live"] == 0
    r = httpx.delete(f"{server.url}/v1/generations/one", headers=_headers(), timeout=30)
    assert r.status_code == 404 and "one" in r.json()["error"]["message"]


def test_unknown_and_foreign_pids_are_404(served):
    rt, server, _ = served
    alice, bob = client_for(server), client_for(server)
    alice.api_key, bob.api_key = "alice-key", "bob-key"
    alice.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, extra_body={**GREEDY, "token_quantum": 5, "pid": "mine"})
    for r in (
        _resume(server, "mine", key="bob-key"),
        httpx.get(f"{server.url}/v1/generations/mine", headers=_headers("bob-key"), timeout=30),
        httpx.delete(f"{server.url}/v1/generations/mine", headers=_headers("bob-key"), timeout=30),
        _resume(server, "nobody", key="alice-key"),
        _resume(server, "mine"),  # no key at all: the anonymous namespace
    ):
        assert r.status_code == 404, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server.url}/v1/generations", headers=_headers("bob-key"), timeout=30).json()["data"] == []
    # Bob may use the same pid: his own namespace.
    bob.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, extra_body={**GREEDY, "token_quantum": 5, "pid": "mine"})
    with pytest.raises(openai.NotFoundError):
        bob.post("/generations/nobody/resume", body={}, cast_to=dict)
    for key in ("alice-key", "bob-key"):
        r = _resume(server, "mine", key=key)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_what_cannot_be_suspended_is_a_400(served):
    rt, server, client = served
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, extra_body={**GREEDY, "token_quantum": 5, "pid": "busy"})
    bad = [  # (request, what the error names)
        (dict(n=2, extra_body={"token_quantum": 5}), "n=1"),
        (dict(extra_body={"token_quantum": 5, "pid": "has space"}), "pid"),
        (dict(extra_body={"token_quantum": 0}), "token_quantum"),
        (dict(extra_body={"time_limit": 1.0}, logprobs=1), "logprobs cannot be combined with time_limit"),
        (dict(extra_body={"token_quantum": 5, "pid": "busy"}), "in use"),
        (dict(extra_body={"token_quantum": 5}, echo=True), "echo"),
        (dict(extra_body={"token_quantum": 5, "structured_outputs": {"regex": "[ab]+"}}), "structured output"),
    ]
    for kwargs, named in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, **kwargs)
        assert named in str(e.value), (kwargs, str(e.value))
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as e:  # a resumed slice would not be parsed for calls
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, tools=[tool], extra_body={"token_quantum": 2}
        )
    assert "tools cannot be combined" in str(e.value)
    assert rt.suspended() == [] or all(i.pid == "busy" for i in rt.suspended())  # nothing was made
    assert _resume(server, "busy", token_quantum=0).status_code == 400
    assert _resume(server, "busy", surprise=1).status_code == 400
    assert httpx.delete(f"{server.url}/v1/generations/busy", headers=_headers(), timeout=30).status_code == 204
