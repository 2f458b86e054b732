"""The parts of `bul bench cluster` that need no cluster: the workload's size against the memory tier,
the counters differenced replica by replica across a lost and a new replica, the periods' figures,
the reading schedule and the report. No Ray, no model."""

import itertools

from bench import cluster
from bench.cluster import Sample, Snapshot
from bench.cluster_workload import WORDS, sessions, system_prompts


def _snap(at: float, **replicas: tuple[int, int, int, int]) -> Snapshot:
    counters = {rid: dict(zip(cluster.COUNTERS, v, strict=True)) for rid, v in replicas.items()}
    return Snapshot(at, counters, len(counters))


def test_the_tenants_prompts_are_at_least_three_times_one_replicas_memory_tier():
    systems = system_prompts(cluster.SHAPE, 7.3)
    assert len(systems) == cluster.SHAPE.tenants == 13 and len(set(systems)) == 13
    # The demo models' byte tokenizer: a token per byte, and the BOS.
    tokens = sum(len(text.encode()) + 1 for text in systems)
    assert tokens / cluster.MEMORY_TOKENS >= cluster.MIN_PROMPT_RATIO
    assert all(900 <= len(text.encode()) <= 1200 for text in systems)
    # The rest of the shape: every tenant as popular, 1-3 turns with 1-3 s pauses between them,
    # 32-96 token answers, seeded.
    work = sessions(cluster.SHAPE, 400, 7.3)
    assert work == sessions(cluster.SHAPE, 400, 7.3)
    assert {len(s.questions) for s in work} == {1, 2, 3}
    assert all(len(s.pauses_s) == len(s.questions) - 1 for s in work)
    assert all(1.0 <= p <= 3.0 for s in work for p in s.pauses_s)
    assert all(32 <= n <= 96 for s in work for n in s.answer_tokens)
    assert len(set(cluster.SHAPE.popularity())) == 1
    assert {s.tenant for s in work} == set(range(13))
    assert set(" ".join(systems[0].split(": ", 1)[1].split()).split()) <= set(WORDS)


def test_counters_are_differenced_replica_by_replica():
    before = _snap(0.0, a=(10, 20, 30, 40), b=(5, 10, 15, 20))
    # b lost with its node, c its replacement: b counts nothing more, c from zero.
    after = _snap(10.0, a=(30, 50, 60, 80), c=(1, 4, 2, 8))
    assert cluster.counter_delta(before, after) == {
        "memory_token_hits": 21,
        "memory_token_queries": 34,
        "cached_tokens": 32,
        "prompt_tokens": 48,
    }


def test_a_replica_missing_from_a_reading_counts_nothing_there_rather_than_everything_later():
    readings = [
        _snap(0.0, a=(0, 0, 0, 0), b=(10, 10, 10, 10)),
        _snap(20.0, a=(5, 5, 5, 5)),  # b too slow to answer (its node being lost), or dead
        _snap(10.0, a=(2, 2, 2, 2), b=(12, 12, 12, 12)),  # read before, answered after: in time order
        _snap(30.0, a=(9, 9, 9, 9), c=(1, 1, 1, 1)),  # b dead, c its replacement
    ]
    snaps = cluster.carried_forward(readings)
    assert [s.at for s in snaps] == [0.0, 10.0, 20.0, 30.0]
    assert [s.reported for s in snaps] == [2, 2, 1, 2]
    deltas = [cluster.counter_delta(x, y)["memory_token_hits"] for x, y in itertools.pairwise(snaps)]
    assert deltas == [4, 3, 5]  # b: +2 then nothing; c: from zero
    assert cluster.counter_delta(snaps[0], snaps[-1])["memory_token_hits"] == 9 + 2 + 1


def test_periods_count_requests_by_when_they_were_sent_and_tokens_by_when_answered():
    samples = [
        Sample(sent=1.0, ttft=0.2, done=2.0, completion_tokens=40),
        Sample(sent=4.0, ttft=0.4, done=11.0, completion_tokens=60),  # answered in the next period
        Sample(sent=5.0, ttft=0.1, done=6.0, error="the retry diverged"),
        Sample(sent=12.0, ttft=0.3, done=13.0, completion_tokens=32),
    ]
    delta = {"memory_token_hits": 30, "memory_token_queries": 40, "cached_tokens": 35, "prompt_tokens": 50}
    first = cluster.summarize(samples, 0.0, 10.0, delta)
    assert first["requests"] == 3 and first["errors"] == 1
    assert first["memory_token_hit_rate"] == 0.75 and first["token_hit_rate"] == 0.7
    assert first["ttft_p50_ms"] == 400.0  # the failed request's TTFT is not counted
    assert first["completion_tokens_per_s"] == 4.0
    second = cluster.summarize(samples, 10.0, 20.0, dict.fromkeys(cluster.COUNTERS, 0))
    assert second["requests"] == 1 and second["errors"] == 0 and second["memory_token_hit_rate"] == 0.0
    assert second["completion_tokens_per_s"] == 9.2

    snaps = [_snap(0.0, a=(0, 0, 0, 0)), _snap(10.0, a=(30, 40, 35, 50)), _snap(20.0, b=(0, 0, 0, 0))]
    timeline = cluster.buckets(samples, snaps, 0.0)
    assert [(b["from_s"], b["to_s"], b["replicas"], b["requests"]) for b in timeline] == [
        (0.0, 10.0, 1, 3),
        (10.0, 20.0, 1, 1),
    ]


def test_the_counters_are_read_every_bucket_and_at_the_removal():
    assert cluster.schedule(60, 10, None) == [10, 20, 30, 40, 50]
    assert cluster.schedule(60, 10, 30.0) == [10, 20, 30.0, 40, 50]
    assert cluster.schedule(6, 2, 3.0) == [2, 3.0, 4]
    assert cluster.schedule(5, 10, None) == []


def test_the_report_shows_both_routers_the_node_lost_and_the_targets():
    figures = {
        "requests": 10,
        "errors": 0,
        "memory_token_hit_rate": 0.8,
        "token_hit_rate": 0.9,
        "ttft_p50_ms": 100.0,
        "ttft_p95_ms": 300.0,
        "completion_tokens_per_s": 50.0,
        "replicas_on_distinct_nodes": True,
    }
    results = {"prefix": figures, "pow2": {**figures, "memory_token_hit_rate": 0.4, "ttft_p50_ms": 200.0}}
    bucket = {"from_s": 0.0, "to_s": 10.0, "replicas": 2, **figures}
    lost = {
        **figures,
        "errors": 1,
        "buckets": [bucket, {**bucket, "from_s": 10.0, "to_s": 20.0, "replicas": 1}],
        "node_lost": {
            "node": "f" * 56,
            "replica": "abc",
            "removed_at_s": 10.0,
            "in_flight_at_removal": 4,
            "dead_after_s": 1.6,
            "replicas_back": True,
            "back_after_s": 25.0,
            "before": figures,
            "after": {**figures, "memory_token_hit_rate": 0.5},
        },
    }
    options = {
        "model": "demo",
        "clients": 4,
        "duration": 20.0,
        "warmup": 2.0,
        "bucket": 10.0,
        "tenant_prompt_tokens": 14430,
        "prompt_ratio": 14430 / 4096,
        "workload": {"tenants": 13},
    }
    checks = cluster.verdicts(results, lost)
    assert checks["memory-tier token hit rate, prefix / pow2 (x)"]["pass"]
    assert checks["TTFT p50, prefix / pow2 (x)"]["value"] == 0.5
    assert not checks["node lost: errors"]["pass"]
    assert checks["node lost: back to 2 replicas on 2 nodes (s after removal)"]["pass"]
    text = cluster.render(results, lost, checks, options)
    assert "3.52x one replica's memory tier" in text and "distinct worker nodes in every run: yes" in text
    assert "before the removal" in text and "after the removal" in text and "yes, 25.0 s after" in text
    assert "10-20" in text and "MISS" in text and "PASS" in text
    assert checks["errors, prefix + pow2"]["pass"]
    # The quick run measures power-of-two and the node-lost prefix run only: nothing to compare.
    quick = cluster.verdicts({"pow2": results["pow2"]}, lost)
    assert set(quick) == {
        "errors, pow2",
        "node lost: errors",
        "node lost: back to 2 replicas on 2 nodes (s after removal)",
    }
