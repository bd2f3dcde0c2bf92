"""Chat sessions over HTTP (`/v1/chat/sessions`) and `prompt_cache_key` on
`/v1/chat/completions`, against a real uvicorn server: the `openai` client for the turns,
httpx for the rest, raw sockets to disconnect. Every test ends with the leak check."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from parrot_core.errors import InvalidRequestError
from parrot_core.server.settings import ServeSettings
from tests.server.conftest import TINY_MAX_LEN, settle, wait_for
from tests.server.test_disconnect import read_events, send

SYSTEM = "You are a parrot that repeats things."
GREEDY = {"temperature": 0, "ignore_eos": True}


def client_for(server, token: str | None = None) -> openai.OpenAI:
    headers = {"X-Session-Token": token} if token else None
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60, default_headers=headers)


def create(http: httpx.Client, **body: Any) -> tuple[str, str]:
    r = http.post("/v1/chat/sessions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.session" and out["id"] and out["token"]
    return out["id"], out["token"]


def turn(server, sid: str, token: str, content: str, **body: Any) -> ChatCompletion:
    """A non-streamed turn through the official client."""
    client = client_for(server, token)
    return client.post(f"/chat/sessions/{sid}/messages", cast_to=ChatCompletion, body={"content": content, **GREEDY, **body})


def stream_turn(server, sid: str, token: str, content: str, **body: Any) -> list[ChatCompletionChunk]:
    client = client_for(server, token)
    stream = client.post(
        f"/chat/sessions/{sid}/messages",
        cast_to=ChatCompletion,
        body={"content": content, "stream": True, "stream_options": {"include_usage": True}, **GREEDY, **body},
        stream=True,
        stream_cls=openai.Stream[ChatCompletionChunk],
    )
    return list(stream)


def info(http: httpx.Client, sid: str, token: str) -> dict[str, Any]:
    r = http.get(f"/v1/chat/sessions/{sid}", headers={"X-Session-Token": token})
    assert r.status_code == 200, r.text
    return r.json()


def delete(http: httpx.Client, sid: str, token: str) -> None:
    r = http.delete(f"/v1/chat/sessions/{sid}", headers={"X-Session-Token": token})
    assert r.status_code == 200, r.text
    assert r.json() == {"id": sid, "object": "chat.session.deleted", "deleted": True}


def assert_error(r: httpx.Response, status: int, param: str | None = "") -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param != "":
        assert error["param"] == param, error
    return error


@pytest.fixture
def served(tiny_runtime, start_server):
    server = start_server(tiny_runtime)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield tiny_runtime, server, http


def test_turns_keep_the_conversation_cached(served):
    rt, server, http = served
    sid, token = create(http, system=SYSTEM)
    assert sid in rt.chat_sessions.all_sessions()
    warm = info(http, sid, token)
    assert warm["is_prefilled"] and warm["context_length"] == warm["shared_prefix_tokens"] > 0  # cache_warmup
    assert warm["messages"] == [{"role": "system", "content": SYSTEM}] and warm["id"] == sid

    first = turn(server, sid, token, "Say hello.", max_tokens=6)
    assert first.object == "chat.completion" and first.id.startswith("chatcmpl-")
    assert first.choices[0].message.role == "assistant" and first.choices[0].finish_reason == "length"
    assert first.usage.completion_tokens == 6
    assert first.usage.prompt_tokens_details.cached_tokens == warm["context_length"]  # the system prompt
    # the same conversation as a plain chat completion: the same reply, the same prompt
    plain = client_for(server).chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Say hello."}],
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert first.choices[0].message.content == plain.choices[0].message.content
    assert first.usage.prompt_tokens == plain.usage.prompt_tokens

    after_first = info(http, sid, token)
    held = after_first["context_length"]
    assert held == first.usage.prompt_tokens + 6  # the prompt and the reply tokens as generated
    assert [m["role"] for m in after_first["messages"]] == ["system", "user", "assistant"]
    assert after_first["messages"][2]["content"] == first.choices[0].message.content

    chunks = stream_turn(server, sid, token, "Again, please.", max_tokens=5)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 5
    assert usage.prompt_tokens_details.cached_tokens == held  # the whole first turn, its reply included
    assert usage.prompt_tokens > held
    second_reply = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    third = turn(server, sid, token, "Once more.", max_tokens=4)
    after_second = held + (usage.prompt_tokens - held) + 5
    assert third.usage.prompt_tokens_details.cached_tokens == after_second
    state = info(http, sid, token)
    assert state["message_count"] == 7 and state["messages"][4] == {"role": "assistant", "content": second_reply}
    assert state["context_length"] == third.usage.prompt_tokens + 4

    delete(http, sid, token)
    assert sid not in rt.chat_sessions.all_sessions()
    assert http.get(f"/v1/chat/sessions/{sid}", headers={"X-Session-Token": token}).status_code == 404
    settle(rt)


def test_sse_wire_format_of_a_turn(served):
    rt, _, http = served
    sid, token = create(http)
    body = {"content": "wire", "max_tokens": 3, "stream": True, **GREEDY}
    with http.stream("POST", f"/v1/chat/sessions/{sid}/messages", json=body, headers={"X-Session-Token": token}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-2])
    delete(http, sid, token)
    settle(rt)


def test_session_tokens_are_enforced(served):
    rt, _, http = served
    a, token_a = create(http)
    b, token_b = create(http)
    for method, path, body in (
        ("GET", "", None),
        ("POST", "/messages", {"content": "hi", "max_tokens": 2}),
        ("DELETE", "", None),
    ):

        def call(sid: str, headers: dict[str, str]) -> httpx.Response:
            return http.request(method, f"/v1/chat/sessions/{sid}{path}", json=body, headers=headers)

        assert_error(call(a, {}), 401)
        assert_error(call(a, {"X-Session-Token": "wrong"}), 401)
        assert_error(call(a, {"X-Session-Token": token_b}), 401)  # another session's token
        assert_error(call("chat-nosuchsession", {"X-Session-Token": token_a}), 404, "session_id")
    # nothing above touched either session
    assert info(http, a, token_a)["message_count"] == 0 and info(http, b, token_b)["message_count"] == 0
    delete(http, a, token_a)
    assert_error(http.get(f"/v1/chat/sessions/{a}", headers={"X-Session-Token": token_a}), 404, "session_id")
    assert info(http, b, token_b)["message_count"] == 0
    delete(http, b, token_b)
    settle(rt)


def test_bad_input_is_a_400(served):
    rt, server, http = served
    sid, token = create(http, max_context_length=64)
    headers = {"X-Session-Token": token}
    url = f"/v1/chat/sessions/{sid}/messages"
    assert_error(http.post(url, json={"max_tokens": 2}, headers=headers), 400, "content")
    assert_error(http.post(url, json={"content": "hi", "n": 2}, headers=headers), 400, "n")
    assert_error(http.post(url, json={"content": "hi", "temperature": -1}, headers=headers), 400, "temperature")
    assert_error(http.post(url, json={"content": "hi", "top_k": -5}, headers=headers), 400, "top_k")
    assert_error(http.post(url, json={"content": "hi", "logit_bias": {"1": 1000}}, headers=headers), 400, "logit_bias")
    assert_error(http.post(url, json={"content": "hi", "model": "other"}, headers=headers), 404, "model")
    assert_error(http.post(url, content=b"{not json", headers={**headers, "Content-Type": "application/json"}), 400)
    for stream in (False, True):  # a turn that can never fit: a 400 before any stream starts
        r = http.post(url, json={"content": "hi", "max_tokens": 64, "stream": stream}, headers=headers)
        assert "max_context_length 64" in assert_error(r, 400)["message"]
    assert_error(http.post("/v1/chat/sessions", json={"max_context_length": 0}), 400, "max_context_length")
    assert_error(http.post("/v1/chat/sessions", json={"system": 3}), 400, "system")
    assert_error(http.post("/v1/chat/sessions", json={"sytem": "typo"}), 400, "sytem")
    assert_error(http.post("/v1/chat/sessions", json={"cache_warmup": "yes"}), 400, "cache_warmup")
    assert info(http, sid, token)["message_count"] == 0  # the failed turns changed nothing
    ok = turn(server, sid, token, "hi", max_tokens=3)  # and the session still works
    assert ok.usage.completion_tokens == 3
    assert_error(http.post("/v1/chat/sessions"), 400)  # no body: `{}` asks for the defaults
    bare, bare_token = create(http)
    assert info(http, bare, bare_token)["max_context"] == 4096
    delete(http, bare, bare_token)
    delete(http, sid, token)
    settle(rt)


@contextlib.contextmanager
def serving(make_runtime, start_server, **settings: Any) -> Iterator[tuple[Any, Any, Any, httpx.Client]]:
    """A fresh runtime served with `settings`: (runtime, server, its chat sessions, an httpx client)."""
    rt = make_runtime()
    server = start_server(rt, **settings)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield rt, server, server.app.state.chat_sessions, http


def test_idle_chat_sessions_expire(make_runtime, start_server):
    with serving(make_runtime, start_server, session_timeout=0.4) as (rt, server, registry, http):
        idle, idle_token = create(http, system=SYSTEM)
        kept, kept_token = create(http, system=SYSTEM)
        turn(server, idle, idle_token, "hello", max_tokens=2)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # calls keep `kept` alive past the timeout
            info(http, kept, kept_token)
            time.sleep(0.1)
        wait_for(lambda: idle not in registry.by_id, 5.0, "the idle session to expire")
        assert kept in registry.by_id
        assert_error(http.get(f"/v1/chat/sessions/{idle}", headers={"X-Session-Token": idle_token}), 404, "session_id")
        wait_for(lambda: idle not in rt.chat_sessions.all_sessions(), 5.0, "the idle session to be closed")
        assert kept in rt.chat_sessions.all_sessions()
        wait_for(lambda: kept not in registry.by_id, 5.0, "the other one to expire once idle")
        wait_for(lambda: len(rt.chat_sessions) == 0, 5.0, "every session to be closed")
    settle(rt)  # their KV (and the shared system prompt's) is free


def _chat(client: openai.OpenAI, messages: list[dict[str, str]], key: str | None, **extra: Any) -> ChatCompletion:
    body = {"ignore_eos": True, **({"prompt_cache_key": key} if key else {}), **extra}
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=7, temperature=0, extra_body=body)


def reply_and(messages: list[dict[str, str]], reply: ChatCompletion, user: str) -> list[dict[str, str]]:
    """`messages`, then `reply`'s message and a new user message."""
    return [*messages, {"role": "assistant", "content": reply.choices[0].message.content}, {"role": "user", "content": user}]


def test_prompt_cache_key_keeps_the_conversation_pinned(served):
    rt, server, http = served
    client = client_for(server)
    registry = server.app.state.chat_sessions
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me about parrots."}]
    first = _chat(client, messages, "conv-1")
    plain = _chat(client, messages, None)
    assert first.choices[0].message.content == plain.choices[0].message.content  # the same generation
    assert first.usage.prompt_tokens == plain.usage.prompt_tokens
    assert list(registry.by_key) == ["conv-1"]
    (key_session,) = rt.chat_sessions.all_sessions()  # the key's session, not an HTTP one
    assert_error(http.get(f"/v1/chat/sessions/{key_session}"), 404, "session_id")

    held = first.usage.prompt_tokens + first.usage.completion_tokens
    assert held % rt.engine.config.block_size  # so block-level reuse alone could not cover it all
    extended = reply_and(messages, first, "More!")
    second = _chat(client, extended, "conv-1")
    assert second.usage.prompt_tokens_details.cached_tokens == held  # the first conversation and its reply
    unkeyed = _chat(client, extended, None)
    assert unkeyed.usage.prompt_tokens_details.cached_tokens < held  # blocks alone: less

    # streamed, with the key: the same machinery, the conversation extended once more
    further = reply_and(extended, second, "Go on.")
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=further,
            max_tokens=3,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "prompt_cache_key": "conv-1"},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens + 7

    # an edited history under the same key reuses only what still matches, and answers as a plain run
    edited = [{"role": "system", "content": "Another system prompt."}, {"role": "user", "content": "Tell me about parrots."}]
    again = _chat(client, edited, "conv-1")
    assert again.choices[0].message.content == _chat(client, edited, None).choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens < held
    # several choices, or no user message last: the key is ignored (a plain generation)
    n2 = _chat(client, messages, "conv-2", n=2)
    assert len(n2.choices) == 2 and list(registry.by_key) == ["conv-1"]
    server.stop_thread()  # the server frees the key's session
    settle(rt)


def test_prompt_cache_key_without_max_tokens_fills_the_context_without_dropping_turns(served):
    """Without max_tokens the reply may take all the room left, counted on the key session's
    own tokens (its replies as generated), so no turn is silently dropped to make it fit."""
    rt, server, _ = served
    client = client_for(server)
    messages = [{"role": "user", "content": "Count with me: one two three."}]
    first = _chat(client, messages, "fill")
    extended = reply_and(messages, first, "Continue.")
    second = client.chat.completions.create(
        model="tiny", messages=extended, temperature=0, extra_body={"ignore_eos": True, "prompt_cache_key": "fill"}
    )
    assert second.choices[0].finish_reason == "length"
    assert second.usage.prompt_tokens + second.usage.completion_tokens == TINY_MAX_LEN
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.total_tokens
    (session_id,) = rt.chat_sessions.all_sessions()
    session = rt.chat_sessions.get_session(session_id)
    assert session.cache_info()["turns_dropped"] == 0 and len(session.messages) == 4
    server.stop_thread()
    settle(rt)


def test_requests_of_one_key_run_one_at_a_time(served):
    rt, server, _ = served
    conversations = [[{"role": "user", "content": f"Thread {i} asks a question."}] for i in range(4)]
    expected = [_chat(client_for(server), m, None).choices[0].message.content for m in conversations]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda m: _chat(client_for(server), m, "shared").choices[0].message.content, conversations))
    assert got == expected
    assert len(rt.chat_sessions) == 1
    server.stop_thread()
    settle(rt)


def test_prompt_cache_key_survives_a_runtime_reset(served):
    rt, server, _ = served
    client = client_for(server)
    messages = [{"role": "user", "content": "Before the reset."}]
    before = _chat(client, messages, "kept")
    rt.reset()  # closes every chat session, the key's included
    assert len(rt.chat_sessions) == 0
    after = _chat(client, messages, "kept")  # the key starts afresh instead of failing
    assert after.choices[0].message.content == before.choices[0].message.content
    assert after.usage.prompt_tokens_details.cached_tokens == 0  # nothing was left to reuse
    assert len(rt.chat_sessions) == 1
    server.stop_thread()
    settle(rt)


def test_prompt_cache_keys_are_bounded_lru(make_runtime, start_server):
    rt = make_runtime()
    server = start_server(rt, max_prompt_cache_keys=2)
    registry = server.app.state.chat_sessions
    client = client_for(server)
    conversations = {k: [{"role": "user", "content": f"Conversation {k} starts here."}] for k in "abc"}
    replies = {k: _chat(client, m, k) for k, m in conversations.items()}
    assert list(registry.by_key) == ["b", "c"]  # "a", the least recently used, was dropped
    wait_for(lambda: len(rt.chat_sessions) == 2, 5.0, "the dropped key's session to be closed")

    def extended(k: str) -> list[dict[str, str]]:
        return reply_and(conversations[k], replies[k], "And?")

    b = _chat(client, extended("b"), "b")  # b is kept: its whole conversation is cached
    assert b.usage.prompt_tokens_details.cached_tokens == replies["b"].usage.total_tokens
    a = _chat(client, extended("a"), "a")  # a starts afresh (dropping c, now the least recent)
    assert a.usage.prompt_tokens_details.cached_tokens < replies["a"].usage.total_tokens
    assert list(registry.by_key) == ["b", "a"]
    wait_for(lambda: len(rt.chat_sessions) == 2, 5.0, "c's session to be closed")
    server.stop_thread()
    settle(rt)


def test_prompt_cache_key_sessions_expire_when_idle(make_runtime, start_server):
    rt = make_runtime()
    server = start_server(rt, session_timeout=0.3)
    _chat(client_for(server), [{"role": "user", "content": "Hello there."}], "short-lived")
    wait_for(lambda: not server.app.state.chat_sessions.by_key, 5.0, "the key to expire")
    wait_for(lambda: len(rt.chat_sessions) == 0, 5.0, "its session to be closed")
    settle(rt)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_disconnect_mid_turn_leaves_the_session_as_it_was(make_runtime, start_server, stream):
    rt = make_runtime(delay=0.02)
    server = start_server(rt)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        sid, token = create(http, system=SYSTEM)
        first = turn(server, sid, token, "First.", max_tokens=3)
        before = info(http, sid, token)
        body = {"content": "Long one.", "max_tokens": 150, "stream": stream, **GREEDY}
        sock = send(server, f"/v1/chat/sessions/{sid}/messages", body, {"X-Session-Token": token})
        if stream:
            read_events(sock, 3)  # decoding now
        else:
            wait_for(lambda: rt.stats()["contexts_live"] > 2, what="the turn to start")  # system prompt, session, turn
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        # the turn is aborted: only the session's own contexts are left, the session unchanged
        wait_for(lambda: rt.stats()["contexts_live"] == 2, 10.0, "the abandoned turn's context to go")
        assert info(http, sid, token) == before
        assert server.state.in_flight == 0
        after = turn(server, sid, token, "Second.", max_tokens=3)
        assert after.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens + 3
        delete(http, sid, token)
    settle(rt)


def test_server_stop_frees_the_sessions_it_holds(make_runtime, start_server):
    rt = make_runtime()
    server = start_server(rt)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        sid, token = create(http, system=SYSTEM)
        turn(server, sid, token, "Hi.", max_tokens=2)
    _chat(client_for(server), [{"role": "user", "content": "Keyed."}], "k")
    assert len(rt.chat_sessions) == 2
    server.stop_thread()
    assert len(rt.chat_sessions) == 0
    settle(rt)


def test_open_chat_sessions_are_capped_with_a_429_that_loses_nothing(make_runtime, start_server):
    with serving(make_runtime, start_server, max_chat_sessions=3) as (rt, server, registry, http):
        a, a_token = create(http, system=SYSTEM)
        before = turn(server, a, a_token, "Remember this.", max_tokens=3)
        # at most 2 of 5 concurrent creations fit beside `a`, however they interleave
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda _: http.post("/v1/chat/sessions", json={"system": SYSTEM}), range(5)))
        made = [r.json() for r in answers if r.status_code == 200]
        refused = [r for r in answers if r.status_code != 200]
        assert len(made) == 2 and len(refused) == 3
        for r in refused:
            error = assert_error(r, 429)
            assert error["type"] == "rate_limit_error" and "--max-chat-sessions 3" in error["message"]
        assert len(registry.by_id) == 3 and len(rt.chat_sessions) == 3  # a refusal made no session
        # the open sessions are untouched: `a` still holds its conversation
        after = turn(server, a, a_token, "And now?", max_tokens=3)
        assert after.usage.prompt_tokens_details.cached_tokens >= before.usage.total_tokens
        delete(http, made[0]["id"], made[0]["token"])  # room for one again
        b, b_token = create(http, system=SYSTEM)
        assert_error(http.post("/v1/chat/sessions", json={}), 429)
        rt.chat_sessions.remove_session(b)  # a session closed under the server no longer counts
        c, c_token = create(http)
        for sid, token in ((a, a_token), (made[1]["id"], made[1]["token"]), (c, c_token)):
            delete(http, sid, token)
    assert len(rt.chat_sessions) == 0
    settle(rt)


def test_chat_settings(tmp_path):
    settings = ServeSettings.from_env({"PARROT_CORE_CHAT_SAVE_DIR": str(tmp_path), "PARROT_CORE_MAX_PROMPT_CACHE_KEYS": "3"})
    assert settings.chat_save_dir == str(tmp_path) and settings.max_prompt_cache_keys == 3
    assert ServeSettings().chat_save_dir is None and ServeSettings().max_prompt_cache_keys == 64
    with pytest.raises(InvalidRequestError, match="chat_save_dir"):
        ServeSettings(chat_save_dir=str(tmp_path / "missing"))
    with pytest.raises(InvalidRequestError, match="max_prompt_cache_keys"):
        ServeSettings(max_prompt_cache_keys=-1)
    assert ServeSettings().max_chat_sessions == 1024
    assert ServeSettings.from_env({"PARROT_CORE_MAX_CHAT_SESSIONS": "0"}).max_chat_sessions == 0
    with pytest.raises(InvalidRequestError, match="max_chat_sessions"):
        ServeSettings(max_chat_sessions=-1)


def test_save_and_restore_in_the_server_directory(tiny_runtime, start_server, make_runtime, tmp_path):
    """`.../save` writes `<name>.safetensors` in `--chat-save-dir` (never a client path);
    `.../restore` makes a session (here: in another server) the saved conversation with its KV,
    keeping the session's id and token; the next turn equals the never-saved one and computes
    only the new tokens."""
    server = start_server(tiny_runtime, chat_save_dir=str(tmp_path))
    with httpx.Client(base_url=server.url, timeout=60) as http:
        sid, token = create(http, system=SYSTEM)
        turn(server, sid, token, "Say hello.", max_tokens=6)
        headers = {"X-Session-Token": token}
        for bad in ("../escape", "/etc/passwd", "", "a/b", ".hidden"):
            assert_error(http.post(f"/v1/chat/sessions/{sid}/save", json={"name": bad}, headers=headers), 400)
        saved = http.post(f"/v1/chat/sessions/{sid}/save", json={"name": "talk-1"}, headers=headers)
        assert saved.status_code == 200, saved.text
        assert saved.json()["tokens"] == info(http, sid, token)["context_length"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["talk-1.safetensors"]
        reference = turn(server, sid, token, "Again, please.", max_tokens=5)
        assert_error(http.post(f"/v1/chat/sessions/{sid}/save", json={"name": "x"}), 401)

    other_rt = make_runtime()
    other = start_server(other_rt, chat_save_dir=str(tmp_path))
    with httpx.Client(base_url=other.url, timeout=60) as http:
        sid2, token2 = create(http)
        headers = {"X-Session-Token": token2}
        assert_error(http.post(f"/v1/chat/sessions/{sid2}/restore", json={"name": "nope"}, headers=headers), 404, "name")
        (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
        assert_error(http.post(f"/v1/chat/sessions/{sid2}/restore", json={"name": "broken"}, headers=headers), 400)
        assert info(http, sid2, token2)["message_count"] == 0  # a bad file changed nothing
        restored = http.post(f"/v1/chat/sessions/{sid2}/restore", json={"name": "talk-1"}, headers=headers)
        assert restored.status_code == 200, restored.text
        state = restored.json()
        assert state["id"] == sid2 and [m["role"] for m in state["messages"]] == ["system", "user", "assistant"]
        computed = other_rt.stats()["prompt_tokens_computed"]
        again = turn(other, sid2, token2, "Again, please.", max_tokens=5)
        assert again.choices[0].message.content == reference.choices[0].message.content
        assert again.usage.prompt_tokens_details.cached_tokens == state["context_length"]  # nothing recomputed
        assert other_rt.stats()["prompt_tokens_computed"] - computed == again.usage.prompt_tokens - state["context_length"]
        delete(http, sid2, token2)


def test_save_and_restore_are_refused_without_a_save_directory(served):
    _, _, http = served
    sid, token = create(http, system=SYSTEM)
    headers = {"X-Session-Token": token}
    for route in ("save", "restore"):
        error = assert_error(http.post(f"/v1/chat/sessions/{sid}/{route}", json={"name": "a"}, headers=headers), 400)
        assert "--chat-save-dir" in error["message"]


def test_a_session_turn_returns_logprobs_in_the_chat_shape(served):
    rt, server, http = served
    sid, token = create(http, system=SYSTEM)
    out = turn(server, sid, token, "Say hello.", max_tokens=4, logprobs=True, top_logprobs=2)
    content = out.choices[0].message.content
    entries = out.choices[0].logprobs.content
    assert len(entries) == 4 and "".join(e.token for e in entries) == content
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    r = http.post(f"/v1/chat/sessions/{sid}/messages", json={"content": "x", "top_logprobs": 2}, headers={"X-Session-Token": token})
    assert_error(r, 400, "top_logprobs")
    delete(http, sid, token)
    settle(rt)
