"""PrometheusExporter on a real engine, and the guide's metrics code beside it."""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from bulk.config import KVCacheConfig
from bulk.core.ultra_adaptive_kv_cache_prometheus import PrometheusExporter
from bulk.engine.engine import UltraAdaptiveKVCacheEngine


def _samples(exporter: PrometheusExporter) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(exporter.generate_latest().decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def test_the_guides_metrics_code_runs_beside_the_exporter(demo_model):
    # The guide defines these on the default registry itself; importing our facade must not clash.
    cache_requests = Counter("kv_cache_requests_total", "Total cache requests", ["status"])
    cache_latency = Histogram(
        "kv_cache_latency_seconds", "Cache latency", buckets=[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0]
    )
    cache_size = Gauge("kv_cache_size_bytes", "Current cache size")
    try:
        cache_requests.labels(status="hit").inc()
        cache_latency.observe(0.002)
        cache_size.set(10)
        with UltraAdaptiveKVCacheEngine(
            KVCacheConfig(model="demo", device="cpu"), model=demo_model
        ) as engine:
            exporter = PrometheusExporter(engine)
            engine.process_request_sync({"query": "exported", "max_new_tokens": 2})
            engine.process_request_sync({"query": "exported", "max_new_tokens": 2})
            with_errors = 0
            try:
                engine.process_request_sync({"query": ""})
            except ValueError:
                with_errors = 1
            samples = _samples(exporter)
    finally:
        for metric in (cache_requests, cache_latency, cache_size):
            REGISTRY.unregister(metric)
    by_status = {s.labels["status"]: s.value for s in samples["kv_cache_requests_total"]}
    assert by_status == {"hit": 1.0, "miss": 1.0}
    assert samples["kv_cache_latency_seconds_count"][0].value == 2.0
    assert samples["kv_cache_time_to_first_token_seconds_count"][0].value == 2.0
    invalid = {s.labels["kind"]: s.value for s in samples["kv_cache_errors_total"]}["invalid"]
    assert invalid == with_errors == 1
    assert samples["kv_cache_prefix_cache_queries_total"][0].value > 0
    assert samples["kv_cache_response_cache_hits_total"][0].value == 1.0


def test_two_exporters_do_not_clash(demo_model):
    with UltraAdaptiveKVCacheEngine(KVCacheConfig(model="demo", device="cpu"), model=demo_model) as engine:
        first, second = PrometheusExporter(engine), PrometheusExporter(engine)
        assert first.registry is not second.registry
        assert (
            b"kv_cache_size_bytes" in first.generate_latest()
            and b"kv_cache_ready" in second.generate_latest()
        )
