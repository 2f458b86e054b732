"""BUL on a real local Ray instance: the Serve application of `bulk.cluster.app`, two
replicas of the demo model sharing the real Redis (database 14), reached through the ingress over
real sockets.

One Ray instance for the whole module (started once, shut down at the end); the tests run in file
order, and the last one kills a replica."""

from __future__ import annotations

import importlib
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from bulk.cluster.app import (  # noqa: E402
    APP_NAME,
    ClusterSettings,
    build_app,
    bul_application,
)
from bulk.engine.protocol import ServingEngine  # noqa: E402
from bulk.server.app import create_app  # noqa: E402
from bulk.server.settings import ServerSettings  # noqa: E402
from tests.cluster.serve_client import ServeClient, free_port, replica_env  # noqa: E402
from tests.helpers import wait_until  # noqa: E402
from tests.server.live_server import LiveServer  # noqa: E402
from tests.server.test_metrics_endpoint import dashboard_metric_names, scrape  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/14"
LIMITS = {"default_max_new_tokens": 4, "max_new_tokens_limit": 256}
ENV = replica_env(REDIS_URL)
# Low thresholds so that a handful of requests shows each behaviour; reports twice a second.
CLUSTER = ClusterSettings(
    replicas=2, replica_cpus=0.5, imbalance_threshold=2, stats_period_s=0.5, max_ongoing_requests=32
)


class Cluster(ServeClient):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.ws_url = url.replace("http://", "ws://")


@pytest.fixture(scope="module")
def cluster():
    store = redis.Redis.from_url(REDIS_URL)
    store.flushdb()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(bul_application(CLUSTER, ENV), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: requests.get(f"{url}/health", timeout=10).status_code == 200, 120, 0.2, "the cluster"
        )
        yield Cluster(url)
    finally:
        serve.shutdown()
        ray.shutdown()
        store.flushdb()
        store.close()


def _wait_for(predicate, timeout: float = 60, what: str = "the condition"):
    return wait_until(predicate, timeout, 0.2, what)


def test_every_route_answers_through_the_ingress(cluster):
    from openai import OpenAI
    from websockets.sync.client import connect

    assert requests.get(f"{cluster.url}/health", timeout=10).json() == {"status": "ok", "model": "demo"}
    answer = cluster.query("Create marketing strategy", max_new_tokens=6)
    assert answer["completion_tokens"] == 6 and answer["replica"]
    assert requests.get(f"{cluster.url}/openapi.json", timeout=10).status_code == 200

    accepted = requests.post(
        f"{cluster.url}/api/batch", json=[{"query": "Plan A"}, {"query": "Plan B"}], timeout=30
    )
    assert accepted.status_code == 200, accepted.text
    for task_id in accepted.json()["task_ids"]:
        status = _wait_for(
            lambda tid=task_id: (
                s
                if (s := requests.get(f"{cluster.url}/api/task/{tid}/status", timeout=10).json())["status"]
                != "processing"
                else None
            ),
            what="a batch task",
        )
        assert status["status"] == "completed" and status["result"]["completion_tokens"] == 4

    client = OpenAI(base_url=f"{cluster.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["demo"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=5)
    assert reply.usage.completion_tokens == 5
    chunks = list(
        client.chat.completions.create(
            model="demo",
            messages=messages,
            temperature=0,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content  # greedy: the same text, from either replica
    assert chunks[-1].usage.completion_tokens == 5
    streamed = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=4, stream=True)
    assert len([c for c in streamed if c.choices and c.choices[0].text]) >= 1
    # Logprobs come with the chunks of their tokens, through the replicas' streams too.
    with_logprobs = [
        c
        for c in client.chat.completions.create(
            model="demo",
            messages=messages,
            temperature=0,
            max_tokens=5,
            stream=True,
            logprobs=True,
            top_logprobs=2,
        )
        if c.choices and c.choices[0].logprobs
    ]
    assert len(with_logprobs) >= 2  # not all in the last chunk
    entries = [e for c in with_logprobs for e in c.choices[0].logprobs.content]
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob for e in entries)

    with connect(f"{cluster.ws_url}/ws/query") as socket_:
        socket_.send(json.dumps({"query": "Hello over a socket", "stream": True, "id": 7}))
        events = []
        while not (events and events[-1].get("done")):
            events.append(json.loads(socket_.recv(timeout=60)))
        assert all(e["id"] == 7 for e in events) and len(events) >= 2
        socket_.send(json.dumps({"query": "   "}))
        assert json.loads(socket_.recv(timeout=60))["error"]["param"] == "query"

    stats = cluster.stats()
    assert stats["cluster"]["replicas"] == 2 and not stats["cluster"]["unreachable"]
    assert len(stats["replicas"]) == 2 and stats["routing"]["policy"] == "prefix"
    assert stats["requests"] == sum(r["requests"] for r in stats["replicas"].values()) >= 6
    assert stats["invalid_requests"] >= 1  # the blank WebSocket query, refused at the ingress
    for figures in stats["replicas"].values():
        assert figures["ready"] and figures["memory_capacity_blocks"] > 0
    samples = scrape(cluster.url)
    assert {s.labels["replica"] for s in samples["kv_cache_replica_requests_total"]} == set(stats["replicas"])
    missing = sorted(dashboard_metric_names() - samples.keys())
    assert not missing, f"the dashboard queries metrics the cluster does not export: {missing}"


BAD_INPUT = [
    ("/api/query", {"query": "hi", "priority": "high"}),
    ("/api/query", {"query": "hi", "max_new_tokens": 100_000}),
    ("/api/query", {"query": "   "}),
    ("/api/query", {"query": "hi", "bogus": 1}),
    ("/api/query", "not json"),
    # Too long for the demo model's 4096-token context: found on the replica, sent back as data.
    ("/api/query", {"query": "x" * 5000}),
    ("/api/batch", [{"query": "a"}, {"query": "b", "max_new_tokens": 100_000}]),
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "robot", "content": "x"}]}),
    (
        "/v1/chat/completions",
        {"model": "demo", "messages": [{"role": "user", "content": "x" * 5000}], "stream": True},
    ),
    ("/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 0}),
]


def test_bad_input_gets_the_same_422_as_bul_serve(cluster, demo_model):
    from bulk.config import KVCacheConfig
    from bulk.engine.engine import UltraAdaptiveKVCacheEngine

    local_settings = ServerSettings(model="demo", device="cpu", **LIMITS)
    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(model="demo", device="cpu", **LIMITS), model=demo_model)
    assert isinstance(engine, ServingEngine)
    try:
        with LiveServer(create_app(local_settings, engine=engine)) as local:
            for path, body in BAD_INPUT:
                kwargs = {"data": body} if isinstance(body, str) else {"json": body}
                ours = requests.post(f"{cluster.url}{path}", timeout=60, **kwargs)
                theirs = requests.post(f"{local.url}{path}", timeout=60, **kwargs)
                assert ours.status_code == theirs.status_code == 422, (path, body, ours.text)
                assert ours.json() == theirs.json(), (path, body)
    finally:
        engine.shutdown()


def test_a_prefix_computed_on_one_replica_is_served_from_redis_on_the_other(cluster):
    first, second = sorted(cluster.stats()["replicas"])
    prompt = f"{uuid.uuid4().hex} " + "The bakery in Madrid sells sourdough, rye and spelt bread. " * 4
    payload = {"query": prompt, "max_new_tokens": 8, "response_cache": False}
    # The handle in this process routes through the same router, which sends a request naming a
    # replica to that replica.
    one = cluster.handle.process_request.remote(payload, bul_replica=first).result(timeout_s=120)["result"]
    assert one["replica"] == first and one["cached_tokens"] == 0
    store = redis.Redis.from_url(REDIS_URL)
    try:
        blocks = one["prompt_tokens"] // 16
        _wait_for(lambda: len(store.keys("bul:kv:v1:*")) >= blocks, what="the blocks written to Redis")
    finally:
        store.close()
    two = cluster.handle.process_request.remote(payload, bul_replica=second).result(timeout_s=120)["result"]
    assert two["replica"] == second
    assert two["cached_tokens"] >= (blocks - 1) * 16 > 0
    assert two["result"] == one["result"]  # greedy: the same text from the reused KV
    redis_hits = cluster.stats()["tiers"]["redis"]["hits"]
    assert redis_hits >= blocks - 1


def test_the_router_keeps_a_prefix_on_its_replica_and_spreads_under_saturation(cluster):
    _wait_for(lambda: cluster.stats()["routing"]["chains"], what="the router's chains")
    prefix = f"{uuid.uuid4().hex} " + "You answer questions about the opening hours of the city library. " * 3
    home = cluster.query(f"{prefix}Question 0?")["replica"]
    replicas = {cluster.query(f"{prefix}Question {i}?")["replica"] for i in range(1, 6)}
    assert replicas == {home}  # the prefix goes back to the replica holding it

    # Requests with no prefix cached anywhere are spread by load.
    spread = {cluster.query(f"{uuid.uuid4().hex} a new tenant {i}")["replica"] for i in range(16)}
    assert len(spread) == 2

    before = cluster.stats()["routing"]["decisions"]

    def long_query(i: int) -> str:
        return cluster.query(f"{prefix}Long question {i}?", max_new_tokens=200)["replica"]

    with ThreadPoolExecutor(10) as pool:
        served = list(pool.map(long_query, range(10)))
    # The first ones queue on the replica holding the prefix; once its queue exceeds the other's by
    # more than the threshold (2), the rest go by power-of-two choices.
    assert served.count(home) >= 3 and len(set(served)) == 2
    after = cluster.stats()["routing"]["decisions"]
    assert after.get("balance", 0) > before.get("balance", 0)
    assert after.get("prefix", 0) >= before.get("prefix", 0) + 3


def test_sessions_stay_with_their_replica(cluster):
    session = uuid.uuid4().hex
    served = {cluster.query(f"{uuid.uuid4().hex} turn {i}", session_id=session)["replica"] for i in range(6)}
    assert len(served) == 1


def test_a_replica_killed_mid_load_costs_no_request(cluster):
    victim = sorted(cluster.stats()["replicas"])[0]

    def one(i: int) -> tuple[int, bool]:
        if i % 3 == 0:
            body = {
                "model": "demo",
                "messages": [{"role": "user", "content": f"question {i} " * 5}],
                "max_tokens": 120,
                "stream": True,
                "temperature": 0,
            }
            answer = requests.post(f"{cluster.url}/v1/chat/completions", json=body, timeout=120)
            return answer.status_code, "[DONE]" in answer.text and '"error"' not in answer.text
        answer = requests.post(
            f"{cluster.url}/api/query",
            json={"query": f"question {i} " * 5, "max_new_tokens": 120},
            timeout=120,
        )
        return answer.status_code, answer.status_code == 200 and answer.json()["completion_tokens"] == 120

    actor = next(
        a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(f"#{victim}")
    )
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(one, i) for i in range(36)]
        time.sleep(1.0)
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        results = [f.result() for f in futures]
    assert results == [(200, True)] * len(results)

    def replaced() -> bool:
        replicas = cluster.stats()["replicas"]
        return len(replicas) == 2 and victim not in replicas

    _wait_for(replaced, timeout=120, what="a new replica")
    assert cluster.query("after the replacement")["completion_tokens"] == 4


def test_the_serve_config_and_the_rayservice_manifest_deploy_this_application():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    deploy = Path(__file__).resolve().parents[2] / "deploy" / "ray"
    config = yaml.safe_load((deploy / "serve-config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    manifest = yaml.safe_load((deploy / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    for app in (config["applications"][0], embedded["applications"][0]):
        assert app["import_path"] == "bulk.cluster.app:build_app"
        module, _, attr = app["import_path"].partition(":")
        assert getattr(importlib.import_module(module), attr) is build_app
        # No secret in a config file: BUL_CACHE_SECRET comes from the nodes' environment.
        assert "BUL_CACHE_SECRET" not in json.dumps(app)
        settings = ClusterSettings(**app.get("args", {}))
        assert settings.replicas >= 2 and settings.router == "prefix"
    images = {
        c["image"]
        for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    }
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert {c["image"] for c in head} == images


@pytest.mark.parametrize(
    "variable", [("BUL_MAX_TOKENS", "-1"), ("BUL_RAY_REPLICAS", "0"), ("BUL_RAY_ROUTER", "x")]
)
def test_bul_cluster_refuses_a_bad_configuration_before_starting_anything(monkeypatch, variable):
    from bulk.cli.main import main

    monkeypatch.setenv(*variable)
    assert main(["cluster", "--port", "1"]) == 2
