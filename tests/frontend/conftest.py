from __future__ import annotations

import pytest
import torch

from parrot_core import Runtime
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine


def assert_no_leak(rt: Runtime) -> None:
    """With every handle freed: no context is live and every block is free or cached-free."""
    for engine in rt.core.engines.values():
        engine.wait_idle()
    rt.check_invariants()
    stats = rt.stats()
    assert stats["contexts_live"] == 0 and stats["engine_contexts"] == 0, stats
    assert stats["blocks_used"] == 0, stats


@pytest.fixture
def tiny_runtime(tiny_llama):
    """A Runtime over a tiny float64 Llama (token ids only: no tokenizer)."""
    engine = BuiltinEngine(tiny_llama(seed=0), None, EngineConfig(block_size=4, num_kv_blocks=64, dtype=torch.float64))
    rt = Runtime(engine=engine)
    yield rt
    assert not rt.closed, "the fixture closes the runtime, after its leak check"
    assert_no_leak(rt)
    rt.close()


@pytest.fixture(scope="session")
def real_runtime(real_model, real_llama):
    engine = BuiltinEngine(real_llama, real_model.tokenizer, EngineConfig(kv_cache_memory_gb=0.25), real_model.model_name)
    rt = Runtime(engine=engine)
    yield rt
    rt.close()


@pytest.fixture
def fresh_real_runtime(real_runtime):
    """The session's real-model runtime, checked for leaks after the test."""
    yield real_runtime
    assert_no_leak(real_runtime)
