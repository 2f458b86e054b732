"""Least frequently used, ties broken by least recently used.

Counts are kept for resident keys only: a key that comes back after eviction starts again at 1, so a
key that was hot long ago cannot squat in the cache on its history. Keys live in one bucket per
frequency (insertion-ordered, so the oldest key of a bucket is its LRU), which makes insert and touch
O(1); `_min_freq` remembers the lowest non-empty bucket for the common unconstrained eviction.
"""

from __future__ import annotations

from collections import OrderedDict

from bulk.kv.policies.base import CanEvict, Key, always


class LFUPolicy:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._freq: dict[Key, int] = {}
        self._buckets: dict[int, OrderedDict[Key, None]] = {}  # freq -> keys, oldest first
        self._min_freq = 0  # meaningless while empty

    def __contains__(self, key: Key) -> bool:
        return key in self._freq

    def __len__(self) -> int:
        return len(self._freq)

    def insert(self, key: Key) -> None:
        self._freq[key] = 1
        self._buckets.setdefault(1, OrderedDict())[key] = None
        self._min_freq = 1

    def touch(self, key: Key) -> None:
        freq = self._freq[key]
        self._unlink(key, freq)
        self._freq[key] = freq + 1
        self._buckets.setdefault(freq + 1, OrderedDict())[key] = None
        if self._min_freq == freq and freq not in self._buckets:
            self._min_freq = freq + 1

    def pop_victim(self, can_evict: CanEvict = always) -> Key | None:
        if not self._freq:
            return None
        # Fast path: the unconstrained victim is the oldest key of the lowest bucket.
        bucket = self._buckets[self._min_freq]
        key = next(iter(bucket))
        if can_evict(key):
            self._remove(key)
            return key
        # Constrained: frequencies are sparse, so sort the bucket keys rather than count upward.
        # Snapshot each bucket because a removal may delete it from `_buckets`.
        for freq in sorted(self._buckets):
            for key in list(self._buckets[freq]):
                if can_evict(key):
                    self._remove(key)
                    return key
        return None

    def discard(self, key: Key) -> None:
        if key in self._freq:
            self._remove(key)

    def _remove(self, key: Key) -> None:
        freq = self._freq.pop(key)
        self._unlink(key, freq)
        if self._freq and freq == self._min_freq and freq not in self._buckets:
            self._min_freq = min(self._buckets)  # rare: only when an eviction empties the min bucket

    def _unlink(self, key: Key, freq: int) -> None:
        bucket = self._buckets[freq]
        del bucket[key]
        if not bucket:
            del self._buckets[freq]  # keep `_buckets` free of empty buckets so min() stays honest
