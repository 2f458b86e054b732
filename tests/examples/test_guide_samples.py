"""The guide's REST client, WebSocket client, Prometheus and storage samples (`examples/`), run against a
real `bul serve` app on a free port and the real Redis and PostgreSQL."""

import asyncio
import importlib.util
from pathlib import Path

import prometheus_client
import pytest
import redis
import sqlalchemy as sa

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.server.app import create_app
from bulk.server.settings import ServerSettings
from tests.server.live_server import LiveServer

EXAMPLES = Path(__file__).parents[2] / "examples"
ENGINE = {"model": "demo", "device": "cpu", "default_max_new_tokens": 4}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"guide_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def live(demo_model):
    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(**ENGINE), model=demo_model)
    with LiveServer(create_app(ServerSettings(**ENGINE), engine=engine)) as server:
        yield server
    engine.shutdown()


def test_rest_client_sample(live):
    client = _load("rest_client_guide").BULAPIClient(live.url)
    first = client.process_query("Create marketing strategy")
    second = client.process_query("Create marketing strategy")
    assert first["result"] == second["result"] and second["cache_hit"] is True
    assert client.get_stats()["requests"] >= 2


def test_websocket_client_sample(live, monkeypatch):
    monkeypatch.setenv("BUL_WS_URL", live.ws_url)
    result = asyncio.run(_load("websocket_client_guide").query_websocket("Create marketing strategy"))
    assert {"result", "cache_hit", "latency"} <= set(result)


def test_prometheus_sample_counts_engine_requests(demo_model):
    guide = _load("prometheus_guide")  # registers the guide's metrics on the default registry
    try:
        with UltraAdaptiveKVCacheEngine(KVCacheConfig(**ENGINE), model=demo_model) as engine:
            guide.connect(engine)
            engine.process_request_sync({"query": "Create marketing strategy"})
            engine.process_request_sync({"query": "Create marketing strategy"})
        text = prometheus_client.generate_latest().decode()
    finally:  # leave the default registry as we found it
        for metric in (guide.cache_requests, guide.cache_latency, guide.cache_size):
            prometheus_client.REGISTRY.unregister(metric)
    assert 'kv_cache_requests_total{status="hit"} 1.0' in text
    assert 'kv_cache_requests_total{status="miss"} 1.0' in text
    assert "kv_cache_latency_seconds_count 2.0" in text
    assert guide.PrometheusExporter is not None


def test_storage_sample(monkeypatch):
    monkeypatch.setenv("BUL_REDIS_URL", "redis://127.0.0.1:6379/12")
    monkeypatch.setenv("BUL_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    guide = _load("storage_guide")
    table_existed = sa.inspect(guide.postgres_adapter.engine).has_table("cache_entries")
    guide.redis_adapter.set("guide-key", {"result": "plan"})
    assert guide.redis_adapter.get("guide-key") == {"result": "plan"}
    guide.redis_adapter.clear()
    assert redis.Redis.from_url("redis://127.0.0.1:6379/12").dbsize() == 0
    guide.postgres_adapter.set("guide-key", {"result": "plan"})
    try:
        assert guide.postgres_adapter.get("guide-key") == {"result": "plan"}
    finally:
        guide.postgres_adapter.delete("guide-key")
        if not table_existed:  # leave the database as we found it
            with guide.postgres_adapter.engine.begin() as conn:
                conn.execute(sa.text("DROP TABLE cache_entries"))
        guide.postgres_adapter.close()
        guide.redis_adapter.close()
