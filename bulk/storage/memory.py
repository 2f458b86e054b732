"""The in-memory tier: blocks (`BlockRecord`s, or anything with `nbytes`) in a dict. Its budget is
enforced by the block manager, which decides what is admitted and evicted; this class only holds
the values and counts their real bytes."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

from bulk.storage.base import BlockStore


class HasNbytes(Protocol):
    @property
    def nbytes(self) -> int: ...


B = TypeVar("B", bound=HasNbytes)


class MemoryBlockStore(BlockStore[B]):
    name = "memory"

    def __init__(self) -> None:
        self._blocks: dict[bytes, B] = {}
        self._lock = threading.Lock()
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._blocks)

    def contains(self, key: bytes) -> bool:
        return key in self._blocks

    def get(self, key: bytes) -> B | None:
        return self._blocks.get(key)

    def put(self, key: bytes, block: B) -> None:
        with self._lock:
            old = self._blocks.get(key)
            if old is not None:
                self._bytes -= old.nbytes
            self._blocks[key] = block
            self._bytes += block.nbytes

    def delete(self, key: bytes) -> None:
        with self._lock:
            old = self._blocks.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._bytes = 0

    def close(self) -> None:
        self.clear()

    def get_many(self, keys: Sequence[bytes]) -> list[B | None]:
        return [self._blocks.get(k) for k in keys]

    def put_many(self, items: Iterable[tuple[bytes, B]]) -> None:
        for key, block in items:
            self.put(key, block)

    def __len__(self) -> int:
        return len(self._blocks)
