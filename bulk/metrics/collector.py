"""A Prometheus collector that reads `engine.get_stats()` when Prometheus scrapes.

Counters and gauges come from the engine's own counters at scrape time rather than being bumped on
every request: the request path pays nothing for them, and they can never drift from `/api/stats`.

Through a cluster's ingress the stats hold a `replicas` entry (`bulk.routing.cluster_stats`): each
replica's figures are then exported too, as `kv_cache_replica_*` families labelled `replica`, with
the router's decisions (`kv_cache_routed_requests_total{replica, reason}`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:  # annotations only: importing the engine here would load torch with the metrics
    from bulk.engine.protocol import ServingEngine

TIER_LABELS = ("tier",)
# (metric name, key in get_stats()["histograms"], help)
HISTOGRAMS = (
    ("latency_seconds", "latency_seconds", "Engine latency of a request, from acceptance to the last token"),
    ("time_to_first_token_seconds", "ttft_seconds", "Time from accepting a request to its first token"),
    ("inter_token_latency_seconds", "itl_seconds", "Time between two tokens of one request"),
    ("batch_size", "batch_size", "Requests decoded together in one step"),
)
# A cluster's per-replica families: (name after `replica_`, key in the replica's summary, help).
REPLICA_COUNTERS = (
    ("requests", "requests", "Requests answered, by replica"),
    ("prefix_cache_queries", "prompt_tokens", "Prompt tokens looked up, by replica"),
    ("prefix_cache_hits", "cached_tokens", "Prompt tokens served from cached KV (any tier), by replica"),
    ("memory_token_queries", "memory_token_queries", "Prompt tokens looked up in memory, by replica"),
    ("memory_token_hits", "memory_token_hits", "Prompt tokens found in the memory tier, by replica"),
    ("completion_tokens", "completion_tokens", "Tokens generated, by replica"),
    ("errors", "errors", "Failed requests, by replica"),
)
REPLICA_GAUGES = (
    ("size_bytes", "memory_size_bytes", "Bytes of KV state in the memory tier, by replica"),
    ("memory_tokens", "memory_tokens", "Tokens of KV state in the memory tier, by replica"),
    ("requests_running", "running", "Requests admitted to the batch, by replica"),
    ("requests_waiting", "queue_depth", "Requests queued for the batch, by replica"),
    ("inflight", "inflight", "Requests the router sent there and not answered yet, by replica"),
    ("generated_tokens_per_second", "generated_tokens_per_second", "Tokens per second, by replica"),
    ("ready", "ready", "1 once the replica's model is loaded and warm"),
)


class EngineStatsCollector(Collector):
    def __init__(self, engine: ServingEngine, prefix: str = "kv_cache") -> None:
        self._engine = engine
        self._prefix = prefix
        self._given = threading.local()  # stats handed in for one rendering, per thread

    @contextmanager
    def reading(self, stats: dict[str, Any]) -> Iterator[None]:
        """Collect from `stats` instead of `engine.get_stats()` within this block (this thread)."""
        self._given.stats = stats
        try:
            yield
        finally:
            self._given.stats = None

    def _name(self, name: str) -> str:
        return f"{self._prefix}_{name}"

    def describe(self) -> list[Metric]:
        # Empty: the registry then calls collect() for names only when needed, not at registration
        # (the engine may still be loading).
        return []

    def collect(self) -> Iterator[Metric]:
        stats = getattr(self._given, "stats", None) or self._engine.get_stats()
        requests = int(stats.get("requests", 0))
        hits = int(stats.get("cache_hits", 0))

        # The guide's counter: a request is a hit when it reused anything (whole answer or KV blocks).
        by_status = CounterMetricFamily(
            self._name("requests"), "Requests answered, by cache outcome", labels=["status"]
        )
        by_status.add_metric(["hit"], hits)
        by_status.add_metric(["miss"], max(requests - hits, 0))
        yield by_status

        histograms = stats.get("histograms", {})
        for name, key, documentation in HISTOGRAMS:
            if key in histograms:
                yield self._histogram(name, documentation, histograms[key])

        yield self._counter(
            "response_cache_hits",
            "Requests answered whole from the response cache",
            stats.get("response_cache_hits", 0),
        )
        yield self._counter(
            "prefix_hit_requests",
            "Requests that reused at least one cached KV block",
            stats.get("prefix_hits", 0),
        )
        # Token-level prefix cache counters (vLLM's prefix_cache_queries / prefix_cache_hits).
        yield self._counter(
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            stats.get("prompt_tokens", 0),
        )
        yield self._counter(
            "prefix_cache_hits", "Prompt tokens served from cached KV", stats.get("cached_tokens", 0)
        )
        yield self._counter("completion_tokens", "Tokens generated", stats.get("completion_tokens", 0))
        yield self._counter("evictions", "KV blocks evicted from memory", stats.get("evictions", 0))

        errors = CounterMetricFamily(self._name("errors"), "Failed requests, by kind", labels=["kind"])
        errors.add_metric(["invalid"], stats.get("invalid_requests", 0))
        errors.add_metric(["internal"], stats.get("errors", 0))
        yield errors

        yield self._gauge("requests_running", "Requests admitted to the batch now", stats.get("running", 0))
        yield self._gauge("requests_waiting", "Requests queued for the batch", stats.get("queue_depth", 0))
        batch = stats.get("batch") or {}
        yield self._gauge(
            "running_kv_tokens", "KV tokens reserved by running requests", batch.get("kv_tokens_in_use", 0)
        )
        yield self._gauge(
            "running_kv_bytes", "KV bytes reserved by running requests", batch.get("kv_bytes_in_use", 0)
        )
        yield self._gauge(
            "max_batch_tokens", "KV tokens the running requests may reserve", batch.get("max_batch_tokens", 0)
        )
        yield self._counter("decode_steps", "Batched decode steps run", batch.get("decode_steps", 0))
        yield self._gauge(
            "generated_tokens_per_second",
            "Tokens generated per second over the last 10 s",
            stats.get("generated_tokens_per_second", 0),
        )
        yield self._gauge("ready", "1 once the model is loaded and warm", 1 if stats.get("ready") else 0)
        yield from self._tiers(stats.get("tiers") or {})

        responses = stats.get("response_cache") or {}
        yield self._gauge(
            "response_cache_entries", "Answers held by the response cache", responses.get("entries", 0)
        )
        yield self._gauge(
            "response_cache_size_bytes", "Bytes held by the response cache", responses.get("size_bytes", 0)
        )
        if "replicas" in stats:
            yield from self._replicas(stats["replicas"])

    def _replicas(self, replicas: dict[str, dict[str, Any]]) -> Iterator[Metric]:
        """A cluster's per-replica figures (`bulk.routing.cluster_stats.replica_summary`)."""
        label = ["replica"]
        yield self._gauge("replicas", "Engine replicas answering", len(replicas))
        for name, key, documentation in REPLICA_COUNTERS:
            counter = CounterMetricFamily(self._name(f"replica_{name}"), documentation, labels=label)
            for replica, figures in sorted(replicas.items()):
                counter.add_metric([replica], _number(figures.get(key, 0)))
            yield counter
        for name, key, documentation in REPLICA_GAUGES:
            gauge = GaugeMetricFamily(self._name(f"replica_{name}"), documentation, labels=label)
            for replica, figures in sorted(replicas.items()):
                value = figures.get(key, 0)
                gauge.add_metric([replica], _number(int(value) if isinstance(value, bool) else value))
            yield gauge
        routed = CounterMetricFamily(
            self._name("routed_requests"),
            "Requests the router sent, by replica and reason (session, prefix, balance, spread, full, pow2)",
            labels=["replica", "reason"],
        )
        for replica, figures in sorted(replicas.items()):
            for reason, count in sorted((figures.get("routed") or {}).items()):
                routed.add_metric([replica, reason], _number(count))
        yield routed

    def _tiers(self, tiers: dict[str, dict[str, Any]]) -> Iterator[Metric]:
        memory = tiers.get("memory") or {}
        # The guide's gauge: the KV bytes held in memory, the tier `max_tokens` bounds.
        yield self._gauge(
            "size_bytes", "Bytes of KV state held in the memory tier", memory.get("size_bytes", 0)
        )
        families = {
            "hits": CounterMetricFamily(
                self._name("tier_hits"), "Block lookups found, by tier", labels=TIER_LABELS
            ),
            "misses": CounterMetricFamily(
                self._name("tier_misses"), "Block lookups not found, by tier", labels=TIER_LABELS
            ),
            "errors": CounterMetricFamily(
                self._name("tier_errors"), "Tier operations that failed, by tier", labels=TIER_LABELS
            ),
            # The fault counters of /api/stats, so that alerts can watch them (deploy/alerts.yml).
            "corrupt": CounterMetricFamily(
                self._name("tier_corrupt"),
                "Blocks refused (bad tag, unparsable, other tokens) and deleted, by tier",
                labels=TIER_LABELS,
            ),
            "skipped": CounterMetricFamily(
                self._name("tier_bypassed"),
                "Tier calls skipped while the tier was bypassed after a failure, by tier",
                labels=TIER_LABELS,
            ),
            "writes": CounterMetricFamily(
                self._name("tier_writes"), "Blocks written, by tier", labels=TIER_LABELS
            ),
            "evictions": CounterMetricFamily(
                self._name("tier_evictions"), "Blocks evicted to keep the budget, by tier", labels=TIER_LABELS
            ),
            "resynced_away": CounterMetricFamily(
                self._name("tier_resynced_away"),
                "Blocks found gone from the backend (restart, expiry, another replica) and forgotten",
                labels=TIER_LABELS,
            ),
        }
        size = GaugeMetricFamily(self._name("tier_size_bytes"), "Bytes held, by tier", labels=TIER_LABELS)
        blocks = GaugeMetricFamily(self._name("tier_blocks"), "Blocks held, by tier", labels=TIER_LABELS)
        healthy = GaugeMetricFamily(
            self._name("tier_healthy"), "1 while the tier answers, by tier", labels=TIER_LABELS
        )
        for name, tier in sorted(tiers.items()):
            for key, family in families.items():
                family.add_metric([name], _number(tier.get(key, 0)))
            size.add_metric([name], _number(tier.get("size_bytes", 0)))
            blocks.add_metric([name], _number(tier.get("blocks", 0)))
            healthy.add_metric([name], 1 if tier.get("healthy", True) else 0)
        yield from families.values()
        yield size
        yield blocks
        yield healthy

    def _counter(self, name: str, doc: str, value: Any) -> CounterMetricFamily:
        return CounterMetricFamily(self._name(name), doc, value=_number(value))

    def _gauge(self, name: str, doc: str, value: Any) -> GaugeMetricFamily:
        return GaugeMetricFamily(self._name(name), doc, value=_number(value))

    def _histogram(self, name: str, documentation: str, data: dict[str, Any]) -> HistogramMetricFamily:
        buckets = [
            (bound if bound == "+Inf" else floatToGoString(bound), count) for bound, count in data["buckets"]
        ]
        return HistogramMetricFamily(self._name(name), documentation, buckets=buckets, sum_value=data["sum"])


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
