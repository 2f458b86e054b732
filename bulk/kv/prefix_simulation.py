"""Token hit ratio of a policy on KV-prefix requests, through the real block manager.

`simulate` (in `bulk.kv.policies`) judges a policy on a flat key trace. A prefix cache is different:
a request's blocks form a chain, a block is reusable only if every block before it is cached, and
the manager evicts only chain tails that no request pins. So this simulator replays each request as
the engine does, with the same `BlockManager`: acquire the longest cached prefix, admit the rest,
release; and it scores the tokens reused, not the keys found."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from bulk.config import CacheStrategy
from bulk.kv.block_manager import BlockManager


def simulate_prefix(strategy: CacheStrategy | str, requests: Iterable[Sequence[int]], capacity: int) -> float:
    """Fraction of requested blocks served from cache, for requests given as chains of block keys
    (each request's key i names its whole prefix up to block i). One key is one block."""
    manager = BlockManager(capacity_blocks=capacity, block_size=1, strategy=strategy, namespace=b"simulation")
    reused = total = 0
    for request in requests:
        # Keys are non-negative token ids to the manager: shift the chain ids into range.
        tokens = [k % (1 << 32) for k in request]
        lease = manager.acquire(tokens)
        reused += lease.num_tokens
        total += len(tokens)
        manager.extend(lease, tokens)
        manager.release(lease)
    return reused / total if total else 0.0
