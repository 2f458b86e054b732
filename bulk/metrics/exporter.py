"""`PrometheusExporter`: every BUL KV metric for one engine, on a registry of its own.

Everything about the engine, counters, gauges and its latency and TTFT histograms (the engine keeps
their bucket counts), is read from `engine.get_stats()` at scrape time (`EngineStatsCollector`): the
request path pays nothing for metrics. Only the API's end-to-end histogram, which the engine cannot
see, is observed per request (`LatencyHistogram`: a bisect and two additions under a lock).

Each exporter owns a `CollectorRegistry` unless given one: two apps (or tests) in one process never
clash, and the guide's own `Counter('kv_cache_requests_total', ...)` on the default registry still
works beside us."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from bulk.engine.stats import LATENCY_BUCKETS
from bulk.metrics.collector import EngineStatsCollector
from bulk.metrics.histogram import LatencyHistogram

if TYPE_CHECKING:  # annotations only: importing the engine here would load torch with the metrics
    from bulk.engine.protocol import ServingEngine


class PrometheusExporter:
    """`PrometheusExporter(engine)` attaches at once; `PrometheusExporter()` then `.attach(engine)`.
    `generate_latest()` renders the text format; `registry` is what a `/metrics` route serves."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        engine: ServingEngine | None = None,
        registry: CollectorRegistry | None = None,
        prefix: str = "kv_cache",
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.prefix = prefix
        self.e2e = LatencyHistogram(
            f"{prefix}_e2e_request_latency_seconds",
            "Wall time of an API request, parsing and answering included, as the server saw it",
            LATENCY_BUCKETS,
            self.registry,
            labelnames=("api",),
        )
        self._engine: ServingEngine | None = None
        if engine is not None:
            self.attach(engine)

    def attach(self, engine: ServingEngine) -> PrometheusExporter:
        """Read `engine`'s stats at scrape time; once per exporter."""
        if self._engine is not None:
            raise RuntimeError("this exporter is already attached to an engine")
        self._engine = engine
        self._collector = EngineStatsCollector(engine, self.prefix)
        self.registry.register(self._collector)
        return self

    def observe_e2e(self, api: str, seconds: float) -> None:
        self.e2e.observe(seconds, api)

    def generate_latest(self, stats: dict[str, Any] | None = None) -> bytes:
        """The text format. `stats`: figures the caller already has (`await engine.fetch_stats()`,
        a cluster's from every replica), read instead of `engine.get_stats()` for this rendering."""
        if stats is None or self._engine is None:
            return generate_latest(self.registry)
        with self._collector.reading(stats):
            return generate_latest(self.registry)
