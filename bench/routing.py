"""`bul bench routing`: routing policies in a trace-driven simulation of 2 to 128 replicas (no model).

The design of `bul cluster`'s router, checked past one machine. Each simulated replica keeps its
memory tier in the engine's own `BlockManager` (with the engine's eviction policy, ADAPTIVE) and
serves its queue in order, one request at a time; a request's service time is a cost model: 0.5 ms
per prompt token not found in memory (prefill) plus 1 ms per answer token (decode, as a share of a
batch). The workload is `bench.cluster_workload`'s shape (the same as `bul bench cluster`): 4 tenants
per replica (at least 8), system prompts of 1,000 tokens, mild Zipf popularity, sessions of 1 to 4
turns, each turn sent with the conversation so far; a replica's memory tier (4,096 tokens) holds
about half the system prompts of its share. Sessions arrive at random (Poisson), a turn follows its
answer after a pause of 1 s on average; the arrival rate is set so that the replicas would be fully
busy if nothing were ever found in memory.

Policies, over the same requests:

  prefix-aware     `bulk.routing.policy.PrefixAffinityPolicy`, the router of `bul cluster`: chains of
                   block ids from `bulk.kv.hashing`, replicas' reports every second (their block
                   managers' contents), what was sent learnt in between, threshold 8, sessions
  power-of-two     two replicas at random, the shorter queue (Ray Serve's default)
  round-robin      each replica in turn
  consistent-hash  a hash ring (100 virtual nodes per replica) on the prompt's first block

Reported per policy and size: the memory-tier token hit rate (tokens found in the replica's memory of
those looked up, as the engine counts it), the load imbalance (the largest replica's time-averaged
queue over the mean), and the modelled time to first token (queueing plus prefill, p50/p95). Figures
go to `bench/results/routing-*.json` and a PNG beside them.

    python -m bench.routing [--replicas 2,8,32,128] [--sessions-per-replica 60] [--seed 1]
    python -m bench.routing --quick        # 2 and 8 replicas, fewer sessions: the smoke test
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import heapq
import itertools
import logging
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.cluster_workload import WorkloadShape
from bench.common import format_table, write_results
from bulk.kv.block_manager import BlockManager
from bulk.kv.hashing import chain_hashes
from bulk.routing.chains import block_id
from bulk.routing.policy import PrefixAffinityPolicy, RoutingKey

log = logging.getLogger("bench.routing")

NAME = "routing"
BLOCK = 16
NAMESPACE = hashlib.sha256(b"bench-routing").digest()
POLICIES = ("prefix-aware", "power-of-two", "round-robin", "consistent-hash")
COMMON_HEADER_TOKENS = 40  # the start every prompt shares: 2 full blocks
DEFAULTS = {"replicas": (2, 8, 32, 128), "sessions_per_replica": 60}
QUICK = {"replicas": (2, 8), "sessions_per_replica": 12}


@dataclass(frozen=True)
class CostModel:
    prefill_ms_per_token: float = 0.5
    decode_ms_per_token: float = 1.0
    capacity_tokens: int = 4096  # the memory tier of each replica, as in `bul bench cluster`
    utilization_cold: float = 1.0
    think_s: float = 1.0
    report_period_s: float = 1.0
    imbalance_threshold: float = 8

    def service_s(self, uncached: int, answer: int) -> float:
        return (uncached * self.prefill_ms_per_token + answer * self.decode_ms_per_token) / 1000


# ---- the workload, in tokens ------------------------------------------------------------------------


@dataclass
class SimSession:
    index: int
    tenant: int
    questions: list[list[int]]
    answers: list[list[int]]
    turn: int = 0
    history: list[int] = field(default_factory=list)


def build_sessions(shape: WorkloadShape, count: int, seed: int) -> tuple[list[list[int]], list[SimSession]]:
    rng = random.Random(seed)
    # Every system prompt starts alike (the chat template's header, a common preamble), as real ones do.
    header = [rng.randrange(1, 50_000) for _ in range(COMMON_HEADER_TOKENS)]
    systems = [
        header + [rng.randrange(1, 50_000) for _ in range(shape.system_tokens - COMMON_HEADER_TOKENS)]
        for _ in range(shape.tenants)
    ]
    popularity = shape.popularity()
    sessions = []
    for index in range(count):
        turns = rng.randint(*shape.turns)
        sessions.append(
            SimSession(
                index=index,
                tenant=rng.choices(range(shape.tenants), popularity)[0],
                questions=[
                    [rng.randrange(1, 50_000) for _ in range(shape.question_tokens)] for _ in range(turns)
                ],
                answers=[
                    [rng.randrange(1, 50_000) for _ in range(rng.randint(*shape.answer_tokens))]
                    for _ in range(turns)
                ],
            )
        )
    return systems, sessions


# ---- policies ----------------------------------------------------------------------------------------


class PrefixAware:
    uses_reports = True

    def __init__(self, replicas: list[str], cost: CostModel, rng: random.Random) -> None:
        self.policy = PrefixAffinityPolicy(cost.imbalance_threshold, rng=rng, report_slack_s=0.0)
        self.policy.set_replicas(replicas)
        self.replicas = replicas
        self.decisions: dict[str, int] = {}

    def choose(self, key: RoutingKey, loads: dict[str, int]) -> str:
        decision = self.policy.choose(self.replicas, key, loads)
        self.decisions[decision.reason] = self.decisions.get(decision.reason, 0) + 1
        return decision.ranks[0][0]

    def routed(self, replica: str, request_id: str, key: RoutingKey, now: float) -> None:
        self.policy.routed(replica, request_id, key, now)

    def completed(self, request_id: str, now: float) -> None:
        self.policy.completed(request_id, now)

    def report(self, replica: str, manager: BlockManager, now: float) -> None:
        blocks = frozenset(block_id(d) for d in manager.digests())
        self.policy.report(replica, blocks, now, manager.capacity_blocks)


class Stateless:
    uses_reports = False

    def __init__(self, replicas: list[str], cost: CostModel, rng: random.Random) -> None:
        self.replicas = replicas
        self.rng = rng
        self.decisions: dict[str, int] = {}

    def routed(self, *args: Any) -> None:
        pass

    def completed(self, *args: Any) -> None:
        pass


class PowerOfTwo(Stateless):
    def choose(self, key: RoutingKey, loads: dict[str, int]) -> str:
        a, b = self.rng.sample(self.replicas, 2) if len(self.replicas) > 1 else (self.replicas[0],) * 2
        return a if loads[a] <= loads[b] else b


class RoundRobin(Stateless):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._next = itertools.cycle(self.replicas)

    def choose(self, key: RoutingKey, loads: dict[str, int]) -> str:
        return next(self._next)


class ConsistentHash(Stateless):
    VNODES = 100

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        ring = []
        for replica in self.replicas:
            for v in range(self.VNODES):
                point = int.from_bytes(hashlib.sha256(f"{replica}#{v}".encode()).digest()[:8], "little")
                ring.append((point, replica))
        ring.sort()
        self._points = [p for p, _ in ring]
        self._owners = [r for _, r in ring]

    def choose(self, key: RoutingKey, loads: dict[str, int]) -> str:
        point = key.chain[0] if key.chain else 0
        index = bisect.bisect(self._points, point) % len(self._points)
        return self._owners[index]


MAKERS = {
    "prefix-aware": PrefixAware,
    "power-of-two": PowerOfTwo,
    "round-robin": RoundRobin,
    "consistent-hash": ConsistentHash,
}


# ---- the simulation ------------------------------------------------------------------------------------


@dataclass
class Request:
    id: str
    session: SimSession
    tokens: list[int]
    answer: list[int]
    key: RoutingKey
    arrived: float
    replica: str = ""
    started: float = 0.0
    ttft: float = 0.0


class Replica:
    def __init__(self, name: str, cost: CostModel) -> None:
        self.name = name
        self.manager = BlockManager(cost.capacity_tokens // BLOCK, BLOCK, "adaptive", NAMESPACE)
        self.queue: deque[Request] = deque()
        self.busy: Request | None = None
        self.lease: Any = None
        self.area = 0.0
        self.last = 0.0

    @property
    def length(self) -> int:
        return len(self.queue) + (self.busy is not None)

    def account(self, now: float) -> None:
        self.area += self.length * (now - self.last)
        self.last = now


def simulate(
    policy_name: str,
    n_replicas: int,
    systems: list[list[int]],
    sessions: list[SimSession],
    cost: CostModel,
    seed: int,
) -> dict[str, Any]:
    rng = random.Random(seed)
    names = [f"r{i}" for i in range(n_replicas)]
    replicas = {name: Replica(name, cost) for name in names}
    router = MAKERS[policy_name](names, cost, random.Random(seed + 1))
    for s in sessions:
        s.turn, s.history = 0, []

    mean_cold = statistics.mean(
        cost.service_s(
            len(systems[s.tenant]) + 60 * (len(s.questions) - 1), statistics.mean(map(len, s.answers))
        )
        for s in sessions
    )
    mean_turns = statistics.mean(len(s.questions) for s in sessions)
    session_rate = cost.utilization_cold * n_replicas / mean_cold / mean_turns

    events: list[tuple[float, int, str, Any]] = []
    counter = itertools.count()
    t = 0.0
    for s in sessions:
        t += rng.expovariate(session_rate)
        heapq.heappush(events, (t, next(counter), "turn", s))
    if router.uses_reports:
        heapq.heappush(events, (cost.report_period_s, next(counter), "report", None))
    ttfts: list[float] = []
    pending = len(sessions)
    now = 0.0

    def start(replica: Replica, now: float) -> None:
        request = replica.queue.popleft()
        replica.busy = request
        lease = replica.manager.acquire(request.tokens, max_tokens=len(request.tokens))
        reused = min(lease.num_tokens, len(request.tokens) - 1)
        replica.lease = lease
        prefill = cost.service_s(len(request.tokens) - reused, 0)
        request.ttft = now + prefill - request.arrived
        done = now + prefill + cost.service_s(0, len(request.answer))
        heapq.heappush(events, (done, next(counter), "done", replica))

    while events and pending:
        now, _, kind, item = heapq.heappop(events)
        if kind == "report":
            for name, replica in replicas.items():
                router.report(name, replica.manager, now)
            heapq.heappush(events, (now + cost.report_period_s, next(counter), "report", None))
            continue
        if kind == "turn":
            s: SimSession = item
            s.history = s.history + s.questions[s.turn]
            tokens = systems[s.tenant] + s.history
            chain = tuple(block_id(d) for d in chain_hashes(tokens, BLOCK, NAMESPACE))
            key = RoutingKey(chain, f"s{s.index}", sticky=s.turn > 0)
            request = Request(f"{s.index}.{s.turn}", s, tokens, s.answers[s.turn], key, now)
            loads = {name: r.length for name, r in replicas.items()}
            target = replicas[router.choose(key, loads)]
            request.replica = target.name
            router.routed(target.name, request.id, key, now)
            target.account(now)
            target.queue.append(request)
            if target.busy is None:
                start(target, now)
            continue
        replica: Replica = item  # "done"
        request = replica.busy
        assert request is not None
        replica.manager.extend(replica.lease, request.tokens + request.answer)
        replica.manager.release(replica.lease)
        replica.account(now)
        replica.busy = None
        router.completed(request.id, now)
        ttfts.append(request.ttft)
        s = request.session
        s.history = s.history + request.answer
        s.turn += 1
        if s.turn < len(s.questions):
            heapq.heappush(events, (now + rng.expovariate(1 / cost.think_s), next(counter), "turn", s))
        else:
            pending -= 1
        if replica.queue:
            start(replica, now)

    for replica in replicas.values():
        replica.account(now)
    queries = sum(r.manager.stats()["token_queries"] for r in replicas.values())
    hits = sum(r.manager.stats()["token_hits"] for r in replicas.values())
    mean_queues = [r.area / now for r in replicas.values()] if now else [0.0]
    mean_queue = statistics.mean(mean_queues)
    ttfts.sort()
    return {
        "requests": len(ttfts),
        "hit_rate": hits / queries if queries else 0.0,
        "imbalance": max(mean_queues) / mean_queue if mean_queue else 1.0,
        "mean_queue": mean_queue,
        "ttft_p50_ms": 1000 * ttfts[len(ttfts) // 2],
        "ttft_p95_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
        "simulated_s": now,
        "decisions": dict(router.decisions),
    }


def measure(sizes: Sequence[int], per_replica: int, seed: int, cost: CostModel) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for n in sizes:
        shape = replace(WorkloadShape(), tenants=max(8, 4 * n), seed=seed)
        systems, sessions = build_sessions(shape, per_replica * n, seed)
        results[str(n)] = {"tenants": shape.tenants, "sessions": len(sessions), "policies": {}}
        for name in POLICIES:
            started = time.perf_counter()
            figures = simulate(name, n, systems, sessions, cost, seed)
            figures["wall_s"] = round(time.perf_counter() - started, 2)
            results[str(n)]["policies"][name] = figures
            log.info("%d replicas, %s: %s", n, name, figures)
    return results


def verdicts(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The checks, each over every simulated size: the prefix-aware router's memory-tier token hit
    rate against power-of-two's, its modelled TTFT p50 against power-of-two's, and its load imbalance
    against consistent hashing's (routing by prefix alone)."""
    sizes = list(results.values())

    def policy(size: dict[str, Any], name: str) -> dict[str, Any]:
        return size["policies"][name]

    ratio = min(
        policy(s, "prefix-aware")["hit_rate"] / max(policy(s, "power-of-two")["hit_rate"], 1e-9)
        for s in sizes
    )
    ttft = max(
        policy(s, "prefix-aware")["ttft_p50_ms"] / max(policy(s, "power-of-two")["ttft_p50_ms"], 1e-9)
        for s in sizes
    )
    imbalance = max(
        policy(s, "prefix-aware")["imbalance"] / max(policy(s, "consistent-hash")["imbalance"], 1e-9)
        for s in sizes
    )
    return {
        "hit rate, prefix-aware / power-of-two (x, lowest)": {
            "value": round(ratio, 2),
            "target": ">= 1.5",
            "pass": ratio >= 1.5,
        },
        "TTFT p50, prefix-aware / power-of-two (x, highest)": {
            "value": round(ttft, 2),
            "target": "< 1",
            "pass": ttft < 1,
        },
        "imbalance, prefix-aware / consistent-hash (x, highest)": {
            "value": round(imbalance, 2),
            "target": "<= 1",
            "pass": imbalance <= 1,
        },
    }


def render(results: dict[str, Any], checks: dict[str, dict[str, Any]], cost: CostModel) -> str:
    rows = []
    for n, size in results.items():
        for name, f in size["policies"].items():
            rows.append(
                [
                    f"{n} replicas, {name}" if name == POLICIES[0] else f"  {name}",
                    round(100 * f["hit_rate"], 1),
                    round(f["imbalance"], 2),
                    round(f["mean_queue"], 2),
                    round(f["ttft_p50_ms"], 1),
                    round(f["ttft_p95_ms"], 1),
                ]
            )
    table = format_table(
        ["replicas, policy", "token hit %", "imbalance", "mean queue", "TTFT p50", "TTFT p95"],
        rows,
        title=(
            f"routing simulation: memory-tier token hit rate, load imbalance (max/mean time-averaged "
            f"queue), modelled TTFT (ms); {cost.capacity_tokens} tokens of memory per replica"
        ),
    )
    target_rows = [
        [name, f"{c['value']:.2f}", c["target"], "PASS" if c["pass"] else "MISS"]
        for name, c in checks.items()
    ]
    return table + "\n\n" + format_table(["target", "value", "target", ""], target_rows, title="Targets")


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(n) for n in results]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name in POLICIES:
        series = [results[str(n)]["policies"][name] for n in sizes]
        width = 2.5 if name == "prefix-aware" else 1.2
        axes[0].plot(sizes, [100 * f["hit_rate"] for f in series], marker="o", linewidth=width, label=name)
        axes[1].plot(sizes, [f["imbalance"] for f in series], marker="o", linewidth=width, label=name)
        axes[2].plot(sizes, [f["ttft_p50_ms"] for f in series], marker="o", linewidth=width, label=name)
    titles = ("memory-tier token hit rate (%)", "load imbalance (max / mean queue)", "modelled TTFT p50 (ms)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_xlabel("replicas")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bul bench routing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", help="comma-separated replica counts (default 2,8,32,128)")
    parser.add_argument("--sessions-per-replica", type=int)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 and 8 replicas, fewer sessions")
    parser.add_argument("--out", help="results directory (default bench/results)")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    sizes = tuple(int(n) for n in args.replicas.split(",")) if args.replicas else base["replicas"]
    per_replica = args.sessions_per_replica or base["sessions_per_replica"]
    cost = CostModel()
    started = time.perf_counter()
    results = measure(sizes, per_replica, args.seed, cost)
    checks = verdicts(results)
    settings = {
        "replicas": list(sizes),
        "sessions_per_replica": per_replica,
        "seed": args.seed,
        "quick": args.quick,
        "cost_model": cost.__dict__,
        "workload": {**WorkloadShape().__dict__, "tenants": "4 per replica (at least 8)"},
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    path = write_results(NAME, {"settings": settings, "sizes": results, "verdicts": checks}, args.out)
    png = plot(results, path.with_suffix(".png"))
    (path.parent / f"{NAME}-latest.png").write_bytes(png.read_bytes())
    print(render(results, checks, cost))
    print(f"\nwritten: {path}\n         {png}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(main())
