"""Eviction policies for the KV block cache, and a key-level simulator to compare them on traces."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

from bulk.config import CacheStrategy
from bulk.kv.policies.adaptive import AdaptivePolicy, BlockAdaptivePolicy
from bulk.kv.policies.base import EvictionPolicy
from bulk.kv.policies.lfu import LFUPolicy
from bulk.kv.policies.lru import LRUPolicy

__all__ = [
    "AdaptivePolicy",
    "BlockAdaptivePolicy",
    "EvictionPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "make_policy",
    "simulate",
]

# Factories from a capacity (a Protocol is not callable as a type).
_POLICIES: dict[CacheStrategy, Callable[[int], EvictionPolicy]] = {
    CacheStrategy.LRU: LRUPolicy,
    CacheStrategy.LFU: LFUPolicy,
    CacheStrategy.ADAPTIVE: AdaptivePolicy,
}
# Where the keys are prefix-cache blocks (`chains`): ADAPTIVE's block-cache mode.
_BLOCK_CACHE_POLICIES: dict[CacheStrategy, Callable[[int], EvictionPolicy]] = {
    CacheStrategy.ADAPTIVE: BlockAdaptivePolicy,
}


def make_policy(strategy: CacheStrategy | str, capacity: int, *, chains: bool = False) -> EvictionPolicy:
    """The policy for `strategy` (a `CacheStrategy` or its value, any case) holding `capacity` keys.
    `chains`: the keys are prefix-cache blocks (only chain tails are ever offered for eviction), which
    ADAPTIVE tunes itself for; LRU and LFU need no such hint."""
    try:
        # CacheStrategy is a str enum, so `.lower()` works on members and plain strings alike.
        resolved = CacheStrategy(strategy.lower())
    except (ValueError, AttributeError):
        valid = [s.value for s in CacheStrategy]
        raise ValueError(f"unknown cache strategy {strategy!r}; expected one of {valid}") from None
    policy = _POLICIES[resolved]
    if chains:
        policy = _BLOCK_CACHE_POLICIES.get(resolved, policy)
    return policy(capacity)


def simulate(strategy: CacheStrategy | str, keys: Iterable[Hashable], capacity: int) -> float:
    """Hit ratio of `strategy` on the access trace `keys` with room for `capacity` keys (0.0 when the
    trace is empty). Every key may be evicted, so this measures ordering alone."""
    policy = make_policy(strategy, capacity)
    hits = accesses = 0
    for key in keys:
        accesses += 1
        if key in policy:
            hits += 1
            policy.touch(key)
            continue
        if len(policy) >= capacity:
            policy.pop_victim()
        policy.insert(key)
    return hits / accesses if accesses else 0.0
