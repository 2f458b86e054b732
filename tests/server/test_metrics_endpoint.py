"""/metrics scraped over a real socket: every metric the Grafana dashboard queries exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "bul-kv-cache.json"
# PromQL's functions and keywords, and the label names our queries group by: never metric names.
PROMQL_WORDS = {
    "rate",
    "increase",
    "sum",
    "min",
    "max",
    "by",
    "histogram_quantile",
    "le",
    "tier",
    "api",
    "kind",
    "status",
    "instance",
    "replica",
    "reason",
}
# A cluster's per-replica metrics (`bul cluster`): a single server has no replicas; the Ray tests check them.
CLUSTER_ONLY = ("kv_cache_replica_", "kv_cache_routed_requests")


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside {} and [], minus PromQL's words."""
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    return {n for n in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare) if n not in PROMQL_WORDS}


def dashboard_metric_names() -> set[str]:
    panels = json.loads(DASHBOARD.read_text())["dashboard"]["panels"]
    return {name for panel in panels for target in panel["targets"] for name in metric_names(target["expr"])}


def scrape(url: str) -> dict[str, list]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def test_every_dashboard_metric_is_exported(server):
    # Traffic first, so the labelled histograms have children to show.
    requests.post(f"{server.url}/api/query", json={"query": "metrics traffic"}, timeout=30)
    requests.post(f"{server.url}/api/query", json={"query": "metrics traffic"}, timeout=30)
    wanted = dashboard_metric_names()
    assert {"kv_cache_requests_total", "kv_cache_latency_seconds_bucket", "kv_cache_size_bytes"} <= wanted
    assert len(wanted) >= 10
    assert {n for n in wanted if n.startswith(CLUSTER_ONLY)} >= {"kv_cache_replica_requests_total"}
    wanted = {n for n in wanted if not n.startswith(CLUSTER_ONLY)}
    samples = scrape(server.url)
    missing = sorted(wanted - samples.keys())
    assert not missing, f"the dashboard queries metrics the server does not export: {missing}"


def test_metrics_follow_the_engine(server):
    before = scrape(server.url)
    hits = {s.labels["status"]: s.value for s in before["kv_cache_requests_total"]}
    requests.post(f"{server.url}/api/query", json={"query": "counted twice"}, timeout=30)
    requests.post(f"{server.url}/api/query", json={"query": "counted twice"}, timeout=30)
    after = scrape(server.url)
    hits_after = {s.labels["status"]: s.value for s in after["kv_cache_requests_total"]}
    assert hits_after["hit"] == hits["hit"] + 1 and hits_after["miss"] == hits["miss"] + 1
    count = next(s.value for s in after["kv_cache_latency_seconds_count"])
    assert count >= next(s.value for s in before["kv_cache_latency_seconds_count"]) + 2
    buckets = [s.labels["le"] for s in after["kv_cache_latency_seconds_bucket"]]
    assert buckets[:7] == ["0.001", "0.005", "0.01", "0.05", "0.1", "0.5", "1.0"] and "10.0" in buckets
    assert {s.labels["tier"] for s in after["kv_cache_tier_healthy"]} >= {"memory"}
    assert next(s.value for s in after["kv_cache_ready"]) == 1.0
    assert next(s.value for s in after["kv_cache_size_bytes"]) > 0
    e2e = {s.labels["api"] for s in after["kv_cache_e2e_request_latency_seconds_count"]}
    assert "rest" in e2e
