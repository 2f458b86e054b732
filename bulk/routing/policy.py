"""The prefix-aware routing policy: which replica a request goes to.

Each replica is seen through a `ReplicaView`, a model of which KV blocks its memory tier holds:

- **reported**: the blocks the replica itself said it held (`engine.cached_blocks()`, sent every
  second or so), the truth at the time of the report;
- **learnt**: the chains of the requests sent there since, which it will hold once they are
  computed, kept in an LRU bounded by the replica's capacity (as its own memory tier is), so that
  what the replica must have evicted since is forgotten here too.

A new report replaces what was learnt before it: the chains of requests that ended before the report
was taken are in the report, or were evicted; only the chains of requests still running, or ended
since, are kept beside it (`report_slack_s` covers clocks that disagree a little).

Chains are lists of block ids (`chains.block_id`: the first 8 bytes of each chained SHA-256 block
hash, as an int). Every cached block's parent is cached, so a replica holds a request's prefix up to
the first block of its chain it lacks.

A choice (`choose`), given the request's `RoutingKey` and each replica's queue length:

1. **session**: a request of a session (an explicit `session_id`, or a multi-turn chat) goes to the
   replica that served the session before, while that replica is up (among the candidates);
2. **prefix**: otherwise, to the replica holding the longest prefix of its chain (ties: the shorter
   queue), unless that replica's queue exceeds the shortest by more than `imbalance_threshold`;
3. **balance**: in that case, power-of-two choices (two replicas at random, the shorter queue);
4. **spread**: no replica holds at least `min_match_ratio` of the chain (10 %, as Ray Serve's own
   prefix router): power-of-two choices too. Every prompt of a deployment may start with the same
   blocks (the chat template's header, a default system turn), which every replica soon holds; a
   match that short is no reason to prefer a replica, and would draw all traffic to the first one
   that served anything.

The answer is a list of ranks, most preferred first, as Ray Serve's request router takes it: the
preferred replica alone, then a power-of-two pair to fall back on when it is full."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass

REASONS = ("session", "prefix", "balance", "spread")
DEFAULT_IMBALANCE_THRESHOLD = 8
DEFAULT_MIN_MATCH_RATIO = 0.1
DEFAULT_CAPACITY_BLOCKS = 512  # KVCacheConfig's default memory tier: 8192 tokens of 16-token blocks


@dataclass(frozen=True)
class RoutingKey:
    """What routing needs of a request: its chain of block ids and its session. `sticky`: the
    session binds the request to a replica (an explicit `session_id`, a chat with earlier turns);
    otherwise `session` is only remembered, for the turns that follow."""

    chain: tuple[int, ...] = ()
    session: str | None = None
    sticky: bool = False


@dataclass(frozen=True)
class Decision:
    ranks: tuple[tuple[str, ...], ...]
    reason: str
    matched_blocks: int = 0

    @property
    def preferred(self) -> str | None:
        return self.ranks[0][0] if self.ranks and self.ranks[0] else None


class ReplicaView:
    """The router's model of one replica's memory tier (see the module's docstring)."""

    __slots__ = ("capacity", "learnt", "namespace", "report_time", "reported")

    def __init__(self, capacity: int = DEFAULT_CAPACITY_BLOCKS) -> None:
        self.capacity = capacity
        self.reported: Set[int] = frozenset()
        self.report_time = float("-inf")
        self.namespace: str | None = None
        self.learnt: OrderedDict[int, float] = OrderedDict()  # block id -> when last sent or finished

    def holds(self, block: int) -> bool:
        return block in self.learnt or block in self.reported

    def matched(self, chain: Sequence[int]) -> int:
        """How many blocks of `chain`, from its start, this replica holds."""
        for index, block in enumerate(chain):
            if block not in self.learnt and block not in self.reported:
                return index
        return len(chain)

    def learn(self, chain: Sequence[int], now: float) -> None:
        learnt = self.learnt
        for block in chain:
            learnt[block] = now
            learnt.move_to_end(block)
        while len(learnt) > self.capacity:
            learnt.popitem(last=False)

    def report(self, blocks: Set[int], taken_at: float, keep: Set[int], slack: float) -> None:
        self.reported = blocks
        self.report_time = taken_at
        cutoff = taken_at - slack
        stale = [b for b, t in self.learnt.items() if t < cutoff and b not in keep]
        for block in stale:
            del self.learnt[block]


class PrefixAffinityPolicy:
    """Routing decisions and the state behind them; single-threaded (the caller serializes)."""

    def __init__(
        self,
        imbalance_threshold: float = DEFAULT_IMBALANCE_THRESHOLD,
        *,
        min_match_ratio: float = DEFAULT_MIN_MATCH_RATIO,
        session_capacity: int = 100_000,
        report_slack_s: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        if imbalance_threshold < 0:
            raise ValueError("imbalance_threshold must be >= 0")
        if not 0 <= min_match_ratio <= 1:
            raise ValueError("min_match_ratio must be in [0, 1]")
        self.imbalance_threshold = imbalance_threshold
        self.min_match_ratio = min_match_ratio
        self.session_capacity = session_capacity
        self.report_slack_s = report_slack_s
        self.rng = rng if rng is not None else random.Random()
        self.views: dict[str, ReplicaView] = {}
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._inflight: dict[str, tuple[str, tuple[int, ...]]] = {}

    # ---- what the replicas are and what they hold ---------------------------------------------

    def set_replicas(self, replicas: Iterable[str]) -> None:
        """The replicas that exist now: views of new ones are made, those of gone ones dropped (a
        session on a gone replica moves at its next request)."""
        current = set(replicas)
        for gone in set(self.views) - current:
            del self.views[gone]
        for replica in current:
            self.views.setdefault(replica, ReplicaView())

    def view(self, replica: str) -> ReplicaView:
        view = self.views.get(replica)
        if view is None:
            view = self.views[replica] = ReplicaView()
        return view

    def report(
        self,
        replica: str,
        blocks: Set[int],
        taken_at: float,
        capacity_blocks: int | None = None,
        namespace: str | None = None,
    ) -> None:
        """A replica's own account of its memory tier, taken at `taken_at` (its wall clock)."""
        view = self.view(replica)
        if taken_at <= view.report_time:
            return  # an older report, delivered late
        if capacity_blocks:
            view.capacity = capacity_blocks
        view.namespace = namespace
        keep = {b for r, chain in self._inflight.values() if r == replica for b in chain}
        view.report(blocks, taken_at, keep, self.report_slack_s)

    # ---- choosing --------------------------------------------------------------------------------

    def choose(self, replicas: Sequence[str], key: RoutingKey | None, loads: Mapping[str, float]) -> Decision:
        """Ranks of `replicas` for a request (see the module's docstring). `loads`: each replica's
        queue (requests sent and not answered); a missing one counts as 0."""
        if not replicas:
            return Decision((), "spread")
        pair = self._two_choices(replicas, loads)
        chain = key.chain if key is not None else ()
        if key is not None and key.sticky and key.session is not None:
            home = self._sessions.get(key.session)
            if home is not None and home in replicas:
                self._sessions.move_to_end(key.session)
                return Decision(((home,), pair), "session", self.view(home).matched(chain))
        best, matched = None, 0
        if chain:
            order = list(replicas)
            self.rng.shuffle(order)  # ties between equal matches and queues: at random
            for replica in order:
                found = self.view(replica).matched(chain)
                if found > matched or (
                    found == matched and found and loads.get(replica, 0) < loads.get(best or "", 0)
                ):
                    best, matched = replica, found
        if best is None or matched < self.min_match_ratio * len(chain):
            return Decision((pair,), "spread", matched)
        least = min(loads.get(r, 0) for r in replicas)
        if loads.get(best, 0) - least > self.imbalance_threshold:
            return Decision((pair,), "balance", matched)
        return Decision(((best,), pair), "prefix", matched)

    def _two_choices(self, replicas: Sequence[str], loads: Mapping[str, float]) -> tuple[str, ...]:
        if len(replicas) == 1:
            return (replicas[0],)
        a, b = self.rng.sample(range(len(replicas)), 2)
        first, second = replicas[a], replicas[b]
        return (first, second) if loads.get(first, 0) <= loads.get(second, 0) else (second, first)

    # ---- what happened ---------------------------------------------------------------------------

    def routed(self, replica: str, request_id: str, key: RoutingKey | None, now: float) -> None:
        """The request went to `replica`: it will hold the request's chain; its session is there."""
        if key is None:
            return
        if key.chain:
            self.view(replica).learn(key.chain, now)
            self._inflight[request_id] = (replica, key.chain)
        if key.session is not None:
            self._sessions[key.session] = replica
            self._sessions.move_to_end(key.session)
            while len(self._sessions) > self.session_capacity:
                self._sessions.popitem(last=False)

    def completed(self, request_id: str, now: float) -> None:
        """The request ended: its blocks are stored now (its chain is the freshest there)."""
        entry = self._inflight.pop(request_id, None)
        if entry is None:
            return
        replica, chain = entry
        view = self.views.get(replica)
        if view is not None:
            view.learn(chain, now)

    def session_replica(self, session: str) -> str | None:
        return self._sessions.get(session)

    @property
    def inflight(self) -> int:
        return len(self._inflight)
