"""Several engines under one Runtime (issue 11 part 3): placement by prefix affinity, then
load; a broken or departed engine fails only its own work and new work goes elsewhere. Two
real builtin engines over the same tiny model, real threads."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import pytest
import torch

import parrot_core as P
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine
from parrot_core.errors import EngineError, EngineUnavailableError
from parrot_core.serve.scheduler import FAILURES_TO_DOWN

from .conftest import assert_no_leak

GREEDY = dict(temperature=0.0, ignore_eos=True)
CONFIG = dict(block_size=4, num_kv_blocks=128, dtype=torch.float64)


class BrokenModel:
    """A model whose every forward raises: an engine that fails all its work."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.config = model.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the accelerator fell off the bus")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def engine(model: Any) -> BuiltinEngine:
    return BuiltinEngine(model, None, EngineConfig(**CONFIG))


def prompt(seed: int, n: int, prefix: list[int] | None = None) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return (prefix or []) + torch.randint(1, 100, (n,), generator=g).tolist()


def concurrently(fn: Any, items: list[Any]) -> list[Any]:
    """`fn` over `items` from as many threads, results in order."""
    with concurrent.futures.ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


def per_engine(rt: P.Runtime, field: str) -> dict[str, int]:
    return {eid: getattr(s["info"], field) for eid, s in rt.engine_stats().items()}


@pytest.fixture
def reference(tiny_llama):
    rt = P.Runtime(engine=engine(tiny_llama(seed=0)))
    yield lambda ids, n=6: rt.generate(ids, max_tokens=n, **GREEDY).token_ids
    rt.close()


def test_engine_ids_and_names(tiny_llama):
    with P.Runtime(engines=[engine(tiny_llama(seed=0)), engine(tiny_llama(seed=0))]) as rt:
        assert rt.engine_ids == ["builtin-0", "builtin-1"] and rt.engine_id == "builtin-0"
        assert rt.engine is rt.core.engines["builtin-0"]
    e = engine(tiny_llama(seed=0))
    with pytest.raises(P.errors.InvalidRequestError, match="twice"):
        P.Runtime(engines=[e, e])
    e.close()


def test_plain_requests_sharing_a_prefix_land_on_the_engine_that_ran_it(tiny_llama, reference):
    rt = P.Runtime(engines=[engine(tiny_llama(seed=0)), engine(tiny_llama(seed=0))])
    try:
        shared = prompt(1, 128)  # two whole affinity chunks
        first = rt.generate(shared + [7], max_tokens=4, **GREEDY)
        assert first.token_ids == reference(shared + [7], 4)
        ran = per_engine(rt, "prompt_tokens_computed")
        holder = max(ran, key=ran.get)
        other = next(e for e in ran if e != holder)
        assert ran[other] == 0
        followers = [shared + prompt(10 + i, 5) for i in range(6)]
        outs = concurrently(lambda ids: rt.generate(ids, max_tokens=4, **GREEDY), followers)
        assert [o.token_ids for o in outs] == [reference(ids, 4) for ids in followers]
        assert per_engine(rt, "prompt_tokens_computed")[other] == 0  # all of them went to the holder
        assert all(o.cached_tokens >= 124 for o in outs)  # and found the prefix in its cache
        # unrelated concurrent work spreads over both engines by load
        strangers = [prompt(100 + i, 40) for i in range(6)]
        outs = concurrently(lambda ids: rt.generate(ids, max_tokens=8, **GREEDY), strangers)
        assert [o.token_ids for o in outs] == [reference(ids, 8) for ids in strangers]
        assert per_engine(rt, "prompt_tokens_computed")[other] > 0
        assert_no_leak(rt)
    finally:
        rt.close()


def test_a_broken_engine_fails_only_its_own_calls_and_new_work_goes_to_the_other(tiny_llama, reference):
    rt = P.Runtime(engines=[engine(tiny_llama(seed=0)), engine(BrokenModel(tiny_llama(seed=0)))])
    try:
        prompts = [prompt(200 + i, 12) for i in range(8)]

        def call(ids: list[int]) -> Any:
            try:
                return rt.generate(ids, max_tokens=5, **GREEDY)
            except EngineError as e:
                return e

        first_wave = concurrently(call, prompts)
        failed = [r for r in first_wave if isinstance(r, EngineError)]
        assert 0 < len(failed) < len(prompts)  # load spread some onto the broken engine
        assert all("engine step failed" in str(e) for e in failed)
        for ids, r in zip(prompts, first_wave):
            if not isinstance(r, EngineError):
                assert r.token_ids == reference(ids, 5)  # the healthy engine's work is untouched
        # whatever the first wave left, a few more failures take the engine down
        for i in range(FAILURES_TO_DOWN):
            if "builtin-1" in rt.core.scheduler.down_engines():
                break
            call(prompt(300 + i, 12))
        assert "builtin-1" in rt.core.scheduler.down_engines()
        second_wave = concurrently(call, prompts)
        assert [r.token_ids for r in second_wave] == [reference(ids, 5) for ids in prompts]
        assert rt.engine_stats()["builtin-1"]["down"]
        assert_no_leak(rt)
    finally:
        rt.close()


def test_an_engine_that_goes_away_fails_the_contexts_it_held_and_new_work_goes_elsewhere(tiny_llama, reference):
    e0, e1 = engine(tiny_llama(seed=0)), engine(tiny_llama(seed=0))
    rt = P.Runtime(engines=[e0, e1])
    try:
        handles = [rt.new_context() for _ in range(2)]  # least loaded: one on each engine
        assert {h.context.engine_id for h in handles} == {"builtin-0", "builtin-1"}
        on_e1 = next(h for h in handles if h.context.engine_id == "builtin-1")
        on_e0 = next(h for h in handles if h.context.engine_id == "builtin-0")
        e1.close()  # the engine went away
        with pytest.raises(EngineUnavailableError, match="builtin-1"):
            on_e1.fill(prompt(1, 8))
        on_e0.fill(prompt(1, 8))
        assert on_e0.generate(max_tokens=4, **GREEDY).token_ids == reference(prompt(1, 8), 4)
        ids = [prompt(400 + i, 10) for i in range(4)]
        assert [rt.generate(p, max_tokens=3, **GREEDY).token_ids for p in ids] == [reference(p, 3) for p in ids]
        fresh = rt.new_context()
        assert fresh.context.engine_id == "builtin-0"
        for handle in (fresh, on_e0, on_e1):
            handle.free()
        rt.check_invariants()  # the closed engine is skipped; the other agrees with the serve layer
        assert rt.stats()["contexts_live"] == 0 and e0.runtime_info().num_contexts == 0
    finally:
        rt.close()


def test_an_unreachable_remote_engine_is_taken_out_and_work_goes_to_the_builtin_one(tiny_llama, reference):
    import socket

    with socket.socket() as s:  # a port nothing listens on: the server went away
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote = P.OpenAIEngine(f"http://127.0.0.1:{port}/v1", "model", max_model_len=256)
    rt = P.Runtime(engines=[engine(tiny_llama(seed=0)), remote])
    try:
        assert rt.engine_ids == ["builtin-0", "openai-0"]
        results = []
        for i in range(6):
            ids = prompt(500 + i, 10)
            try:
                results.append(rt.generate(ids, max_tokens=3, **GREEDY).token_ids == reference(ids, 3))
            except EngineUnavailableError as e:
                assert str(port) in str(e)
                results.append("unavailable")
        assert results.count("unavailable") == 1  # the first call placed there; then it is down
        assert all(r is True for r in results if r != "unavailable")
        assert "openai-0" in rt.core.scheduler.down_engines()
        rt.check_invariants()
        assert rt.stats()["contexts_live"] == 0 and remote.context_ids() == set()
        builtin = rt.core.engines["builtin-0"]
        builtin.wait_idle()
        assert builtin.runtime_info().num_blocks_used == 0 and builtin.context_ids() == set()
    finally:
        rt.close()
