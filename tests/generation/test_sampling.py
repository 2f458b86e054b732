from __future__ import annotations

import pytest
import torch

from bulk.generation.sampling import SamplingParams, make_generator, sample, suppress_tokens


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9])
    assert sample(logits, SamplingParams(), None) == 1


def test_seed_makes_sampling_repeatable():
    logits = torch.randn(200, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, seed=11)
    draws = [
        [sample(logits, params, g) for _ in range(20)]
        for g in (make_generator(params), make_generator(params))
    ]
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    params = SamplingParams(temperature=1.0, top_p=0.8, seed=0)
    generator = make_generator(params)
    assert {sample(logits, params, generator) for _ in range(300)} == {0, 1}


def test_deterministic_flag():
    assert SamplingParams().deterministic
    assert SamplingParams(temperature=0.7, seed=3).deterministic
    assert not SamplingParams(temperature=0.7).deterministic


@pytest.mark.parametrize("temperature", [5.9e-294, 1e-40, 1e-9])
def test_a_tiny_temperature_is_greedy_not_nan(temperature):
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    params = SamplingParams(temperature=temperature, seed=1)
    assert sample(logits, params, torch.Generator().manual_seed(1)) == 1


@pytest.mark.parametrize("top_p", [5e-324, 1e-45, 1e-9])
def test_a_tiny_top_p_keeps_the_most_likely_token(top_p):
    # 5e-324 is a float64 that float32 reads as 0: every token would be cut, and the probabilities NaN.
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    params = SamplingParams(temperature=1.0, top_p=top_p, seed=1)
    generator = make_generator(params)
    assert {sample(logits, params, generator) for _ in range(20)} == {1}


def test_suppressed_tokens_are_never_chosen_greedy_or_sampled():
    # Token 1 is by far the likeliest: with it suppressed, greedy takes the next best, and no draw
    # at any temperature or top_p ever picks it.
    logits = torch.tensor([0.5, 9.0, 0.4, 0.3])
    assert suppress_tokens(logits, {1, 99}) is logits  # in place; an id past the vocabulary is skipped
    assert logits[1] == float("-inf") and logits[[0, 2, 3]].tolist() == pytest.approx([0.5, 0.4, 0.3])
    assert sample(logits, SamplingParams(), None) == 0
    for params in (
        SamplingParams(temperature=2.0, seed=3),
        SamplingParams(temperature=1.0, top_p=0.9, seed=4),
    ):
        generator = make_generator(params)
        assert 1 not in {sample(logits, params, generator) for _ in range(300)}


def test_suppressing_works_on_the_models_inference_tensors():
    # A forward's logits are made under torch.inference_mode; the sampler runs outside it.
    with torch.inference_mode():
        rows = torch.tensor([[1.0, 5.0, 2.0], [1.0, 5.0, 2.0]])
    suppress_tokens(rows[0], [1])
    assert rows.argmax(dim=-1).tolist() == [2, 1]  # the other row is untouched
