"""The import path the BUL integration guide uses for metrics; the code lives in `bulk.metrics`.

    from bulk.core.ultra_adaptive_kv_cache_prometheus import PrometheusExporter
    exporter = PrometheusExporter(engine)       # every kv_cache_* metric, on its own registry
    exporter.generate_latest()                  # the text a /metrics route returns

Importing this module registers nothing on prometheus_client's default registry, so the guide's own
`Counter('kv_cache_requests_total', ...)` definitions beside it keep working."""

from bulk.metrics import LATENCY_BUCKETS, EngineStatsCollector, PrometheusExporter

__all__ = ["LATENCY_BUCKETS", "EngineStatsCollector", "PrometheusExporter"]
