"""The runtime lifecycle (issue 12, part 2; cyllama's context lifecycle): one KV pool reused
for the runtime's life, `flush_cache()`, `reset()`, idempotent `close()`, `with`, cleanup
when a runtime is dropped or the interpreter exits, and what a closed runtime does."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import parrot_core as P
from parrot_core import Runtime
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine
from parrot_core.errors import ParrotError, RuntimeClosedError, UnknownContextError
from tests.frontend.conftest import assert_no_leak

pytestmark = pytest.mark.timeout(180)
GREEDY = dict(temperature=0.0, ignore_eos=True)
REPO = Path(__file__).resolve().parents[2]


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 101) for _ in range(n)]


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


def assert_pool_whole(rt: Runtime) -> None:
    """No context anywhere, every block free and holding no cached prefix."""
    rt.engine.wait_idle()
    rt.check_invariants()
    stats = rt.stats()
    assert stats["contexts_live"] == 0 and stats["engine_contexts"] == 0, stats
    assert stats["blocks_free"] == stats["blocks_total"] and stats["blocks_cached"] == 0, stats


def test_a_freed_handle_leaves_nothing_in_the_engine(tiny_runtime):
    """Regression: `fill` on a freed handle raised, but only after the engine had created the
    context anew; that engine context leaked (the serve layer no longer knew it)."""
    h = tiny_runtime.new_context()
    h.fill(ids(1, 5))
    h.free()
    with pytest.raises(UnknownContextError):
        h.fill(ids(2, 3))
    # the fixture's leak check: no context in either layer, invariants hold


@pytest.fixture
def text_runtime(tiny_text_llama, real_model):
    """A tiny random Llama over the real vocabulary and tokenizer: programs run on it."""
    rt = Runtime(engine=BuiltinEngine(tiny_text_llama, real_model.tokenizer, EngineConfig(num_kv_blocks=128), "tiny-text"))
    yield rt
    assert not rt.closed, "the fixture closes the runtime, after its leak check"
    assert_no_leak(rt)
    rt.close()


@P.semantic_function()
def describe(topic: P.Input, text: P.Output(max_tokens=6, temperature=0.0, ignore_eos=True)):
    """You are a careful writer. Describe {{topic}} in one line: {{text}}"""


def test_reset_drops_every_context_session_and_prefix_and_the_runtime_works_after(text_runtime):
    rt = text_runtime
    pool_k = [t.data_ptr() for t in rt.engine.kv.k]
    first = describe.invoke(rt, "parrots").get(timeout=60)
    assert rt.contexts.constant_prefix_contexts  # the function's constant prefix is pinned
    other = OtherSession(rt)  # a program session of the core (as the server makes them)
    assert describe.invoke(other, "dogs").get(timeout=60)
    pending = describe.invoke(other, "cats")  # never fetched: its chain waits
    root = rt.new_context()
    root.fill("a shared document")
    child = root.fork()
    child.fill(" and a question")
    chats = [rt.chat(system="You are terse.", session_id=sid) for sid in ("a", "b")]
    chats[0].send("hello", max_tokens=2, **GREEDY)
    plain = rt.generate("some prompt", max_tokens=3, **GREEDY)
    assert rt.stats()["blocks_cached"] > 0 and rt.stats()["contexts_live"] > 0

    rt.reset()

    assert rt.chat_sessions.all_sessions() == [] and all(c.closed for c in chats)
    assert set(rt.core.sessions) == {"local"} and other.session.closed
    with pytest.raises(ParrotError, match="session was removed"):  # its pending output failed
        pending.get(timeout=10)
    assert not rt.contexts.constant_prefix_contexts and all(len(c) == 0 for c in rt.contexts.prefix_caches.values())
    assert_pool_whole(rt)
    assert [t.data_ptr() for t in rt.engine.kv.k] == pool_k  # the pool was reused, not reallocated
    for call in (lambda: child.fill("more"), lambda: child.generate(max_tokens=2), root.fork, child.free):
        with pytest.raises(UnknownContextError):
            call()
    with root:  # `with` over a handle that reset() dropped exits quietly
        pass

    # The runtime works as new: programs (the local session), plain calls, the context API,
    # with nothing cached any more and the same greedy outputs as before.
    computed = rt.stats()["prompt_tokens_computed"]
    again = describe.invoke(rt, "parrots").get(timeout=60)
    assert again == first and rt.stats()["prompt_tokens_computed"] > computed
    repeat = rt.generate("some prompt", max_tokens=3, **GREEDY)
    assert repeat.token_ids == plain.token_ids and repeat.cached_tokens == 0
    with rt.new_context() as h:
        h.fill("a shared document and a question")
        assert len(h.generate(max_tokens=2, **GREEDY).token_ids) == 2
    rt.chat(system="You are terse.").send("again", max_tokens=2, **GREEDY)  # chat works after a reset
    rt.reset()  # also drops the pin the second program call made
    assert_pool_whole(rt)


class OtherSession:
    """Submits semantic calls into another program session of the runtime's core."""

    def __init__(self, rt: Runtime) -> None:
        async def create():  # noqa: ANN202
            return rt.core.create_session()

        self.rt = rt
        self.session = rt._run(create())

    def submit_call(self, template, parameters, literals, metadata):  # noqa: ANN001, ANN201
        async def submit():  # noqa: ANN202
            return dict(self.session.submit_call(template, parameters, metadata, literals).outputs)

        return self.rt._run(submit())


def test_reset_aborts_work_in_flight(tiny_runtime):
    rt = tiny_runtime
    gate = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(rt.generate, ids(1, 8), max_tokens=200, **GREEDY)
        wait_until(lambda: rt.engine.stats["generation_tokens"] > 0)
        rt.engine._post(lambda: gate.wait(30))  # hold the engine thread: the generation cannot finish
        resetting = pool.submit(rt.reset)
        wait_until(lambda: not rt.contexts.contexts)  # reset() released it and waits for the engine
        gate.set()
        resetting.result(timeout=30)
        out = running.result(timeout=30)
    assert out.finish_reason == "abort" and len(out.token_ids) < 200
    assert_pool_whole(rt)
    assert len(rt.generate(ids(2, 5), max_tokens=4, **GREEDY).token_ids) == 4


def test_flush_cache_forgets_only_what_nothing_holds(tiny_runtime):
    rt = tiny_runtime
    prompt = ids(3, 13)
    first = rt.generate(prompt, max_tokens=4, **GREEDY)
    held = rt.new_context()
    held.fill(ids(4, 9))
    cached, used = rt.stats()["blocks_cached"], rt.stats()["blocks_used"]
    assert cached > 0
    assert rt.flush_cache() == cached
    stats = rt.stats()
    assert stats["blocks_cached"] == 0 and stats["blocks_used"] == used  # the held context keeps its KV
    again = rt.generate(prompt, max_tokens=4, **GREEDY)
    assert again.cached_tokens == 0 and again.token_ids == first.token_ids
    computed = rt.stats()["prompt_tokens_computed"]
    out = held.generate(max_tokens=3, **GREEDY)
    assert rt.stats()["prompt_tokens_computed"] == computed  # its KV was not touched
    assert out.token_ids == rt.generate(ids(4, 9), max_tokens=3, **GREEDY).token_ids
    held.free()
    rt.engine.wait_idle()
    cached = rt.stats()["blocks_cached"]
    assert cached > 0 and rt.flush_cache() == cached and rt.stats()["blocks_cached"] == 0


def test_a_closed_runtime_refuses_every_method_and_keeps_its_attributes(tiny_text_llama, real_model, tmp_path):
    engine = BuiltinEngine(tiny_text_llama, real_model.tokenizer, EngineConfig(num_kv_blocks=32), "tiny-text")
    with Runtime(engine=engine) as rt:
        handle = rt.new_context()
        handle.fill("kept")
        handle.save(tmp_path / "ctx.safetensors")
        assert_no_leak_except(rt, 1)
    assert rt.closed and engine.closed
    rt.close()  # idempotent
    rt.close()
    calls = {
        "generate": lambda: rt.generate("x", max_tokens=1),
        "generate ids": lambda: rt.generate([1, 2], max_tokens=1),
        "agenerate": lambda: asyncio.run(rt.agenerate([1, 2], max_tokens=1)),
        "astream": lambda: asyncio.run(_drain(rt.astream([1, 2], max_tokens=1))),
        "new_context": rt.new_context,
        "variable": lambda: rt.variable("v", "x"),
        "semantic call": lambda: describe.invoke(rt, "x"),
        "stats": rt.stats,
        "check_invariants": rt.check_invariants,
        "flush_cache": rt.flush_cache,
        "reset": rt.reset,
        "load_context": lambda: rt.load_context(tmp_path / "ctx.safetensors"),
        "save_context": lambda: rt.save_context(handle, tmp_path / "again.safetensors"),
        "with": lambda: rt.__enter__(),
        "handle.fill": lambda: handle.fill("x"),
        "handle.fork": handle.fork,
        "handle.generate": lambda: handle.generate(max_tokens=1),
        "handle.save": lambda: handle.save(tmp_path / "again.safetensors"),
        "handle.free": handle.free,
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeClosedError):
            call()
            pytest.fail(f"{name} worked on a closed runtime")
    assert not (tmp_path / "again.safetensors").exists()
    with handle:  # `with` over a handle of a closed runtime exits quietly
        pass
    assert rt.engine is engine and rt.contexts is rt.core.contexts and handle.tokens_num > 0
    # the tokenizer helpers hold no resource of the runtime: they keep working
    assert rt.detokenize(rt.tokenize("kept")) == "kept" and rt.tokenize_prompt("kept")
    assert engine.runtime_info().num_blocks_total == 32


def assert_no_leak_except(rt: Runtime, contexts: int) -> None:
    rt.engine.wait_idle()
    rt.check_invariants()
    assert rt.stats()["contexts_live"] == contexts


async def _drain(stream) -> list:
    return [d async for d in stream]


def test_a_dropped_runtime_is_closed_by_garbage_collection(tiny_llama):
    engine = BuiltinEngine(tiny_llama(seed=0), None, EngineConfig(block_size=4, num_kv_blocks=16, dtype=torch.float64))
    rt = Runtime(engine=engine)
    handle = rt.new_context()
    handle.fill(ids(5, 6))
    assert len(rt.generate(ids(6, 5), max_tokens=3, **GREEDY).token_ids) == 3
    loop_thread = rt._thread
    del rt
    gc.collect()
    assert not engine.closed  # the handle still holds the runtime
    del handle
    gc.collect()
    assert engine.closed and not loop_thread.is_alive()


def test_a_runtime_collected_on_its_own_loop_thread_is_closed_without_deadlock(tiny_llama):
    engine = BuiltinEngine(tiny_llama(seed=0), None, EngineConfig(block_size=4, num_kv_blocks=16, dtype=torch.float64))
    rt = Runtime(engine=engine)
    loop, loop_thread = rt._loop, rt._thread
    holder = [rt]
    del rt
    loop.call_soon_threadsafe(holder.clear)  # the last reference goes on the loop's own thread
    wait_until(lambda: engine.closed and not loop_thread.is_alive())
    assert loop.is_closed()


SCRIPT = """
import gc, threading, torch
from parrot_core import Runtime
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine

close = BuiltinEngine.close
def reporting_close(self):
    if not self.closed:
        print("engine closed", flush=True)
    close(self)
BuiltinEngine.close = reporting_close
from parrot_core.engines.builtin.model import LlamaConfig, LlamaModel
from tests.conftest import TINY_CONFIG

def make():
    model = LlamaModel.random(LlamaConfig(**TINY_CONFIG), seed=0)
    return Runtime(engine=BuiltinEngine(model, None, EngineConfig(block_size=4, num_kv_blocks=16, dtype=torch.float64)))

dropped = make()
dropped.generate([1, 2, 3], max_tokens=2)
engine = dropped.engine
del dropped
gc.collect()
assert engine.closed, "a runtime dropped mid-program is closed"

kept = make()                      # still open at exit, never closed
handle = kept.new_context()
handle.fill([4, 5, 6])
cycle = make()                     # in a reference cycle at exit
cycle.me = cycle
print("end of program", flush=True)
"""


def test_runtimes_left_open_are_released_quietly_at_interpreter_exit():
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # no traceback, no "Exception ignored in"
    # one closed mid-program by garbage collection, the other two at exit
    assert proc.stdout.split("\n") == ["engine closed", "end of program", "engine closed", "engine closed", ""], proc.stdout
