"""Semantic-function programs end to end on tiny random models (real tokenizer)."""

from __future__ import annotations

import time

import pytest

import parrot_core as P
from parrot_core.errors import EngineError, TemplateError

from .functions import OUT, review, write_code, write_tests

pytestmark = pytest.mark.timeout(120)


def _contains(haystack: list[int], needle: list[int]) -> bool:
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


def test_new_contexts_of_a_call_are_filled_in_one_engine_call_and_stay_shareable(make_program_runtime):
    rt = make_program_runtime()

    @P.semantic_function(criteria="latency")  # both calls run at once, sharing what they can
    def ask(doc: P.Input, question: P.Input, answer: OUT):
        """Document: {{doc}} Question: {{question}} Answer: {{answer}}"""

    with rt:
        doc = P.variable("doc", "Parrot shares prompt prefixes between calls.")
        first, second = ask(doc, "What is shared?"), ask(doc, "Between what?")
        first.get(timeout=60), second.get(timeout=60)
    fills = rt.engine.fills
    assert len(fills) == 2  # five new contexts in the first call, one forward pass; two in the second
    head = rt.tokenize("Document: ") + rt.tokenize("Parrot shares prompt prefixes between calls.") + rt.tokenize(" Question: ")
    tails = {tuple(f[2][len(head) :]) if f[2][: len(head)] == head else tuple(f[2]) for f in fills}
    q1, q2 = (rt.tokenize(q) + rt.tokenize(" Answer: ") for q in ("What is shared?", "Between what?"))
    assert tails == {tuple(q1), tuple(q2)}  # one call filled the shared head, the other forked it
    assert rt.contexts.cache_hits_total == 3  # "Document: ", the document and " Question: "
    assert sum(f[2][: len(head)] == head for f in fills) == 1


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def test_a_dag_of_three_functions_flows_on_the_server_side(make_program_runtime):
    rt = make_program_runtime()
    with rt:
        task = P.variable("task", "a snake game")
        code = write_code(task)
        tests = write_tests(task, code)
        verdict = review(tests)
        assert not code.done and not tests.done  # calls return at once; nothing runs unfetched
        text = verdict.get(P.LATENCY, timeout=60)
        assert isinstance(text, str) and code.done and tests.done
        engine = rt.engine
        # the downstream call was filled with the upstream output's tokens, never sent back to us
        code_tokens = rt.tokenize(code.get())
        assert any(_contains(f[2], code_tokens) for f in engine.fills)
        chains = [v.producer.chain for v in (code, tests, verdict)]
        assert [c.depth for c in chains] == [1, 2, 3]
        assert rt.session.graph.requests == {}  # finished requests leave the graph
        assert all(c.criteria is P.LATENCY for c in chains)


def test_a_constant_system_prompt_is_filled_once_across_calls_and_sessions(make_program_runtime):
    rt = make_program_runtime()

    @P.semantic_function()
    def ask(question: P.Input, answer: OUT):
        """You are the help desk of a library with a very long and detailed policy document. Question: {{question}} Answer: {{answer}}"""

    system = "You are the help desk of a library with a very long and detailed policy document. Question: "
    sys_tokens = rt.tokenize(system)
    with rt:
        first = [ask(f"question {i}?") for i in range(3)]
        assert all(isinstance(a.get(timeout=60), str) for a in first)
        # a second session (another program) with the same system prompt
        import asyncio

        other = asyncio.run_coroutine_threadsafe(_new_session(rt), rt._loop).result()
        second = [ask.invoke(_SessionRuntime(rt, other), f"other {i}?") for i in range(3)]
        assert all(isinstance(a.get(timeout=60), str) for a in second)
    fills_of_system = [f for f in rt.engine.fills if f[2][: len(sys_tokens)] == sys_tokens]
    assert len(fills_of_system) == 1  # six calls, two sessions: the prefix was computed once
    assert rt.contexts.cache_hits_total >= 5


async def _new_session(rt):
    return rt.core.create_session()


class _SessionRuntime:
    """Submits to another session of the same core (what a second client program does)."""

    def __init__(self, rt, session):
        self.rt, self.session = rt, session

    def submit_call(self, template, parameters, literals, metadata):
        async def go():
            return dict(self.session.submit_call(template, parameters, metadata, literals).outputs)

        return self.rt._run(go())


def test_multi_output_continues_from_the_previous_output(make_program_runtime):
    rt = make_program_runtime()

    @P.semantic_function()
    def two(topic: P.Input, first: OUT, second: OUT):
        """Topic: {{topic}}. One: {{first}} Two: {{second}}"""

    with rt:
        a, b = two("cats")
        b.get(timeout=60)  # fetching the second output runs the first one too
        assert a.done and b.done
    engine = rt.engine
    gen_a = engine.generates[0][0]
    # the text " Two: " was filled into a context forked from output a's context
    two_tokens = rt.tokenize(" Two: ")
    fill_two = next(f for f in engine.fills if f[2] == two_tokens)
    assert fill_two[1] == gen_a
    assert engine.generates[1][1] == fill_two[0]


def test_an_engine_failure_fails_the_output_and_everything_downstream(make_program_runtime):
    rt = make_program_runtime()
    poison = rt.tokenize(" poison")[0]
    rt.engine.fail_fill_containing = poison
    with rt:
        bad = write_code("a poison pill")
        downstream = review(bad)
        with pytest.raises(EngineError, match="injected"):
            downstream.get(timeout=30)  # raises instead of hanging
        with pytest.raises(EngineError):
            bad.get(timeout=5)
        # the session and the runtime keep working
        rt.engine.fail_fill_containing = None
        ok = review(write_code("a calculator"))
        assert isinstance(ok.get(timeout=60), str)
        assert len(rt.generate("hello", max_tokens=3, temperature=0.0, ignore_eos=True).token_ids) == 3


def test_native_function_runs_in_process_as_a_dag_node(make_program_runtime):
    rt = make_program_runtime()

    @P.native_function()
    def shout(text: P.Input, loud: P.Output):
        loud.set(text.get().upper() + "!")

    @P.native_function()
    def broken(text: P.Input, out: P.Output):
        raise ValueError("native failure")

    with rt:
        code = write_code("a clock")
        loud = shout(code)
        verdict = review(loud)
        verdict.get(timeout=60)
        assert loud.get() == code.get().upper() + "!"
        assert rt.session.graph.natives == []  # a finished native node leaves the graph
        with pytest.raises(ValueError, match="native failure"):
            review(broken("x")).get(timeout=30)


def test_criteria_at_submission_runs_without_a_fetch(make_program_runtime):
    rt = make_program_runtime()

    @P.semantic_function(criteria="latency")
    def eager(x: P.Input, y: OUT):
        """Eager {{x}} -> {{y}}"""

    with rt:
        y = eager("go")
        wait_until(lambda: y.done, timeout=60)
        assert y.is_ready


def test_python_values_are_rendered_into_the_template(make_program_runtime):
    rt = make_program_runtime()

    @P.semantic_function()
    def count(n, item: P.Input, out: OUT):
        """List {{n}} kinds of {{item}}: {{out}}"""

    with rt:
        out = count(3, "fruit")
        out.get(timeout=60)
    first_fill = rt.engine.fills[0][2]
    prefix = rt.tokenize("List 3 kinds of ")
    assert first_fill[: len(prefix)] == prefix


@pytest.mark.parametrize(
    "doc, message",
    [
        ("In {{x}}. Say {{out}}{{out2}}", "directly follows"),
        ("In {{x}} {{missing}} {{out}} {{out2}}", "has no parameter"),
        ("In {{x}}: {{out}} and {{out}} then {{out2}}", "used twice"),
        ("In {{x}}: {{out}} and {{out2}} trailing", "after its last output"),
        ("In {{x}}: no outputs here", "not used"),
    ],
)
def test_malformed_templates_fail_at_decoration_time(doc, message):
    def f(x: P.Input, out: P.Output, out2: P.Output):
        pass

    f.__doc__ = doc
    with pytest.raises(TemplateError, match=message):
        P.semantic_function()(f)


def test_a_function_without_docstring_or_outputs_is_rejected():
    def nodoc(x: P.Input, out: P.Output):
        pass

    with pytest.raises(TemplateError, match="docstring"):
        P.semantic_function()(nodoc)

    def no_out(x: P.Input):
        pass

    with pytest.raises(TemplateError, match="no P.Output"):
        P.native_function()(no_out)


def test_several_engines_each_run_work_and_continuations_stay_put(make_program_runtime):
    rt = make_program_runtime(num_engines=2)

    @P.semantic_function(criteria="latency")
    def step(x: P.Input, a: OUT, b: OUT):
        """Item {{x}}: first {{a}} then {{b}}"""

    with rt:
        pairs = [step(f"item {i}") for i in range(8)]
        for a, b in pairs:
            b.get(timeout=60)
    used = [e for e in rt.core.engines.values() if e.generates]
    assert len(used) == 2  # eight latency calls do not fit one engine under the cap of 4
    for engine in rt.core.engines.values():
        gen_ids = {g[0] for g in engine.generates}
        # every continuation's first fill forks a generation context of the SAME engine
        for cid, parent, tokens in engine.fills:
            if tokens == rt.tokenize(" then "):
                assert parent in gen_ids


def test_removing_a_session_fails_pending_outputs_and_frees_its_contexts(make_program_runtime):
    import asyncio

    rt = make_program_runtime()
    with rt:
        session = asyncio.run_coroutine_threadsafe(_new_session(rt), rt._loop).result()
        proxy = _SessionRuntime(rt, session)
        never = write_code.invoke(proxy, "never fetched")
        done = write_code.invoke(proxy, "fetched")
        done.get(timeout=60)
        asyncio.run_coroutine_threadsafe(rt.core.remove_session(session.session_id), rt._loop).result()
        with pytest.raises(P.errors.ParrotError, match="session was removed"):
            never.get(timeout=5)
        owned = [c for c in rt.contexts.contexts.values() if c.session_id == session.session_id]
        assert owned == []


def test_idle_sessions_expire_but_never_with_a_pending_get(tiny_text_llama, real_model):
    import asyncio

    from parrot_core.engines.builtin.config import EngineConfig
    from parrot_core.serve.core import ServeCore

    from .conftest import RecordingEngine

    now = [0.0]
    engine = RecordingEngine(tiny_text_llama, real_model.tokenizer, EngineConfig(num_kv_blocks=64), "tiny")
    core = ServeCore({"e": engine}, session_timeout=100.0, constant_prefix_timeout=50.0, clock=lambda: now[0])

    async def main():
        core.bind_loop(asyncio.get_running_loop())
        idle, waiting, fresh = core.create_session(), core.create_session(), core.create_session()
        waiting.pending_gets = 1  # a client is blocked in GET /v1/semantic_var
        now[0] = 90.0
        fresh.touch()
        now[0] = 150.0
        assert await core.expire() == [idle.session_id]
        assert set(core.sessions) == {waiting.session_id, fresh.session_id}
        waiting.pending_gets = 0
        now[0] = 300.0
        assert sorted(await core.expire()) == sorted([waiting.session_id, fresh.session_id])
        assert core.contexts.holder_count() == 0

    try:
        asyncio.run(main())
    finally:
        engine.close()
