"""Prometheus metrics for BUL KV: `PrometheusExporter(engine)` and the collector behind it."""

from bulk.metrics.collector import EngineStatsCollector
from bulk.metrics.exporter import LATENCY_BUCKETS, TTFT_BUCKETS, PrometheusExporter

__all__ = ["LATENCY_BUCKETS", "TTFT_BUCKETS", "EngineStatsCollector", "PrometheusExporter"]
