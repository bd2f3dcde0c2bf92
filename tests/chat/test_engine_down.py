"""Chat sessions when the engine holding their KV goes down: the next turn recomputes the
conversation on an engine that is up (as a router sends a session elsewhere when its worker
dies), and the shared system prompt is made again there, so new sessions work too."""

from __future__ import annotations

import pytest
import torch

from parrot_core import Runtime
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine

SYSTEM = "You are a parrot that repeats things."
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture
def two_engines(tiny_chat_llama, real_model):
    """A runtime over two builtin engines sharing the tiny model, and its engines."""
    engines = [
        BuiltinEngine(tiny_chat_llama, real_model.tokenizer, EngineConfig(num_kv_blocks=256, dtype=torch.float64), "tiny")
        for _ in range(2)
    ]
    rt = Runtime(engines=engines)
    yield rt, engines
    rt.close()


def assert_only_live_engine_holds_nothing(rt: Runtime, live: BuiltinEngine) -> None:
    live.wait_idle()
    live.check_invariants()
    rt.check_invariants()  # the serve layer against the engines, the closed one included
    assert len(rt.contexts.contexts) == 0  # the serve layer forgot the dead engine's contexts too
    info = live.runtime_info()
    assert live.context_ids() == set() and info.num_blocks_used == 0, info


def test_a_turn_after_its_engine_closed_recomputes_the_conversation_elsewhere(two_engines, make_chat_runtime):
    rt, engines = two_engines
    reference = make_chat_runtime().chat(SYSTEM)  # one engine, never down: the expected replies
    expected = [reference.send(text, max_tokens=6, **GREEDY).text for text in ("Say hello.", "Say it again.")]
    reference.close()

    chat = rt.chat(SYSTEM)
    first = chat.send("Say hello.", max_tokens=6, **GREEDY)
    assert first.text == expected[0]
    dead_id = chat._state.own.engine_id
    dead = engines[rt.engine_ids.index(dead_id)]
    live = engines[1 - rt.engine_ids.index(dead_id)]
    dead.close()
    assert dead_id in rt.core.scheduler.down_engines()

    second = chat.send("Say it again.", max_tokens=6, **GREEDY)
    assert second.text == expected[1]  # the same reply, computed on the engine that is up
    assert chat._state.own.engine_id != dead_id and second.cached_tokens == 0
    assert [m["content"] for m in chat.messages[1:]] == ["Say hello.", expected[0], "Say it again.", expected[1]]
    third = chat.send("Once more.", max_tokens=4, **GREEDY)
    assert third.cached_tokens >= second.prompt_tokens  # the new engine keeps it cached from now on

    other = rt.chat(SYSTEM)  # the shared system prompt lived on the dead engine: made again
    assert other.send("Say hello.", max_tokens=6, **GREEDY).text == expected[0]
    root = other._state.root.context
    assert root.engine_id != dead_id and root is chat._state.root.context
    # pinned on the engine that holds it (rt.engine, the first engine, is the dead one here)
    assert dead is rt.engine and live.call(lambda: root.context_id in live._pinned)
    other.close()
    chat.close()
    assert_only_live_engine_holds_nothing(rt, live)
