"""The one storage interface every KV tier implements: memory, local disk, Redis, PostgreSQL.

Keys are block hashes (32 bytes). The memory tier holds decoded `BlockRecord`s; the lower tiers hold
their serialized bytes (`bulk.storage.serialization`), so one format crosses every process boundary.
Batched variants exist because a prefix is many blocks and a network tier should pay one round trip
for all of them. A lower tier raises `TierError` for any failure of its backend (translated in that
tier's module, in one place); the tiered store decides what a failure means."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

V = TypeVar("V")


@runtime_checkable
class BlockStore(Protocol[V]):
    name: str

    def contains(self, key: bytes) -> bool: ...

    def get(self, key: bytes) -> V | None: ...

    def put(self, key: bytes, value: V) -> None: ...

    def delete(self, key: bytes) -> None: ...

    def clear(self) -> None: ...

    def close(self) -> None: ...

    def get_many(self, keys: Sequence[bytes]) -> list[V | None]: ...

    def put_many(self, items: Iterable[tuple[bytes, V]]) -> None: ...
