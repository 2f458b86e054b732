"""BUL on a real three-node Ray cluster on this machine: Ray's own `ray.cluster_utils.Cluster`, as
Ray's test suite uses it (a head node and two worker nodes, each its own raylet and object store),
the Serve application of `bulk.cluster.app` with two engine replicas of the demo model spread over
the worker nodes (`max_replicas_per_node: 1`), sharing the real Redis (database 15) and reached
through the ingress over real sockets.

One cluster for the whole module; the tests run in file order, and the last one removes a worker
node under load (then adds another, as a cluster's autoscaler would)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster as RayCluster  # noqa: E402
from ray.util.state import list_actors, list_nodes  # noqa: E402

from bulk.cluster.app import APP_NAME, ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT, bul_application  # noqa: E402
from bulk.cluster.settings import ClusterSettings  # noqa: E402
from tests.cluster.serve_client import ServeClient, free_port, replica_env  # noqa: E402
from tests.helpers import wait_until  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/15"
ENV = {
    **replica_env(REDIS_URL),
    # A stream cut by the lost node is finished on another replica from what it had delivered, which
    # takes the retry to reproduce it: float32 (in bfloat16, "auto" on CPUs that have it, a prompt
    # prefilled over its own blocks found in Redis gets logits a few bits off the first run's, and a
    # near-tie can flip) and batch-invariant kernels (the same tokens whatever the retry is batched
    # with). Otherwise such a stream may end with an error event (docs/cluster.md, "When a replica dies").
    "BUL_DTYPE": "float32",
    "BUL_BATCH_INVARIANT": "true",
}


# One engine replica per node (the placement); each worker node has one CPU, each replica takes it.
# Reports twice a second; retries enough to outlast Ray noticing a lost node (a few seconds).
CLUSTER = ClusterSettings(
    replicas=2,
    replica_cpus=1,
    max_replicas_per_node=1,
    stats_period_s=0.5,
    max_ongoing_requests=32,
    retries=8,
)
# Small nodes: the head runs Serve's controller, its HTTP proxy and the ingress (no CPU asked), no
# engine; each worker node has room for one engine replica.
HEAD = {
    "num_cpus": 0,
    "object_store_memory": 80 * 2**20,
    # The dashboard serves Ray's state API (`ray.util.state`), which the tests read placement from.
    "include_dashboard": True,
    "dashboard_port": free_port(),
    # Ray declares a silent node dead after ~1.5 s instead of ~15 s.
    "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3},
}
WORKER = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
REPLICA_PREFIX = f"SERVE_REPLICA::{APP_NAME}#{ENGINE_DEPLOYMENT}#"
INGRESS_PREFIX = f"SERVE_REPLICA::{APP_NAME}#{INGRESS_DEPLOYMENT}#"


def _wait_for(predicate, timeout: float = 60, what: str = "the condition"):
    return wait_until(predicate, timeout, 0.25, what)


class Fleet(ServeClient):
    def __init__(self, ray_cluster: RayCluster, workers: list, url: str) -> None:
        super().__init__(url)
        self.ray_cluster = ray_cluster
        self.workers = workers

    def replica_nodes(self, prefix: str = REPLICA_PREFIX) -> dict[str, str]:
        """Each live replica's id -> the id of the Ray node its actor runs on (Ray's state API)."""
        actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)
        return {a.name[len(prefix) :]: a.node_id for a in actors if (a.name or "").startswith(prefix)}

    def alive_nodes(self) -> set[str]:
        return {
            n.node_id for n in list_nodes(filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
        }


@pytest.fixture(scope="module")
def fleet():
    store = redis.Redis.from_url(REDIS_URL)
    store.flushdb()
    ray_cluster = RayCluster(initialize_head=True, head_node_args=HEAD)
    try:
        workers = [ray_cluster.add_node(**WORKER), ray_cluster.add_node(**WORKER)]
        ray.init(address=ray_cluster.address, log_to_driver=False)
        port = free_port()
        # One HTTP proxy, on the head: the nodes share this machine's address, so proxies on every
        # node would all want the same port.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(bul_application(CLUSTER, ENV), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: requests.get(f"{url}/health", timeout=10).status_code == 200, 180, "the cluster")
        yield Fleet(ray_cluster, workers, url)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            ray_cluster.shutdown()
            store.flushdb()
            store.close()


def test_the_replicas_run_on_two_nodes_and_the_api_answers_through_the_ingress(fleet):
    worker_ids = {node.node_id for node in fleet.workers}
    assert len(fleet.alive_nodes()) == 3 and worker_ids <= fleet.alive_nodes()
    placement = fleet.replica_nodes()
    assert len(placement) == 2
    assert set(placement.values()) == worker_ids  # one replica on each worker node

    health = requests.get(f"{fleet.url}/health", timeout=10).json()
    assert health == {"status": "ok", "model": "demo"}
    answer = fleet.query("Create marketing strategy", max_new_tokens=6)
    assert answer["completion_tokens"] == 6 and answer["replica"] in placement

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    body = {"model": "demo", "messages": messages, "temperature": 0, "max_tokens": 5}
    reply = requests.post(f"{fleet.url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    text = reply.json()["choices"][0]["message"]["content"]
    assert reply.json()["usage"]["completion_tokens"] == 5
    streamed = requests.post(
        f"{fleet.url}/v1/chat/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
        timeout=120,
    )
    chunks = _sse(streamed.text)
    assert "".join(_content(c) for c in chunks) == text  # greedy: the same text from either node
    assert chunks[-1]["usage"]["completion_tokens"] == 5

    stats = fleet.stats()
    assert set(stats["replicas"]) == set(placement) and not stats["cluster"]["unreachable"]
    assert stats["routing"]["policy"] == "prefix"


def test_a_prefix_computed_on_one_node_is_served_from_redis_on_the_other(fleet):
    placement = fleet.replica_nodes()
    prompt = f"{uuid.uuid4().hex} " + "The bakery in Madrid sells sourdough, rye and spelt bread. " * 4
    store = redis.Redis.from_url(REDIS_URL)
    try:
        stored = len(store.keys("bul:kv:v1:*"))  # the earlier tests' blocks
        one = fleet.query(prompt, max_new_tokens=8)  # through the ingress: to either node
        blocks = one["prompt_tokens"] // 16
        _wait_for(
            lambda: len(store.keys("bul:kv:v1:*")) >= stored + blocks, what="the blocks written to Redis"
        )
    finally:
        store.close()
    first = one["replica"]
    (second,) = set(placement) - {first}
    assert placement[first] != placement[second] and one["cached_tokens"] == 0
    before = fleet.stats()["tiers"]["redis"]["hits"]
    # The other node's replica, named: this process's handle routes through the same router, which
    # sends a request naming a replica to that replica.
    payload = {"query": prompt, "max_new_tokens": 8, "response_cache": False}
    two = fleet.handle.process_request.remote(payload, bul_replica=second).result(timeout_s=120)["result"]
    assert two["replica"] == second
    assert two["cached_tokens"] >= (blocks - 1) * 16 > 0
    assert two["result"] == one["result"]  # greedy: the same text from the KV computed on the other node
    assert fleet.stats()["tiers"]["redis"]["hits"] - before >= blocks - 1


def _sse(text: str) -> list[dict]:
    return [
        json.loads(line[len("data: ") :])
        for line in text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def _content(chunk: dict) -> str:
    return "".join(c["delta"].get("content") or "" for c in chunk.get("choices", []))


def test_a_worker_node_lost_under_16_streaming_clients_costs_no_request(fleet):
    placement = fleet.replica_nodes()
    ingress_node = next(iter(fleet.replica_nodes(INGRESS_PREFIX).values()))
    # The lost node is one with an engine replica and not the ingress (whose own requests go with it:
    # see docs/cluster.md).
    victim_node = next(n for n in fleet.workers if n.node_id != ingress_node)
    victim = next(r for r, node in placement.items() if node == victim_node.node_id)
    (survivor,) = set(placement) - {victim}

    # A prefix computed on the victim only, then known there by the ingress's router (from the
    # victim's reports): a request with it goes to the victim.
    prefix = f"{uuid.uuid4().hex} " + "You answer questions about the opening hours of the city library. " * 3
    payload = {"query": f"{prefix}Question 0?", "max_new_tokens": 4, "response_cache": False}
    store = redis.Redis.from_url(REDIS_URL)
    try:
        stored = len(store.keys("bul:kv:v1:*"))
        planted = fleet.handle.process_request.remote(payload, bul_replica=victim).result(timeout_s=120)
        blocks = planted["result"]["prompt_tokens"] // 16
        _wait_for(lambda: len(store.keys("bul:kv:v1:*")) >= stored + blocks, what="the blocks in Redis")
    finally:
        store.close()
    assert planted["result"]["replica"] == victim
    time.sleep(2.0)  # four report periods: the ingress's router has the victim's report
    assert fleet.query(f"{prefix}Question 1?")["replica"] == victim

    started = threading.Event()

    def stream(i: int) -> tuple[int, bool, int]:
        body = {
            "model": "demo",
            "messages": [{"role": "user", "content": f"client {i}: " + "tell me a long story " * 3}],
            "max_tokens": 48,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with requests.post(f"{fleet.url}/v1/chat/completions", json=body, timeout=300, stream=True) as answer:
            lines = []
            for line in answer.iter_lines(decode_unicode=True):
                lines.append(line)
                if line.startswith("data: {") and '"content"' in line:
                    started.set()
        text = "\n".join(lines)
        chunks = _sse(text)
        usage = next((c["usage"] for c in chunks if c.get("usage")), {})
        ok = "data: [DONE]" in text and '"error"' not in text
        if not ok:
            print(f"client {i}: {text[-600:]}")
        return answer.status_code, ok, usage.get("completion_tokens", 0)

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(stream, i) for i in range(16)]
        assert started.wait(120), "no stream started"
        in_flight = sum(not f.done() for f in futures)
        removed_at = time.monotonic()
        fleet.ray_cluster.remove_node(victim_node, allow_graceful=False)  # a machine lost, not drained
        results = [f.result() for f in futures]
    elapsed = time.monotonic() - removed_at
    assert in_flight >= 8, "the node went after the streams had ended"
    assert results == [(200, True, 48)] * 16, results
    print(f"node removed with {in_flight} streams in flight; all 16 answered in full {elapsed:.1f} s later")

    # Ray declares the node dead; the ingress's router drops its replica (and what it held).
    _wait_for(lambda: victim_node.node_id not in fleet.alive_nodes(), 60, "the node declared dead")

    def survivor_only() -> bool:
        stats = fleet.stats()
        return set(stats["replicas"]) == {survivor} and not stats["cluster"]["unreachable"]

    _wait_for(survivor_only, 60, "the router to forget the lost replica")

    # The victim's prefix: no replica known to hold it now (a `spread` decision, not `prefix`), and
    # the survivor finds its blocks in Redis.
    decisions = fleet.stats()["routing"]["decisions"]
    after = fleet.query(f"{prefix}Question 2?")
    assert after["replica"] == survivor
    assert after["cached_tokens"] >= (blocks - 1) * 16 > 0
    now = fleet.stats()["routing"]["decisions"]
    assert now.get("spread", 0) == decisions.get("spread", 0) + 1
    assert now.get("prefix", 0) == decisions.get("prefix", 0)

    # One replica per node: the replacement waits for a node, and starts on the one that joins.
    newcomer = fleet.ray_cluster.add_node(**WORKER)
    fleet.workers = [n for n in fleet.workers if n is not victim_node] + [newcomer]

    def back_to_two() -> dict[str, str] | None:
        nodes = fleet.replica_nodes()
        stats = fleet.stats()
        return nodes if len(nodes) == 2 and set(stats["replicas"]) == set(nodes) else None

    restored = _wait_for(back_to_two, 180, "a replacement replica on the new node")
    assert sorted(restored.values()) == sorted(n.node_id for n in fleet.workers)
    assert victim not in restored and survivor in restored
    assert fleet.query("after the replacement")["completion_tokens"] == 4
