"""Fixtures of the server tests: runtimes over a tiny random Llama with the real tokenizer
(text works, generation is fast), a real uvicorn server on a free port, and leak checks."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from parrot_core import Runtime
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine
from parrot_core.engines.builtin.model import LlamaModel
from parrot_core.server.app import create_app
from parrot_core.server.server import Server
from parrot_core.server.settings import ServeSettings

TINY_MAX_LEN = 256


class SlowModel:
    """A model whose forward sleeps `delay` seconds first: makes queued / prefilling /
    decoding states last long enough to disconnect in them."""

    def __init__(self, model: LlamaModel, delay: float) -> None:
        self._model = model
        self.delay = delay
        self.config = model.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.delay)
        return self._model.forward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def settle(rt: Runtime, timeout: float = 10.0) -> dict[str, float]:
    """Wait until no context is live and every block is free or cached-free; check invariants."""
    state: dict[str, Any] = {}

    def clean() -> bool:
        state["stats"] = rt.stats()
        s = state["stats"]
        return s["contexts_live"] == 0 and s["engine_contexts"] == 0 and s["blocks_used"] == 0

    try:
        wait_for(clean, timeout, "every block to come back")
    except AssertionError:
        raise AssertionError(f"KV leaked: {state['stats']}") from None
    rt.engine.wait_idle()
    rt.check_invariants()
    return state["stats"]


@pytest.fixture
def make_runtime(real_model, tiny_text_llama) -> Iterator[Callable[..., Runtime]]:
    """Factory: `make_runtime(delay=0.0, session_timeout=None, **engine_config)` -> a Runtime
    over the tiny model (max_model_len 256, 128 blocks of 16). Every runtime is checked for
    leaks, then closed."""
    made: list[Runtime] = []

    def make(delay: float = 0.0, session_timeout: float | None = None, **overrides: Any) -> Runtime:
        config = dict(block_size=16, num_kv_blocks=128, max_model_len=TINY_MAX_LEN, max_num_seqs=8, max_num_batched_tokens=256)
        model = SlowModel(tiny_text_llama, delay) if delay else tiny_text_llama
        engine = BuiltinEngine(model, real_model.tokenizer, EngineConfig(**{**config, **overrides}), "tiny")  # type: ignore[arg-type]
        rt = Runtime(engine=engine, session_timeout=session_timeout)
        made.append(rt)
        return rt

    yield make
    try:
        for rt in made:
            assert not rt.closed, "the fixture closes its runtimes, after the leak check"
            settle(rt)
    finally:
        for rt in made:
            rt.close()


@pytest.fixture
def tiny_runtime(make_runtime) -> Runtime:
    return make_runtime()


@pytest.fixture
def start_server() -> Iterator[Callable[..., Server]]:
    """Factory: `start_server(runtime, **settings)` -> a running uvicorn `Server` on a free port."""
    servers: list[Server] = []

    def start(runtime: Runtime, **settings: Any) -> Server:
        s = ServeSettings(port=0, log_stats_interval=0, **settings)
        server = Server(create_app(runtime, s), s, log_level="warning").start_in_thread()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop_thread()


def client_for(server: Server, timeout: float = 120) -> openai.OpenAI:
    """The real `openai` client against `server` (no retries: every error is seen)."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


@pytest.fixture
def real_served(real_model: Any, real_llama: Any, start_server: Callable[..., Server]) -> Iterator[Callable[..., tuple[Runtime, Server, openai.OpenAI]]]:
    """Factory: `real_served(**engine_config)` -> (runtime, server, client) on the real default
    model, served as "real". Each runtime is closed at teardown (the test settles it itself)."""
    runtimes: list[Runtime] = []

    def make(**config: Any) -> tuple[Runtime, Server, openai.OpenAI]:
        rt = Runtime(engine=BuiltinEngine(real_llama, real_model.tokenizer, EngineConfig(**config), "real"))
        runtimes.append(rt)
        server = start_server(rt)
        return rt, server, client_for(server)

    yield make
    for rt in runtimes:
        rt.close()


@pytest.fixture
def served(tiny_runtime: Runtime, start_server: Callable[..., Server]) -> tuple[Runtime, Server, openai.OpenAI]:
    """The tiny runtime behind a running server, and a client for it."""
    server = start_server(tiny_runtime)
    return tiny_runtime, server, client_for(server)
