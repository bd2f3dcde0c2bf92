"""Runtime and the forkable context API on a tiny float64 Llama (token ids)."""

from __future__ import annotations

import random

import pytest

from parrot_core import Runtime
from parrot_core.errors import InvalidRequestError, RuntimeClosedError

GREEDY = dict(temperature=0.0, ignore_eos=True)


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 101) for _ in range(n)]


def test_generate_one_and_a_batch_in_order(tiny_runtime):
    rt = tiny_runtime
    one = rt.generate(ids(1, 9), max_tokens=6, **GREEDY)
    assert len(one.token_ids) == 6 and one.finish_reason == "length" and one.prompt_tokens == 9
    batch = rt.generate([ids(2, 7), ids(1, 9), ids(3, 5)], max_tokens=6, **GREEDY)
    assert [len(o.token_ids) for o in batch] == [6, 6, 6]
    assert batch[1].token_ids == one.token_ids  # same prompt, same greedy output, in order
    assert batch[1].cached_tokens == 8  # the earlier identical prompt's full blocks were reused


def test_fork_refcounts_describe_what_the_engine_holds(tiny_runtime):
    rt = tiny_runtime
    root = rt.new_context()
    root.fill(ids(4, 10))
    child = root.fork()
    assert root.context.ref_count == 2 and child.context.parent_context is root.context
    assert root.tokens_num == 10 and child.tokens_num == 0
    root.free()
    assert root.context.alive  # the child still needs it
    rt.check_invariants()  # the engine holds exactly the serve layer's contexts
    out = child.generate(max_tokens=5, **GREEDY)
    assert child.tokens_num == 5 and len(out.token_ids) == 5
    child.free()
    assert not root.context.alive and rt.stats()["contexts_live"] == 0


def test_a_fork_keeps_the_parent_as_it_was(tiny_runtime):
    rt = tiny_runtime
    head, tail = ids(5, 11), ids(6, 4)
    with rt.new_context() as root:
        root.fill(head)
        with root.fork() as child:
            root.fill(ids(7, 6))  # the parent grows after the fork
            child.fill(tail)
            forked = child.generate(max_tokens=8, **GREEDY)
    fresh = rt.generate(head + tail, max_tokens=8, **GREEDY)
    assert forked.token_ids == fresh.token_ids


def test_generation_joins_the_context(tiny_runtime):
    rt = tiny_runtime
    with rt.new_context() as ctx:
        ctx.fill(ids(8, 6))
        first = ctx.generate(max_tokens=4, **GREEDY)
        second = ctx.generate(max_tokens=3, **GREEDY)
        assert ctx.tokens_num == 6 + 4 + 3
    fresh = rt.generate(ids(8, 6) + first.token_ids, max_tokens=3, **GREEDY)
    assert second.token_ids == fresh.token_ids


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda rt: rt.generate([], max_tokens=2), "empty"),
        (lambda rt: rt.generate({"a": 1}, max_tokens=2), "prompt is a string"),
        (lambda rt: rt.generate([1, 2], max_tokens=0), "max_tokens"),
        (lambda rt: rt.generate([1, 2], max_tokens=2, temperature=-1), "temperature"),
        (lambda rt: rt.generate([1, 2], max_tokens=2, top_p=0), "top_p"),
        (lambda rt: rt.generate([1, 2], max_tokens=2, beam_width=3), "unknown sampling options"),
        (lambda rt: rt.generate([1, 2000], max_tokens=2), "token ids"),
        (lambda rt: rt.generate("text", max_tokens=2), "no tokenizer"),
        (lambda rt: rt.generate([1, 2], max_tokens=2, stop=["x"]), "stop strings need a tokenizer"),
    ],
)
def test_bad_input_is_a_typed_error_and_leaks_nothing(tiny_runtime, call, message):
    with pytest.raises(InvalidRequestError, match=message):
        call(tiny_runtime)
    # the runtime still works
    assert len(tiny_runtime.generate([1, 2, 3], max_tokens=2, **GREEDY).token_ids) == 2


def test_freeing_twice_is_a_typed_error(tiny_runtime):
    from parrot_core.errors import UnknownContextError

    ctx = tiny_runtime.new_context()
    ctx.free()
    with pytest.raises(UnknownContextError):
        ctx.free()


def test_close_is_idempotent_and_a_closed_runtime_refuses_work(tiny_llama):
    import torch

    from parrot_core.engines.builtin.config import EngineConfig
    from parrot_core.engines.builtin.engine import BuiltinEngine

    engine = BuiltinEngine(tiny_llama(seed=0), None, EngineConfig(block_size=4, num_kv_blocks=16, dtype=torch.float64))
    with Runtime(engine=engine) as rt:
        assert len(rt.generate([1, 2], max_tokens=1, **GREEDY).token_ids) == 1
    assert rt.closed
    rt.close()  # idempotent
    with pytest.raises(RuntimeClosedError):
        rt.generate([1, 2], max_tokens=1)
    with pytest.raises(RuntimeClosedError):
        rt.new_context()


def test_astream_from_another_loop_and_abort_frees_everything(tiny_runtime):
    import asyncio

    rt = tiny_runtime

    async def full():
        return [d async for d in rt.astream(ids(9, 6), max_tokens=5, **GREEDY)]

    deltas = asyncio.run(full())
    assert [t for d in deltas for t in d.token_ids] == rt.generate(ids(9, 6), max_tokens=5, **GREEDY).token_ids
    assert deltas[-1].finish_reason == "length" and deltas[0].prompt_tokens == 6

    async def early_stop():
        got = []
        stream = rt.astream(ids(10, 6), max_tokens=150, **GREEDY)
        async for d in stream:
            got.extend(d.token_ids)
            if len(got) >= 3:
                break
        await stream.aclose()
        return got

    assert len(asyncio.run(early_stop())) == 3
    # the fixture's leak check proves the aborted request's context and blocks came back


def test_out_of_range_seed_is_a_typed_error_not_a_hang(tiny_runtime):
    with pytest.raises(InvalidRequestError, match="seed"):
        tiny_runtime.generate([1, 2], max_tokens=2, temperature=1.0, seed=2**70)


def test_close_fails_every_pending_call_instead_of_hanging(tiny_llama):
    """Issue 9 defect 9: shutdown failed no queued work, so callers could wait forever."""
    import concurrent.futures
    import time

    import torch

    from parrot_core.engines.builtin.config import EngineConfig
    from parrot_core.engines.builtin.engine import BuiltinEngine

    engine = BuiltinEngine(tiny_llama(seed=0), None, EngineConfig(block_size=4, num_kv_blocks=64, max_num_seqs=1, dtype=torch.float64))
    rt = Runtime(engine=engine)
    pool = concurrent.futures.ThreadPoolExecutor(6)
    handle = rt.new_context()
    calls = [pool.submit(rt.generate, ids(i, 8), max_tokens=240, **GREEDY) for i in range(5)]
    calls.append(pool.submit(handle.fill, ids(9, 8)))
    time.sleep(0.1)  # one generation runs, the rest wait in the engine
    start = time.monotonic()
    rt.close()
    closed = 0
    for call in calls:
        try:
            call.result(timeout=30)  # finished before the close: fine
        except RuntimeClosedError:
            closed += 1
    assert closed >= 4
    assert time.monotonic() - start < 30
    with pytest.raises(RuntimeClosedError):
        rt.generate(ids(1, 4), max_tokens=2)
