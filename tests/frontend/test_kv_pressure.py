"""KV as a cache of tokens: requests that fit the pool alone always run, whatever else is held,
and give the same greedy ids as on a roomy pool (design.md 3.3b, issue 9)."""

from __future__ import annotations

import random

import pytest
import torch

from parrot_core import Runtime
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine
from tests.frontend.conftest import assert_no_leak

GREEDY = dict(temperature=0.0, ignore_eos=True)


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 101) for _ in range(n)]


@pytest.fixture
def make_runtime(tiny_llama):
    runtimes: list[Runtime] = []

    def make(num_kv_blocks: int, block_size: int = 16, **config) -> Runtime:
        model = tiny_llama(seed=0, max_position_embeddings=512)
        cfg = EngineConfig(block_size=block_size, num_kv_blocks=num_kv_blocks, dtype=torch.float64, **config)
        rt = Runtime(engine=BuiltinEngine(model, None, cfg))
        runtimes.append(rt)
        return rt

    yield make
    for rt in runtimes:
        assert_no_leak(rt)
        rt.close()


def test_twelve_requests_that_fit_alone_all_finish_on_a_pool_that_holds_four(make_runtime):
    # The repro: 12 x (100 prompt + 40 output) tokens, 9 blocks each, on 40 blocks of 16.
    prompts = [ids(100 + i, 100) for i in range(12)]
    roomy = make_runtime(num_kv_blocks=512).generate(prompts, max_tokens=40, **GREEDY)
    tight_rt = make_runtime(num_kv_blocks=40)
    tight = tight_rt.generate(prompts, max_tokens=40, **GREEDY)
    assert [o.finish_reason for o in tight] == ["length"] * 12
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]


@pytest.mark.parametrize("caching", [True, False])
def test_pressure_with_a_shared_prefix_and_forks_is_exact(make_runtime, caching):
    system = ids(7, 48)
    prompts = [system + ids(200 + i, 20) for i in range(10)]

    def run(rt: Runtime) -> tuple[list[list[int]], list[list[int]]]:
        outs = rt.generate(prompts, max_tokens=24, **GREEDY)
        with rt.new_context() as root:
            root.fill(system)
            forks = [root.fork() for _ in range(3)]
            for i, f in enumerate(forks):
                f.fill(ids(300 + i, 12))
            gens = [f.generate(max_tokens=20, **GREEDY).token_ids for f in forks]
            for f in forks:
                f.free()
        return [o.token_ids for o in outs], gens

    roomy = run(make_runtime(num_kv_blocks=512, enable_prefix_caching=caching))
    tight = run(make_runtime(num_kv_blocks=12, enable_prefix_caching=caching))
    assert tight == roomy


def test_held_contexts_are_evicted_for_a_large_request_and_recomputed_exactly(make_runtime):
    def run(rt: Runtime) -> tuple[list[list[int]], list[int]]:
        held = []
        for i in range(4):  # 4 x 40 tokens = 12 blocks of 4, held by the caller
            h = rt.new_context()
            h.fill(ids(400 + i, 40))
            held.append(h)
        big = rt.generate(ids(500, 60), max_tokens=30, **GREEDY)  # 23 blocks: needs the held ones' room
        gens = [h.generate(max_tokens=10, **GREEDY).token_ids for h in held]
        for h in held:
            h.free()
        return gens, big.token_ids

    roomy = run(make_runtime(num_kv_blocks=512, block_size=4))
    tight_rt = make_runtime(num_kv_blocks=24, block_size=4)
    tight = run(tight_rt)
    assert tight == roomy
    assert tight_rt.stats()["prompt_tokens_computed"] > 4 * 40 + 60  # the held contexts really were recomputed
