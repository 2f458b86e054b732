"""`engine.process_request_json` (the JSON answer `POST /api/query` sends) against `process_request`:
same fields, same stats, same listener events; and the response cache pieces behind it."""

from __future__ import annotations

import json

import pytest

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.engine.response_cache import ResponseCache, StoredAnswer, json_bytes, request_key
from bulk.errors import InvalidRequestError
from bulk.generation.sampling import SamplingParams

QUERY = {
    "query": "Create marketing strategy \u00e9\u00e8",
    "max_new_tokens": 4,
    "request_id": 'id "quoted" \u00e9',
}


@pytest.fixture
def engine(demo_model):
    with UltraAdaptiveKVCacheEngine(KVCacheConfig(model="demo", device="cpu"), model=demo_model) as engine:
        yield engine


async def test_json_answers_match_dict_answers(engine):
    events: list[dict] = []
    engine.add_listener(events.append)
    computed = json.loads(await engine.process_request_json(QUERY))  # runs the model
    assert computed["response_cached"] is False and computed["request_id"] == QUERY["request_id"]
    as_dict = await engine.process_request(QUERY)  # from the response cache
    before = engine.get_stats()
    as_json = json.loads(await engine.process_request_json(QUERY))  # from the response cache, as JSON
    after = engine.get_stats()

    assert as_json.keys() == as_dict.keys()
    per_request = {"latency", "ttft_ms"}
    assert {k: v for k, v in as_json.items() if k not in per_request} == {
        k: v for k, v in as_dict.items() if k not in per_request
    }
    assert as_json["response_cached"] and as_json["cache_hit"]
    assert as_json["latency"] == as_json["ttft_ms"] > 0
    assert as_json["cached_tokens"] == as_json["prompt_tokens"] == computed["prompt_tokens"]
    # Stats: one more request, answered from the response cache.
    assert after["requests"] == before["requests"] + 1
    assert after["response_cache_hits"] == before["response_cache_hits"] + 1
    assert after["response_cache"]["hits"] == before["response_cache"]["hits"] + 1
    assert after["completion_tokens"] == before["completion_tokens"] + as_json["completion_tokens"]
    # Listener events: the answer plus "status", exactly as process_request sends them.
    assert len(events) == 3
    assert events[2] == {**as_json, "status": "ok"}
    assert events[1].keys() == events[2].keys()


async def test_bad_input_raises_and_is_counted_like_process_request(engine):
    events: list[dict] = []
    engine.add_listener(events.append)
    with pytest.raises(InvalidRequestError) as caught:
        await engine.process_request_json({"query": "hi", "max_new_tokens": 0})
    assert caught.value.field == "max_new_tokens"
    assert engine.get_stats()["invalid_requests"] == 1
    assert events == [{"status": "error", "error": "InvalidRequestError", "invalid": True}]


async def test_requests_that_skip_the_response_cache_are_computed(engine):
    query = {"query": "Sampled", "max_new_tokens": 3, "temperature": 0.7}
    first = json.loads(await engine.process_request_json(query))
    second = json.loads(await engine.process_request_json(query))
    assert not first["response_cached"] and not second["response_cached"]
    assert engine.get_stats()["response_cache"]["hits"] == 0


def test_get_derived_computes_once_per_stored_entry():
    cache = ResponseCache(max_entries=4, ttl_seconds=60)
    calls: list[bytes] = []

    def derive(data: bytes) -> int:
        calls.append(data)
        return len(calls)

    assert cache.get_derived("k", derive) is None and cache.misses == 1
    cache.put("k", {"a": 1})
    assert cache.get_derived("k", derive) == 1
    assert cache.get_derived("k", derive) == 1 and len(calls) == 1 and cache.hits == 2
    assert cache.get("k") == {"a": 1}  # the stored value itself is untouched
    cache.put("k", {"a": 2})  # a new value is derived again
    assert cache.get_derived("k", derive) == 2
    cache.put("gone", 1, ttl_seconds=-1)
    assert cache.get_derived("gone", derive) is None


def test_stored_answer_json_is_valid_and_escaped():
    stored = {
        "result": 'a "quote" \\ and \u00e9',
        "cache_hit": False,
        "response_cached": False,
        "latency": 5.0,
        "ttft_ms": 1.0,
        "cached_tokens": 0,
        "prompt_tokens": 7,
        "completion_tokens": 2,
        "finish_reason": "length",
        "request_id": "first",
        "model": "demo",
    }
    cache = ResponseCache(max_entries=4, ttl_seconds=60)
    cache.put("k", stored)
    answer = cache.get_derived("k", StoredAnswer.from_stored)
    assert answer is not None and answer.prompt_tokens == 7 and answer.completion_tokens == 2
    text = answer.answer_json(0.25, 'new "id"\n')
    decoded = json.loads(text)
    assert decoded == answer.answer(0.25, 'new "id"\n')
    assert decoded == {
        **stored,
        "cache_hit": True,
        "response_cached": True,
        "latency": 0.25,
        "ttft_ms": 0.25,
        "cached_tokens": 7,
        "request_id": 'new "id"\n',
    }
    assert json_bytes({"x": "\u00e9"}) == '{"x":"\u00e9"}'.encode()


def test_request_key_tells_every_sampling_knob_apart():
    base = SamplingParams(max_new_tokens=8)
    keys = {
        request_key("fp", "prompt", base),
        request_key("fp2", "prompt", base),
        request_key("fp", "prompt ", base),
        request_key("fp", "prompt", SamplingParams(max_new_tokens=9)),
        request_key("fp", "prompt", SamplingParams(max_new_tokens=8, temperature=0.5)),
        request_key("fp", "prompt", SamplingParams(max_new_tokens=8, top_p=0.5)),
        request_key("fp", "prompt", SamplingParams(max_new_tokens=8, seed=1)),
        request_key("fp", "prompt", SamplingParams(max_new_tokens=8, stop=("x",))),
        request_key("fp", "prompt", SamplingParams(max_new_tokens=8, stop=("x", "y"))),
    }
    assert len(keys) == 9
    assert request_key("fp", "prompt", base) == request_key("fp", "prompt", SamplingParams(max_new_tokens=8))


def test_a_long_prompt_is_keyed_by_its_digest():
    base = SamplingParams(max_new_tokens=8)
    long_a, long_b = "a" * 5000, "a" * 4999 + "b"
    key = request_key("fp", long_a, base)
    assert key == request_key("fp", "a" * 5000, base) and key != request_key("fp", long_b, base)
    assert all(len(part) < 100 for part in key if isinstance(part, str | bytes))
