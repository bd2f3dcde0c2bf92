"""Engine fixtures: `make_engine` builds engines over the tiny seeded float64 Llama (no
tokenizer: token ids) and, at teardown, frees what is left and runs the leak check."""

from __future__ import annotations

import pytest
import torch

from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine
from parrot_core.engines.builtin.model import LlamaModel


@pytest.fixture
def model(tiny_llama) -> LlamaModel:
    """The tiny model `make_engine`'s engines run (seed 0, float64)."""
    return tiny_llama(seed=0)


@pytest.fixture
def make_engine(model):
    engines: list[BuiltinEngine] = []

    def make(**config) -> BuiltinEngine:
        config = {"block_size": 4, "num_kv_blocks": 64, "dtype": torch.float64, **config}
        engine = BuiltinEngine(model, None, EngineConfig(**config))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:  # leak check: with every context freed, every block is free or cached
        for cid in engine.call(lambda e=engine: [c.context_id for c in e.tree.contexts()]):
            engine.free_context(cid)
        engine.wait_idle()
        engine.check_invariants()
        info = engine.runtime_info()
        assert info.num_blocks_used == 0 and info.num_contexts == 0
        engine.close()
