"""`LatencyHistogram` exposes exactly what `prometheus_client.Histogram` would (bar `_created`)."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bulk.metrics.histogram import LatencyHistogram

BUCKETS = (0.001, 0.01, 1.0)
VALUES = (0.0005, 0.001, 0.0010001, 0.02, 1.0, 5.0)


def exposition(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_same_exposition_as_prometheus_client():
    for labelnames in ((), ("api",)):
        theirs, ours = CollectorRegistry(), CollectorRegistry()
        reference = Histogram("x_seconds", "doc", labelnames=labelnames, buckets=BUCKETS, registry=theirs)
        histogram = LatencyHistogram("x_seconds", "doc", BUCKETS, ours, labelnames=labelnames)
        for value in VALUES:
            if labelnames:
                reference.labels(api="rest").observe(value)
                reference.labels(api="ws").observe(value / 2)
                histogram.observe(value, "rest")
                histogram.observe(value / 2, "ws")
            else:
                reference.observe(value)
                histogram.observe(value)
        assert exposition(ours) == exposition(theirs)


def test_counts_survive_concurrent_observers():
    registry = CollectorRegistry()
    histogram = LatencyHistogram("y_seconds", "doc", BUCKETS, registry)

    def observe() -> None:
        for _ in range(5000):
            histogram.observe(0.005)

    threads = [threading.Thread(target=observe) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    samples = {(s.name, s.labels.get("le")): s.value for s in families["y_seconds"].samples}
    assert samples[("y_seconds_count", None)] == 20000
    assert samples[("y_seconds_bucket", "0.001")] == 0 and samples[("y_seconds_bucket", "0.01")] == 20000
