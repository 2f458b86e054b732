"""The logit-changing request fields on the engine: OpenAI's `presence_penalty`, `frequency_penalty`
and `logit_bias`, Hugging Face's `repetition_penalty`, vLLM's `stop_token_ids`. Each answer is
checked against a reference decoder that applies `process_logits` to plain transformers-cache
logits (the formulas themselves: tests/generation/test_sampling.py), and for what it must show: a
bias of +100 forces its token, a large frequency penalty stops the repetition greedy decoding makes."""

from __future__ import annotations

import asyncio

import pytest

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.engine.request import parse_request
from bulk.errors import InvalidRequestError
from bulk.generation.decode import decode_one, prefill
from bulk.generation.sampling import SamplingParams, make_generator, process_logits, sample
from bulk.models.tokenizer import ByteTokenizer
from tests.conftest import ENDS_EARLY

CONFIG = KVCacheConfig(model="demo", dtype="float32", default_max_new_tokens=12)


@pytest.fixture(scope="module")
def engine(demo_model):
    with UltraAdaptiveKVCacheEngine(CONFIG, model=demo_model) as engine:
        yield engine


def reference(lm, prompt: str, request: dict) -> str:
    """No KV reuse, no pool, no batching: the prompt prefilled from nothing, each token chosen from
    `process_logits`' row, generation ending at an end of sequence or a stop token."""
    params = parse_request({"query": prompt, **request}, CONFIG).params
    generator = make_generator(params)
    ids = lm.tokenizer.encode(prompt)
    logits, cache = prefill(lm, ids, None)
    out: list[int] = []
    for _ in range(params.max_new_tokens):
        logits = process_logits(logits.clone(), params, ids, out)
        token = sample(logits, params, generator)
        if token in lm.tokenizer.eos_token_ids or token in params.stop_token_ids:
            break
        out.append(token)
        logits, cache = decode_one(lm, token, cache)
    return lm.tokenizer.decode(out)


CHANGES = [
    {"frequency_penalty": 2.0},
    {"presence_penalty": 1.5},
    {"frequency_penalty": -1.0, "presence_penalty": 0.5},
    {"repetition_penalty": 1.5},
    {"repetition_penalty": 0.7},
    {"logit_bias": {str(ord("J")): 3.0, str(ord("X")): -2.5}},
    {"frequency_penalty": 0.8, "temperature": 0.9, "seed": 4},
]


@pytest.mark.parametrize("change", CHANGES, ids=lambda c: ",".join(c))
async def test_each_change_gives_the_reference_answer(engine, demo_model, change):
    request = {"max_new_tokens": 12, **change}
    answer = await engine.process_request({"query": ENDS_EARLY, **request})
    assert answer["result"] == reference(demo_model, ENDS_EARLY, request)


async def test_the_changes_do_what_they_say(engine):
    plain = (await engine.process_request({"query": ENDS_EARLY}))["result"]
    assert plain == "XXJXJXJXJXJX"  # greedy repeats X and J
    no_repeats = (await engine.process_request({"query": ENDS_EARLY, "frequency_penalty": 2.0}))["result"]
    assert no_repeats != plain and len(set(no_repeats)) == len(no_repeats), no_repeats
    forced = await engine.process_request({"query": ENDS_EARLY, "logit_bias": {str(ord("A")): 100}})
    assert forced["result"] == "A" * 12
    banned = await engine.process_request({"query": ENDS_EARLY, "logit_bias": {str(ord("X")): -100}})
    assert "X" not in banned["result"]


async def test_rows_with_changes_leave_the_other_rows_of_their_batch_alone(engine):
    prompts = [ENDS_EARLY, "Summarise the report", "Write a haiku about rain", "List three colours"]
    alone = [(await engine.process_request({"query": p, "response_cache": False}))["result"] for p in prompts]
    changed = {"frequency_penalty": 2.0, "logit_bias": {"65": 5}, "response_cache": False}
    batch = await asyncio.gather(
        *(engine.process_request({"query": p, "response_cache": False, **(changed if i % 2 else {})})
          for i, p in enumerate(prompts))
    )  # fmt: skip
    assert [r["result"] for i, r in enumerate(batch) if i % 2 == 0] == alone[::2]
    separately = [(await engine.process_request({"query": p, **changed}))["result"] for p in prompts[1::2]]
    assert [r["result"] for r in batch[1::2]] == separately


async def test_stop_token_ids_end_the_answer_like_an_end_of_sequence(engine):
    answer = await engine.process_request({"query": ENDS_EARLY, "stop_token_ids": [ord("J")]})
    assert (answer["result"], answer["completion_tokens"], answer["finish_reason"]) == ("XX", 2, "stop")
    # Even with ignore_eos (as vLLM); and not before min_tokens (then the model chooses otherwise).
    forced = await engine.process_request(
        {"query": ENDS_EARLY, "stop_token_ids": [ord("J")], "ignore_eos": True}
    )
    assert forced["result"] == "XX"
    held = await engine.process_request({"query": ENDS_EARLY, "stop_token_ids": [ord("J")], "min_tokens": 4})
    assert len(held["result"]) >= 4 and "J" not in held["result"][:4]


async def test_the_response_cache_tells_the_changes_apart(engine):
    plain = await engine.process_request({"query": "cache me"})
    changed = await engine.process_request({"query": "cache me", "logit_bias": {"65": 100}})
    assert not changed["response_cached"] and changed["result"] != plain["result"]
    again = await engine.process_request({"query": "cache me", "logit_bias": {"65": 100.0}})
    assert again["response_cached"] and again["result"] == changed["result"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("frequency_penalty", "1"),
        ("repetition_penalty", 0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", 1e-30),  # the logits would overflow to infinity
        ("repetition_penalty", 1e3),
        ("logit_bias", {"5": 101}),
        ("logit_bias", {"x": 1}),
        ("logit_bias", {"-1": 1}),
        ("logit_bias", [5, 1]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", 5),
        ("stop_token_ids", [True]),
        ("logprobs", 21),
        ("logprobs", -1),
        ("logprobs", True),
    ],
)
def test_bad_values_name_their_field(field, value):
    with pytest.raises(InvalidRequestError) as caught:
        parse_request({"query": "q", field: value}, CONFIG)
    assert caught.value.field == field


@pytest.mark.parametrize("field", ["logit_bias", "stop_token_ids"])
async def test_token_ids_beyond_the_vocabulary_are_refused_at_intake(engine, field):
    beyond = ByteTokenizer.vocab_size
    value = {str(beyond): 1} if field == "logit_bias" else [beyond]
    with pytest.raises(InvalidRequestError) as caught:
        await engine.process_request({"query": "q", field: value})
    assert caught.value.field == field and "vocabulary" in caught.value.message


def test_equal_maps_make_equal_requests():
    a = parse_request({"query": "q", "logit_bias": {"7": 1, "3": 0, "5": -2}}, CONFIG).params
    b = parse_request({"query": "q", "logit_bias": {5: -2.0, 7: 1.0}}, CONFIG).params
    assert a == b and a.logit_bias == ((5, -2.0), (7, 1.0))
    assert SamplingParams(stop_token_ids=(1, 2)).stop_token_ids == (1, 2)
