from __future__ import annotations

import pytest

from parrot_core import Runtime
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine


class RecordingEngine(BuiltinEngine):
    """A builtin engine that records the primitives it receives (and can be told to fail)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fills: list[tuple[int, int | None, list[int]]] = []
        self.generates: list[tuple[int, int | None]] = []
        self.fail_fill_containing: int | None = None

    async def fill(self, context_id, parent_context_id, token_ids):
        self.fills.append((context_id, parent_context_id, list(token_ids)))
        if self.fail_fill_containing is not None and self.fail_fill_containing in token_ids:
            from parrot_core.errors import EngineError

            raise EngineError("injected fill failure")
        return await super().fill(context_id, parent_context_id, token_ids)

    def generate(self, context_id, parent_context_id, params):
        self.generates.append((context_id, parent_context_id))
        return super().generate(context_id, parent_context_id, params)


@pytest.fixture
def make_program_runtime(tiny_text_llama, real_model):
    runtimes: list[Runtime] = []

    def make(num_engines: int = 1, **kwargs) -> Runtime:
        engines = [
            RecordingEngine(tiny_text_llama, real_model.tokenizer, EngineConfig(num_kv_blocks=256), f"tiny-{i}")
            for i in range(num_engines)
        ]
        rt = Runtime(engines=engines, **kwargs)
        runtimes.append(rt)
        return rt

    yield make
    for rt in runtimes:
        if rt.closed:
            continue
        # after every program: the rules hold and only pinned constant prefixes stay alive
        rt.check_invariants()
        live = [c for c in rt.contexts.contexts.values() if not c.pinned]
        assert live == [], live
        rt.close()
