"""Least recently used: the baseline every other policy is measured against."""

from __future__ import annotations

from collections import OrderedDict

from bulk.kv.policies.base import CanEvict, Key, always


class LRUPolicy:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._order: OrderedDict[Key, None] = OrderedDict()  # oldest first

    def __contains__(self, key: Key) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)

    def insert(self, key: Key) -> None:
        self._order[key] = None

    def touch(self, key: Key) -> None:
        self._order.move_to_end(key)

    def pop_victim(self, can_evict: CanEvict = always) -> Key | None:
        for key in self._order:
            if can_evict(key):
                del self._order[key]
                return key
        return None

    def discard(self, key: Key) -> None:
        self._order.pop(key, None)
