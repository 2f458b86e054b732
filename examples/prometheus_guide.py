# Changed from the guide: the "Conectar con eventos del engine" comment is made real with
# `engine.add_listener` (the engine's hook for exporters), in `connect()`; nothing else. The package's own
# exporter (`PrometheusExporter`, served at /metrics by `bul serve`) keeps these metric names.
# ruff: noqa
# fmt: off
from prometheus_client import Counter, Histogram, Gauge
from bulk.core.ultra_adaptive_kv_cache_prometheus import PrometheusExporter

# Métricas del KV Cache
cache_requests = Counter(
    'kv_cache_requests_total',
    'Total cache requests',
    ['status']  # 'hit' or 'miss'
)

cache_latency = Histogram(
    'kv_cache_latency_seconds',
    'Cache latency',
    buckets=[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0]
)

cache_size = Gauge(
    'kv_cache_size_bytes',
    'Current cache size'
)

class PrometheusMetrics:
    """Wrapper para métricas Prometheus."""

    def record_request(self, cache_hit: bool):
        """Registrar request."""
        status = 'hit' if cache_hit else 'miss'
        cache_requests.labels(status=status).inc()

    def record_latency(self, duration: float):
        """Registrar latencia."""
        cache_latency.observe(duration)

    def update_cache_size(self, size: int):
        """Actualizar tamaño del cache."""
        cache_size.set(size)

# Integrar con engine
metrics = PrometheusMetrics()

# Conectar con eventos del engine
def connect(engine):
    def on_request(event):
        if event["status"] != "ok":
            return
        metrics.record_request(event["cache_hit"])
        metrics.record_latency(event["latency"] / 1000)
        metrics.update_cache_size(engine.get_stats()["tiers"]["memory"].get("size_bytes", 0))
    engine.add_listener(on_request)
