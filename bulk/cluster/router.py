"""Ray Serve request routers for the engine deployment: BUL's prefix-aware one and a power-of-two one.

Wiring only: the decisions are `bulk.routing.policy`'s, the chains `bulk.routing.chains`'s. Ray Serve
runs a router inside every process holding a `DeploymentHandle` of the engine deployment (the
ingress), and asks it for each request (`choose_replicas`); the request's arguments are there
(`pending_request.args`: the request dict the ingress sends).

- `PrefixAwareRouter`: the request's block-hash chain, computed with the engine's own hashing (the
  tokenizer is loaded once, in the router), against what each replica holds: reported by the replica
  (`record_routing_stats`: its memory tier's block ids, pulled by Ray's controller every
  `request_routing_stats_period_s` and delivered to every router as `replica.routing_stats`), and
  learnt from where requests were sent since. Queue lengths are this router's own count of requests
  sent and not answered, or Ray's cached probe of the replica when that is larger (other ingress
  replicas send there too).
- `PowerOfTwoRouter`: Ray's own `PowerOfTwoChoicesRequestRouter` for every request, unchanged: the
  baseline of `bul bench cluster`.

Both route a request that names a replica (the keyword argument `bul_replica`, used by the ingress to
ask every replica for its stats) to that replica only, and keep counts of their decisions per replica
(`routing_snapshot`), which the ingress reports in `/api/stats` and `/metrics`."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from bulk.engine_settings import EngineSettings
from bulk.routing.chains import RequestChains, unpack_block_ids
from bulk.routing.policy import (
    DEFAULT_IMBALANCE_THRESHOLD,
    DEFAULT_MIN_MATCH_RATIO,
    Decision,
    PrefixAffinityPolicy,
    RoutingKey,
)
from bulk.routing.registry import register_router

log = logging.getLogger(__name__)

TARGET_KWARG = "bul_replica"
_PENDING_LIMIT = 10_000  # routing keys kept for requests not routed yet (retries reuse them)
# How long a decision counts as load on its replica before Ray reports it routed: a burst is routed
# within milliseconds; a request cancelled before routing must not weigh on its replica for ever.
_DECIDING_SECONDS = 2.0
# Ray Serve ships this module to the ingress by value (a copy of its globals): no state is kept at
# module level here; routers register in `bulk.routing.registry`, where the ingress finds them.


def _target(pending_request: PendingRequest | None) -> str | None:
    if pending_request is None:
        return None
    target = pending_request.kwargs.get(TARGET_KWARG)
    return target if isinstance(target, str) else None


def _back_off_when_refused(pending_request: PendingRequest | None) -> None:
    """Every rank is in the answer at once: when none takes the request, Ray should wait before
    asking again (without this it asks again at once, in a loop that never yields)."""
    if pending_request is not None:
        pending_request.routing_context.should_backoff = True


class _Bookkeeping:
    """What both routers share: registration, targeted requests, decision counts."""

    _lock: threading.Lock
    _decisions: Counter[tuple[str, str]]
    _inflight: Counter[str]
    _ended_early: OrderedDict[str, bool]

    def _register(self) -> None:
        self._lock = threading.Lock()  # the ingress reads the counts from another thread
        self._decisions = Counter()
        self._inflight = Counter()
        # Requests that ended before Ray reported them routed (a quick answer can), so that their
        # late `on_request_routed` does not count them as running; the oldest forgotten first.
        self._ended_early = OrderedDict()
        deployment = self._deployment_id  # type: ignore[attr-defined]
        register_router(deployment.app_name, deployment.name, self)

    def replica_ids(self) -> list[str]:
        return [rid.unique_id for rid in list(self.curr_replicas)]  # type: ignore[attr-defined]

    def routing_snapshot(self) -> dict[str, Any]:
        """`{"policy", "decisions": {replica: {reason: n}}, "inflight": {replica: n}}`."""
        with self._lock:
            decisions: dict[str, dict[str, int]] = {}
            for (replica, reason), count in self._decisions.items():
                decisions.setdefault(replica, {})[reason] = count
            inflight = {replica: n for replica, n in self._inflight.items() if n}
        return {"policy": self.POLICY, "decisions": decisions, "inflight": inflight}  # type: ignore[attr-defined]

    def _targeted(
        self, candidates: list[RunningReplica], pending_request: PendingRequest | None, target: str
    ) -> Any:
        _back_off_when_refused(pending_request)
        chosen = [r for r in candidates if r.replica_id.unique_id == target]
        return [chosen] if chosen else []

    def _ended(self, request_id: str) -> None:
        self._ended_early[request_id] = True
        while len(self._ended_early) > _PENDING_LIMIT:
            self._ended_early.popitem(last=False)

    def _count(self, replica: str, reason: str, delta_inflight: int) -> None:
        with self._lock:
            if reason:
                self._decisions[(replica, reason)] += 1
            self._inflight[replica] += delta_inflight
            if self._inflight[replica] <= 0:
                del self._inflight[replica]


class PrefixAwareRouter(_Bookkeeping, RequestRouter):
    """Sends a request to the replica holding the longest prefix of its block-hash chain (see
    `bulk.routing.policy`). `request_router_kwargs`: `imbalance_threshold` (queue difference past
    which load wins over the prefix), `min_match_ratio` (the share of a chain a replica must hold to
    be preferred), `session_capacity`, `report_slack_s`."""

    POLICY = "prefix"

    def initialize_state(  # type: ignore[override]  # Serve passes request_router_kwargs as keywords
        self,
        imbalance_threshold: float = DEFAULT_IMBALANCE_THRESHOLD,
        min_match_ratio: float = DEFAULT_MIN_MATCH_RATIO,
        session_capacity: int = 100_000,
        report_slack_s: float = 0.5,
    ) -> None:
        self._register()
        self.policy = PrefixAffinityPolicy(
            imbalance_threshold,
            min_match_ratio=min_match_ratio,
            session_capacity=session_capacity,
            report_slack_s=report_slack_s,
        )
        # The same BUL_* settings as the replicas: parsing and the system prompt agree with theirs.
        self.chains = RequestChains(EngineSettings().engine_config())
        self._namespace: bytes | None = None
        self._block_size: int | None = None
        self._seen_reports: dict[str, float] = {}
        self._pending: OrderedDict[str, tuple[RoutingKey | None, Decision]] = OrderedDict()
        # request id -> (the replica chosen for it, when): decided, not yet reported routed.
        self._deciding: dict[str, tuple[str | None, float]] = {}
        self._sent: dict[str, tuple[str, str]] = {}  # internal request id -> (replica, reason)

    # ---- Ray's hooks ------------------------------------------------------------------------------

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.policy.set_replicas(r.replica_id.unique_id for r in replicas)
        self._absorb_reports(replicas)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        target = _target(pending_request)
        if target is not None:
            return self._targeted(candidate_replicas, pending_request, target)
        _back_off_when_refused(pending_request)
        self._absorb_reports(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        key = self._key(pending_request)
        decision = self.policy.choose(list(by_id), key, self._loads(candidate_replicas))
        if pending_request is not None:
            request_id = pending_request.metadata.internal_request_id
            self._ended_early.pop(request_id, None)  # a new attempt (a replica refused the last one)
            self._pending[request_id] = (key, decision)
            self._deciding[request_id] = (decision.preferred, time.monotonic())
            self._pending.move_to_end(request_id)
            while len(self._pending) > _PENDING_LIMIT:
                self._pending.popitem(last=False)
        return [[by_id[i] for i in rank] for rank in decision.ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        if _target(pending_request) is not None:
            return
        request_id = pending_request.metadata.internal_request_id
        key, decision = self._pending.pop(request_id, (None, None))
        self._deciding.pop(request_id, None)
        replica = replica_id.unique_id
        reason = decision.reason if decision is not None else "spread"
        if decision is not None and reason in ("prefix", "session") and replica != decision.preferred:
            reason = "full"  # the preferred replica was at max_ongoing_requests: the fallback took it
        now = time.time()
        self.policy.routed(replica, request_id, key, now)
        if self._ended_early.pop(request_id, None) is not None:
            # A quick answer can end before Ray reports it routed: it is done already.
            self.policy.completed(request_id, now)
            self._count(replica, reason, 0)
            return
        self._sent[request_id] = (replica, reason)
        self._count(replica, reason, +1)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        sent = self._sent.pop(internal_request_id, None)
        if sent is None:
            # A targeted request; one a replica refused (it is routed again); or one that ended
            # before `on_request_routed` (remembered, so that it is not counted as running).
            self._ended(internal_request_id)
            return
        self.policy.completed(internal_request_id, time.time())
        self._count(sent[0], "", -1)

    def routing_snapshot(self) -> dict[str, Any]:
        snapshot = super().routing_snapshot()
        # Chains are computed once the tokenizer is loaded and a replica has reported its namespace.
        snapshot["chains"] = self.chains.ready and self._namespace is not None
        return snapshot

    # ---- internals ----------------------------------------------------------------------------------

    def _key(self, pending_request: PendingRequest | None) -> RoutingKey | None:
        if pending_request is None or not pending_request.args:
            return None
        cached = self._pending.get(pending_request.metadata.internal_request_id)
        if cached is not None:
            return cached[0]  # a retry: the chain is computed once
        try:
            return self.chains.key(pending_request.args[0], self._namespace, self._block_size)
        except Exception:
            log.exception("cannot compute a routing key; routing by load")
            return None

    def _loads(self, replicas: list[RunningReplica]) -> dict[str, float]:
        cache = self.replica_queue_len_cache
        loads: dict[str, float] = {}
        for replica in replicas:
            rid = replica.replica_id
            probed = cache.get(rid) if self._use_replica_queue_len_cache else None
            loads[rid.unique_id] = max(self._inflight.get(rid.unique_id, 0), probed or 0)
        # Requests chosen but not yet reported routed count on the replica chosen for them: a burst
        # is decided before the first of it is routed, and would otherwise all see the same loads.
        now = time.monotonic()
        for request_id, (chosen, decided_at) in list(self._deciding.items()):
            if now - decided_at > _DECIDING_SECONDS:
                del self._deciding[request_id]  # never routed (cancelled): no longer load
            elif chosen in loads:
                loads[chosen] += 1
        return loads

    def _absorb_reports(self, replicas: list[RunningReplica]) -> None:
        for replica in replicas:
            stats = replica.routing_stats or {}
            taken_at = stats.get("time")
            rid = replica.replica_id.unique_id
            if not isinstance(taken_at, int | float) or self._seen_reports.get(rid) == taken_at:
                continue
            self._seen_reports[rid] = taken_at
            namespace = stats.get("namespace")
            if isinstance(namespace, str):
                if self._namespace is None:
                    self._namespace = bytes.fromhex(namespace)
                    self._block_size = int(stats.get("block_size") or 0) or None
                elif self._namespace.hex() != namespace:
                    log.warning("replica %s reports another block namespace: its blocks never match", rid)
                    continue
            try:
                blocks = unpack_block_ids(stats.get("blocks") or b"")
            except (TypeError, ValueError):
                log.warning("replica %s sent a malformed block report", rid)
                continue
            capacity = stats.get("capacity_blocks")
            self.policy.report(rid, blocks, float(taken_at), capacity if isinstance(capacity, int) else None)
        for gone in set(self._seen_reports) - {r.replica_id.unique_id for r in replicas}:
            if gone not in self.policy.views:
                del self._seen_reports[gone]


class PowerOfTwoRouter(_Bookkeeping, PowerOfTwoChoicesRequestRouter):
    """Ray Serve's default router (power-of-two choices on queue length) for every request, with
    the bookkeeping above: the baseline the prefix-aware router is measured against."""

    POLICY = "pow2"

    def initialize_state(self, **_: Any) -> None:
        self._register()
        self._sent: dict[str, str] = {}

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        target = _target(pending_request)
        if target is not None:
            return self._targeted(candidate_replicas, pending_request, target)
        if pending_request is not None:
            self._ended_early.pop(pending_request.metadata.internal_request_id, None)
        return await super().choose_replicas(candidate_replicas, pending_request)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        if _target(pending_request) is not None:
            return
        request_id = pending_request.metadata.internal_request_id
        if self._ended_early.pop(request_id, None) is not None:
            self._count(replica_id.unique_id, "pow2", 0)
            return
        self._sent[request_id] = replica_id.unique_id
        self._count(replica_id.unique_id, "pow2", +1)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        replica = self._sent.pop(internal_request_id, None)
        if replica is not None:
            self._count(replica, "", -1)
        else:
            self._ended(internal_request_id)
