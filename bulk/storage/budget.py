"""A lower tier's own budget: at most `capacity` blocks, evicted in the order of the configured
strategy (the same policies as the memory tier).

The policy sees the keys this process wrote or read, plus those the backend lists at start (disk
files, PostgreSQL rows). Blocks other replicas write to a shared Redis are bounded by the Redis TTL
instead. Lower tiers hold whole chains only as far as their budget allows: a child whose parent was
evicted is never reached (lookups walk from the first block) and ages out like any cold key.

What a backend holds can change behind our back: a Redis restarted without persistence lost its
keys, a TTL expired, another replica deleted a row. `resync()` asks the backend for the stored size
of every key the policy holds (per batch of 1,000: one pipelined round trip on Redis, one query on
PostgreSQL), forgets the keys it no longer has and takes the sizes it reports, so that the reported
size and the eviction decisions rest on what is really there. The tiered store runs it off the
request path, after a reconnect and every `tier_resync_seconds`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from typing import cast

from bulk.config import CacheStrategy
from bulk.errors import TierError
from bulk.kv.policies import make_policy
from bulk.storage.base import BlockStore

log = logging.getLogger(__name__)

RESYNC_BATCH = 1000  # keys per round trip when resynchronising


class BudgetedStore(BlockStore[bytes]):
    """A lower tier under its budget: a store over `store`, which it fills and evicts."""

    def __init__(self, store: BlockStore[bytes], capacity_blocks: int, strategy: CacheStrategy | str) -> None:
        self.store = store
        self.name = store.name
        self.capacity_blocks = capacity_blocks
        self._strategy = strategy
        self._policy = make_policy(strategy, capacity_blocks)
        self._lock = threading.Lock()
        self.evictions = 0
        self.resynced_away = 0  # keys forgotten because the backend no longer held them
        # Every key the policy holds, with the bytes of its value (0 until seen or resynchronised):
        # the size figure for backends that keep no count of their own (disk does), and the list of
        # keys a resync checks.
        self._counts_sizes = store.size_bytes is None
        self._sizes: dict[bytes, int] = {}
        self._bytes = 0
        # While a resync runs: keys admitted or deleted meanwhile, whose backend answer may be stale.
        self._changed: set[bytes] | None = None
        self._connections_seen = 0  # the backend's `connections_opened` at the last resync
        self._learn_existing_keys()

    def _learn_existing_keys(self) -> None:
        try:
            existing = self.store.keys()
        except TierError as exc:  # the backend is down; its entries age out by TTL or stay unbudgeted
            log.warning("%s tier: could not list existing blocks (%s)", self.name, exc)
            return
        for key in existing or ():  # None: a backend that cannot list its keys (Redis)
            self._admit(key)

    def __len__(self) -> int:
        return len(self._policy)

    @property
    def size_bytes(self) -> int:
        """The backend's own count where it keeps one (disk), else the bytes of the keys we know."""
        backend = None if self._counts_sizes else self.store.size_bytes
        return self._bytes if backend is None else backend

    def _set_size(self, key: bytes, size: int) -> None:
        self._bytes += size - self._sizes.get(key, 0)
        self._sizes[key] = size

    def _forget(self, key: bytes) -> None:
        self._bytes -= self._sizes.pop(key, 0)

    def _admit(self, key: bytes, size: int | None = None) -> None:
        """Make `key` resident in the policy, deleting victims from the backend to keep the budget."""
        victims = []
        with self._lock:
            if self._changed is not None:
                self._changed.add(key)
            if size is not None or key not in self._sizes:
                self._set_size(key, size or 0)
            if key in self._policy:
                self._policy.touch(key)
                return
            while len(self._policy) >= self.capacity_blocks:
                key_out = self._policy.pop_victim()
                if key_out is None:
                    break
                victim = cast(bytes, key_out)  # the policy holds only block hashes
                victims.append(victim)
                self._forget(victim)
            self._policy.insert(key)
            self.evictions += len(victims)
        for victim in victims:
            self.store.delete(victim)

    def contains(self, key: bytes) -> bool:
        return self.store.contains(key)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        values = self.store.get_many(keys)
        for key, value in zip(keys, values, strict=True):
            if value is not None:
                self._admit(key, len(value))
        return values

    def put_many(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        items = list(items)
        self.store.put_many(items)
        for key, value in items:
            self._admit(key, len(value))

    def delete(self, key: bytes) -> None:
        with self._lock:
            if self._changed is not None:
                self._changed.add(key)
            self._policy.discard(key)
            self._forget(key)
        self.store.delete(key)

    def clear(self) -> None:
        with self._lock:
            if self._changed is not None:
                self._changed.update(self._sizes)
            self._policy = make_policy(self._strategy, self.capacity_blocks)
            self._sizes.clear()
            self._bytes = 0
        self.store.clear()

    @property
    def reconnected(self) -> bool:
        """The backend opened a connection since the last resync: it may have restarted empty."""
        return self.store.connections_opened > self._connections_seen

    def resync(self) -> int:
        """Forget the keys the backend no longer holds and take the sizes it reports for the others;
        returns how many were forgotten. A no-op for backends that cannot say (`sizes` answers None);
        raises `TierError` when the backend fails (the tier's guard counts it)."""
        self._connections_seen = self.store.connections_opened
        with self._lock:
            keys = list(self._sizes)
            self._changed = set()
        gone = 0
        try:
            for start in range(0, len(keys), RESYNC_BATCH):
                batch = keys[start : start + RESYNC_BATCH]
                sizes = self.store.sizes(batch)  # outside the lock: requests keep admitting keys meanwhile
                if sizes is None:  # a backend that cannot say (disk keeps its own count)
                    break
                with self._lock:
                    for key, size in zip(batch, sizes, strict=True):
                        if key in self._changed or key not in self._sizes:
                            continue  # written, read or deleted since the snapshot: not our answer
                        if size is None:
                            self._policy.discard(key)
                            self._forget(key)
                            gone += 1
                        else:
                            self._set_size(key, size)
        finally:
            with self._lock:
                self._changed = None
                self.resynced_away += gone
        if gone:
            log.info(
                "%s tier: %d of %d known blocks were gone from the backend, forgotten",
                self.name,
                gone,
                len(keys),
            )
        return gone

    def close(self) -> None:
        self.store.close()
