"""Suspend and resume (issue 13, part 1): a generation suspended every few tokens and resumed
to its end is the uninterrupted generation, token for token, with its budget, stop strings,
logit processing and random stream carried over, and nothing recomputed while its KV stays."""

from __future__ import annotations

import asyncio
import time

import pytest

from parrot_core import Runtime, SlicedOutput
from parrot_core.errors import InvalidRequestError, NotFoundError, UnknownGenerationError

PROMPT = [5, 17, 3, 88, 41, 9, 60, 2, 33, 71, 12]
SAMPLINGS = {
    "greedy": dict(temperature=0.0),
    "seeded": dict(temperature=1.0, seed=1234),
    "seeded-processed": dict(
        temperature=0.9,
        seed=99,
        top_k=40,
        top_p=0.95,
        min_p=0.01,
        presence_penalty=0.5,
        frequency_penalty=0.7,
        repetition_penalty=1.3,
        logit_bias={7: 3.0},
        min_tokens=23,
    ),
}


def run_sliced(rt: Runtime, prompt, max_tokens: int, quantum: int = 5, pid: str = "p", **sampling) -> list[SlicedOutput]:
    """Generate in slices of `quantum` tokens until the end; every resume computes exactly
    the one token sampled before its suspension (which an uninterrupted run computes too)."""
    parts = [rt.generate(prompt, max_tokens=max_tokens, token_quantum=quantum, pid=pid, **sampling)]
    while not parts[-1].finished:
        assert parts[-1].finish_reason == "suspended" and parts[-1].pid == pid
        rt.engine.wait_idle()
        before = rt.stats()["prompt_tokens_computed"]
        parts.append(rt.resume(pid, token_quantum=quantum))
        rt.engine.wait_idle()
        assert rt.stats()["prompt_tokens_computed"] - before == 1, "a resident resume recomputed its context"
        assert parts[-1].recomputed_tokens == 0
    return parts


@pytest.mark.parametrize("sampling", list(SAMPLINGS.values()), ids=list(SAMPLINGS))
@pytest.mark.parametrize("ignore_eos", [True, False])
def test_suspended_every_5_tokens_equals_uninterrupted(make_tiny, sampling, ignore_eos):
    rt = make_tiny()
    full = rt.generate(PROMPT, max_tokens=37, ignore_eos=ignore_eos, **sampling)
    parts = run_sliced(rt, PROMPT, 37, ignore_eos=ignore_eos, **sampling)
    ids = [t for p in parts for t in p.token_ids]
    assert ids == full.token_ids
    assert parts[-1].finish_reason == full.finish_reason and parts[-1].stop_token_id == full.stop_token_id
    assert all(len(p.token_ids) == 5 for p in parts[:-1]) and len(parts[-1].token_ids) <= 5
    assert sum(len(p.token_ids) for p in parts) <= 37
    assert [p.output_tokens for p in parts] == [sum(len(q.token_ids) for q in parts[: i + 1]) for i in range(len(parts))]
    if sampling.get("seed") is not None:  # the seeded runs really sample: they differ from greedy
        assert full.token_ids != rt.generate(PROMPT, max_tokens=37, ignore_eos=ignore_eos, temperature=0.0).token_ids


@pytest.mark.parametrize("sampling", [SAMPLINGS["greedy"], SAMPLINGS["seeded"]], ids=["greedy", "seeded"])
def test_real_model_suspended_every_5_tokens_equals_uninterrupted(real_runtime, sampling):
    rt = real_runtime
    prompt = "The old lighthouse keeper climbed the stairs and"
    full = rt.generate(prompt, max_tokens=24, ignore_eos=True, **sampling)
    parts = run_sliced(rt, prompt, 24, ignore_eos=True, **sampling)
    assert [t for p in parts for t in p.token_ids] == full.token_ids
    assert "".join(p.text for p in parts) == full.text
    assert len(parts) == 5 and parts[-1].finish_reason == "length"


def test_budget_is_never_exceeded(make_tiny):
    rt = make_tiny()
    first = rt.generate(PROMPT, max_tokens=12, token_quantum=5, pid="b", ignore_eos=True, temperature=0.0)
    assert (first.finish_reason, len(first.token_ids)) == ("suspended", 5)
    rest = rt.resume("b", token_quantum=100)  # a quantum past the budget: the budget wins
    assert (rest.finish_reason, len(rest.token_ids), rest.output_tokens) == ("length", 7, 12)
    with pytest.raises(UnknownGenerationError):
        rt.resume("b")  # finished: gone


def test_resume_without_limits_runs_to_the_end(make_tiny):
    rt = make_tiny()
    full = rt.generate(PROMPT, max_tokens=20, ignore_eos=True, temperature=0.0)
    first = rt.generate(PROMPT, max_tokens=20, token_quantum=3, pid="e", ignore_eos=True, temperature=0.0)
    rest = rt.resume("e")
    assert first.token_ids + rest.token_ids == full.token_ids and rest.finish_reason == "length"


def _spanning_stop(rt: Runtime, prompt: str, max_tokens: int) -> tuple[str, int]:
    """A stop string that first occurs across a suspension point (after k tokens, k a
    multiple of 5) of the greedy generation: (the string, k)."""
    full = rt.generate(prompt, max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    for k in range(5, max_tokens - 5, 5):
        at = len(rt.detokenize(full.token_ids[:k]))
        stop = full.text[at - 2 : at + 2]
        if len(stop) == 4 and full.text.find(stop) == at - 2 and rt.detokenize(full.token_ids[:k]) == full.text[:at]:
            return stop, k
    raise AssertionError(f"no suspension point to span in {full.text!r}")


def test_stop_string_across_a_suspension_point_stops_it(text_runtime):
    rt = text_runtime
    prompt = "Once upon a time, in a small village by the sea,"
    stop, k = _spanning_stop(rt, prompt, 40)
    expected = rt.generate(prompt, max_tokens=40, ignore_eos=True, temperature=0.0, stop=[stop])
    assert expected.finish_reason == "stop"
    parts = run_sliced(rt, prompt, 40, ignore_eos=True, temperature=0.0, stop=[stop])
    assert len(parts) == k // 5 + 1, "the generation must stop in the slice after the one the stop string began in"
    assert parts[-1].finish_reason == "stop"
    assert "".join(p.text for p in parts) == expected.text
    assert [t for p in parts for t in p.token_ids] == expected.token_ids
    assert not parts[-2].text.endswith(stop[:2]), "the stop string's start must be held back at the suspension"


def test_time_limit_suspends_and_resume_is_exact(make_tiny):
    rt = make_tiny(delay=0.01)
    full = rt.generate(PROMPT, max_tokens=30, ignore_eos=True, temperature=0.0)
    parts = [rt.generate(PROMPT, max_tokens=30, time_limit=0.06, pid="t", ignore_eos=True, temperature=0.0)]
    while not parts[-1].finished:
        assert [s.pid for s in rt.suspended()] == ["t"]
        parts.append(rt.resume("t", time_limit=0.06))
    assert len(parts) >= 3 and all(p.token_ids for p in parts)  # every slice makes progress
    assert [t for p in parts for t in p.token_ids] == full.token_ids
    assert parts[-1].finish_reason == "length"


@pytest.mark.parametrize("sampling", [SAMPLINGS["greedy"], SAMPLINGS["seeded-processed"]], ids=["greedy", "seeded"])
def test_evicted_while_suspended_resume_is_still_exact(make_tiny, sampling):
    rt = make_tiny(num_kv_blocks=16)  # 64 slots
    full = rt.generate(PROMPT, max_tokens=30, ignore_eos=True, **sampling)
    first = rt.generate(PROMPT, max_tokens=30, token_quantum=10, pid="v", ignore_eos=True, **sampling)
    assert first.finish_reason == "suspended" and rt.suspended()[0].resident
    other = rt.generate([90, 91, 92, 93, 94, 95, 96, 97, 98, 99] * 2, max_tokens=40, ignore_eos=True, temperature=0.0)
    assert len(other.token_ids) == 40  # 60 tokens: it needed the suspended generation's blocks
    assert [s.resident for s in rt.suspended()] == [False]
    rest = rt.resume("v", token_quantum=10)
    assert rest.recomputed_tokens > 0
    parts = [first, rest]
    while not parts[-1].finished:
        parts.append(rt.resume("v", token_quantum=10))
    assert [t for p in parts for t in p.token_ids] == full.token_ids


def test_discard_frees_everything(make_tiny):
    rt = make_tiny()
    idle = rt.stats()["blocks_used"]
    rt.generate(PROMPT, max_tokens=30, token_quantum=6, pid="d1", temperature=0.0, ignore_eos=True)
    rt.generate(PROMPT[:5], max_tokens=30, token_quantum=6, pid="d2", temperature=0.0, ignore_eos=True)
    infos = rt.suspended()
    assert [(s.pid, s.tokens, s.max_tokens) for s in infos] == [("d1", 6, 30), ("d2", 6, 30)]
    assert rt.stats()["blocks_used"] > idle and rt.stats()["contexts_live"] == 2
    rt.discard("d1")
    assert [s.pid for s in rt.suspended()] == ["d2"] and rt.stats()["contexts_live"] == 1
    rt.discard("d2")
    rt.engine.wait_idle()
    rt.check_invariants()
    assert rt.stats()["contexts_live"] == 0 and rt.stats()["blocks_used"] == 0
    with pytest.raises(UnknownGenerationError) as e:
        rt.resume("d1")
    assert isinstance(e.value, NotFoundError)
    with pytest.raises(UnknownGenerationError):
        rt.discard("d2")


def test_expiry_by_count_drops_the_least_recently_suspended(make_tiny):
    rt = make_tiny(runtime_options={"max_suspended": 2})
    for pid in ("a", "b", "c"):
        rt.generate(PROMPT, max_tokens=20, token_quantum=4, pid=pid, temperature=0.0, ignore_eos=True)
    assert [s.pid for s in rt.suspended()] == ["b", "c"]
    with pytest.raises(UnknownGenerationError):
        rt.resume("a")
    rt.resume("b", token_quantum=4)  # b is now the most recently suspended
    rt.generate(PROMPT, max_tokens=20, token_quantum=4, pid="d", temperature=0.0, ignore_eos=True)
    assert [s.pid for s in rt.suspended()] == ["b", "d"]
    assert rt.switching.dropped_total == 2
    rt.discard("b")
    rt.discard("d")


def test_expiry_by_age_frees_everything(make_tiny):
    rt = make_tiny(runtime_options={"suspended_ttl": 0.2})
    rt.generate(PROMPT, max_tokens=20, token_quantum=4, pid="old", temperature=0.0, ignore_eos=True)
    assert rt.suspended()[0].age < 0.2
    time.sleep(0.3)
    assert rt.suspended() == []  # expired (the runtime's tick would also have done it)
    rt.engine.wait_idle()
    assert rt.stats()["contexts_live"] == 0 and rt.stats()["blocks_used"] == 0
    with pytest.raises(UnknownGenerationError):
        rt.resume("old")


def test_bad_input_is_a_typed_error_and_takes_nothing(make_tiny):
    rt = make_tiny()
    rt.generate(PROMPT, max_tokens=20, token_quantum=4, pid="x", temperature=0.0)
    cases = [
        dict(pid="x", token_quantum=4),  # in use
        dict(pid="has space", token_quantum=4),
        dict(pid="y", token_quantum=0),
        dict(pid="y", time_limit=-1.0),
        dict(pid="y", time_limit=float("nan")),
        dict(pid="y", token_quantum=4, json_object=True),
        dict(pid="y", time_limit=1.0, logprobs=1),
    ]
    for case in cases:
        with pytest.raises(InvalidRequestError):
            rt.generate(PROMPT, max_tokens=20, **case)
    with pytest.raises(InvalidRequestError):
        rt.generate([PROMPT, PROMPT], max_tokens=20, pid="z")  # one pid, two generations
    with pytest.raises(InvalidRequestError):
        rt.resume("x", token_quantum=-2)
    with pytest.raises(UnknownGenerationError):
        rt.resume("nobody")
    assert [s.pid for s in rt.suspended()] == ["x"]
    rt.discard("x")


def test_round_trip_of_logprobs_and_a_batch(make_tiny):
    rt = make_tiny()
    prompts = [PROMPT, PROMPT[3:], [1, 2, 3]]
    fulls = rt.generate(prompts, max_tokens=14, ignore_eos=True, temperature=0.0, logprobs=2)
    firsts = rt.generate(prompts, max_tokens=14, token_quantum=6, ignore_eos=True, temperature=0.0, logprobs=2)
    assert len({f.pid for f in firsts}) == 3 and all(f.finish_reason == "suspended" for f in firsts)
    for full, first in zip(fulls, firsts):
        rest = rt.resume(first.pid)
        assert first.token_ids + rest.token_ids == full.token_ids
        assert first.logprobs is not None and rest.logprobs is not None
        assert [lp.token_id for lp in first.logprobs + rest.logprobs] == full.token_ids
        assert [lp.logprob for lp in first.logprobs + rest.logprobs] == pytest.approx([lp.logprob for lp in full.logprobs], abs=1e-9)


def test_abandoning_a_slice_discards_the_generation(make_tiny):
    rt = make_tiny(delay=0.005)

    async def abandon() -> None:
        async for delta in rt.astream(PROMPT, max_tokens=40, token_quantum=30, pid="gone", ignore_eos=True):
            assert delta.pid == "gone"
            break

    asyncio.run(abandon())
    assert rt.suspended() == []
    with pytest.raises(UnknownGenerationError):
        rt.resume("gone")


def test_streamed_slices_concatenate_to_the_whole(text_runtime):
    rt = text_runtime
    prompt = "A list of fruits: apple,"
    full = rt.generate(prompt, max_tokens=25, ignore_eos=True, temperature=0.0)

    async def slices() -> list[list]:
        out = [[d async for d in rt.astream(prompt, max_tokens=25, token_quantum=7, pid="s", ignore_eos=True, temperature=0.0)]]
        while out[-1][-1].finish_reason == "suspended":
            out.append([d async for d in rt.astream_resume("s", token_quantum=7)])
        return out

    parts = asyncio.run(slices())
    assert [len(p) > 0 for p in parts] == [True] * 4
    assert "".join(d.text for p in parts for d in p) == full.text
    assert [t for p in parts for d in p for t in d.token_ids] == full.token_ids


def test_reset_and_clear_drop_suspended_generations(make_tiny):
    rt = make_tiny()
    rt.generate(PROMPT, max_tokens=20, token_quantum=4, pid="r", temperature=0.0)
    rt.reset()
    assert rt.suspended() == []
    with pytest.raises(UnknownGenerationError):
        rt.resume("r")
    rt.generate(PROMPT, max_tokens=20, token_quantum=4, pid="mine", temperature=0.0)
    rt.generate(PROMPT, max_tokens=20, token_quantum=4, pid="theirs", owner="someone", temperature=0.0)
    assert [s.pid for s in rt.suspended()] == ["mine"] and [s.pid for s in rt.suspended(owner="someone")] == ["theirs"]
    assert rt.clear_suspended() == 2
    assert rt.stats()["contexts_live"] == 0
