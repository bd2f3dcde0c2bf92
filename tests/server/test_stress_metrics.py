"""`benchmarks/stress.py` reads the KV state from a real server's /metrics: with the per-engine
label every engine metric carries, the figures are summed over the engines (the label once
made every read fail with a KeyError, and the stress tool with it)."""

from __future__ import annotations

import asyncio

import httpx

from benchmarks import stress
from parrot_core import Runtime
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine
from tests.server.conftest import settle


def test_kv_state_sums_the_engines_of_a_real_server(tiny_text_llama, real_model, start_server):
    engines = [BuiltinEngine(tiny_text_llama, real_model.tokenizer, EngineConfig(block_size=16, num_kv_blocks=n), "tiny") for n in (32, 48)]
    rt = Runtime(engines=engines)
    try:
        server = start_server(rt)

        async def read() -> stress.KVState:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                return await stress.kv_state(http)

        state = asyncio.run(read())
        assert state.blocks_total == 32 + 48
        assert state.blocks_used == 0 and state.contexts_live == 0 and state.running == 0
        server.stop_thread()
        settle(rt)
    finally:
        rt.close()
