"""Bookkeeping of the in-memory prefix block cache: which blocks are cached, who pins them, who leaves.

The manager holds no tensors. It deals only in block hashes, token ids, ref counts, parent/child links
and the eviction policy; the owner (the KV cache proper) keeps the tensors in a map keyed by the same
hashes, stores them for the blocks `extend` admits and drops or writes down those `on_evict` names. So
the decisions that must be exact (capacity never exceeded, a pinned block never evicted, a chain never
broken) live in small, lock-guarded, device-free code that tests can drive hard, and tensor copies
happen outside the lock.

Only full blocks are cached. A block is named by the chained hash of the whole prefix up to its end
(`bulk.kv.hashing`); a partial block has no stable identity yet, and its KV would have to be rewritten
as the sequence grows. The engine recomputes at most `block_size - 1` tail tokens instead.

Chain tails leave before their parents: a block may be evicted only when no lease pins it and none of
its children is cached. A lookup walks a chain from its first block, so a cached child of an evicted
parent could never be reached again; it would hold memory for nothing. Evicting tails first keeps
every cached block reachable (every cached block's parent is cached).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from bulk.config import CacheStrategy
from bulk.kv.hashing import chain_hashes
from bulk.kv.policies import make_policy
from bulk.kv.policies.base import CanEvict

logger = logging.getLogger(__name__)


@dataclass
class PrefixLease:
    """Blocks pinned for one request, in chain order. Release it exactly once."""

    hashes: list[bytes]
    block_size: int
    released: bool = field(default=False, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.hashes) * self.block_size


@dataclass
class _Block:
    hash: bytes
    parent: bytes | None
    tokens: tuple[int, ...]
    refs: int = 0
    children: set[bytes] = field(default_factory=set)


class BlockManager:
    def __init__(
        self,
        capacity_blocks: int,
        block_size: int,
        strategy: CacheStrategy | str,
        namespace: bytes,
        on_evict: Callable[[bytes], None] | None = None,
    ) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.capacity_blocks = capacity_blocks
        self.block_size = block_size
        self.namespace = bytes(namespace)
        self._on_evict = on_evict
        self._policy = make_policy(strategy, capacity_blocks, chains=True)
        self._blocks: dict[bytes, _Block] = {}
        self._lock = threading.Lock()
        self._evictions = 0
        self._token_queries = 0
        self._token_hits = 0
        self._collisions = 0

    def _hash_chain(self, token_ids: Sequence[int], parent: bytes | None) -> list[bytes]:
        """Hashes of the full blocks of `token_ids`, chained onto `parent` (or the namespace)."""
        return chain_hashes(token_ids, self.block_size, self.namespace, parent)

    def _block_tokens(self, token_ids: Sequence[int], index: int) -> tuple[int, ...]:
        return tuple(int(t) for t in token_ids[index * self.block_size : (index + 1) * self.block_size])

    def acquire(self, token_ids: Sequence[int], max_tokens: int | None = None) -> PrefixLease:
        """Pin the longest cached chain matching the start of `token_ids`, covering at most
        `max_tokens` tokens (the engine passes len(prompt) - 1 so that one token is always computed)."""
        n_blocks = len(token_ids) // self.block_size
        if max_tokens is not None:
            n_blocks = max(0, min(n_blocks, max_tokens // self.block_size))
        hashes = self._hash_chain(token_ids[: n_blocks * self.block_size], None)
        lease = PrefixLease([], self.block_size)
        with self._lock:
            self._token_queries += n_blocks * self.block_size
            for index, digest in enumerate(hashes):
                block = self._blocks.get(digest)
                if block is None:
                    break
                if block.tokens != self._block_tokens(token_ids, index):
                    self._collisions += 1
                    break
                block.refs += 1
                self._policy.touch(digest)
                lease.hashes.append(digest)
            self._token_hits += lease.num_tokens
        return lease

    def cached_blocks(self, hashes: Sequence[bytes]) -> int:
        """How many of `hashes`, a chain from its first block, are cached now (nothing pinned, no
        token comparison: a hint for scheduling, not a hit)."""
        with self._lock:
            n = 0
            for digest in hashes:
                if digest not in self._blocks:
                    break
                n += 1
            return n

    def extend(self, lease: PrefixLease, token_ids: Sequence[int]) -> list[tuple[int, bytes]]:
        """Admit the full blocks of `token_ids` after the lease's blocks, pinning each into the lease.
        Returns (block_index, hash) for each newly cached block, whose tensors the caller now stores.
        Stops at a hash collision or when no block may be evicted to make room."""
        if lease.released:
            raise RuntimeError("lease already released")
        start = len(lease.hashes)
        parent = lease.hashes[-1] if lease.hashes else None
        hashes = self._hash_chain(token_ids[start * self.block_size :], parent)
        admitted: list[tuple[int, bytes]] = []
        evicted: list[bytes] = []
        with self._lock:
            for offset, digest in enumerate(hashes):
                index = start + offset
                tokens = self._block_tokens(token_ids, index)
                block = self._blocks.get(digest)
                if block is not None:
                    if block.tokens != tokens:
                        self._collisions += 1
                        break
                    block.refs += 1
                    self._policy.touch(digest)
                elif not self._make_room(evicted):
                    break
                else:
                    self._blocks[digest] = _Block(digest, parent, tokens, refs=1)
                    if parent is not None:
                        self._blocks[parent].children.add(digest)
                    self._policy.insert(digest)
                    admitted.append((index, digest))
                lease.hashes.append(digest)
                parent = digest
        self._notify(evicted)
        return admitted

    def _evictable(self, digest: bytes) -> bool:
        block = self._blocks[digest]
        return block.refs == 0 and not block.children

    def _make_room(self, evicted: list[bytes]) -> bool:
        """Evict until one block fits; False when nothing may leave. Caller holds the lock."""
        while len(self._blocks) >= self.capacity_blocks:
            # The policy holds only block hashes: it asks `_evictable` about bytes alone.
            key = self._policy.pop_victim(cast(CanEvict, self._evictable))
            if key is None:
                return False
            victim = cast(bytes, key)  # the policy holds only block hashes
            self._unlink(victim)
            self._evictions += 1
            evicted.append(victim)
        return True

    def _unlink(self, digest: bytes) -> None:
        block = self._blocks.pop(digest)
        if block.parent is not None and block.parent in self._blocks:
            self._blocks[block.parent].children.discard(digest)

    def _notify(self, evicted: list[bytes]) -> None:
        if self._on_evict is None:
            return
        for digest in evicted:
            try:
                self._on_evict(digest)
            except Exception:
                logger.exception("on_evict failed for block %s", digest.hex())

    def release(self, lease: PrefixLease) -> None:
        """Unpin the lease's blocks. A second release raises RuntimeError."""
        with self._lock:
            if lease.released:
                raise RuntimeError("lease already released")
            lease.released = True
            for digest in lease.hashes:
                self._blocks[digest].refs -= 1

    def clear(self) -> list[bytes]:
        """Drop every unpinned block (no `on_evict` call); returns the removed hashes. Ancestors of
        pinned blocks are pinned by the same leases, so the chains that remain stay whole."""
        with self._lock:
            removed = [d for d, block in self._blocks.items() if block.refs == 0]
            for d in removed:
                self._policy.discard(d)
            for d in removed:
                self._unlink(d)
            return removed

    def digests(self, limit: int | None = None) -> list[bytes]:
        """The cached blocks' hashes (at most `limit`, in no particular order): what a replica
        reports to a prefix-aware router."""
        with self._lock:
            if limit is None or limit >= len(self._blocks):
                return list(self._blocks)
            return list(itertools.islice(self._blocks, max(limit, 0)))

    def __contains__(self, digest: object) -> bool:
        with self._lock:
            return digest in self._blocks

    def __len__(self) -> int:
        with self._lock:
            return len(self._blocks)

    @property
    def num_tokens(self) -> int:
        return len(self) * self.block_size

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "blocks": len(self._blocks),
                "tokens": len(self._blocks) * self.block_size,
                "capacity_blocks": self.capacity_blocks,
                "pinned_blocks": sum(1 for b in self._blocks.values() if b.refs),
                "evictions": self._evictions,
                "token_queries": self._token_queries,
                "token_hits": self._token_hits,
                "collisions": self._collisions,
            }
