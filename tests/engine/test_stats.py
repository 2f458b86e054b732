"""The engine's cumulative latency histograms (`get_stats()["histograms"]`), which exporters publish."""

import json

from bulk.engine.stats import LATENCY_BUCKETS, BucketCounts, EngineStats


def test_bucket_bounds_are_inclusive_and_cumulative():
    counts = BucketCounts((0.01, 0.1, 1.0))
    for seconds in (0.005, 0.01, 0.05, 2.0):
        counts.add(seconds)
    snapshot = counts.snapshot()
    assert snapshot["buckets"] == [[0.01, 2], [0.1, 3], [1.0, 3], ["+Inf", 4]]
    assert snapshot["count"] == 4 and abs(snapshot["sum"] - 2.065) < 1e-9


def test_engine_stats_report_both_histograms_as_json():
    stats = EngineStats()
    for latency_ms in (0.5, 40.0, 3000.0):
        stats.record(
            prompt_tokens=10,
            cached_tokens=0,
            completion_tokens=2,
            latency_ms=latency_ms,
            ttft_ms=latency_ms / 2,
            response_cached=False,
        )
    histograms = json.loads(json.dumps(stats.snapshot()["histograms"]))
    latency = histograms["latency_seconds"]
    assert latency["count"] == 3 and len(latency["buckets"]) == len(LATENCY_BUCKETS) + 1
    assert latency["buckets"][0] == [0.001, 1]  # 0.5 ms
    assert histograms["ttft_seconds"]["count"] == 3
