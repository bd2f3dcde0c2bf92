"""Fair sharing among agents (issue 13, part 2): many generations on few slots take turns;
all finish, each progresses in every round, none is recomputed while its KV fits, and each
agent's output is its uninterrupted generation."""

from __future__ import annotations

import pytest

from parrot_core.errors import InvalidRequestError

AGENTS = [[(7 * a + i) % 97 + 1 for i in range(6 + a % 5)] for a in range(16)]


def test_16_agents_on_4_slots_all_finish_and_progress_every_round(make_tiny):
    rt = make_tiny(max_num_seqs=4, num_kv_blocks=256)
    lengths = [20 + 3 * (a % 4) for a in range(16)]  # 20..29 tokens: 4 to 6 rounds of 5
    expected = [rt.generate(p, max_tokens=n, ignore_eos=True, temperature=0.0).token_ids for p, n in zip(AGENTS, lengths)]
    rt.engine.wait_idle()
    before = rt.stats()["prompt_tokens_computed"]
    result = rt.round_robin(AGENTS, max_tokens=29, token_quantum=5, ignore_eos=True, temperature=0.0)
    assert [o.finish_reason for o in result.outputs] == ["length"] * 16
    full = [o.token_ids for o in result.outputs]
    assert [ids[:n] for ids, n in zip(full, lengths)] == expected[:]  # a prefix of a longer run
    assert all(len(ids) == 29 for ids in full)

    rounds = result.rounds()
    assert len(rounds) == 6  # ceil(29 / 5)
    for r, progress in enumerate(rounds):  # every agent ran in every round and made progress
        assert sorted(progress) == list(range(16)), f"round {r}: agents {sorted(progress)}"
        assert set(progress.values()) == {5 if r < 5 else 4}
    # No slice of round r + 1 starts before every agent started its slice of round r.
    for s in result.slices:
        if s.round:
            assert all(o.start <= s.start for o in result.slices if o.round == s.round - 1)
    # Slots bound the concurrency: at no time do more than 4 slices run.
    events = sorted([(s.start, 1) for s in result.slices] + [(s.end, -1) for s in result.slices])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 4
    # The KV fits: nothing was recomputed; each resume computed only its pending token.
    assert all(s.recomputed_tokens == 0 for s in result.slices)
    rt.engine.wait_idle()
    resumes = len(result.slices) - 16
    assert rt.stats()["prompt_tokens_computed"] - before <= sum(len(p) for p in AGENTS) + resumes


def test_the_last_agent_starts_before_anyone_gets_a_third_turn(make_tiny):
    rt = make_tiny(max_num_seqs=2, num_kv_blocks=256)
    result = rt.round_robin(AGENTS[:6], max_tokens=20, token_quantum=4, ignore_eos=True, temperature=0.0)
    last = next(s for s in result.slices if s.agent == 5 and s.round == 0)
    assert last.first_token is not None
    assert all(last.first_token <= s.start for s in result.slices if s.round >= 2)
    assert len(result.slices) == 6 * 5


def test_round_robin_under_kv_pressure_is_still_exact(make_tiny):
    rt = make_tiny(max_num_seqs=2, num_kv_blocks=24)  # 96 slots for 8 agents of ~40 tokens
    prompts = AGENTS[:8]
    expected = [rt.generate(p, max_tokens=30, ignore_eos=True, temperature=0.0).token_ids for p in prompts]
    result = rt.round_robin(prompts, max_tokens=30, token_quantum=6, ignore_eos=True, temperature=0.0)
    assert [o.token_ids for o in result.outputs] == expected
    assert any(s.recomputed_tokens > 0 for s in result.slices), "the pool was meant to be too small to keep every agent"


def test_round_robin_needs_a_quantum_and_valid_slots(make_tiny):
    rt = make_tiny()
    with pytest.raises(InvalidRequestError):
        rt.round_robin(AGENTS[:2], max_tokens=8)
    with pytest.raises(InvalidRequestError):
        rt.round_robin(AGENTS[:2], max_tokens=8, token_quantum=2, slots=0)
    assert rt.round_robin([], max_tokens=8, token_quantum=2).outputs == []
