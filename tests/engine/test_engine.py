from __future__ import annotations

import asyncio
import json

import pytest

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.errors import EngineClosedError, InvalidRequestError, PromptTooLongError

SHARED = "You are BUL, an assistant for business documents. Answer briefly.\n"


@pytest.fixture
def engine(demo_model):
    config = KVCacheConfig(model="demo", default_max_new_tokens=6, max_tokens=2048)
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
        yield engine


def test_guide_fields_present(engine):
    result = engine.process_request_sync({"query": "Create marketing strategy", "priority": 1})
    for key in (
        "result",
        "cache_hit",
        "latency",
        "cached_tokens",
        "prompt_tokens",
        "completion_tokens",
        "ttft_ms",
        "request_id",
    ):
        assert key in result
    assert isinstance(result["result"], str) and result["completion_tokens"] == 6
    assert result["latency"] >= result["ttft_ms"] > 0
    json.dumps(engine.get_stats())  # JSON-serializable


def test_text_field_as_in_the_guides_websocket_example(engine):
    assert engine.process_request_sync({"text": "Create marketing strategy"})["prompt_tokens"] == 26


async def test_32_concurrent_requests_all_correct(engine, reference):
    prompts = [SHARED + f"Question {i % 8}: plan for product {i % 8}" for i in range(32)]
    results = await asyncio.gather(*(engine.process_request({"query": p}) for p in prompts))
    expected = {p: reference(p, 6).text for p in set(prompts)}
    assert [r["result"] for r in results] == [expected[p] for p in prompts]
    assert len({r["request_id"] for r in results}) == 32
    # After the first, every request shares the system prompt's blocks or the whole answer.
    assert sum(r["cache_hit"] for r in results) >= 31
    stats = engine.get_stats()
    assert stats["requests"] == 32 and stats["errors"] == 0


async def test_queued_requests_served_by_priority(engine):
    # A long request holds the worker while the others queue up behind it: they are sent once its
    # first token has come, so it is running (not merely queued) whatever the machine's speed.
    running = asyncio.Event()

    async def hold() -> None:
        async for _ in engine.stream_request({"query": "hold the worker", "max_new_tokens": 120}):
            running.set()

    blocker = asyncio.ensure_future(hold())
    await asyncio.wait_for(running.wait(), timeout=60)
    finished: list[int] = []

    async def run(priority: int) -> None:
        await engine.process_request({"query": f"job with priority {priority}", "priority": priority})
        finished.append(priority)

    tasks = [asyncio.ensure_future(run(p)) for p in (1, 5, 3, 5, 10, -2)]
    await asyncio.gather(blocker, *tasks)
    assert finished == [10, 5, 5, 3, 1, -2]


def test_response_cache_serves_identical_deterministic_requests(engine):
    first = engine.process_request_sync({"query": "Create marketing strategy"})
    second = engine.process_request_sync({"query": "Create marketing strategy"})
    assert not first["response_cached"]
    assert second["response_cached"] and second["cache_hit"]
    assert second["result"] == first["result"]
    assert second["cached_tokens"] == second["prompt_tokens"]
    assert second["request_id"] != first["request_id"]


def test_sampled_requests_bypass_response_cache_unless_seeded(engine):
    sampled = {"query": "Write a slogan", "temperature": 0.9}
    engine.process_request_sync(sampled)
    assert not engine.process_request_sync(sampled)["response_cached"]
    seeded = {**sampled, "seed": 42}
    a = engine.process_request_sync(seeded)
    b = engine.process_request_sync(seeded)
    assert b["response_cached"] and a["result"] == b["result"]
    forced = {**sampled, "response_cache": True}
    engine.process_request_sync(forced)
    assert engine.process_request_sync(forced)["response_cached"]


async def test_key_value_api_round_trips_bytes_and_json(engine):
    await engine.store_in_cache("POST:/api/query", b"\x00raw bytes")
    await engine.store_in_cache("doc", {"a": [1, 2, {"b": None}]})
    assert await engine.get_from_cache("POST:/api/query") == b"\x00raw bytes"
    value = await engine.get_from_cache("doc")
    assert value == {"a": [1, 2, {"b": None}]}
    value["a"].append(3)  # the caller's copy, not the cache's
    assert await engine.get_from_cache("doc") == {"a": [1, 2, {"b": None}]}
    assert await engine.get_from_cache("missing") is None
    with pytest.raises(TypeError):
        await engine.store_in_cache("bad", {1, 2})


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({}, "query"),
        ({"query": ""}, "query"),
        ({"query": "   "}, "query"),
        ({"query": 42}, "query"),
        ({"text": ["a"]}, "text"),
        ({"query": "hi", "priority": "high"}, "priority"),
        ({"query": "hi", "priority": 1.5}, "priority"),
        ({"query": "hi", "priority": True}, "priority"),
        ({"query": "hi", "max_new_tokens": "ten"}, "max_new_tokens"),
        ({"query": "hi", "max_new_tokens": 0}, "max_new_tokens"),
        ({"query": "hi", "temperature": "hot"}, "temperature"),
        ({"query": "hi", "top_p": 0}, "top_p"),
        ({"query": "hi", "stop": [1]}, "stop"),
        ({"query": "hi", "colour": "blue"}, "colour"),
        ({"query": "a", "text": "b"}, "query"),
        ("just a string", "query"),
    ],
)
async def test_bad_input_raises_typed_error_naming_the_field(engine, query, field):
    with pytest.raises(InvalidRequestError) as info:
        await engine.process_request(query)
    assert info.value.field == field
    assert field in str(info.value)


def test_prompt_longer_than_context(engine, demo_model):
    with pytest.raises(PromptTooLongError) as info:
        engine.process_request_sync({"query": "x" * demo_model.context_length})
    assert info.value.field == "query" and "context" in str(info.value)
    # One bad request never affects the next.
    assert engine.process_request_sync({"query": "still fine"})["completion_tokens"] == 6
    assert engine.get_stats()["invalid_requests"] == 1


def test_stop_strings_cut_the_text(engine, reference):
    free = reference("Stop here", 20).text
    stop = free[5:7]
    result = engine.process_request_sync({"query": "Stop here", "max_new_tokens": 20, "stop": stop})
    assert result["result"] == free[: free.find(stop)]
    assert result["finish_reason"] == "stop"


async def test_streaming_yields_tokens_then_the_result(engine, reference):
    events = [e async for e in engine.stream_request({"query": "Stream this", "max_new_tokens": 8})]
    tokens, final = events[:-1], events[-1]
    assert final["done"] and final["completion_tokens"] == 8
    assert "".join(e["token"] for e in tokens) == final["result"] == reference("Stream this", 8).text
    assert len(tokens) == 8


async def test_abandoned_stream_cancels_generation(engine):
    stream = engine.stream_request({"query": "a long one", "max_new_tokens": 500, "response_cache": False})
    async for _ in stream:
        break
    await stream.aclose()
    result = await engine.process_request({"query": "next", "max_new_tokens": 2})
    assert result["completion_tokens"] == 2


async def test_warmup_is_idempotent_and_sets_ready(demo_model):
    with UltraAdaptiveKVCacheEngine(KVCacheConfig(model="demo"), model=demo_model) as engine:
        assert not engine.ready
        await engine.warmup()
        await engine.warmup()
        engine.warmup_sync()
        assert engine.ready and engine.get_stats()["requests"] == 0


def test_shutdown_refuses_new_work(demo_model):
    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(model="demo"), model=demo_model)
    engine.process_request_sync({"query": "one", "max_new_tokens": 1})
    engine.shutdown()
    engine.shutdown()
    with pytest.raises(EngineClosedError):
        engine.process_request_sync({"query": "two", "max_new_tokens": 1, "response_cache": False})


def test_stats_report_tiers_tokens_and_latencies(engine):
    engine.process_request_sync({"query": SHARED + "one"})
    engine.process_request_sync({"query": SHARED + "two"})
    stats = engine.get_stats()
    assert stats["prefix_hits"] == 1 and stats["cached_tokens"] >= 64
    assert 0 < stats["token_hit_rate"] < 1
    assert stats["tiers"]["memory"]["tokens"] <= 2048
    assert stats["tiers"]["memory"]["size_bytes"] == stats["tiers"]["memory"]["blocks"] * 16 * 10240
    assert stats["latency_ms"]["p50"] > 0 and stats["ttft_ms"]["p95"] > 0
