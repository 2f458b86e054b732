"""`bul bench cluster`: two engine replicas on two Ray nodes, BUL's prefix-aware router against Ray's
power-of-two choices on one multi-tenant chat workload, then the prefix-aware run again with a node
lost halfway through.

Each configuration is a real Ray cluster of three nodes on this machine, built with Ray's own
`ray.cluster_utils.Cluster` as `tests/cluster/test_multi_node.py` builds it: a head node with no CPU
for replicas (Serve's controller, its one HTTP proxy, Ray's dashboard for the state API) and two
worker nodes of one CPU each, every node its own raylet and object store. The Serve application of
`bulk.cluster.app` runs two engine replicas with `max_replicas_per_node: 1`, so one on each worker
node (checked with Ray's state API: each replica actor's node), one torch thread each, the memory tier
of each replica 4,096 tokens, the real Redis (database 15) shared below them. `--clients` users drive
it through the ingress over the OpenAI streaming chat API.

The workload is `bench.cluster_workload.SHAPE` (its docstring says why that shape): 13 tenants with
system prompts of about 1,000 tokens each, so the tenants' prompts are about 3.2 times one replica's
memory tier (the header prints the ratio, counted with the model's tokenizer); every tenant as popular,
sessions of 1 to 3 turns sent with the conversation so far, each after the user's pause of 1 to 3 s,
greedy answers of 32 to 96 tokens; the same sessions, in the same order, for every run. After
`--warmup` seconds (not measured: the caches fill, with sessions of their own), `--duration` seconds
are measured. `bul bench routing` simulates this run, with the engine's own block manager, before it
is made:

- memory-tier token hit rate: prompt tokens found in the replicas' own memory, of those looked up
  there (`/api/stats`: each replica's counters, differenced replica by replica); the token hit rate
  of every tier (memory, then Redis) beside it;
- TTFT p50/p95 of the requests sent in the window (time to the first streamed chunk);
- errors: requests that failed (an HTTP error, a stream that ended with an error event or without
  `[DONE]`);
- completion tokens per second of the requests answered in the window.

The third run ("node lost") is the prefix-aware one again, the same sessions: halfway through the
window, the worker node of one replica (not the one running the ingress, whose own requests would go
with it: docs/cluster.md) is removed with `remove_node(allow_graceful=False)`, a machine lost, not
drained. When Ray declares it dead a new worker node is added, as a cluster's autoscaler would, and
the run records when the service is back to two replicas on two nodes. Its figures: errors, the
memory-tier hit rate, TTFT and tokens/s before and after the removal and per `--bucket` seconds.

Targets (the issue's): the prefix-aware router's memory-tier token hit rate at least 1.5x
power-of-two's, a lower TTFT p50, no errors; with the node lost, no errors and two replicas again.
Figures to `bench/results/cluster-*.json`.

    python -m bench.cluster [--model demo-large] [--clients 8] [--warmup 30] [--duration 90]
    python -m bench.cluster --quick      # the demo model, a few seconds each: the smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import random
import secrets
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import redis

from bench import child_env
from bench.cluster_workload import MEMORY_TOKENS, SHAPE, Session, sessions, system_prompts
from bench.common import format_table, options_from, ratio, write_results

log = logging.getLogger("bench.cluster")

NAME = "cluster"
REDIS_URL = "redis://127.0.0.1:6379/15"
ROUTERS = ("prefix", "pow2")
# The quick run (the test suite's smoke test) starts one Ray cluster less: power-of-two, then the
# node-lost run, which measures the prefix router; it compares nothing.
QUICK_ROUTERS = ("pow2",)
DEFAULTS = {
    "model": "demo-large",
    "clients": 8,
    "warmup": 30.0,
    "duration": 90.0,
    "sessions": 400,
    "bucket": 10.0,
    "node_loss": True,
}
QUICK = {
    "model": "demo",
    "clients": 4,
    "warmup": 1.0,
    "duration": 6.0,
    "sessions": 60,
    "bucket": 2.0,
    "node_loss": True,
}
MIN_PROMPT_RATIO = 3.0  # the tenants' prompts against one replica's memory tier, at least
# What every replica runs besides the model: the test's settings (tests/cluster/test_multi_node.py). A
# stream cut by the lost node is finished on another replica from what it had delivered, which takes
# the retry to reproduce it bit for bit: float32 and batch-invariant kernels (docs/cluster.md). Every
# run has them, so that the node-lost run is the prefix-aware run with only the node lost.
ENGINE_ENV = {"BUL_DTYPE": "float32", "BUL_BATCH_INVARIANT": "true"}


def engine_env(clients: int) -> dict[str, str]:
    """`ENGINE_ENV`, and decode batches of at most `clients` rows: no replica ever has more requests
    at once, and batch-invariant decoding pads every step to the largest batch where this machine's
    GEMMs give other row counts other bits (32 rows, the default, cost 2.4x the time of 8 in float32
    on the 2-core Xeon)."""
    return {**ENGINE_ENV, "BUL_MAX_BATCH_SIZE": str(clients)}


READY_TIMEOUT_S = 240
DEAD_TIMEOUT_S = 60
RECOVERY_TIMEOUT_S = 240
# Replica and ingress actors' names in Ray (`SERVE_REPLICA::<app>#<deployment>#<id>`).
ACTOR_PREFIX = "SERVE_REPLICA::{app}#{deployment}#"
# The tests' Ray nodes: the head runs Serve's controller, its HTTP proxy and the ingress (no CPU
# asked), never an engine; each worker node has room for one engine replica. Ray declares a silent
# node dead after ~1.5 s instead of ~15 s; the replicas' retries (8, backing off up to 2 s) outlast it.
HEAD: dict[str, Any] = {
    "num_cpus": 0,
    "object_store_memory": 80 * 2**20,
    "include_dashboard": True,  # Ray's state API (`ray.util.state`), which placement is read from
    "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3},
}
WORKER: dict[str, Any] = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
COUNTERS = ("memory_token_hits", "memory_token_queries", "cached_tokens", "prompt_tokens")


# Serve's HTTP proxy (and Ray's dashboard) bind their ports once Ray has started, while Ray's
# processes bind ports of their own: its workers from 10002-19999 (Ray's default range) and the rest
# wherever the kernel puts them (Linux: 32768-60999). A port the kernel hands out was once taken by one
# of them before the proxy came up ("Failed to bind"); a free port between the two ranges is handed
# out by neither.
SERVE_PORTS = range(20000, 32768)


def _serve_port() -> int:
    for port in random.sample(SERVE_PORTS, 64):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {SERVE_PORTS.start}-{SERVE_PORTS.stop - 1} for the cluster")


@contextmanager
def _node_environ() -> Iterator[None]:
    """This process's environment as a process the benchmark starts gets it (`child_env`: OpenMP's
    wait policy as the caller had it), while Ray nodes start: their raylets start the replicas'
    worker processes with their own environment."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(child_env())
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@dataclass
class Sample:
    sent: float
    ttft: float | None = None
    done: float | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    ended: float = 0.0  # when the last user was done (monotonic)


@dataclass
class Snapshot:
    """The replicas' counters (`COUNTERS`, by replica id) at `at` (monotonic seconds); `reported`:
    how many replicas answered this reading."""

    at: float
    replicas: dict[str, dict[str, int]]
    reported: int = 0


def snapshot_of(stats: dict[str, Any], at: float) -> Snapshot:
    replicas = {rid: {k: int(r.get(k, 0)) for k in COUNTERS} for rid, r in stats["replicas"].items()}
    return Snapshot(at, replicas, len(replicas))


def carried_forward(snapshots: Sequence[Snapshot]) -> list[Snapshot]:
    """The snapshots in time order, each with the last counters known of a replica that did not
    answer it (a replica dying, or too slow while its node is lost): it counts nothing there, rather
    than its whole count again when it next answers."""
    known: dict[str, dict[str, int]] = {}
    out = []
    for snap in sorted(snapshots, key=lambda s: s.at):
        known = {**known, **snap.replicas}
        out.append(Snapshot(snap.at, known, snap.reported))
    return out


def counter_delta(before: Snapshot, after: Snapshot) -> dict[str, int]:
    """What the replicas counted between two snapshots, replica by replica: a replica gone since
    `before` (its node lost) counts nothing, one new since (a replacement) counts from zero, so that
    neither makes the totals jump."""
    total = dict.fromkeys(COUNTERS, 0)
    for rid, now in after.replicas.items():
        then = before.replicas.get(rid, {})
        for key in COUNTERS:
            total[key] += now[key] - then.get(key, 0)
    return total


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(samples: Sequence[Sample], start: float, end: float, delta: dict[str, int]) -> dict[str, Any]:
    """The figures of one period: requests sent in [start, end), their errors and TTFTs, completion
    tokens of requests answered in it per second, and the hit rates of `delta`."""
    sent = [s for s in samples if start <= s.sent < end]
    ok = [s for s in sent if s.error is None and s.done is not None]
    ttfts = [1000 * s.ttft for s in ok if s.ttft is not None]
    answered = [s for s in samples if s.error is None and s.done is not None and start <= s.done < end]
    elapsed = max(end - start, 1e-9)
    queries, prompt = delta["memory_token_queries"], delta["prompt_tokens"]
    return {
        "requests": len(sent),
        "errors": len(sent) - len(ok),
        "memory_token_hit_rate": delta["memory_token_hits"] / queries if queries else 0.0,
        "token_hit_rate": delta["cached_tokens"] / prompt if prompt else 0.0,
        "ttft_p50_ms": _percentile(ttfts, 0.5),
        "ttft_p95_ms": _percentile(ttfts, 0.95),
        "completion_tokens_per_s": sum(s.completion_tokens for s in answered) / elapsed,
        "window_s": round(elapsed, 1),
    }


def buckets(samples: Sequence[Sample], snapshots: Sequence[Snapshot], start: float) -> list[dict[str, Any]]:
    """`summarize` between each two consecutive snapshots, with when it starts and ends (seconds into
    the window) and how many replicas reported at its end."""
    out = []
    for before, after in itertools.pairwise(snapshots):
        figures = summarize(samples, before.at, after.at, counter_delta(before, after))
        out.append(
            {
                "from_s": round(before.at - start, 1),
                "to_s": round(after.at - start, 1),
                "replicas": after.reported,
                **figures,
            }
        )
    return out


def schedule(duration: float, bucket: float, removal: float | None) -> list[float]:
    """Seconds into the window at which the counters are read: every `bucket` seconds, and at the
    removal (a bucket boundary within a second of it is left out: the removal's reading ends it)."""
    times = [bucket * k for k in range(1, int(duration / bucket) + 1) if bucket * k < duration - 0.5]
    if removal is not None:
        times = [t for t in times if abs(t - removal) >= 1.0] + [removal]
    return sorted(times)


# ---- the Ray cluster --------------------------------------------------------------------------------


class Fleet:
    """A three-node Ray cluster on this machine (`ray.cluster_utils.Cluster`) running the Serve
    application of `bulk.cluster.app`: the ingress behind the head's HTTP proxy, an engine replica on
    each worker node."""

    def __init__(self, router: str, model: str, clients: int) -> None:
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster as RayCluster

        from bulk.cluster.app import APP_NAME, ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT, bul_application
        from bulk.cluster.settings import ClusterSettings

        self.router = router
        self.replica_prefix = ACTOR_PREFIX.format(app=APP_NAME, deployment=ENGINE_DEPLOYMENT)
        self.ingress_prefix = ACTOR_PREFIX.format(app=APP_NAME, deployment=INGRESS_DEPLOYMENT)
        settings = ClusterSettings(
            replicas=2, router=router, replica_cpus=1, max_replicas_per_node=1, retries=8
        )
        env = child_env(
            {
                "BUL_MODEL": model,
                "BUL_DEVICE": "cpu",
                "BUL_MAX_TOKENS": str(MEMORY_TOKENS),
                "BUL_REDIS_URL": REDIS_URL,
                "BUL_CACHE_SECRET": secrets.token_hex(16),
                "BUL_ACCESS_LOG": "false",
                **engine_env(clients),
            }
        )
        # What `bul cluster` hands every replica: the BUL_* variables (this shell's too), one thread.
        replica_env = {k: v for k, v in env.items() if k.startswith("BUL_")} | {"OMP_NUM_THREADS": "1"}
        self.workers: list[Any] = []
        with _node_environ():
            self.ray_cluster = RayCluster(
                initialize_head=True, head_node_args={**HEAD, "dashboard_port": _serve_port()}
            )
        try:
            self.workers = [self.add_worker(), self.add_worker()]
            ray.init(address=self.ray_cluster.address, log_to_driver=False)
            self.port = _serve_port()
            self.url = f"http://127.0.0.1:{self.port}"
            # One HTTP proxy, on the head: the nodes share this machine's address, so proxies on every
            # node would all want the same port.
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": self.port})
            serve.run(bul_application(settings, replica_env), name=APP_NAME, route_prefix="/")
        except BaseException:
            self.shutdown()
            raise

    def add_worker(self) -> Any:
        with _node_environ():
            return self.ray_cluster.add_node(**WORKER)

    def replica_nodes(self, prefix: str | None = None) -> dict[str, str]:
        """Each live replica's id -> the id of the Ray node its actor runs on (Ray's state API)."""
        from ray.util.state import list_actors

        prefix = prefix or self.replica_prefix
        actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)
        return {a.name[len(prefix) :]: str(a.node_id) for a in actors if a.name and a.name.startswith(prefix)}

    def ingress_nodes(self) -> set[str]:
        return set(self.replica_nodes(self.ingress_prefix).values())

    def alive_nodes(self) -> set[str]:
        from ray.util.state import list_nodes

        return {
            n.node_id for n in list_nodes(filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
        }

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/api/stats", timeout=30).json()

    def wait_ready(self) -> dict[str, str]:
        """Until the API answers with both replicas reporting (and, for the prefix-aware router, its
        chains computed) and Ray places them on the two worker nodes; the placement."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    stats = self.stats()
                    placement = self.replica_nodes()
                    chains = self.router != "prefix" or stats["routing"].get("chains")
                    if len(stats["replicas"]) == 2 and set(placement) == set(stats["replicas"]) and chains:
                        break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster not ready after {READY_TIMEOUT_S} s (Ray's logs: /tmp/ray)")
            time.sleep(0.5)
        workers = {n.node_id for n in self.workers}
        if len(set(placement.values())) != 2 or set(placement.values()) != workers:
            raise RuntimeError(f"replicas not one on each worker node: {placement}, workers {workers}")
        return placement

    def lose_node(self) -> dict[str, Any]:
        """Remove the worker node of one replica (not the ingress's), as a machine lost."""
        placement = self.replica_nodes()
        ingress = self.ingress_nodes()
        victim_node = next(n for n in self.workers if n.node_id not in ingress)
        victim = next(r for r, node in placement.items() if node == victim_node.node_id)
        removed_at = time.monotonic()
        self.ray_cluster.remove_node(victim_node, allow_graceful=False)
        self.workers = [n for n in self.workers if n is not victim_node]
        log.info(
            "removed worker node %s (replica %s) in %.1f s",
            victim_node.node_id[:8],
            victim,
            time.monotonic() - removed_at,
        )
        return {
            "node": victim_node.node_id,
            "replica": victim,
            "survivor": next(r for r in placement if r != victim),
            "ingress_nodes": sorted(ingress),
            "removed_at": removed_at,
            "_node": victim_node,
        }

    def recover(self, lost: dict[str, Any]) -> dict[str, Any]:
        """Wait for Ray to declare the lost node dead, add a new worker node (the autoscaler's part)
        and wait for the replacement replica on it: the service back to two replicas on two nodes."""
        out: dict[str, Any] = {"dead_after_s": None, "back_after_s": None, "replicas_back": False}
        deadline = time.monotonic() + DEAD_TIMEOUT_S
        while lost["node"] in self.alive_nodes():
            if time.monotonic() > deadline:
                out["error"] = f"the node was not declared dead within {DEAD_TIMEOUT_S} s"
                return out
            time.sleep(0.25)
        out["dead_after_s"] = round(time.monotonic() - lost["removed_at"], 1)
        newcomer = self.add_worker()
        self.workers.append(newcomer)
        out["new_node"] = newcomer.node_id
        out["node_added_after_s"] = round(time.monotonic() - lost["removed_at"], 1)
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while True:
            try:
                placement = self.replica_nodes()
                stats = self.stats()
                workers = {n.node_id for n in self.workers}
                if (
                    len(placement) == 2
                    and set(stats["replicas"]) == set(placement)
                    and set(placement.values()) == workers
                    and not stats["cluster"]["unreachable"]
                ):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                out["error"] = f"not back to two replicas within {RECOVERY_TIMEOUT_S} s"
                return out
            time.sleep(1.0)  # each check asks every replica for its stats: a light touch
        out["back_after_s"] = round(time.monotonic() - lost["removed_at"], 1)
        out["replicas_back"] = True
        out["placement_after"] = placement
        return out

    def shutdown(self) -> None:
        import ray
        from ray import serve

        started = time.monotonic()
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            self.ray_cluster.shutdown()
        log.info("Ray cluster shut down in %.1f s", time.monotonic() - started)


# ---- the clients --------------------------------------------------------------------------------------


async def _turn(
    client: httpx.AsyncClient, url: str, messages: list[dict[str, str]], max_tokens: int
) -> Sample:
    body = {
        "model": "bench",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sample = Sample(sent=time.monotonic())
    text = []
    finished = False
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as answer:
            if answer.status_code != 200:
                sample.error = f"HTTP {answer.status_code}"
                await answer.aread()
                return sample
            async for line in answer.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if sample.ttft is None:
                    sample.ttft = time.monotonic() - sample.sent
                data = line[6:]
                if data == "[DONE]":
                    finished = True
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    sample.error = chunk["error"].get("message") or "stream error"
                if chunk.get("usage"):
                    sample.completion_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or []:
                    text.append((choice.get("delta") or {}).get("content") or "")
        if not finished and sample.error is None:
            sample.error = "the stream ended without [DONE]"
    except httpx.HTTPError as exc:
        sample.error = type(exc).__name__
    sample.done = time.monotonic()
    messages.append({"role": "assistant", "content": "".join(text)})
    return sample


async def _drive(url: str, systems: list[str], work: list[Session], clients: int, stop_at: float) -> Run:
    """`clients` users, each running the next session, turn after turn, until `stop_at` (monotonic)."""
    run = Run()
    queue = list(reversed(work))

    async def user(client: httpx.AsyncClient) -> None:
        while queue and time.monotonic() < stop_at:
            session = queue.pop()
            messages = [{"role": "system", "content": systems[session.tenant]}]
            pauses = [0.0, *session.pauses_s]
            for question, answer_tokens, pause in zip(
                session.questions, session.answer_tokens, pauses, strict=True
            ):
                await asyncio.sleep(pause)  # the user reads the answer before asking again
                if time.monotonic() >= stop_at:
                    return
                messages.append({"role": "user", "content": question})
                run.samples.append(await _turn(client, url, messages, answer_tokens))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        await asyncio.gather(*(user(client) for _ in range(clients)))
        run.ended = time.monotonic()
    return run


def _snapshot(url: str, at_answer: bool = False) -> Snapshot:
    """The replicas' counters, as they were when asked: the ingress asks every replica at once, and
    those that answer do at once (while a lost replica is still listed, the reply waits for its
    timeout, 10 s, twice). `at_answer`: as they were when the reply came (the reading just before
    the removal, which follows it at once: a busy replica may take a second or two to answer)."""
    asked = time.monotonic()
    stats = httpx.get(f"{url}/api/stats", timeout=60).json()
    return snapshot_of(stats, time.monotonic() if at_answer else asked)


async def _users_and_readings(
    url: str,
    systems: list[str],
    work: list[Session],
    options: dict[str, Any],
    start: float,
    skip: float | None,
) -> tuple[Run, list[Snapshot], float]:
    """The users, from `start` for `duration` seconds, and the counters read every `bucket` seconds
    (not within a second of `skip`, where the removal's reading is) and when the users are done
    (the window's end, also returned)."""
    users = asyncio.create_task(_drive(url, systems, work, options["clients"], start + options["duration"]))
    readings = []  # each in a thread of its own: a slow one holds up neither the next nor the end
    for offset in schedule(options["duration"], options["bucket"], skip):
        await asyncio.wait([users], timeout=max(0.0, start + offset - time.monotonic()))
        if users.done():
            break
        if offset != skip:
            readings.append(asyncio.create_task(asyncio.to_thread(_snapshot, url)))
    run = await users
    last = await asyncio.to_thread(_snapshot, url)  # nothing runs any more: the counters as at the end
    last.at = run.ended
    return run, [*(await asyncio.gather(*readings)), last], run.ended


def _window(
    fleet: Fleet, systems: list[str], work: list[Session], options: dict[str, Any], lose_node: bool
) -> dict[str, Any]:
    """The measured window: the users and the counters' readings on an event loop of their own (a
    thread), while this thread (Ray adds nodes from the main thread only), with `lose_node`, reads the
    counters and removes a worker node halfway, then waits for its recovery (past the window if need be)."""
    removal = options["duration"] / 2 if lose_node else None
    first = _snapshot(fleet.url)
    start = first.at = time.monotonic()
    out: dict[str, Any] = {"start": start}
    with ThreadPoolExecutor(1, thread_name_prefix="bench-users") as pool:
        measured = pool.submit(
            asyncio.run, _users_and_readings(fleet.url, systems, work, options, start, removal)
        )
        cut = None
        if removal is not None:
            time.sleep(max(0.0, start + removal - time.monotonic()))
            if measured.done():
                raise RuntimeError("the sessions ran out before the node was to be removed: raise 'sessions'")
            cut = _snapshot(fleet.url, at_answer=True)
            out["lost"] = fleet.lose_node()
            out["recovery"] = fleet.recover(out["lost"])
        run, readings, out["end"] = measured.result()
    ordered = sorted([first, *readings, *([cut] if cut else [])], key=lambda s: s.at)
    if cut is not None:
        out["removal_snapshot"] = next(i for i, s in enumerate(ordered) if s is cut)
    snapshots = carried_forward(ordered)
    out.update(run=run, snapshots=snapshots)
    return out


# ---- one configuration --------------------------------------------------------------------------------


def tenant_prompt_tokens(model: str, systems: list[str]) -> int:
    """The tenants' system prompts in the model's own tokens."""
    from bulk.engine_settings import EngineSettings
    from bulk.routing.chains import load_tokenizer

    tokenizer = load_tokenizer(EngineSettings(model=model).engine_config())
    return sum(len(tokenizer.encode(text)) for text in systems)


def workload(options: dict[str, Any]) -> tuple[list[str], list[Session], list[Session]]:
    """The tenants' prompts, the measured sessions and the warmup's (another seed)."""
    per_word = options["tokens_per_word"]
    systems = system_prompts(SHAPE, per_word)
    work = sessions(SHAPE, options["sessions"], per_word)
    warm = sessions(SHAPE, options["sessions"], per_word, seed=1)
    return systems, work, warm


def measure(router: str, options: dict[str, Any], lose_node: bool = False) -> dict[str, Any]:
    store = redis.Redis.from_url(REDIS_URL)
    store.flushdb()
    systems, work, warm = workload(options)
    started = time.monotonic()
    fleet = Fleet(router, options["model"], options["clients"])
    try:
        placement = fleet.wait_ready()
        ingress = sorted(fleet.ingress_nodes())
        log.info(
            "%s: cluster ready after %.1f s; replicas on nodes %s",
            router,
            time.monotonic() - started,
            {r: n[:8] for r, n in placement.items()},
        )
        asyncio.run(
            _drive(fleet.url, systems, warm, options["clients"], time.monotonic() + options["warmup"])
        )
        window = _window(fleet, systems, work, options, lose_node)
        after = fleet.stats()
    finally:
        fleet.shutdown()
        store.flushdb()
        store.close()
    run, start, end, snapshots = window["run"], window["start"], window["end"], window["snapshots"]
    figures = summarize(run.samples, start, end + 1e-6, counter_delta(snapshots[0], snapshots[-1]))
    result: dict[str, Any] = {
        **figures,
        "routing": after.get("routing"),
        "replicas": {
            rid: {k: r[k] for k in ("requests", "memory_token_hit_rate", "memory_tokens", "token_hit_rate")}
            for rid, r in after["replicas"].items()
        },
        "placement": placement,
        "ingress_nodes": ingress,
        "replicas_on_distinct_nodes": len(set(placement.values())) == len(placement) == 2,
        "buckets": buckets(run.samples, snapshots, start),
    }
    if lose_node:
        lost, cut = window["lost"], snapshots[window["removal_snapshot"]]
        removed = lost["removed_at"]
        in_flight = [s for s in run.samples if s.sent < removed and (s.done is None or s.done > removed)]
        result["node_lost"] = {
            **{k: v for k, v in lost.items() if not k.startswith("_") and k != "removed_at"},
            "removed_at_s": round(removed - start, 1),
            "in_flight_at_removal": len(in_flight),
            # How long after the removal the last of them ended (finished on the survivor, or failed).
            "in_flight_ended_after_s": round(max((s.done or end) - removed for s in in_flight), 1)
            if in_flight
            else None,
            "before": summarize(run.samples, start, removed, counter_delta(snapshots[0], cut)),
            "after": summarize(run.samples, removed, end + 1e-6, counter_delta(cut, snapshots[-1])),
            **window["recovery"],
            "failures": sorted({s.error for s in run.samples if s.error}),
            # Every request: sent and ended (s into the window), TTFT (ms), completion tokens, error.
            "samples": [
                [
                    round(s.sent - start, 2),
                    None if s.done is None else round(s.done - start, 2),
                    None if s.ttft is None else round(1000 * s.ttft, 1),
                    s.completion_tokens,
                    s.error,
                ]
                for s in run.samples
            ],
        }
    return result


# ---- the report -------------------------------------------------------------------------------------


def verdicts(results: dict[str, dict[str, Any]], lost: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    checks: dict[str, dict[str, Any]] = {}
    if "prefix" in results and "pow2" in results:
        ours, theirs = results["prefix"], results["pow2"]
        hit = ratio(ours["memory_token_hit_rate"], theirs["memory_token_hit_rate"])
        ttft = ratio(ours["ttft_p50_ms"], theirs["ttft_p50_ms"])
        checks["memory-tier token hit rate, prefix / pow2 (x)"] = {
            "value": hit,
            "target": ">= 1.5",
            "pass": hit is not None and hit >= 1.5,
        }
        checks["TTFT p50, prefix / pow2 (x)"] = {
            "value": ttft,
            "target": "< 1",
            "pass": ttft is not None and ttft < 1,
        }
    errors = sum(r["errors"] for r in results.values())
    checks[f"errors, {' + '.join(results)}"] = {"value": errors, "target": "0", "pass": errors == 0}
    if lost is not None:
        back = lost["node_lost"]
        checks["node lost: errors"] = {"value": lost["errors"], "target": "0", "pass": lost["errors"] == 0}
        checks["node lost: back to 2 replicas on 2 nodes (s after removal)"] = {
            "value": back["back_after_s"],
            "target": "yes",
            "pass": bool(back["replicas_back"]),
        }
    return checks


def _row(label: str, r: dict[str, Any]) -> list[Any]:
    return [
        label,
        r["requests"],
        r["errors"],
        round(100 * r["memory_token_hit_rate"], 1),
        round(100 * r["token_hit_rate"], 1),
        r["ttft_p50_ms"],
        r["ttft_p95_ms"],
        r["completion_tokens_per_s"],
    ]


def _value(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


HEADERS = ["memory hit %", "all tiers hit %", "TTFT p50", "TTFT p95", "tok/s"]


def render(
    results: dict[str, dict[str, Any]],
    lost: dict[str, Any] | None,
    checks: dict[str, dict[str, Any]],
    options: dict[str, Any],
) -> str:
    labels = {"prefix": "prefix-aware (ours)", "pow2": "power-of-two (Ray's)"}
    prompt_tokens, tenants = options["tenant_prompt_tokens"], options["workload"]["tenants"]
    distinct = all(r["replicas_on_distinct_nodes"] for r in [*results.values(), *([lost] if lost else [])])
    table = format_table(
        ["router", "requests", "errors", *HEADERS],
        [_row(labels[name], r) for name, r in results.items()],
        title=(
            f"2 replicas of {options['model']} on two Ray nodes (ray.cluster_utils: a head and 2 worker "
            f"nodes; replicas on distinct worker nodes in every run: {'yes' if distinct else 'NO'}), "
            f"{options['clients']} clients, {options['duration']:.0f} s measured after "
            f"{options['warmup']:.0f} s of warmup\n"
            f"{tenants} tenants, {prompt_tokens} tokens of system prompts = "
            f"{options['prompt_ratio']:.2f}x one replica's memory tier ({MEMORY_TOKENS} tokens); Redis "
            f"shared; {ENGINE_ENV['BUL_DTYPE']}, batch-invariant, batches of at most {options['clients']}"
        ),
    )
    parts = [table]
    if lost is not None:
        n = lost["node_lost"]
        title = (
            f"Node lost (prefix-aware, the same sessions): worker node {n['node'][:8]} (replica "
            f"{n['replica']}) removed with allow_graceful=False at {n['removed_at_s']:.1f} s of the window, "
            f"{n['in_flight_at_removal']} requests in flight; declared dead after {n['dead_after_s']} s, "
            f"then a new worker node added; back to 2 replicas on 2 nodes: "
            + (
                f"yes, {n['back_after_s']} s after the removal"
                if n["replicas_back"]
                else f"NO ({n.get('error')})"
            )
        )
        rows = [
            _row("before the removal", n["before"]),
            _row("after the removal", n["after"]),
            _row("whole window", lost),
        ]
        parts.append(format_table(["period", "requests", "errors", *HEADERS], rows, title=title))
        bucket_rows = [
            [
                f"{b['from_s']:.0f}-{b['to_s']:.0f}",
                b["replicas"],
                b["requests"],
                b["errors"],
                round(100 * b["memory_token_hit_rate"], 1),
                b["ttft_p50_ms"],
                b["completion_tokens_per_s"],
            ]
            for b in lost["buckets"]
        ]
        parts.append(
            format_table(
                ["s into window", "replicas", "requests", "errors", "memory hit %", "TTFT p50", "tok/s"],
                bucket_rows,
                title=f"Node lost, by {options['bucket']:.0f} s (the removal at {n['removed_at_s']:.1f} s)",
            )
        )
    target_rows = [
        [name, _value(c["value"]), c["target"], "PASS" if c["pass"] else "MISS"] for name, c in checks.items()
    ]
    parts.append(format_table(["target", "value", "target", ""], target_rows, title="Targets"))
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bul bench cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="engine model (default demo-large)")
    parser.add_argument("--clients", type=int)
    parser.add_argument("--warmup", type=float, help="seconds of traffic before measuring")
    parser.add_argument("--duration", type=float, help="seconds measured")
    parser.add_argument("--bucket", type=float, help="seconds per line of the node-lost run's timeline")
    parser.add_argument(
        "--no-node-loss",
        dest="node_loss",
        action="store_false",
        default=None,
        help="skip the third run (a worker node lost halfway)",
    )
    parser.add_argument("--quick", action="store_true", help="the demo model, a few seconds each")
    parser.add_argument("--out", help="results directory (default bench/results)")
    args = parser.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    keys = ("model", "clients", "warmup", "duration", "bucket", "node_loss")
    options = {**options_from(QUICK if args.quick else DEFAULTS, args, keys), "quick": args.quick}
    options["workload"] = asdict(SHAPE)  # recorded with the results
    options["memory_tokens_per_replica"] = MEMORY_TOKENS
    options["engine_env"] = engine_env(options["clients"])
    # Words of `cluster_workload.WORDS` take about 7.3 tokens each with a byte tokenizer (the demo
    # models'); the prompts are then counted with the model's own tokenizer.
    options["tokens_per_word"] = 7.3 if options["model"].startswith("demo") else 1.3
    options["tenant_prompt_tokens"] = tenant_prompt_tokens(options["model"], workload(options)[0])
    options["prompt_ratio"] = options["tenant_prompt_tokens"] / MEMORY_TOKENS
    if options["prompt_ratio"] < MIN_PROMPT_RATIO:
        log.warning("the tenants' prompts are only %.2fx one replica's memory tier", options["prompt_ratio"])
    options["load_1min_at_start"] = os.getloadavg()[0]
    results: dict[str, dict[str, Any]] = {}
    for router in QUICK_ROUTERS if options["quick"] else ROUTERS:
        log.info("measuring the %s router", router)
        results[router] = measure(router, options)
        log.info(
            "%s: %s", router, {k: v for k, v in results[router].items() if k not in ("replicas", "buckets")}
        )
    lost = None
    if options["node_loss"]:
        log.info("measuring the prefix router with a worker node lost halfway")
        lost = measure("prefix", options, lose_node=True)
        log.info("node lost: %s", {k: v for k, v in lost.items() if k not in ("replicas", "buckets")})
    checks = verdicts(results, lost)
    options["load_1min_at_end"] = os.getloadavg()[0]
    data = {"options": options, "routers": results, "node_lost": lost, "verdicts": checks}
    path = write_results(NAME, data, args.out)
    print(render(results, lost, checks, options))
    load = (options["load_1min_at_start"], options["load_1min_at_end"])
    print(f"\n1-minute load: {load[0]:.2f} at start, {load[1]:.2f} at end")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(main())
