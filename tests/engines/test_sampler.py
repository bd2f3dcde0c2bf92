"""The sampler: greedy, temperature, top-k, top-p and per-request seeds."""

from __future__ import annotations

import pytest
import torch

from parrot_core.engines.base import SamplingParams
from parrot_core.engines.builtin.sampler import sample

V = 1000


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_is_argmax():
    x = logits(6)
    params = [SamplingParams(temperature=0.0)] * 6
    assert sample(x, params, [None] * 6) == x.argmax(-1).tolist()



def test_greedy_bfloat16_takes_the_first_of_tied_maxima():
    # logits rounded to few values tie often in bfloat16; greedy must pick the first maximum,
    # as vLLM's sampler does (it takes the argmax of the float32 logits)
    x = (logits(64, seed=9) * 2).round().bfloat16()
    wide = x.float()
    first_max = (wide == wide.max(-1, keepdim=True).values).int().argmax(-1)
    assert int(((wide == wide.max(-1, keepdim=True).values).sum(-1) > 1).sum()) > 0  # ties present
    params = [SamplingParams(temperature=0.0)] * 64
    assert sample(x, params, [None] * 64) == first_max.tolist()

@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0])
def test_top_k_1_is_greedy_at_any_temperature(temperature):
    x = logits(8, seed=1)
    params = [SamplingParams(temperature=temperature, top_k=1)] * 8
    assert sample(x, params, [gen(i) for i in range(8)]) == x.argmax(-1).tolist()


def test_tiny_top_p_is_greedy():
    x = logits(8, seed=2)
    params = [SamplingParams(temperature=2.0, top_p=1e-6)] * 8
    assert sample(x, params, [gen(i) for i in range(8)]) == x.argmax(-1).tolist()


def test_top_k_and_top_p_keep_only_allowed_tokens():
    x = logits(1, seed=3)
    top5 = set(x[0].topk(5).indices.tolist())
    g = gen(0)
    for _ in range(200):
        assert sample(x, [SamplingParams(temperature=5.0, top_k=5)], [g])[0] in top5
    probs = torch.softmax(x[0], -1)
    order = probs.argsort(descending=True)
    nucleus = int((probs[order].cumsum(0) < 0.5).sum()) + 1  # smallest head with mass >= 0.5
    allowed = set(order[:nucleus].tolist())
    for _ in range(200):
        assert sample(x, [SamplingParams(top_p=0.5)], [g])[0] in allowed


def test_same_seed_same_tokens_whatever_the_batch():
    x = logits(1, seed=4)
    p = SamplingParams(temperature=1.5, top_p=0.9, top_k=50, seed=7)

    def run(batch_logits: torch.Tensor, params: list[SamplingParams], row: int) -> list[int]:
        gens = [gen(7) if i == row else gen(1000 + i) for i in range(len(params))]
        return [sample(batch_logits, params, gens)[row] for _ in range(20)]

    alone = run(x, [p], 0)
    others = logits(5, seed=5)
    mixed_params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7), p, SamplingParams(top_k=3)]
    mixed = torch.cat([others[:2], x, others[2:3]])
    assert run(mixed, mixed_params, 2) == alone
    assert len(set(alone)) > 1  # really sampled, not greedy


def test_different_seeds_differ():
    x = torch.zeros(1, V)
    a = [sample(x, [SamplingParams()], [g])[0] for g in [gen(1)] for _ in range(10)]
    b = [sample(x, [SamplingParams()], [g])[0] for g in [gen(2)] for _ in range(10)]
    assert a != b


def test_temperature_sampling_follows_softmax():
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    g = gen(123)
    n = 4000
    for temperature in (1.0, 0.5):
        counts = torch.zeros(5)
        for _ in range(n):
            counts[sample(x, [SamplingParams(temperature=temperature)], [g])[0]] += 1
        expected = torch.softmax(x[0] / temperature, -1)
        assert (counts / n - expected).abs().max() < 0.03


def test_float64_logits_and_mixed_rows():
    x = logits(3, seed=6).double()
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1), SamplingParams(top_p=1e-9)]
    assert sample(x, params, [None, gen(0), None]) == x.argmax(-1).tolist()


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError):
        sample(logits(2), [SamplingParams()], [None])


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(top_k=-5), "top_k"),
        (dict(top_k=1.5), "top_k"),
        (dict(top_p=0), "top_p"),
        (dict(temperature=-1), "temperature"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(seed=-1), "seed"),
        (dict(stop=[""]), "stop"),
        (dict(stop_token_ids=[-2]), "stop_token_ids"),
    ],
)
def test_bad_sampling_values_are_typed_errors_that_name_the_field(bad, match):
    from parrot_core.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=match):
        SamplingParams(**bad)


@pytest.mark.parametrize("top_k", [-1, 0, 1, 50])
def test_top_k_minus_one_and_zero_disable_it_and_positive_values_are_accepted(top_k):
    assert SamplingParams(top_k=top_k).top_k == top_k


# -- logit processing: penalties, bias, min_tokens, min_p -------------------------------------
from parrot_core.engines.builtin.sampler import apply_penalties  # noqa: E402
from parrot_core.errors import InvalidRequestError  # noqa: E402

ROW = [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]  # logits over a 6-token vocabulary; EOS is token 5


def penalize(params: SamplingParams, prompt: list[int], output: list[int], eos: int | None = 5) -> list[float]:
    return apply_penalties(torch.tensor([ROW]), [params], [(prompt, output)], eos)[0].tolist()


def test_frequency_and_presence_penalties_follow_openai_definition():
    # output counts: token 0 twice, token 3 once; the prompt does not count
    got = penalize(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), prompt=[1, 2], output=[0, 3, 0])
    assert got == [2.0 - 0.5 * 2 - 0.25, -1.0, 0.5, 3.0 - 0.5 - 0.25, -2.0, 1.0]
    # negative values reward repetition
    got = penalize(SamplingParams(frequency_penalty=-1.0), prompt=[], output=[4, 4])
    assert got == [2.0, -1.0, 0.5, 3.0, -2.0 + 2.0, 1.0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    # seen: prompt {1, 2}, output {3}; positive logits are divided, negative multiplied
    got = penalize(SamplingParams(repetition_penalty=2.0), prompt=[1, 2, 2], output=[3])
    assert got == [2.0, -2.0, 0.25, 1.5, -2.0, 1.0]
    # below 1 it encourages them
    got = penalize(SamplingParams(repetition_penalty=0.5), prompt=[0], output=[4])
    assert got == [4.0, -1.0, 0.5, 3.0, -1.0, 1.0]


def test_logit_bias_adds_to_the_named_tokens():
    got = penalize(SamplingParams(logit_bias={2: 10.0, 4: -100}), prompt=[0], output=[])
    assert got == [2.0, -1.0, 10.5, 3.0, -102.0, 1.0]


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached():
    params = SamplingParams(max_tokens=8, min_tokens=2, stop_token_ids=[1])
    inf = float("-inf")
    assert penalize(params, prompt=[0], output=[3]) == [2.0, inf, 0.5, 3.0, -2.0, inf]
    assert penalize(params, prompt=[0], output=[3, 3]) == ROW  # reached: nothing masked
    ignore = SamplingParams(max_tokens=8, min_tokens=2, ignore_eos=True)  # EOS is no stop then
    assert penalize(ignore, prompt=[0], output=[]) == ROW


def test_processing_order_is_min_tokens_bias_repetition_then_frequency_presence():
    params = SamplingParams(logit_bias={1: 3.0}, repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5)
    # token 1: -1 + 3 = 2 (bias), seen in output so 2 / 2 = 1, once: 1 - 1 - 0.5
    # token 0: seen in the prompt only: 2 / 2; token 4: -2 in output twice: -4 - 2 - 0.5
    got = penalize(params, prompt=[0], output=[1, 4, 4])
    assert got == [1.0, -0.5, 0.5, 3.0, -6.5, 1.0]


def test_rows_without_processing_are_the_same_tensor_or_bit_identical():
    x = logits(4, seed=8)
    plain = [SamplingParams(), SamplingParams(temperature=0)]
    head = x[:2]
    assert apply_penalties(head, plain, [None, None], eos_token_id=5) is head  # no copy, no work
    mixed = [SamplingParams(), SamplingParams(presence_penalty=2.0), SamplingParams(temperature=0), SamplingParams(logit_bias={7: 5})]
    out = apply_penalties(x, mixed, [None, ([1], [2, 3]), None, ([], [])], eos_token_id=5)
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert out[1, 2] == x[1, 2] - 2.0 and out[3, 7] == x[3, 7] + 5
    assert torch.equal(x, logits(4, seed=8))  # the input is not modified


def test_penalties_in_a_mixed_batch_leave_other_rows_samples_bit_identical():
    x = logits(4, seed=9)
    free = [SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=0), SamplingParams(top_p=0.9), SamplingParams()]
    processed = [free[0], SamplingParams(temperature=0, frequency_penalty=2.0), free[2], SamplingParams(min_p=0.5)]
    gens = lambda: [gen(1), None, gen(3), gen(4)]  # noqa: E731
    alone = sample(x, free, gens())
    hist = [None, ([0], [int(x[1].argmax())] * 3), None, ([], [])]
    mixed = sample(apply_penalties(x, processed, hist, None), processed, gens())
    assert mixed[0] == alone[0] and mixed[2] == alone[2]
    assert mixed[1] != alone[1]  # the greedy pick was penalised away (-6 on logits of scale 3)
    probs = torch.softmax(x[3], -1)
    assert probs[mixed[3]] >= 0.5 * probs.max()  # min_p held


def test_greedy_rows_take_the_argmax_of_the_processed_logits():
    x = torch.tensor([ROW])
    p = SamplingParams(temperature=0, logit_bias={4: 6.0})
    assert sample(apply_penalties(x, [p], [([], [])], None), [p], [None]) == [4]


def test_min_p_keeps_only_tokens_above_its_share_of_the_top_probability():
    # probabilities ∝ [8, 4, 2, 1]: min_p 0.3 keeps p >= 0.3 * 8/15, i.e. tokens 0 and 1
    x = torch.log(torch.tensor([[8.0, 4.0, 2.0, 1.0]]))
    g = gen(0)
    picks = {sample(x, [SamplingParams(min_p=0.3)], [g])[0] for _ in range(300)}
    assert picks == {0, 1}
    picks = {sample(x, [SamplingParams(min_p=0.2)], [g])[0] for _ in range(300)}
    assert picks == {0, 1, 2}  # 2/8 = 0.25 >= 0.2, 1/8 < 0.2
    assert {sample(x, [SamplingParams(min_p=1.0)], [g])[0] for _ in range(50)} == {0}


def test_min_p_zero_gives_the_same_samples_as_before():
    x = logits(2, seed=10)
    a = [sample(x, [SamplingParams(), SamplingParams(top_k=5)], [gen(4), gen(5)])]
    b = [sample(x, [SamplingParams(min_p=0.0), SamplingParams(top_k=5, min_p=0.0)], [gen(4), gen(5)])]
    assert a == b


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(presence_penalty=float("nan")), "presence_penalty"),
        (dict(frequency_penalty=-2.01), "frequency_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(logit_bias={1: 101}), "logit_bias"),
        (dict(logit_bias={-1: 1}), "logit_bias"),
        (dict(logit_bias={"3": 1}), "logit_bias"),
        (dict(logit_bias=[(1, 1.0), (1, 2.0)]), "logit_bias"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(max_tokens=4, min_tokens=5), "min_tokens"),
        (dict(min_p=1.5), "min_p"),
        (dict(min_p=-0.1), "min_p"),
    ],
)
def test_bad_processing_values_are_typed_errors_that_name_the_field(bad, match):
    with pytest.raises(InvalidRequestError, match=f"^{match}"):
        SamplingParams(**bad)


def test_logit_bias_is_stored_as_sorted_pairs_and_params_stay_hashable():
    p = SamplingParams(logit_bias={9: 1.0, 2: -3})
    assert p.logit_bias == ((2, -3), (9, 1.0))
    assert hash(p) == hash(SamplingParams(logit_bias=[(2, -3), (9, 1.0)]))
    assert not SamplingParams().processes_logits and SamplingParams(min_tokens=1).processes_logits
