"""A cluster's figures from its replicas' `get_stats()`: totals in the engine's shape, per-replica
figures, routing counts; what a shared tier reports is not summed."""

from __future__ import annotations

import pytest

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.routing.cluster_stats import merge_stats


@pytest.fixture(scope="module")
def two_replicas(demo_model):
    stats = []
    for queries in (["alpha " * 20, "alpha " * 20 + "more"], ["beta " * 30]):
        with UltraAdaptiveKVCacheEngine(
            KVCacheConfig(model="demo", device="cpu"), model=demo_model
        ) as engine:
            engine.warmup_sync()
            for text in queries:
                engine.process_request_sync({"query": text, "max_new_tokens": 3, "response_cache": False})
            stats.append(engine.get_stats())
    return {"r1": stats[0], "r2": stats[1]}


def test_totals_keep_the_engines_shape(two_replicas):
    r1, r2 = two_replicas["r1"], two_replicas["r2"]
    total = merge_stats(two_replicas, ingress_invalid=2)
    assert set(r1) <= set(total)  # every key a single engine reports
    assert total["requests"] == r1["requests"] + r2["requests"] == 3
    assert total["prompt_tokens"] == r1["prompt_tokens"] + r2["prompt_tokens"]
    assert total["token_hit_rate"] == round(total["cached_tokens"] / total["prompt_tokens"], 4)
    assert total["invalid_requests"] == 2
    memory = total["tiers"]["memory"]
    assert memory["blocks"] == r1["tiers"]["memory"]["blocks"] + r2["tiers"]["memory"]["blocks"]
    assert memory["block_size"] == 16 and memory["healthy"] is True
    count = total["histograms"]["latency_seconds"]["count"]
    assert count == 3 and total["histograms"]["latency_seconds"]["buckets"][-1] == ["+Inf", 3]
    assert total["latency_ms"]["estimated"] is True and total["latency_ms"]["p50"] > 0
    assert total["ready"] is True and total["model"] == "demo"


def test_each_replica_has_its_figures(two_replicas):
    routing = {"policy": "prefix", "decisions": {"r1": {"prefix": 1, "spread": 1}, "r2": {"spread": 1}}}
    total = merge_stats(two_replicas, routing)
    one = total["replicas"]["r1"]
    assert one["requests"] == 2 and one["memory_blocks"] > 0 and one["memory_token_hit_rate"] > 0
    assert one["routed"] == {"prefix": 1, "spread": 1}
    assert total["routing"] == {"policy": "prefix", "decisions": {"prefix": 1, "spread": 2}}


def test_a_shared_tier_is_one_store():
    def replica(blocks: int, hits: int) -> dict:
        return {
            "tiers": {"redis": {"blocks": blocks, "size_bytes": blocks * 10, "hits": hits, "healthy": True}}
        }

    total = merge_stats({"a": replica(5, 1), "b": replica(7, 2)})
    assert total["tiers"]["redis"] == {"blocks": 7, "size_bytes": 70, "hits": 3, "healthy": True}


def test_no_replicas():
    total = merge_stats({})
    assert total["requests"] == 0 and total["replicas"] == {} and total["ready"] is False
    assert total["ttft_ms"]["p50"] is None
