"""One large or slow request cannot stall the server: request bodies over
`max_request_body_bytes` are a 413 in OpenAI's shape (without reading a body whose
Content-Length is already too big), and tokenization, chat templates and detokenization run
off the event loop, so `/health` answers while they work."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from parrot_core.server.settings import ServeSettings
from tests.server.conftest import settle, wait_for

LIMIT = 4096


def assert_413(r: httpx.Response) -> None:
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large"
    assert str(LIMIT) in error["message"]


def test_a_body_declared_too_big_is_refused_before_it_is_read(tiny_runtime, start_server):
    server = start_server(tiny_runtime, max_request_body_bytes=LIMIT)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
    sock.sendall(head.encode() + b'{"prompt": "')  # the rest never comes: the answer must not wait for it
    response = b""
    while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        response += chunk
    sock.close()
    status_line, _, rest = response.partition(b"\r\n")
    assert status_line.split()[1] == b"413", response
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "request_too_large" and str(LIMIT) in body["error"]["message"]
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/health").status_code == 200


def test_bodies_over_the_limit_are_413_and_under_it_are_served(tiny_runtime, start_server):
    server = start_server(tiny_runtime, max_request_body_bytes=LIMIT)
    big = json.dumps({"prompt": "word " * LIMIT, "max_tokens": 2}).encode()
    small = json.dumps({"prompt": "Hello", "max_tokens": 2}).encode()

    def chunked(data: bytes) -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    with httpx.Client(base_url=server.url, timeout=10, headers={"content-type": "application/json"}) as http:
        for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/v1/session"):
            assert_413(http.post(path, content=big))
            assert_413(http.post(path, content=chunked(big)))
        r = http.post("/v1/completions", content=chunked(small))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        r = http.post("/v1/completions", content=small)
        assert r.status_code == 200
        assert http.get("/health").status_code == 200
    settle(tiny_runtime)


def test_the_default_limit_refuses_a_10_mb_prompt_at_once(tiny_runtime, start_server):
    assert ServeSettings().max_request_body_bytes < 10_000_000
    server = start_server(tiny_runtime)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        t0 = time.monotonic()
        r = http.post("/v1/completions", json={"prompt": "x" * 10_000_000, "max_tokens": 1})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert time.monotonic() - t0 < 5
        assert http.get("/health").status_code == 200


GATED = [
    ("tokenize_prompt", "/v1/completions", {"prompt": "Hello there", "max_tokens": 2}),
    ("apply_chat_template", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    ("tokenize", "/tokenize", {"prompt": "Hello there"}),
    ("apply_chat_template", "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("detokenize", "/detokenize", {"tokens": [1, 2, 3]}),
]


@pytest.mark.parametrize(("method", "path", "body"), GATED, ids=[f"{p}-{m}" for m, p, _ in GATED])
def test_health_answers_while_a_request_is_tokenized(tiny_runtime, start_server, monkeypatch, method, path, body):
    """The tokenizer call is held until /health has answered: if it ran on the event loop,
    /health could not answer (and this test would time out on it)."""
    rt = tiny_runtime
    server = start_server(rt)
    entered, release = threading.Event(), threading.Event()
    real: Callable[..., Any] = getattr(rt, method)

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert release.wait(30), "never released"
        return real(*args, **kwargs)

    monkeypatch.setattr(rt, method, held)
    result: dict[str, httpx.Response] = {}
    worker = threading.Thread(target=lambda: result.update(r=httpx.post(server.url + path, json=body, timeout=60)))
    worker.start()
    try:
        assert entered.wait(10), f"{method} was never called"
        with httpx.Client(base_url=server.url, timeout=5) as http:
            t0 = time.monotonic()
            assert http.get("/health").status_code == 200
            assert time.monotonic() - t0 < 2
            assert http.get("/v1/models").status_code == 200
        assert "r" not in result  # still held
    finally:
        release.set()
        worker.join(30)
    assert result["r"].status_code == 200, result["r"].text
    wait_for(lambda: server.state.in_flight == 0, what="the request to finish")
    settle(rt)
