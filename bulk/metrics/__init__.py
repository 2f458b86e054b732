"""Prometheus metrics for BUL KV: `PrometheusExporter(engine)` and the collector behind it."""

from bulk.engine.stats import LATENCY_BUCKETS, TTFT_BUCKETS
from bulk.metrics.collector import EngineStatsCollector
from bulk.metrics.exporter import PrometheusExporter

__all__ = ["LATENCY_BUCKETS", "TTFT_BUCKETS", "EngineStatsCollector", "PrometheusExporter"]
