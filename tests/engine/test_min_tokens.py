"""vLLM's extra sampling fields on the engine: `ignore_eos` (the end of sequence is an ordinary token;
the answer runs to `max_new_tokens`) and `min_tokens` (the end of sequence cannot be chosen, and no
stop string is looked for, until that many tokens are out), checked against the reference decoder
(`tests/conftest.py`), on the batched path and on the one-by-one fallback."""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict

import pytest
import torch

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.engine.request import parse_request
from bulk.engine.response_cache import request_key
from bulk.errors import InvalidRequestError
from bulk.models.tokenizer import ByteTokenizer
from tests.conftest import ENDS_EARLY, generate_without_cache
from tests.tiny_hf_model import recurrent_model

J = ord("J")  # `eos_model`'s other end of sequence


@pytest.fixture(scope="module")
def observed() -> dict[str, list[tuple[float, float]]]:
    """Per request id, the logits of its two EOS tokens (J, ByteTokenizer.EOS) each token was sampled
    from, as the engine's logits observer saw them."""
    return defaultdict(list)


@pytest.fixture(scope="module")
def engine(eos_model, observed):
    def observe(seq, logits: torch.Tensor) -> None:
        observed[seq.request.request_id].append((float(logits[J]), float(logits[ByteTokenizer.EOS])))

    # No response cache: every request here runs the model, so the observer sees its every row.
    config = KVCacheConfig(model="demo", dtype="float32", response_cache=False, default_max_new_tokens=8)
    with UltraAdaptiveKVCacheEngine(config, model=eos_model, logits_observer=observe) as engine:
        yield engine


async def test_ignore_eos_runs_to_max_new_tokens_keeping_the_eos_token(engine, eos_model):
    plain = await engine.process_request({"query": ENDS_EARLY, "max_new_tokens": 10})
    assert (plain["result"], plain["completion_tokens"], plain["finish_reason"]) == ("XX", 2, "stop")

    forced = await engine.process_request({"query": ENDS_EARLY, "max_new_tokens": 10, "ignore_eos": True})
    assert forced["completion_tokens"] == 10 and forced["finish_reason"] == "length"
    # The EOS token sampled is an ordinary token: its text (here "J") is in the answer, and the model
    # goes on from it.
    expected = generate_without_cache(eos_model, ENDS_EARLY, 10, ignore_eos=True)
    assert forced["result"] == expected.text == "XXJXJXJXJX"

    request = {"query": ENDS_EARLY, "max_new_tokens": 10, "ignore_eos": True}
    events = [e async for e in engine.stream_request(request)]
    assert "".join(e["token"] for e in events[:-1]) == forced["result"]
    assert events[-1]["completion_tokens"] == 10 and events[-1]["finish_reason"] == "length"


async def test_min_tokens_masks_eos_until_reached_and_leaves_other_rows_alone(engine, eos_model, observed):
    # Side by side in the same steps: a request held to 5 tokens, and one without min_tokens.
    held, free = await asyncio.gather(
        engine.process_request(
            {"query": ENDS_EARLY, "max_new_tokens": 12, "min_tokens": 5, "request_id": "held"}
        ),
        engine.process_request(
            {"query": ENDS_EARLY, "max_new_tokens": 12, "ignore_eos": True, "request_id": "free"}
        ),
    )
    # Without min_tokens it ended after 2 tokens (above); held to 5, J cannot come before the 6th.
    assert held["completion_tokens"] == 5 and held["finish_reason"] == "stop"
    assert held["result"] == generate_without_cache(eos_model, ENDS_EARLY, 12, min_tokens=5).text == "XXXXX"
    rows = observed["held"]
    assert len(rows) == 6  # 5 tokens, then the EOS that ended it
    assert all(j == eos == -math.inf for j, eos in rows[:5]), rows
    assert all(math.isfinite(j) and math.isfinite(eos) for j, eos in rows[5:]), rows
    # The other request's rows were not masked: it chose J (kept, with ignore_eos) as greedy does.
    assert all(math.isfinite(j) for j, _ in observed["free"])
    assert free["result"] == "XXJXJXJXJXJX"


async def test_min_tokens_holds_sampled_answers_too(engine, eos_model):
    # Seeded sampling, so each answer is the reference's. Some of these end before 8 tokens on
    # their own; held to 8, none does.
    seeds = range(16)

    async def answers(**extra):
        request = {"query": ENDS_EARLY, "max_new_tokens": 16, "temperature": 0.6, **extra}
        return await asyncio.gather(*(engine.process_request({**request, "seed": s}) for s in seeds))

    plain, held = await answers(), await answers(min_tokens=8)
    assert any(r["completion_tokens"] < 8 for r in plain)
    assert all(r["completion_tokens"] >= 8 for r in held)
    for seed, result in zip(seeds, held, strict=True):
        expected = generate_without_cache(eos_model, ENDS_EARLY, 16, temperature=0.6, seed=seed, min_tokens=8)
        assert result["result"] == expected.text, seed


async def test_stop_strings_are_looked_for_only_from_min_tokens_on(demo_model):
    # The demo model's greedy answer is "XXJXJXJX...". A stop string "J" ends it at "XX"; held to 4
    # tokens ("XXJX", not searched), the next "J" (the 5th token) ends it, as in vLLM: the "J"
    # written before min_tokens is not looked for afterwards.
    config = KVCacheConfig(model="demo", dtype="float32", response_cache=False)
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
        plain = await engine.process_request({"query": ENDS_EARLY, "max_new_tokens": 12, "stop": "J"})
        held = await engine.process_request(
            {"query": ENDS_EARLY, "max_new_tokens": 12, "stop": "J", "min_tokens": 4}
        )
    assert plain["result"] == "XX"
    assert (held["result"], held["completion_tokens"], held["finish_reason"]) == ("XXJX", 5, "stop")
    expected = generate_without_cache(demo_model, ENDS_EARLY, 12, stop=("J",), min_tokens=4)
    assert held["result"] == expected.text


async def test_min_tokens_and_ignore_eos_on_the_one_by_one_fallback():
    prompt = "sliding window prompt, long enough to slide past its window"
    # Its third greedy token made an end of sequence: its answer ends by then on its own.
    third = generate_without_cache(recurrent_model(), prompt, 8).token_ids[2]
    lm = recurrent_model(eos=third)
    config = KVCacheConfig(model="demo", dtype="float32", response_cache=False)
    with UltraAdaptiveKVCacheEngine(config, model=lm) as engine:
        assert engine._loop is not None and not engine._loop.runner.batched
        plain, held, forced = await asyncio.gather(
            *(
                engine.process_request({"query": prompt, "max_new_tokens": 10, **extra})
                for extra in ({}, {"min_tokens": 6}, {"ignore_eos": True})
            )
        )
    assert plain["completion_tokens"] <= 2 and plain["finish_reason"] == "stop"
    assert held["completion_tokens"] >= 6
    assert held["result"] == generate_without_cache(lm, prompt, 10, min_tokens=6).text
    assert forced["completion_tokens"] == 10 and forced["finish_reason"] == "length"
    assert forced["result"] == generate_without_cache(lm, prompt, 10, ignore_eos=True).text


async def test_the_response_cache_tells_these_fields_apart(eos_model):
    config = KVCacheConfig(model="demo", dtype="float32", default_max_new_tokens=8)
    variants = ({}, {"ignore_eos": True}, {"min_tokens": 5}, {"min_tokens": 5, "ignore_eos": True})
    with UltraAdaptiveKVCacheEngine(config, model=eos_model) as engine:
        first = [await engine.process_request({"query": ENDS_EARLY, **extra}) for extra in variants]
        again = [await engine.process_request({"query": ENDS_EARLY, **extra}) for extra in variants]
    assert [r["result"] for r in first] == ["XX", "XXJXJXJX", "XXXXX", "XXXXXJXJ"]
    assert not any(r["response_cached"] for r in first)
    assert all(r["response_cached"] for r in again)
    assert [r["result"] for r in again] == [r["result"] for r in first]
    requests = [parse_request({"query": ENDS_EARLY, **extra}, config) for extra in variants]
    assert len({request_key("m", r.prompt, r.params) for r in requests}) == len(variants)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"min_tokens": 9, "max_new_tokens": 8}, "min_tokens"),
        ({"min_tokens": 9}, "min_tokens"),  # above the default max_new_tokens (8 here)
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": True}, "min_tokens"),  # a bool is not an int here
        ({"min_tokens": 2.0}, "min_tokens"),
        ({"min_tokens": "2"}, "min_tokens"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_bad_values_are_invalid_requests_naming_the_field(fields, field):
    config = KVCacheConfig(model="demo", default_max_new_tokens=8)
    with pytest.raises(InvalidRequestError) as caught:
        parse_request({"query": "q", **fields}, config)
    assert caught.value.field == field


def test_defaults_and_limits_parse():
    config = KVCacheConfig(model="demo", default_max_new_tokens=8)
    params = parse_request({"query": "q"}, config).params
    assert (params.ignore_eos, params.min_tokens) == (False, 0)
    params = parse_request({"query": "q", "min_tokens": 8, "ignore_eos": True}, config).params
    assert (params.ignore_eos, params.min_tokens) == (True, 8)
    assert parse_request({"query": "q", "min_tokens": None, "ignore_eos": None}, config).params == (
        parse_request({"query": "q"}, config).params
    )
