"""Continuous batching through the engine's public API: many concurrent callers on the model thread,
streams cancelled mid-way, the batching figures in `get_stats()`, and a model that cannot batch."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from tests.conftest import generate_without_cache
from tests.tiny_hf_model import llama_layout_model, recurrent_model

SYSTEM = "You are BUL, an assistant for business documents. Answer briefly.\n"


def _requests(n: int) -> list[dict]:
    rng = random.Random(11)
    requests = []
    for i in range(n):
        request = {
            "query": SYSTEM + f"Question {i % 24}: plan {rng.randint(0, 999)}",
            "max_new_tokens": 4 + i % 13,
        }
        if i % 3 == 0:
            request |= {"temperature": 0.8, "seed": i}
        requests.append(request)
    return requests


@pytest.mark.slow
async def test_64_concurrent_requests_all_return_correct_results(demo_model):
    """In batch-invariant mode "correct" is exact: each answer is the one the same request gets
    alone, bit for bit, greedy and seeded ones alike."""
    config = KVCacheConfig(
        model="demo", dtype="float32", response_cache=False, batch_invariant=True, max_batch_size=32
    )
    requests = _requests(64)
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
        results = await asyncio.gather(*(engine.process_request(r) for r in requests))
        stats = engine.get_stats()
        alone = [engine.process_request_sync(r) for r in requests]  # one at a time
    assert [r["result"] for r in results] == [r["result"] for r in alone]
    assert [r["completion_tokens"] for r in results] == [r["completion_tokens"] for r in alone]
    assert len({r["request_id"] for r in results}) == 64
    assert stats["requests"] == 64 and stats["errors"] == 0
    assert stats["batch"]["mean_size"] > 4
    # The system prompt is computed once and reused by the others.
    assert sum(r["cached_tokens"] >= 64 for r in results) >= 60


async def test_a_cancelled_stream_frees_its_slot(demo_model):
    config = KVCacheConfig(model="demo", dtype="float32", response_cache=False, max_batch_size=1)
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
        stream = engine.stream_request({"query": "a very long answer", "max_new_tokens": 2000})
        async for _ in stream:
            break  # one token, then the client goes away
        await stream.aclose()
        # With one slot, this can only run once the abandoned stream has left it.
        result = await asyncio.wait_for(engine.process_request({"query": "next", "max_new_tokens": 3}), 60)
        assert result["completion_tokens"] == 3
        stats = engine.get_stats()
    assert stats["running"] == 0 and stats["queue_depth"] == 0
    assert stats["batch"]["kv_tokens_in_use"] == 0
    assert stats["completion_tokens"] < 2000  # the long one stopped early (counted as cancelled)


async def test_stats_report_batching(demo_model):
    config = KVCacheConfig(model="demo", dtype="float32", response_cache=False)
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
        await asyncio.gather(
            *(engine.process_request({"query": f"q{i}", "max_new_tokens": 12}) for i in range(8))
        )
        stats = engine.get_stats()
    batch = stats["batch"]
    assert batch["mean_size"] > 1 and batch["decode_steps"] > 0
    assert batch["max_batch_size"] == 32 and batch["max_batch_tokens"] == 16384
    assert batch["kv_tokens_in_use"] == 0 and batch["batch_invariant"] is False
    assert stats["itl_ms"]["p50"] > 0 and stats["itl_ms"]["p99"] >= stats["itl_ms"]["p50"]
    assert stats["generated_tokens_per_second"] > 0
    histograms = stats["histograms"]
    assert histograms["itl_seconds"]["count"] == 8 * 11  # 12 tokens: 11 gaps each
    assert histograms["batch_size"]["count"] == batch["decode_steps"]


async def test_a_model_that_cannot_batch_runs_one_request_at_a_time(caplog):
    lm = recurrent_model()
    prompts = [f"recurrent prompt number {i}, a few words long" for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="bulk.engine.model_runner"):
        engine = UltraAdaptiveKVCacheEngine(
            KVCacheConfig(model="demo", dtype="float32", response_cache=False), model=lm
        )
    with engine:
        results = await asyncio.gather(
            *(engine.process_request({"query": p, "max_new_tokens": 10}) for p in prompts)
        )
        stats = engine.get_stats()
    assert [r["result"] for r in results] == [generate_without_cache(lm, p, 10).text for p in prompts]
    assert stats["batch"]["max_batch_size"] == 1
    assert stats["histograms"]["batch_size"]["buckets"][0] == [1, stats["batch"]["decode_steps"]]
    assert [r.getMessage() for r in caplog.records if r.name == "bulk.engine.model_runner"] == [
        "model tiny-recurrent decodes one request at a time: its cache layers are not all full or "
        "sliding-window attention (recurrent or chunked)"
    ]


async def test_a_failing_step_fails_its_requests_not_the_engine(demo_model, monkeypatch):
    config = KVCacheConfig(model="demo", dtype="float32", response_cache=False)
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
        scheduler = engine._loop.scheduler
        schedule = scheduler.schedule
        calls = []

        def broken_once():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("a scheduler bug")
            return schedule()

        monkeypatch.setattr(scheduler, "schedule", broken_once)
        with pytest.raises(RuntimeError, match="a scheduler bug"):
            await engine.process_request({"query": "first", "max_new_tokens": 3})
        result = await engine.process_request({"query": "second", "max_new_tokens": 3})
        stats = engine.get_stats()
    assert result["completion_tokens"] == 3
    assert stats["errors"] == 1 and stats["running"] == 0 and stats["batch"]["kv_tokens_in_use"] == 0


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "phi3", "smollm3"])
async def test_mistral_and_qwen_batch_and_reuse_through_the_plain_step(family):
    lm = llama_layout_model(family)
    config = KVCacheConfig(model="demo", dtype="float32", response_cache=False)
    prompts = [f"a {family} prompt number {i}, long enough for a block or two of its own" for i in range(16)]
    with UltraAdaptiveKVCacheEngine(config, model=lm) as engine:
        results = await asyncio.gather(
            *(engine.process_request({"query": p, "max_new_tokens": 8}) for p in prompts)
        )
        again = await engine.process_request({"query": prompts[3], "max_new_tokens": 8})
        stats = engine.get_stats()
        assert engine._loop is not None and engine._loop.runner.plain_step is not None
    solo = [generate_without_cache(lm, p, 8).text for p in prompts]
    assert [r["result"] for r in results] == solo  # batched greedy answers are the solo ones
    assert stats["batch"]["max_batch_size"] >= 12  # 16 requests decoded together
    assert again["cached_tokens"] >= 16 and again["result"] == solo[3]  # its prefix reused
