"""A lower tier's own budget: at most `capacity` blocks, evicted in the order of the configured
strategy (the same policies as the memory tier).

The policy sees the keys this process wrote or read, plus those the backend lists at start (disk
files, PostgreSQL rows). Blocks other replicas write to a shared Redis are bounded by the Redis TTL
instead. Lower tiers hold whole chains only as far as their budget allows: a child whose parent was
evicted is never reached (lookups walk from the first block) and ages out like any cold key.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from bulk.config import CacheStrategy
from bulk.errors import TierError
from bulk.kv.policies import make_policy

log = logging.getLogger(__name__)


class BudgetedStore:
    def __init__(self, store: Any, capacity_blocks: int, strategy: CacheStrategy | str) -> None:
        self.store = store
        self.name = store.name
        self.capacity_blocks = capacity_blocks
        self._strategy = strategy
        self._policy = make_policy(strategy, capacity_blocks)
        self._lock = threading.Lock()
        self.evictions = 0
        # Bytes of the values this process saw, by key, for backends that keep no count of their own
        # (disk does).
        self._counts_sizes = not hasattr(store, "size_bytes")
        self._sizes: dict[bytes, int] = {}
        self._learn_existing_keys()

    def _learn_existing_keys(self) -> None:
        keys = getattr(self.store, "keys", None)
        if keys is None:
            return
        try:
            existing = keys()
        except TierError as exc:  # the backend is down; its entries age out by TTL or stay unbudgeted
            log.warning("%s tier: could not list existing blocks (%s)", self.name, exc)
            return
        for key in existing:
            self._admit(key)

    def __len__(self) -> int:
        return len(self._policy)

    @property
    def size_bytes(self) -> int:
        """The backend's own count where it keeps one (disk), else the bytes of the keys we know."""
        return sum(self._sizes.values()) if self._counts_sizes else self.store.size_bytes

    def _admit(self, key: bytes, size: int | None = None) -> None:
        """Make `key` resident in the policy, deleting victims from the backend to keep the budget."""
        victims = []
        with self._lock:
            if size is not None and self._counts_sizes:
                self._sizes[key] = size
            if key in self._policy:
                self._policy.touch(key)
                return
            while len(self._policy) >= self.capacity_blocks:
                victim = self._policy.pop_victim()
                if victim is None:
                    break
                victims.append(victim)
                self._sizes.pop(victim, None)
            self._policy.insert(key)
            self.evictions += len(victims)
        for victim in victims:
            self.store.delete(victim)

    def contains(self, key: bytes) -> bool:
        return self.store.contains(key)

    def get(self, key: bytes) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        values = self.store.get_many(keys)
        for key, value in zip(keys, values, strict=True):
            if value is not None:
                self._admit(key, len(value))
        return values

    def put(self, key: bytes, value: bytes) -> None:
        self.put_many([(key, value)])

    def put_many(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        items = list(items)
        self.store.put_many(items)
        for key, value in items:
            self._admit(key, len(value))

    def delete(self, key: bytes) -> None:
        with self._lock:
            self._policy.discard(key)
            self._sizes.pop(key, None)
        self.store.delete(key)

    def clear(self) -> None:
        with self._lock:
            self._policy = make_policy(self._strategy, self.capacity_blocks)
            self._sizes.clear()
        self.store.clear()

    def close(self) -> None:
        self.store.close()
