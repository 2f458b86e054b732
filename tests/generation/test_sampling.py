from __future__ import annotations

import pytest
import torch

from bulk.generation.sampling import SamplingParams, make_generator, sample


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
