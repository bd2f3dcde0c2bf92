"""Text-based switching (issue 13 part 3): suspendable generations on an `OpenAIEngine` against
parrot-core's own OpenAI-compatible server, started in the test over a tiny seeded float64
Llama with the real vocabulary. A suspension closes the upstream stream and keeps the text
handed out; a resume sends the prompt plus that text. For greedy decoding the slices together
are the uninterrupted generation. No mocks."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

import pytest

from parrot_core import Runtime, SlicedOutput
from parrot_core.errors import InvalidRequestError, UnknownGenerationError
from tests.engines.test_openai_engine import GREEDY, SYSTEM, make_builtin, make_client_runtime, served, tiny64  # noqa: F401 - fixtures
from tests.server.conftest import start_server, wait_for  # noqa: F401 - start_server is a fixture

pytestmark = pytest.mark.timeout(180)

PROMPT = SYSTEM + " Where are the maps? Answer:"
MAX = 30


@pytest.fixture
def remote(served, make_client_runtime) -> tuple[Runtime, Runtime]:
    """(a Runtime over an OpenAIEngine, the builtin runtime its server serves)."""
    served_rt, server = served()
    return make_client_runtime(server), served_rt


def computed(rt: Runtime) -> int:
    rt.engine.wait_idle()
    return rt.stats()["prompt_tokens_computed"]


def run_sliced(rt: Runtime, served_rt: Runtime, max_tokens: int, pid: str = "p", **sampling: Any) -> list[SlicedOutput]:
    """Generate in slices of 5 tokens to the end. Greedy, each resume's `recomputed_tokens` is
    what the server computed again (its prompt tokens less its cache's, less the pending
    token); a slice cut by a stop string closed its stream before the server's usage came: a
    bound. (Sampled text need not tokenize back to its ids; the engine counts its own.)"""
    parts = [rt.generate(PROMPT, max_tokens=max_tokens, token_quantum=5, pid=pid, **sampling)]
    while not parts[-1].finished:
        assert parts[-1].finish_reason == "suspended" and parts[-1].pid == pid
        assert [(s.pid, s.tokens, s.resident) for s in rt.suspended()] == [(pid, parts[-1].output_tokens, False)]
        before = computed(served_rt)
        parts.append(rt.resume(pid, token_quantum=5))
        again = computed(served_rt) - before - 1
        if sampling.get("temperature") != 0:
            continue
        if parts[-1].finish_reason == "stop":
            assert parts[-1].recomputed_tokens >= again
        else:
            assert parts[-1].recomputed_tokens == again
    return parts


def test_greedy_output_of_this_prompt_tokenizes_back_to_its_ids(make_builtin, real_model):
    # The premise of exact text resumes: the server re-tokenizes prompt + text at every cut.
    tok = real_model.tokenizer
    ids = make_builtin().generate(PROMPT, max_tokens=40, **GREEDY).token_ids
    assert len(ids) == 40
    for k in range(1, 41):
        assert tok.encode_prompt(PROMPT + tok.decode(ids[:k])) == tok.encode_prompt(PROMPT) + ids[:k], k


def test_suspended_every_5_tokens_equals_uninterrupted(remote, make_builtin):
    rt, served_rt = remote
    in_process = make_builtin().generate(PROMPT, max_tokens=MAX, **GREEDY)
    full = rt.generate(PROMPT, max_tokens=MAX, **GREEDY)
    assert full.text == in_process.text and full.token_ids == in_process.token_ids
    parts = run_sliced(rt, served_rt, MAX, **GREEDY)
    assert "".join(p.text for p in parts) == full.text
    assert [t for p in parts for t in p.token_ids] == full.token_ids
    assert [len(p.token_ids) for p in parts] == [5] * 6 and parts[-1].finish_reason == "length"
    assert [p.output_tokens for p in parts] == [5, 10, 15, 20, 25, 30]
    # the server's prefix cache held the context's full blocks: a resume computes only the rest
    assert all(0 <= p.recomputed_tokens < 16 for p in parts[1:])
    assert rt.suspended() == [] and rt.engine.context_ids() == set()


def test_the_budget_carries_over(remote):
    rt, _ = remote
    full = rt.generate(PROMPT, max_tokens=12, **GREEDY)
    first = rt.generate(PROMPT, max_tokens=12, token_quantum=5, pid="b", **GREEDY)
    assert (first.finish_reason, len(first.token_ids)) == ("suspended", 5)
    rest = rt.resume("b", token_quantum=100)  # a quantum past the budget: the budget wins
    assert (rest.finish_reason, len(rest.token_ids), rest.output_tokens) == ("length", 7, 12)
    assert first.text + rest.text == full.text
    with pytest.raises(UnknownGenerationError):
        rt.resume("b")  # finished: gone


def test_a_time_limit_suspension_closes_the_stream_and_resumes_exactly(served, make_client_runtime):
    served_rt, server = served(delay=0.02)  # 20 ms a step: the slice is cut mid-stream
    rt = make_client_runtime(server)
    full = rt.generate(PROMPT, max_tokens=MAX, **GREEDY)
    info = served_rt.engine.runtime_info
    wait_for(lambda: info().num_running == 0)
    before = info().generation_tokens
    parts = [rt.generate(PROMPT, max_tokens=MAX, time_limit=0.15, pid="t", **GREEDY)]
    assert parts[0].finish_reason == "suspended" and 0 < len(parts[0].token_ids) < MAX
    # the upstream stream was closed: the server aborted the request well before its budget
    wait_for(lambda: info().num_running == 0 and info().num_waiting == 0, what="the server to abort the slice")
    assert info().generation_tokens - before < MAX
    while not parts[-1].finished:
        parts.append(rt.resume("t", time_limit=0.15))
    assert len(parts) >= 3 and all(p.token_ids for p in parts)
    assert "".join(p.text for p in parts) == full.text
    assert [t for p in parts for t in p.token_ids] == full.token_ids
    assert parts[-1].finish_reason == "length" and parts[-1].output_tokens == MAX


def test_a_stop_string_across_a_suspension_point_stops_it(remote):
    rt, served_rt = remote
    full = rt.generate(PROMPT, max_tokens=MAX, **GREEDY)
    at = len(rt.detokenize(full.token_ids[:10]))  # the second suspension point
    stop = full.text[at - 2 : at + 2]
    assert len(stop) == 4 and full.text.find(stop) == at - 2
    expected = rt.generate(PROMPT, max_tokens=MAX, stop=[stop], **GREEDY)  # cut by the server
    assert expected.finish_reason == "stop" and expected.text == full.text[: at - 2]
    parts = run_sliced(rt, served_rt, MAX, stop=[stop], **GREEDY)
    assert len(parts) == 3 and parts[-1].finish_reason == "stop"
    assert "".join(p.text for p in parts) == expected.text
    assert not parts[1].text.endswith(stop[:2]), "the stop string's start must be held back at the suspension"


def test_min_tokens_and_unseeded_sampling_carry_over(remote):
    rt, served_rt = remote
    # min_tokens counts the earlier slices' output: a resume sends what is left of it (the
    # second slice's 10 would exceed its 5 tokens otherwise: a 400 from the server)
    full = rt.generate(PROMPT, max_tokens=MAX, **GREEDY)
    parts = run_sliced(rt, served_rt, MAX, min_tokens=20, **GREEDY)
    assert "".join(p.text for p in parts) == full.text
    # sampled: the quantum and the budget go by the ids handed out, re-tokenized from each text
    # piece here; a piece need not re-tokenize to the tokens the server sampled (see below)
    sampled = run_sliced(rt, served_rt, MAX, temperature=1.0, ignore_eos=True)
    assert sampled[-1].finish_reason == "length"
    assert [p.output_tokens for p in sampled] == list(itertools.accumulate(len(p.token_ids) for p in sampled))


def test_with_the_servers_token_ids_sliced_counts_are_exact(served, make_client_runtime):
    # A token's text need not say how many tokens it stands for: a special token's is empty,
    # byte tokens' comes out merged or as U+FFFD. Re-tokenizing the text then miscounts the
    # quantum and the budget; the server's own ids (`return_token_ids`) count exactly.
    served_rt, server = served()
    rt = make_client_runtime(server, server_token_ids=True)
    special = 5
    assert rt.detokenize([special]) == ""
    # certain at any temperature; sampled, so run_sliced checks no recomputation figures (the
    # server's prompt is the text, which these tokens leave empty)
    sampling = dict(temperature=1.0, ignore_eos=True, logit_bias={special: 100.0})
    assert rt.generate(PROMPT, max_tokens=MAX, **sampling).token_ids == [special] * MAX
    parts = run_sliced(rt, served_rt, MAX, **sampling)
    assert [p.token_ids for p in parts] == [[special] * 5] * 6 and parts[-1].finish_reason == "length"
    sampled = run_sliced(rt, served_rt, MAX, pid="s", temperature=1.0, ignore_eos=True)
    assert [len(p.token_ids) for p in sampled] == [5] * 6 and sampled[-1].finish_reason == "length"


def test_discard_frees_everything(remote):
    rt, served_rt = remote
    rt.generate(PROMPT, max_tokens=MAX, token_quantum=6, pid="d1", **GREEDY)
    rt.generate(PROMPT[:40], max_tokens=MAX, token_quantum=6, pid="d2", **GREEDY)
    assert [(s.pid, s.tokens, s.max_tokens, s.resident) for s in rt.suspended()] == [("d1", 6, MAX, False), ("d2", 6, MAX, False)]
    assert len(rt.engine.context_ids()) == 2 and rt.stats()["contexts_live"] == 2
    rt.discard("d1")
    assert [s.pid for s in rt.suspended()] == ["d2"]
    rt.discard("d2")
    rt.check_invariants()
    assert rt.suspended() == [] and rt.engine.context_ids() == set() and rt.stats()["contexts_live"] == 0
    with pytest.raises(UnknownGenerationError):
        rt.resume("d1")


@pytest.mark.parametrize(
    "sampling, field",
    [
        (dict(temperature=1.0, seed=3), "seed"),
        (dict(temperature=0.0, presence_penalty=0.5), "presence_penalty"),
        (dict(temperature=0.0, frequency_penalty=0.5), "frequency_penalty"),
    ],
)
def test_what_a_text_resume_cannot_carry_is_a_typed_error_and_takes_nothing(remote, sampling, field):
    rt, served_rt = remote
    before = served_rt.engine.runtime_info().generation_tokens
    with pytest.raises(InvalidRequestError, match=field):
        rt.generate(PROMPT, max_tokens=MAX, token_quantum=5, pid="x", **sampling)
    with pytest.raises(InvalidRequestError, match=field):
        rt.round_robin([PROMPT], max_tokens=MAX, token_quantum=5, **sampling)
    assert rt.suspended() == [] and rt.engine.context_ids() == set()
    assert served_rt.engine.runtime_info().generation_tokens == before  # nothing reached the server
    assert rt.generate(PROMPT, max_tokens=4, ignore_eos=True, **sampling).finish_reason == "length"  # unsliced, it runs


def test_abandoning_a_slice_discards_the_generation(served, make_client_runtime):
    served_rt, server = served(delay=0.02)
    rt = make_client_runtime(server)

    async def abandon() -> None:
        async with contextlib.aclosing(rt.astream(PROMPT, max_tokens=MAX, token_quantum=20, pid="gone", **GREEDY)) as stream:
            async for delta in stream:
                assert delta.pid == "gone"
                break

    asyncio.run(abandon())
    wait_for(lambda: rt.engine.context_ids() == set(), what="the abandoned generation's context to be freed")
    assert rt.suspended() == []
    with pytest.raises(UnknownGenerationError):
        rt.resume("gone")
    info = served_rt.engine.runtime_info
    wait_for(lambda: info().num_running == 0 and info().num_waiting == 0, what="the server to abort the slice")
