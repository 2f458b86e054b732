"""The tier fault counters on a live /metrics: corrupt blocks, errors, bypasses, health, per tier, equal
to /api/stats; the dashboard's "Tier Faults" panel and the example alert rules in deploy/ query
metrics the server exports. Real Redis (database 10), a PostgreSQL URL nothing listens on (a tier
that stays down), real uvicorn sockets."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
import redis
import requests
import yaml

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.server.app import create_app
from bulk.storage.redis_store import BLOCK_PREFIX
from tests.server.conftest import ENGINE, settings, wait_ready
from tests.server.live_server import LiveServer
from tests.server.test_metrics_endpoint import metric_names, scrape

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REDIS_URL = "redis://127.0.0.1:6379/10"
QUERY = {
    "query": "Tier metrics: " + "a prompt long enough for a few cached blocks. " * 4,
    "max_new_tokens": 2,
}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def faulty(demo_model):
    """A server whose Redis tier served a corrupt block and whose PostgreSQL tier is down."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    config = KVCacheConfig(
        **ENGINE,
        response_cache=False,
        redis_url=REDIS_URL,
        database_url=f"postgresql://postgres@127.0.0.1:{_closed_port()}/test",
        cache_secret="metrics-test-secret",
        tier_retry_seconds=0.05,
    )
    engine = UltraAdaptiveKVCacheEngine(config, model=demo_model)
    try:
        with LiveServer(create_app(settings(), engine=engine)) as live:
            wait_ready(live.url)
            assert requests.post(f"{live.url}/api/query", json=QUERY, timeout=60).status_code == 200
            assert engine.flush_storage(10)
            for key in client.scan_iter(BLOCK_PREFIX + "*"):
                value = bytearray(client.get(key))
                value[len(value) // 2] ^= 0x40
                client.set(key, bytes(value))
            engine.drop_memory_tier()
            assert requests.post(f"{live.url}/api/query", json=QUERY, timeout=60).status_code == 200
            yield live
    finally:
        engine.shutdown()
        client.flushdb()
        client.close()


def _by_tier(samples: dict, name: str) -> dict[str, float]:
    return {s.labels["tier"]: s.value for s in samples[name]}


def test_tier_fault_counters_are_exported_and_match_the_stats(faulty):
    samples = scrape(faulty.url)
    tiers = requests.get(f"{faulty.url}/api/stats", timeout=10).json()["tiers"]
    corrupt = _by_tier(samples, "kv_cache_tier_corrupt_total")
    errors = _by_tier(samples, "kv_cache_tier_errors_total")
    bypassed = _by_tier(samples, "kv_cache_tier_bypassed_total")
    healthy = _by_tier(samples, "kv_cache_tier_healthy")
    assert set(corrupt) == set(errors) == set(bypassed) == {"memory", "redis", "postgres"}
    # The tiers' own figures in the message: this failed once in a full run (no corrupt block
    # counted) and never alone; they say which path the second query took.
    assert corrupt["redis"] == tiers["redis"]["corrupt"] >= 1 and corrupt["memory"] == 0, tiers
    assert errors["postgres"] == tiers["postgres"]["errors"] >= 1 and errors["redis"] == 0, tiers
    assert bypassed["postgres"] == tiers["postgres"]["skipped"]
    assert healthy == {"memory": 1.0, "redis": 1.0, "postgres": 0.0}
    blocks = _by_tier(samples, "kv_cache_tier_blocks")
    assert blocks["redis"] == tiers["redis"]["blocks"] > 0
    assert _by_tier(samples, "kv_cache_tier_writes_total")["redis"] == tiers["redis"]["writes"] > 0


def test_the_dashboard_panel_queries_the_fault_counters_of_a_live_server(faulty):
    panels = json.loads((DEPLOY / "grafana" / "bul-kv-cache.json").read_text())["dashboard"]["panels"]
    faults = next(p for p in panels if p["title"] == "Tier Faults")
    queried = set().union(*(metric_names(t["expr"]) for t in faults["targets"]))
    assert {
        "kv_cache_tier_corrupt_total",
        "kv_cache_tier_errors_total",
        "kv_cache_tier_bypassed_total",
    } <= queried
    assert all("by (tier)" in t["expr"] and "{{tier}}" in t["legendFormat"] for t in faults["targets"])
    samples = scrape(faulty.url)
    for name in queried:
        assert {"redis", "postgres"} <= {s.labels.get("tier") for s in samples.get(name, [])}, name
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))


def test_the_example_alert_rules_query_exported_metrics(faulty):
    assert "alerts.yml" in yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["rule_files"]
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    rules = {rule["alert"]: rule for group in groups for rule in group["rules"]}
    assert set(rules) == {"BulKvTierUnhealthy", "BulKvTierCorruptBlocks"}
    assert metric_names(rules["BulKvTierUnhealthy"]["expr"]) == {"kv_cache_tier_healthy"}
    assert metric_names(rules["BulKvTierCorruptBlocks"]["expr"]) == {"kv_cache_tier_corrupt_total"}
    samples = scrape(faulty.url)
    for rule in rules.values():
        assert re.fullmatch(r"\d+[smh]", rule["for"]) and rule["labels"]["severity"]
        assert "{{ $labels.tier }}" in rule["annotations"]["summary"]
        for name in metric_names(rule["expr"]):
            assert "tier" in samples[name][0].labels, name
    # The unhealthy rule's condition holds for the tier that is down, and only for it.
    down = [s.labels["tier"] for s in samples["kv_cache_tier_healthy"] if s.value == 0]
    assert down == ["postgres"]
