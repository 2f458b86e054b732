"""The eviction-policy interface shared by the block cache and the key-level simulator.

A policy only orders keys; it never decides *when* to evict. The owner (the block manager, or
`simulate`) calls `pop_victim` when it needs room, passing a predicate that says which resident keys
may leave right now: in the block cache a block that a running request pins, or one whose child block
is still cached, is not evictable. A policy must skip such keys rather than fail.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Protocol, runtime_checkable

Key = Hashable
CanEvict = Callable[[Key], bool]


def always(_key: Key) -> bool:
    return True


@runtime_checkable
class EvictionPolicy(Protocol):
    """What every strategy implements. All methods are O(1) amortised except `pop_victim`, which may
    scan past keys that `can_evict` refuses."""

    capacity: int

    def __contains__(self, key: Key) -> bool: ...

    def __len__(self) -> int: ...

    def insert(self, key: Key) -> None:
        """A new resident key (after a miss). The key must not be resident."""

    def touch(self, key: Key) -> None:
        """A hit on a resident key."""

    def pop_victim(self, can_evict: CanEvict = always) -> Key | None:
        """Remove and return the key the policy would evict first among those `can_evict` allows;
        None when no resident key may leave."""

    def discard(self, key: Key) -> None:
        """Forget a resident key without treating it as an eviction (an entry found corrupt, a
        block deleted by the owner). No-op when absent."""
