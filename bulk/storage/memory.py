"""The in-memory tier: blocks (`BlockRecord`s, or anything with `nbytes`) in a dict. Its budget is
enforced by the block manager, which decides what is admitted and evicted; this class only holds
the values and counts their real bytes."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any


class MemoryBlockStore:
    name = "memory"

    def __init__(self) -> None:
        self._blocks: dict[bytes, Any] = {}
        self._lock = threading.Lock()
        self.size_bytes = 0

    def contains(self, key: bytes) -> bool:
        return key in self._blocks

    def get(self, key: bytes) -> Any | None:
        return self._blocks.get(key)

    def put(self, key: bytes, block: Any) -> None:
        with self._lock:
            old = self._blocks.get(key)
            if old is not None:
                self.size_bytes -= old.nbytes
            self._blocks[key] = block
            self.size_bytes += block.nbytes

    def delete(self, key: bytes) -> None:
        with self._lock:
            old = self._blocks.pop(key, None)
            if old is not None:
                self.size_bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self.size_bytes = 0

    def close(self) -> None:
        self.clear()

    def get_many(self, keys: Sequence[bytes]) -> list[Any | None]:
        return [self._blocks.get(k) for k in keys]

    def put_many(self, items: Iterable[tuple[bytes, Any]]) -> None:
        for key, block in items:
            self.put(key, block)

    def __len__(self) -> int:
        return len(self._blocks)
