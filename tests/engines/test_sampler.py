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
