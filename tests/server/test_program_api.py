"""The program API over a real uvicorn server: a GET that waits on a variable stops waiting when
its client goes away (so its session can expire), a session the core expires loses its token,
and an output that can never fit the model's context is a 400 at submission."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any
from urllib.parse import quote

import httpx

from tests.server.conftest import TINY_MAX_LEN, wait_for


def new_session(http: httpx.Client) -> tuple[str, dict[str, str]]:
    r = http.post("/v1/session")
    assert r.status_code == 200, r.text
    body = r.json()
    return body["session_id"], {"X-Session-Token": body["session_auth"]}


def on_core(rt, coro) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, rt._loop).result(10)


def expire_after(rt, timeout: float) -> None:
    """What the runtime's periodic tick does, without waiting for the tick."""
    time.sleep(timeout * 1.2)
    on_core(rt, rt.core.expire())


def test_get_variable_stops_waiting_when_its_client_goes_away(make_runtime, start_server):
    rt = make_runtime(session_timeout=0.5)
    server = start_server(rt)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        sid, headers = new_session(http)
        r = http.post("/v1/semantic_var", json={"session_id": sid, "name": "never_set"}, headers=headers)
        var_id = r.json()["var_id"]
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    head = (
        f"GET /v1/semantic_var/{quote(var_id)}?session_id={sid} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"X-Session-Token: {headers['X-Session-Token']}\r\n\r\n"
    )
    sock.sendall(head.encode())
    session = rt.core.sessions[sid]
    wait_for(lambda: session.pending_gets == 1, what="the GET to wait on the variable")
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    wait_for(lambda: session.pending_gets == 0, 5.0, "the GET to stop waiting")
    assert not session.busy
    expire_after(rt, 0.5)
    assert sid not in rt.core.sessions  # so the idle session expired
    wait_for(lambda: sid not in server.app.state.program_sessions.tokens, 5.0, "the session's token to go")


def test_a_session_the_core_expires_loses_its_token(make_runtime, start_server):
    rt = make_runtime(session_timeout=0.3)
    server = start_server(rt)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        idle, idle_headers = new_session(http)
        kept, kept_headers = new_session(http)
        tokens = server.app.state.program_sessions.tokens
        assert {idle, kept} <= set(tokens)
        expire_after(rt, 0.3)
        assert idle not in rt.core.sessions and kept not in rt.core.sessions
        wait_for(lambda: idle not in tokens and kept not in tokens, 5.0, "the expired sessions' tokens to go")
        r = http.post("/v1/semantic_var", json={"session_id": idle, "name": "x"}, headers=idle_headers)
        assert r.status_code == 404 and r.json()["error"]["param"] == "session_id"
        assert http.delete(f"/v1/session/{kept}", headers=kept_headers).status_code == 404
        # a live session keeps its token, and DELETE still removes both
        live, live_headers = new_session(http)
        time.sleep(0.2)
        assert live in tokens
        assert http.delete(f"/v1/session/{live}", headers=live_headers).status_code == 200
        assert live not in tokens and live not in rt.core.sessions
    rt.check_invariants()


def test_semantic_call_output_that_cannot_fit_the_context_is_a_400(tiny_runtime, start_server):
    rt = tiny_runtime
    server = start_server(rt)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        sid, headers = new_session(http)

        def call(sampling: dict[str, Any]) -> httpx.Response:
            body = {
                "session_id": sid,
                "template": "Say something: {{out}}",
                "parameters": [{"name": "out", "is_output": True, "sampling_config": sampling}],
                "metadata": {"cache_prefix": False},  # no pinned prefix: the leak check wants no context left
            }
            return http.post("/v1/semantic_call", json=body, headers=headers)

        for max_tokens in (10**9, TINY_MAX_LEN):
            r = call({"max_tokens": max_tokens})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == "sampling_config"
            assert f"maximum context length is {TINY_MAX_LEN} tokens" in error["message"]
        r = call({"max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        out = r.json()["outputs"]["out"]
        r = http.get(f"/v1/semantic_var/{quote(out)}", params={"session_id": sid}, headers=headers)
        assert r.status_code == 200 and isinstance(r.json()["content"], str)
        assert http.delete(f"/v1/session/{sid}", headers=headers).status_code == 200
