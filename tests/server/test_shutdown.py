"""Shutdown drains: new requests get 503 at once, requests in flight finish within the grace
period, the rest are aborted, and every stream ends properly (an error event, then
`data: [DONE]`). In-process through `Server.begin_shutdown()`, and for real: `parrot-core
serve` in a subprocess receiving SIGTERM exits 0 with every client stream terminated."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.conftest import settle, wait_for

REPO = Path(__file__).resolve().parents[2]


class Stream(threading.Thread):
    """A streamed completion read in the background: `events` are the `data:` payloads; `error`
    is what reading raised (e.g. the connection closed without the chunk terminator)."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.events: list[str] = []
        self.status: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=120) as http, http.stream("POST", self.url, json=self.body) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line.removeprefix("data: "))
        except BaseException as e:  # noqa: BLE001 - checked by the test
            self.error = e

    def ended_with_done(self) -> bool:
        return self.error is None and self.status == 200 and bool(self.events) and self.events[-1] == "[DONE]"

    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.events if e != "[DONE]"]


def completion(max_tokens: int, stream: bool = True, prompt: str = "Tell me a long story") -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def assert_shutting_down(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["type"] == "service_unavailable" and "shutting down" in error["message"]


def assert_refuses_new_work(url: str) -> None:
    with httpx.Client(base_url=url, timeout=10) as http:
        assert_shutting_down(http.get("/health"))
        assert_shutting_down(http.post("/v1/completions", json=completion(2, stream=False)))
        assert_shutting_down(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True}))


def test_in_flight_streams_finish_within_the_grace_period(make_runtime, start_server):
    rt = make_runtime(delay=0.02)
    server = start_server(rt, shutdown_grace_seconds=60)
    streams = [Stream(server.url + "/v1/completions", completion(30, prompt=f"story {i}")) for i in range(2)]
    for s in streams:
        s.start()
    wait_for(lambda: all(len(s.events) >= 2 for s in streams), 30, "the streams to start")
    server.begin_shutdown()
    assert_refuses_new_work(server.url)
    for s in streams:
        s.join(60)
        assert s.ended_with_done(), (s.error, s.events[-3:])
        payloads = s.payloads()
        assert all("error" not in p for p in payloads)
        assert payloads[-1]["usage"]["completion_tokens"] == 30
        assert payloads[-2]["choices"][0]["finish_reason"] == "length"
    server._thread.join(15)
    assert not server._thread.is_alive()
    settle(rt)


def test_what_outlives_the_grace_period_is_aborted_and_every_stream_ends(make_runtime, start_server):
    rt = make_runtime(delay=0.02)
    server = start_server(rt, shutdown_grace_seconds=0.5)
    url = server.url
    streams = [Stream(url + "/v1/completions", completion(200, prompt=f"long {i}")) for i in range(3)]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "ignore_eos": True, "stream": True}
    streams.append(Stream(url + "/v1/chat/completions", chat))
    plain: dict[str, httpx.Response] = {}
    plain_thread = threading.Thread(target=lambda: plain.update(r=httpx.post(url + "/v1/completions", json=completion(200, stream=False), timeout=120)))
    for s in streams:
        s.start()
    plain_thread.start()
    wait_for(lambda: all(len(s.events) >= 2 for s in streams) and server.state.in_flight == 5, 30, "every request to run")
    t0 = time.monotonic()
    server.begin_shutdown()
    assert_refuses_new_work(url)
    for s in streams:
        s.join(30)
        assert s.ended_with_done(), (s.error, s.events[-3:])
        error = json.loads(s.events[-2])["error"]
        assert error["type"] == "service_unavailable" and "grace period" in error["message"]
        assert all("error" not in p for p in s.payloads()[:-1])
    plain_thread.join(30)
    assert_shutting_down(plain["r"])
    assert 0.5 <= time.monotonic() - t0 < 10
    server._thread.join(15)
    assert not server._thread.is_alive()
    assert server.state.in_flight == 0
    assert rt.stats()["generation_tokens"] < 5 * 200
    settle(rt)


def test_a_second_shutdown_request_ends_the_grace_period(make_runtime, start_server):
    rt = make_runtime(delay=0.02)
    server = start_server(rt, shutdown_grace_seconds=600)
    stream = Stream(server.url + "/v1/completions", completion(200))
    stream.start()
    wait_for(lambda: len(stream.events) >= 2, 30, "the stream to start")
    server.begin_shutdown()
    assert_refuses_new_work(server.url)
    assert stream.is_alive()  # the grace period goes on
    t0 = time.monotonic()
    server.begin_shutdown()  # like a second SIGTERM or Ctrl-C
    stream.join(15)
    assert stream.ended_with_done() and "grace period" in json.loads(stream.events[-2])["error"]["message"]
    assert time.monotonic() - t0 < 5
    server._thread.join(15)
    assert not server._thread.is_alive()
    settle(rt)


def test_shutdown_with_nothing_in_flight_is_immediate(tiny_runtime, start_server):
    server = start_server(tiny_runtime, shutdown_grace_seconds=60)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.post("/v1/completions", json=completion(2, stream=False)).status_code == 200
    t0 = time.monotonic()
    server.begin_shutdown()
    server._thread.join(15)
    assert not server._thread.is_alive() and time.monotonic() - t0 < 5
    settle(tiny_runtime)


@pytest.mark.real_model
def test_sigterm_drains_the_real_server_and_exits_0():
    """The real command on the default model: 8 streams in flight, SIGTERM, a short grace."""
    cmd = [
        sys.executable, "-m", "parrot_core.cli", "serve", "--port", "0", "--max-num-seqs", "8", "--num-kv-blocks", "320",
        "--max-model-len", "512", "--log-stats-interval", "0", "--shutdown-grace-seconds", "3",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        port: list[int] = []

        def bound() -> bool:
            found = [m for line in list(lines) if (m := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line))]
            port.extend(int(m.group(1)) for m in found[:1])
            return bool(port) or proc.poll() is not None

        wait_for(bound, 60, "the server to bind")
        assert port, "".join(lines)
        url = f"http://127.0.0.1:{port[0]}"

        def loaded() -> bool:
            time.sleep(0.1)  # the model loads on the same few cores: do not hammer it
            return httpx.get(url + "/health", timeout=5).status_code == 200

        wait_for(loaded, 120, "the model to load")
        streams = [Stream(url + "/v1/completions", completion(480, prompt=f"Story number {i}:")) for i in range(8)]
        for s in streams:
            s.start()
        wait_for(lambda: all(len(s.events) >= 2 for s in streams), 120, "all 8 streams to be generating")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(url + "/health", timeout=5).status_code == 503, 3, "/health to say it is shutting down")
        assert_shutting_down(httpx.post(url + "/v1/completions", json=completion(2, stream=False), timeout=10))
        for s in streams:
            s.join(60)
        assert proc.wait(60) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    reader.join(10)
    log = "".join(lines)
    for s in streams:
        assert s.ended_with_done(), (s.error, s.events[-3:], log[-3000:])
        error = json.loads(s.events[-2])["error"]
        assert error["type"] == "service_unavailable" and "grace period" in error["message"]
    assert "timeout graceful shutdown exceeded" not in log
    assert "aborted 8 request(s)" in log, log[-3000:]
