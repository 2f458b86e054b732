"""`PrometheusExporter`: every BUL KV metric for one engine, on a registry of its own.

Counters and gauges are read from `engine.get_stats()` at scrape time (`EngineStatsCollector`).
Latency histograms cannot be rebuilt from a summary, so they are fed by an engine listener, which
the engine calls once per finished request; observing one (`LatencyHistogram`) is a bisect and two
additions under a lock.

Each exporter owns a `CollectorRegistry` unless given one: two apps (or tests) in one process never
clash, and the guide's own `Counter('kv_cache_requests_total', ...)` on the default registry still
works beside us."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from bulk.metrics.collector import EngineStatsCollector
from bulk.metrics.histogram import LatencyHistogram

# The guide's buckets (0.001 ... 1.0), then more above: a model on a CPU often takes seconds.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class PrometheusExporter:
    """`PrometheusExporter(engine)` attaches at once; `PrometheusExporter()` then `.attach(engine)`.
    `generate_latest()` renders the text format; `registry` is what a `/metrics` route serves."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self, engine: Any | None = None, registry: CollectorRegistry | None = None, prefix: str = "kv_cache"
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.prefix = prefix
        self.latency = LatencyHistogram(
            f"{prefix}_latency_seconds",
            "Engine latency of a request, from acceptance to the last token",
            LATENCY_BUCKETS,
            self.registry,
        )
        self.ttft = LatencyHistogram(
            f"{prefix}_time_to_first_token_seconds",
            "Time from accepting a request to its first generated token",
            TTFT_BUCKETS,
            self.registry,
        )
        self.e2e = LatencyHistogram(
            f"{prefix}_e2e_request_latency_seconds",
            "Wall time of an API request, parsing and answering included, as the server saw it",
            LATENCY_BUCKETS,
            self.registry,
            labelnames=("api",),
        )
        self._latency_observe = self.latency.observe
        self._ttft_observe = self.ttft.observe
        self._engine: Any | None = None
        if engine is not None:
            self.attach(engine)

    def attach(self, engine: Any) -> PrometheusExporter:
        """Read `engine`'s stats at scrape time and observe each of its requests; once per exporter."""
        if self._engine is not None:
            raise RuntimeError("this exporter is already attached to an engine")
        self._engine = engine
        self.registry.register(EngineStatsCollector(engine, self.prefix))
        engine.add_listener(self.on_request)
        return self

    def on_request(self, event: dict[str, Any]) -> None:
        """The engine listener: one call per finished request (see `engine.add_listener`)."""
        if event.get("status") != "ok":
            return
        latency = event.get("latency")
        if latency is not None:
            self._latency_observe(latency / 1000.0)
        ttft = event.get("ttft_ms")
        if ttft is not None:
            self._ttft_observe(ttft / 1000.0)

    def observe_e2e(self, api: str, seconds: float) -> None:
        self.e2e.observe(seconds, api)

    # ---- the guide's PrometheusMetrics wrapper, for code written against it ------------------------

    def record_latency(self, duration: float) -> None:
        self._latency_observe(duration)

    def generate_latest(self) -> bytes:
        return generate_latest(self.registry)
