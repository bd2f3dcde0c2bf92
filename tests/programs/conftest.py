from __future__ import annotations

import asyncio
import threading

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
        self.fills_open = threading.Event()  # cleared: fills wait (after being recorded) until it is set
        self.fills_open.set()

    async def fill(self, context_id, parent_context_id, token_ids):
        self.fills.append((context_id, parent_context_id, list(token_ids)))
        if not self.fills_open.is_set():
            await asyncio.to_thread(self.fills_open.wait, 60)
        if self.fail_fill_containing is not None and self.fail_fill_containing in token_ids:
            from parrot_core.errors import EngineError

            raise EngineError("injected fill failure")
        return await super().fill(context_id, parent_context_id, token_ids)

    def generate(self, context_id, parent_context_id, params, prompt_token_ids=()):
        self.generates.append((context_id, parent_context_id))
        return super().generate(context_id, parent_context_id, params, prompt_token_ids)


def check_program_runtime(rt: Runtime) -> None:
    """After a program: the rules hold and only pinned constant prefixes stay alive."""
    for engine in rt.core.engines.values():
        engine.wait_idle()
    rt.check_invariants()
    live = [c for c in rt.contexts.contexts.values() if not c.pinned]
    assert live == [], live


@pytest.fixture
def make_program_runtime(tiny_text_llama, real_model):
    """Runtimes over the tiny model whose `close()` first runs the invariant and leak checks
    (tests close them with `with rt:`); the teardown proves the checks ran for each one."""
    runtimes: list[Runtime] = []
    checked: list[Runtime] = []

    def make(num_engines: int = 1, num_kv_blocks: int = 256, **kwargs) -> Runtime:
        engines = [
            RecordingEngine(tiny_text_llama, real_model.tokenizer, EngineConfig(num_kv_blocks=num_kv_blocks), f"tiny-{i}")
            for i in range(num_engines)
        ]
        rt = Runtime(engines=engines, **kwargs)
        close = rt.close

        def checked_close() -> None:
            if not rt.closed:
                try:
                    check_program_runtime(rt)
                    checked.append(rt)
                finally:
                    close()

        rt.close = checked_close  # type: ignore[method-assign]
        runtimes.append(rt)
        return rt

    yield make
    for rt in runtimes:
        rt.close()
    assert checked == runtimes, "a runtime was closed without its checks"
