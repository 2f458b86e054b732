"""Fault isolation for one lower tier: a tier that errors or times out is bypassed, its error
counted, and it is tried again after a back-off. The engine never fails a request because of a
lower tier: a read from a tier that is down is a miss (the request computes), a write is dropped
(the block stays in memory and is rewritten the next time it is computed).

Back-off starts at `retry_seconds` and doubles with each consecutive failure, up to 16 times that
(and never past a minute); the first call after it is a probe, and its success makes the tier
healthy again. A tier that comes back may have lost what it held (a Redis restarted empty), so
after its recovery, or a new connection to its backend, it is `resync_due`: the tiered store then
checks its budget against the backend.

The guard wraps a tier under its budget (`BudgetedStore`) and is not itself a `BlockStore`: a call to
it never raises, and a write answers whether it happened."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from bulk.errors import TierError
from bulk.storage.budget import BudgetedStore

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 60.0
MAX_DOUBLINGS = 4
T = TypeVar("T")


class GuardedStore:
    def __init__(self, store: BudgetedStore, retry_seconds: float = 1.0) -> None:
        self.store = store
        self.name = store.name
        self.retry_seconds = retry_seconds
        self._lock = threading.Lock()
        self._failures = 0
        self._retry_at = 0.0
        self.counters = {"hits": 0, "misses": 0, "errors": 0, "corrupt": 0, "writes": 0, "skipped": 0}
        self._recovered = False

    @property
    def healthy(self) -> bool:
        return self._failures == 0

    @property
    def resync_due(self) -> bool:
        return self._recovered or self.store.reconnected

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def _call(self, action: str, fn: Callable[[], T], fallback: T) -> T:
        if self._failures and time.monotonic() < self._retry_at:
            self.count("skipped")
            return fallback
        try:
            result = fn()
        except Exception as exc:
            self._failed(action, exc)
            return fallback
        if self._failures:
            log.info("%s tier is back after %d failed calls", self.name, self._failures)
            with self._lock:
                self._failures = 0
            self._recovered = True
        return result

    def _failed(self, action: str, exc: Exception) -> None:
        with self._lock:
            self._failures += 1
            self.counters["errors"] += 1
            doublings = min(self._failures - 1, MAX_DOUBLINGS)
            backoff = min(MAX_BACKOFF_SECONDS, self.retry_seconds * 2**doublings)
            self._retry_at = time.monotonic() + backoff
        if isinstance(exc, TierError):
            log.warning("%s tier %s failed (%s); bypassed for %.1f s", self.name, action, exc, backoff)
        else:  # not a backend failure we translated: a bug, so keep the traceback
            log.exception("%s tier %s failed unexpectedly; bypassed for %.1f s", self.name, action, backoff)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return self._call("read", lambda: self.store.get_many(keys), [None] * len(keys))

    def put_many(self, items: Iterable[tuple[bytes, bytes]]) -> bool:
        items = list(items)

        def write() -> bool:
            self.store.put_many(items)
            return True

        done = self._call("write", write, False)
        if done:
            self.count("writes", len(items))
        return done

    def delete(self, key: bytes) -> None:
        self._call("delete", lambda: self.store.delete(key), None)

    def clear(self) -> None:
        self._call("clear", self.store.clear, None)

    def resync(self) -> None:
        """Check the budget against the backend (`BudgetedStore.resync`). Not tried while the tier is
        bypassed: its recovery asks for one anyway."""
        if not self.healthy:
            return
        self._recovered = False
        self._call("resync", self.store.resync, 0)

    def close(self) -> None:
        try:
            self.store.close()
        except Exception:
            log.warning("closing the %s tier failed", self.name, exc_info=True)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counters = dict(self.counters)
        return {
            **counters,
            "healthy": self.healthy,
            "blocks": len(self.store),
            "size_bytes": self.store.size_bytes,
            "evictions": self.store.evictions,
            "resynced_away": self.store.resynced_away,
        }
