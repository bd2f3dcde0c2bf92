"""Fixtures of the switching tests: runtimes over a tiny float64 Llama (token ids), over a
tiny Llama with the real tokenizer (text and stop strings), and over the real model; each is
checked for leaks after its test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from parrot_core import Runtime
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine
from tests.server.conftest import SlowModel


def assert_no_leak(rt: Runtime) -> None:
    """Nothing suspended, no context live, every block free or cached-free, invariants hold."""
    rt.engine.wait_idle()
    rt.check_invariants()
    assert rt.suspended() == []
    stats = rt.stats()
    assert stats["contexts_live"] == 0 and stats["engine_contexts"] == 0, stats
    assert stats["blocks_used"] == 0, stats


@pytest.fixture
def make_tiny(tiny_llama) -> Iterator[Callable[..., Runtime]]:
    """Factory: `make_tiny(delay=0.0, runtime_options={}, **engine_config)` -> a Runtime over
    a tiny float64 Llama (vocab 101, no tokenizer; 64 blocks of 4 unless told otherwise)."""
    made: list[Runtime] = []

    def make(delay: float = 0.0, runtime_options: dict[str, Any] | None = None, **overrides: Any) -> Runtime:
        config = {"block_size": 4, "num_kv_blocks": 64, "dtype": torch.float64, **overrides}
        model = tiny_llama(seed=0)
        engine = BuiltinEngine(SlowModel(model, delay) if delay else model, None, EngineConfig(**config))  # type: ignore[arg-type]
        rt = Runtime(engine=engine, **(runtime_options or {}))
        made.append(rt)
        return rt

    yield make
    try:
        for rt in made:
            assert_no_leak(rt)
    finally:
        for rt in made:
            rt.close()


@pytest.fixture
def text_runtime(real_model, tiny_text_llama) -> Iterator[Runtime]:
    """A tiny random Llama with the real tokenizer: real text, fast generation."""
    config = EngineConfig(block_size=16, num_kv_blocks=128, max_model_len=1024)
    rt = Runtime(engine=BuiltinEngine(tiny_text_llama, real_model.tokenizer, config, "tiny"))
    yield rt
    try:
        assert_no_leak(rt)
    finally:
        rt.close()


@pytest.fixture(scope="module")
def real_rt(real_model, real_llama) -> Iterator[Runtime]:
    engine = BuiltinEngine(real_llama, real_model.tokenizer, EngineConfig(kv_cache_memory_gb=0.1), real_model.model_name)
    rt = Runtime(engine=engine)
    yield rt
    rt.close()


@pytest.fixture
def real_runtime(real_rt: Runtime) -> Iterator[Runtime]:
    """The module's real-model runtime, checked for leaks after the test."""
    yield real_rt
    assert_no_leak(real_rt)
