"""The one storage interface every KV tier implements: memory, local disk, Redis, PostgreSQL, and the
budget that bounds a lower tier (`BudgetedStore`, itself a store over a store).

Keys are block hashes (32 bytes). The memory tier holds decoded `BlockRecord`s; the lower tiers hold
their serialized bytes (`bulk.storage.serialization`), so one format crosses every process boundary.
Batched variants exist because a prefix is many blocks and a network tier should pay one round trip
for all of them. A lower tier raises `TierError` for any failure of its backend (translated in that
tier's module, in one place); the tiered store decides what a failure means.

An abstract class rather than a structural protocol (as LMCache v1's storage backends): the optional
capabilities below have defaults that say "this backend cannot tell", so a wrapper calls them
directly instead of probing for attributes, and a backend declares only what it can do."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

V = TypeVar("V")


class BlockStore(ABC, Generic[V]):
    name: str = "store"
    # Connections the backend has opened so far: a new one may mean a restarted (empty) server, so the
    # budget above it checks itself against the backend. Network tiers count; others stay at 0.
    connections_opened: int = 0

    @abstractmethod
    def contains(self, key: bytes) -> bool: ...

    @abstractmethod
    def get_many(self, keys: Sequence[bytes]) -> list[V | None]:
        """The value of each key, None where absent, in one call (one round trip on a network tier)."""

    @abstractmethod
    def put_many(self, items: Iterable[tuple[bytes, V]]) -> None: ...

    @abstractmethod
    def delete(self, key: bytes) -> None: ...

    @abstractmethod
    def clear(self) -> None: ...

    def get(self, key: bytes) -> V | None:
        return self.get_many([key])[0]

    def put(self, key: bytes, value: V) -> None:
        self.put_many([(key, value)])

    def close(self) -> None:
        """Release the backend's connections or files; the default holds none."""

    # ---- optional capabilities: the defaults mean "this backend cannot tell" ----------------------

    def keys(self) -> list[bytes] | None:
        """Every stored key, oldest first (the order a budget's policy learns them in); None when the
        backend cannot list its keys (Redis: other replicas' keys are bounded by its TTL instead)."""
        return None

    def sizes(self, keys: Sequence[bytes]) -> list[int | None] | None:
        """The stored length of each key (None where absent) without reading the values; None when
        the backend cannot say, and a budget then keeps its own figures."""
        return None

    @property
    def size_bytes(self) -> int | None:
        """The bytes stored, by the backend's own count; None when it keeps none (a budget counts)."""
        return None
