"""`bul bench routing`: routing policies in a trace-driven simulation of 2 to 128 replicas (no model).

The design of `bul cluster`'s router, checked past one machine, and `bul bench cluster`'s run
predicted before it is made: the simulation runs that benchmark as it runs, so that where the two
differ, the model is wrong. Each simulated replica keeps its memory tier in the engine's own
`BlockManager` (ADAPTIVE eviction, 4,096 tokens) and is stepped as the engine's loop steps it: up to 8
requests in its batch; a request's prompt is looked up (and its hit pinned) when its prefill begins,
its prompt blocks stored once computed and its answer's at retirement, when its pins go; a request
that shares blocks not cached yet with a prefill beginning in the same step waits for them
(`Scheduler._waits_for`). A step costs 65 ms of decoding (padded to the batch: batch invariance) plus
0.6 ms per prompt token computed, demo-large's speeds on the development machine.

The traffic is `bul bench cluster`'s: 4 users per replica (8 at two), each running the next session of
`bench.cluster_workload.SHAPE` turn after turn, a turn sent when the user's pause after the previous
answer ends (a closed loop: a user waits for the answer); 30 s of warmup with sessions of their own,
then 90 s measured. The tenants scale with the replicas, 6.5 a replica: all their prompts are 3.2
times one replica's memory tier at two replicas, and a replica's share of them (what a router that
splits the tenants leaves it) is 1.6 times its memory tier at every size. The closed loop is what
made power-of-two look good before: with no pause, a user's next turn goes to the replica that has
just answered it, which is then the shorter queue, and finds its whole previous prompt there; with
users who read their answer first, the queues have moved.

Policies, over the same sessions in the same order:

  prefix-aware     `bulk.routing.policy.PrefixAffinityPolicy`, the router of `bul cluster`: chains of
                   block ids from `bulk.kv.hashing`, replicas' reports every second (their block
                   managers' contents), what was sent learnt in between, threshold 8, sessions
  power-of-two     Ray Serve's `PowerOfTwoChoicesRequestRouter`: two replicas at random, the shorter
                   queue (requests sent and not answered, as its probes report), ties at random
  round-robin      each replica in turn
  consistent-hash  a hash ring (100 virtual nodes per replica) on the prompt's first block

Reported per policy and size, over the measured window: the memory-tier token hit rate (tokens found in
the replica's memory of those looked up, as the engine counts it), the load imbalance (the largest
replica's time-averaged queue over the mean), and the modelled time to first token (p50/p95). Figures
go to `bench/results/routing-*.json` and a PNG beside them.

    python -m bench.routing [--replicas 2,8,32,128] [--sessions-per-replica 200] [--seed 1]
    python -m bench.routing --quick        # 2 and 8 replicas: the smoke test
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

from bench.cluster_workload import MEMORY_TOKENS, SHAPE, WorkloadShape
from bench.common import format_table, write_results
from bulk.engine.scheduler import common_blocks
from bulk.kv.block_manager import BlockManager, PrefixLease
from bulk.kv.hashing import chain_hashes
from bulk.routing.chains import block_id
from bulk.routing.policy import PrefixAffinityPolicy, RoutingKey

log = logging.getLogger("bench.routing")

NAME = "routing"
BLOCK = 16
NAMESPACE = hashlib.sha256(b"bench-routing").digest()
POLICIES = ("prefix-aware", "power-of-two", "round-robin", "consistent-hash")
COMMON_HEADER_TOKENS = 40  # the start every prompt shares: 2 full blocks
DEFAULTS: dict[str, Any] = {"replicas": (2, 8, 32, 128), "sessions_per_replica": 200}
QUICK: dict[str, Any] = {"replicas": (2, 8), "sessions_per_replica": 200}


@dataclass(frozen=True)
class CostModel:
    """The replicas' speed and the run's timing, those of `bul bench cluster` on the development
    machine (demo-large, float32, batch-invariant, one thread a replica)."""

    prefill_ms_per_token: float = 0.6
    decode_step_ms: float = 65.0  # a decode step, padded to the largest batch (batch invariance)
    max_batch: int = 8
    capacity_tokens: int = MEMORY_TOKENS  # each replica's memory tier
    clients_per_replica: int = 4  # `bul bench cluster`: 8 users, 2 replicas
    warmup_s: float = 30.0
    duration_s: float = 90.0
    report_period_s: float = 1.0
    imbalance_threshold: float = 8

    @property
    def wait_tokens(self) -> int:
        """Shared prompt tokens worth waiting a step for rather than computing again (the engine's
        `Scheduler.worth_waiting`)."""
        return int(self.decode_step_ms / self.prefill_ms_per_token)


# ---- the workload, in tokens ------------------------------------------------------------------------


@dataclass
class SimSession:
    index: int
    tenant: int
    questions: list[list[int]]
    answers: list[list[int]]
    pauses: list[float] = field(default_factory=list)  # seconds before each turn after the first
    turn: int = 0
    history: list[int] = field(default_factory=list)


def build_systems(shape: WorkloadShape, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Every system prompt starts alike (the chat template's header, a common preamble), as real ones do.
    header = [rng.randrange(1, 50_000) for _ in range(COMMON_HEADER_TOKENS)]
    return [
        header + [rng.randrange(1, 50_000) for _ in range(shape.system_tokens - COMMON_HEADER_TOKENS)]
        for _ in range(shape.tenants)
    ]


def build_sessions(shape: WorkloadShape, count: int, seed: int) -> list[SimSession]:
    rng = random.Random(seed)
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
                pauses=[rng.uniform(*shape.pause_s) for _ in range(turns - 1)],
            )
        )
    return sessions


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


@dataclass(eq=False)  # requests are told apart by identity
class Request:
    id: str
    session: SimSession
    tokens: list[int]
    answer: list[int]
    key: RoutingKey
    hashes: list[bytes]
    arrived: float
    measured: bool
    replica: str = ""
    lease: PrefixLease | None = None
    produced: int = 0  # answer tokens sampled so far (the first comes with the prefill)
    ttft: float = 0.0


class Replica:
    """One engine replica: its memory tier (the engine's `BlockManager`), the requests it was sent
    and has not begun (`waiting`) and those in its batch (`running`), stepped as the engine's loop
    steps (`bulk.engine.loop`)."""

    def __init__(self, name: str, cost: CostModel) -> None:
        self.name = name
        self.manager = BlockManager(cost.capacity_tokens // BLOCK, BLOCK, "adaptive", NAMESPACE)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stepping = False
        self.area = 0.0
        self.last = 0.0

    @property
    def length(self) -> int:
        """What Ray's probe reports and the routers count: requests sent and not answered."""
        return len(self.waiting) + len(self.running)

    def account(self, now: float) -> None:
        self.area += self.length * (now - self.last)
        self.last = now

    def admit(self, max_batch: int, wait_tokens: int) -> list[tuple[Request, int]]:
        """The requests that begin their prefill in this step, with the prompt tokens each computes.
        As the engine's scheduler does (`Scheduler._waits_for`), a request whose prompt shares blocks
        that are not cached with a prefill beginning in this step waits for it to store them, when
        computing them again would cost more than a step (`wait_tokens` or more)."""
        began: list[tuple[Request, int]] = []
        kept: deque[Request] = deque()
        while self.waiting:
            request = self.waiting.popleft()
            if len(self.running) >= max_batch:
                kept.append(request)
                continue
            cached = self.manager.cached_blocks(request.hashes)
            if any(
                (shared := common_blocks(request.hashes, other.hashes)) > cached
                and (shared - cached) * BLOCK >= wait_tokens
                for other, _ in began
            ):
                kept.append(request)
                continue
            lease = self.manager.acquire(request.tokens, max_tokens=len(request.tokens))
            request.lease = lease
            reused = min(lease.num_tokens, len(request.tokens) - 1)
            self.running.append(request)
            began.append((request, len(request.tokens) - reused))
        self.waiting = kept
        return began


@dataclass
class Client:
    """A user of `bul bench cluster`: the next session from the shared list, turn after turn, each
    sent as soon as the previous answer ended, until the phase's end."""

    session: SimSession | None = None


def simulate(
    policy_name: str,
    n_replicas: int,
    systems: list[list[int]],
    warm: list[SimSession],
    work: list[SimSession],
    cost: CostModel,
    seed: int,
) -> dict[str, Any]:
    """Two phases on the same replicas and router, as `bul bench cluster` runs them: the warmup's
    sessions for `cost.warmup_s`, then the measured sessions for `cost.duration_s`; each phase ends
    when its clients' last requests are answered. Figures are the measured phase's."""
    names = [f"r{i}" for i in range(n_replicas)]
    replicas = {name: Replica(name, cost) for name in names}
    router = MAKERS[policy_name](names, cost, random.Random(seed + 1))
    events: list[tuple[float, int, str, Any]] = []
    counter = itertools.count()
    ttfts: list[float] = []
    sent = [0]
    now = 0.0
    if router.uses_reports:
        heapq.heappush(events, (cost.report_period_s, next(counter), "report", None))

    def send(session: SimSession, at: float, measured: bool) -> None:
        session.history = session.history + session.questions[session.turn]
        tokens = systems[session.tenant] + session.history
        hashes = chain_hashes(tokens, BLOCK, NAMESPACE)
        key = RoutingKey(tuple(block_id(d) for d in hashes), f"s{session.index}", sticky=session.turn > 0)
        request = Request(
            f"{session.index}.{session.turn}",
            session,
            tokens,
            session.answers[session.turn],
            key,
            hashes,
            at,
            measured,
        )
        loads = {name: r.length for name, r in replicas.items()}
        target = replicas[router.choose(key, loads)]
        request.replica = target.name
        router.routed(target.name, request.id, key, at)
        target.account(at)
        target.waiting.append(request)
        sent[0] += measured
        if not target.stepping:
            step(target, at)

    def step(replica: Replica, at: float) -> None:
        """Begin one step of `replica`: a forward over the prefills beginning and one token of each
        request decoding; it ends at the returned time."""
        decoding = len(replica.running)
        began = replica.admit(cost.max_batch, cost.wait_tokens)
        if not replica.running:
            replica.stepping = False
            return
        replica.stepping = True
        prompt = sum(n for _, n in began)
        duration = (
            cost.decode_step_ms * (decoding > 0 or not began) + cost.prefill_ms_per_token * prompt
        ) / 1000
        heapq.heappush(events, (at + duration, next(counter), "step", (replica, [r for r, _ in began])))

    def run_phase(sessions: list[SimSession], start: float, length: float, measured: bool) -> float:
        nonlocal now
        queue = deque(sessions)
        clients = [Client() for _ in range(cost.clients_per_replica * n_replicas)]
        by_session: dict[int, Client] = {}
        stop_at = start + length
        active = 0

        def next_turn(client: Client, at: float) -> None:
            """The client's next request: its session's next turn, or the first of the next session."""
            nonlocal active
            session = client.session
            if session is None or session.turn >= len(session.questions):
                session = client.session = queue.popleft() if queue and at < stop_at else None
                if session is None:
                    return
                session.turn, session.history = 0, []
                by_session[session.index] = client
            if at >= stop_at:
                client.session = None
                return
            active += 1
            send(session, at, measured)

        for client in clients:
            next_turn(client, start)
        while events and active:
            now, _, kind, item = heapq.heappop(events)
            if kind == "report":
                for name, replica in replicas.items():
                    router.report(name, replica.manager, now)
                heapq.heappush(events, (now + cost.report_period_s, next(counter), "report", None))
                continue
            if kind == "pause":  # the user has read the answer and asks again
                active -= 1
                next_turn(item, now)
                continue
            replica, began = item
            replica.account(now)
            finished = []
            for request in replica.running:
                if request in began:
                    # The prompt's blocks are stored once computed (the engine's loop, after each
                    # prefill chunk); the first answer token comes with this step.
                    replica.manager.extend(request.lease, request.tokens)
                    request.ttft = now - request.arrived
                    if request.measured:
                        ttfts.append(request.ttft)
                request.produced += 1
                if request.produced >= len(request.answer):
                    finished.append(request)
            for request in finished:
                # Retired: every token whose KV was computed (the prompt, the answer but its last
                # token) is offered, then the lease let go (`EngineLoop._retire`).
                replica.manager.extend(request.lease, request.tokens + request.answer[:-1])
                replica.manager.release(request.lease)
                replica.running.remove(request)
                router.completed(request.id, now)
            step(replica, now)
            for request in finished:
                session = request.session
                session.history = session.history + request.answer
                session.turn += 1
                client = by_session[session.index]
                if session.turn < len(session.questions) and session.pauses[session.turn - 1] > 0:
                    # Still active: the pause ends with the next turn (or with nothing, past the end).
                    pause = session.pauses[session.turn - 1]
                    heapq.heappush(events, (now + pause, next(counter), "pause", client))
                    continue
                active -= 1
                next_turn(client, now)
        return now

    before = {name: r.manager.stats() for name, r in replicas.items()}
    warm_end = run_phase(warm, 0.0, cost.warmup_s, measured=False)
    before = {name: r.manager.stats() for name, r in replicas.items()}
    for replica in replicas.values():
        replica.area, replica.last = 0.0, warm_end
    end = run_phase(work, warm_end, cost.duration_s, measured=True)
    for replica in replicas.values():
        replica.account(end)
    after = {name: r.manager.stats() for name, r in replicas.items()}
    queries = sum(after[n]["token_queries"] - before[n]["token_queries"] for n in names)
    hits = sum(after[n]["token_hits"] - before[n]["token_hits"] for n in names)
    elapsed = end - warm_end
    mean_queues = [r.area / elapsed for r in replicas.values()] if elapsed else [0.0]
    mean_queue = statistics.mean(mean_queues)
    ttfts.sort()
    return {
        "requests": sent[0],
        "hit_rate": hits / queries if queries else 0.0,
        "imbalance": max(mean_queues) / mean_queue if mean_queue else 1.0,
        "mean_queue": mean_queue,
        "ttft_p50_ms": 1000 * ttfts[len(ttfts) // 2] if ttfts else 0.0,
        "ttft_p95_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] if ttfts else 0.0,
        "simulated_s": elapsed,
        "decisions": dict(router.decisions),
    }


def measure(
    sizes: Sequence[int], per_replica: int, seed: int, cost: CostModel, shape: WorkloadShape = SHAPE
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for n in sizes:
        # The tenants scale with the replicas: each replica's share of their prompts stays that of
        # `bul bench cluster`'s two.
        sized = replace(shape, tenants=max(1, shape.tenants * n // 2), seed=seed)
        systems = build_systems(sized, seed)
        warm = build_sessions(sized, per_replica * n, seed + 1000)
        work = build_sessions(sized, per_replica * n, seed)
        results[str(n)] = {"tenants": sized.tenants, "policies": {}}
        for name in POLICIES:
            started = time.perf_counter()
            figures = simulate(name, n, systems, warm, work, cost, seed)
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
        "workload": {**SHAPE.__dict__, "tenants": f"{SHAPE.tenants / 2:g} per replica"},
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
