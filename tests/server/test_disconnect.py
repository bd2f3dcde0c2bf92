"""A client that goes away aborts its request and its KV blocks come back: while queued,
while prefilling and while decoding, streaming and not. Also the 429 queue bound.

The model sleeps in every forward (`SlowModel`) so each state lasts long enough to disconnect
in; `max_num_seqs=1` makes "queued" deterministic behind one long request. Requests go over
raw sockets so that a disconnect is exactly a closed TCP connection."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import pytest

from tests.server.conftest import settle, wait_for


def send(server, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> socket.socket:
    """POST `body` on a raw socket (so the test can drop the connection at any point)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}Content-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock


def read_events(sock: socket.socket, count: int) -> bytes:
    """Read until `count` SSE `data:` events arrived."""
    buf = b""
    while buf.count(b"data: ") < count:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed early: {buf!r}"
        buf += chunk
    return buf


def hang_up(sock: socket.socket) -> None:
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def info(rt):
    return rt.engine.runtime_info()


def body(prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "stream": stream, "ignore_eos": True, "temperature": 0}


@pytest.fixture
def slow(make_runtime, start_server):
    rt = make_runtime(delay=0.02, max_num_seqs=1, max_num_batched_tokens=16)
    return rt, start_server(rt, max_waiting_requests=4)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_disconnect_while_queued(slow, stream):
    rt, server = slow
    running = send(server, "/v1/completions", body("the long one", 200, True))
    read_events(running, 2)  # decoding now, and it holds the only slot
    queued = send(server, "/v1/completions", body("the queued one", 8, stream))
    wait_for(lambda: info(rt).num_waiting == 1, what="the second request to queue")
    assert rt.stats()["contexts_live"] == 2
    hang_up(queued)
    # well before the first request could finish (200 tokens at >= 20 ms each)
    wait_for(lambda: info(rt).num_waiting == 0 and rt.stats()["contexts_live"] == 1, 2.0, "the queued request to go")
    assert info(rt).num_running == 1 and rt.stats()["generation_tokens"] < 150
    read_events(running, 6)  # the first one goes on
    hang_up(running)
    settle(rt)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_disconnect_while_prefilling(slow, stream):
    rt, server = slow
    rt.engine.model.delay = 0.08
    prompt = " ".join(f"w{i}" for i in range(50)) + (" streaming" if stream else " plain")
    prompt_len = len(rt.tokenize(prompt))
    assert 100 < prompt_len < 200  # 16-token chunks: 7+ steps of 80 ms
    before = rt.stats()
    sock = send(server, "/v1/completions", body(prompt, 8, stream))
    wait_for(lambda: info(rt).num_running == 1, what="the prefill to start")
    hang_up(sock)
    after = settle(rt)
    computed = after["prompt_tokens_computed"] - before["prompt_tokens_computed"]
    assert 0 < computed < prompt_len, (computed, prompt_len)  # stopped part-way through the prompt
    assert after["generation_tokens"] == before["generation_tokens"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_disconnect_while_decoding(slow, stream):
    rt, server = slow
    before = rt.stats()["generation_tokens"]
    sock = send(server, "/v1/completions", body("decode a lot", 200, stream))
    if stream:
        read_events(sock, 3)
    else:
        wait_for(lambda: rt.stats()["generation_tokens"] - before >= 3, what="decoding to start")
    hang_up(sock)
    produced = settle(rt)["generation_tokens"] - before
    assert 3 <= produced < 150, produced
    assert rt.stats()["generation_tokens"] - before == produced  # and it stays stopped


def test_chat_stream_disconnect_frees_blocks(slow):
    rt, server = slow
    sock = send(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": True, "ignore_eos": True})
    read_events(sock, 3)
    hang_up(sock)
    settle(rt)


def test_429_when_the_queue_bound_is_reached(make_runtime, start_server):
    rt = make_runtime(delay=0.02, max_num_seqs=1)
    server = start_server(rt, max_waiting_requests=1)
    running = send(server, "/v1/completions", body("first", 200, True))
    read_events(running, 2)
    queued = send(server, "/v1/completions", body("second", 4, False))
    wait_for(lambda: info(rt).num_waiting == 1, what="the second request to queue")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        r = http.post("/v1/completions", json=body("third", 4, False))
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["message"]
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "stream": True})
        assert r.status_code == 429
        hang_up(running)
        hang_up(queued)
        settle(rt)
        rt.engine.model.delay = 0.0
        r = http.post("/v1/completions", json=body("after", 4, False))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert server.state.in_flight == 0
