from __future__ import annotations

import math

import pytest
import torch

from bulk.generation.sampling import (
    LOGPROB_FLOOR,
    SamplingParams,
    make_generator,
    process_logits,
    sample,
    suppress_tokens,
    token_logprobs,
)


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


# ---- logit processing and logprobs ----------------------------------------------------------------


def test_rows_that_ask_for_nothing_are_not_processed():
    assert not SamplingParams().processes_logits
    assert not SamplingParams(logprobs=5, stop_token_ids=(3,)).processes_logits
    for change in (
        {"presence_penalty": 0.1},
        {"frequency_penalty": -0.1},
        {"repetition_penalty": 1.1},
        {"logit_bias": ((2, 1.0),)},
    ):
        assert SamplingParams(**change).processes_logits, change
    # Computed, so not a parameter: equal requests compare (and cache) equal.
    assert SamplingParams(presence_penalty=0.5) == SamplingParams(presence_penalty=0.5)


def test_logit_bias_is_added_to_its_tokens():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    params = SamplingParams(logit_bias=((0, 100.0), (2, -1.5), (99, 5.0)))  # 99: beyond, skipped
    assert process_logits(logits, params, [], []) is logits  # in place
    assert logits.tolist() == [101.0, 2.0, 1.5, 4.0]


def test_presence_and_frequency_penalties_count_the_answer_not_the_prompt():
    logits = torch.zeros(6)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    process_logits(logits, params, prompt_ids=[4, 4, 5], output_ids=[1, 2, 2, 2])
    # OpenAI's formula: logit - count * frequency_penalty - (count > 0) * presence_penalty.
    assert logits.tolist() == [0.0, -0.75, -1.25, 0.0, 0.0, 0.0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_prompt_and_answer():
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0, 2.0])
    process_logits(logits, SamplingParams(repetition_penalty=2.0), prompt_ids=[0, 1], output_ids=[1, 3])
    # Hugging Face's RepetitionPenaltyLogitsProcessor: each seen token once, however often it occurs.
    assert logits.tolist() == [1.0, -4.0, 2.0, -4.0, 2.0]


def test_processing_a_bfloat16_row_writes_it_back_in_place():
    logits = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    process_logits(logits, SamplingParams(logit_bias=((0, 8.0),)), [], [])
    assert logits.dtype == torch.bfloat16 and logits.tolist() == [9.0, 2.0, 3.0]


def test_token_logprobs_are_a_float32_log_softmax_with_sorted_alternatives():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    expected = torch.log_softmax(logits, dim=-1)
    chosen, top = token_logprobs(logits, 7, 5)
    assert chosen == pytest.approx(float(expected[7]))
    values = [value for _, value in top]
    assert values == sorted(values, reverse=True) and len(top) == 5
    assert top[0][0] == int(torch.argmax(logits))
    assert [i for i, _ in top] == expected.topk(5).indices.tolist()
    assert sum(math.exp(value) for value in values) <= 1.0
    assert token_logprobs(logits, 7, 0) == (chosen, [])


def test_the_chosen_token_leads_its_ties_and_minus_infinity_is_shown_as_the_floor():
    logits = torch.tensor([1.0, 3.0, 3.0, float("-inf")])
    _, top = token_logprobs(logits, 2, 2)
    assert [i for i, _ in top] == [2, 1]
    chosen, top = token_logprobs(logits, 3, 4)
    assert chosen == LOGPROB_FLOOR and top[-1] == (3, LOGPROB_FLOOR)
