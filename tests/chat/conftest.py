"""Fixtures for chat sessions: runtimes whose leak check runs before they close."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from parrot_core import ChatSession, Runtime
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine
from parrot_core.engines.builtin.model import LlamaConfig, LlamaModel
from parrot_core.errors import EngineError
from tests.conftest import TINY_CONFIG
from tests.frontend.conftest import assert_no_leak

SYSTEM = "You are a terse assistant. Answer in a few words."
END_OF_TURN = "<|im_end|>\n"  # what SmolLM2's template puts after every message


class ProbeEngine(BuiltinEngine):
    """A builtin engine that counts the generates in flight (they all start on the runtime's
    loop, so plain counters are safe) and can hold, gate or fail them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_flight = 0
        self.max_in_flight = 0
        self.started = 0
        self.barrier = 0  # > 0: each generate waits until this many have started
        self.hold_s = 0.0  # each fill and generate waits this long first (widens races)
        self.fail_next_generate = False

    async def fill(self, context_id, parent_context_id, token_ids):  # noqa: ANN001, ANN201
        if self.hold_s and token_ids:
            await asyncio.sleep(self.hold_s)
        return await super().fill(context_id, parent_context_id, token_ids)

    async def generate(self, context_id, parent_context_id, params, prompt_token_ids=()):  # noqa: ANN001, ANN201
        self.in_flight += 1
        self.started += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.fail_next_generate:
                self.fail_next_generate = False
                raise EngineError("injected generate failure")
            deadline = time.monotonic() + 20
            while self.started < self.barrier:
                if time.monotonic() > deadline:
                    raise EngineError(f"only {self.started} of {self.barrier} generates ever ran at once")
                await asyncio.sleep(0.002)
            if self.hold_s:
                await asyncio.sleep(self.hold_s)
            async for delta in super().generate(context_id, parent_context_id, params, prompt_token_ids):
                yield delta
        finally:
            self.in_flight -= 1


@pytest.fixture(scope="session")
def tiny_chat_llama(real_model) -> LlamaModel:
    """A tiny random float64 Llama over the real vocabulary (exact comparisons, fast turns)."""
    config = LlamaConfig(**{**TINY_CONFIG, "vocab_size": real_model.config.vocab_size, "max_position_embeddings": 1024})
    return LlamaModel.random(config, seed=0, dtype=torch.float64)


@pytest.fixture
def make_chat_runtime(tiny_chat_llama, real_model) -> Iterator[Callable[..., Runtime]]:
    """Runtimes over the tiny model with the real tokenizer (SmolLM2's chat template). At
    teardown each one that the test left open (`checked`) must pass the invariant and leak
    checks (every session closed, no context live, no block used) before it is closed."""
    made: list[tuple[Runtime, bool]] = []

    def make(*, checked: bool = True, tokenizer: Any = None, **config: Any) -> Runtime:
        engine = ProbeEngine(
            tiny_chat_llama, tokenizer or real_model.tokenizer, EngineConfig(**{"num_kv_blocks": 256, "dtype": torch.float64, **config}), "tiny"
        )
        rt = Runtime(engine=engine)
        made.append((rt, checked))
        return rt

    yield make
    failures = []
    for rt, checked in made:
        try:
            if checked:
                assert not rt.closed, "a checked runtime must be left open: the teardown checks it, then closes it"
                assert_no_leak(rt)
        except AssertionError as e:
            failures.append(e)
        finally:
            rt.close()
    assert not failures, failures


@pytest.fixture
def chat_rt(make_chat_runtime) -> Runtime:
    return make_chat_runtime()


@pytest.fixture
def scratch_rt(make_chat_runtime) -> Runtime:
    """Same tiny model, prefix caching off: replays computed from scratch."""
    return make_chat_runtime(enable_prefix_caching=False)


def engine_tokens(rt: Runtime, session: ChatSession) -> list[int]:
    """The token ids the engine's context of `session` holds."""
    state = session._state
    ctx = state.own or state.root.context
    return rt.engine.call(lambda: list(rt.engine.tree.get(ctx.context_id).token_ids))


def assert_tokens_are_the_conversation(rt: Runtime, session: ChatSession) -> None:
    """The session's context holds exactly the rendered conversation (SmolLM2's template),
    up to the end-of-turn marker of the last reply, which the next turn adds."""
    text = rt.apply_chat_template(session.messages, add_generation_prompt=False)
    assert text.endswith(END_OF_TURN)
    assert engine_tokens(rt, session) == session.token_ids
    assert rt.engine.tokenizer.decode(session.token_ids, skip_special_tokens=False) == text[: -len(END_OF_TURN)]


def computed(rt: Runtime) -> int:
    return rt.engine.runtime_info().prompt_tokens_computed
