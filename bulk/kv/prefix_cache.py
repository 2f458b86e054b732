"""The prefix cache: the block manager's bookkeeping joined to a store that holds the block tensors.

A request asks for the longest cached prefix of its prompt (`lookup`), runs the model on the rest,
then offers its full blocks back (`store`). Blocks it holds stay pinned until `release`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from bulk.config import KVCacheConfig
from bulk.kv.block_manager import BlockManager, PrefixLease
from bulk.kv.hashing import namespace_digest
from bulk.storage.memory import MemoryBlockStore

# Returns copies of the KV for tokens [start, stop), one tensor per block.
KVSource = Callable[[int, int], list[torch.Tensor]]


@dataclass
class PrefixHit:
    lease: PrefixLease
    blocks: list[torch.Tensor] = field(default_factory=list)  # each (layers, 2, kv_heads, block, head_dim)

    @property
    def num_tokens(self) -> int:
        return len(self.blocks) * self.lease.block_size


class PrefixCache:
    def __init__(self, config: KVCacheConfig, model_fingerprint: str, dtype_name: str) -> None:
        self.block_size = config.block_size
        self.namespace = namespace_digest(
            model_fingerprint, config.block_size, dtype_name, config.quantization
        )
        self.store = MemoryBlockStore()
        self.manager = BlockManager(
            capacity_blocks=config.max_blocks,
            block_size=config.block_size,
            strategy=config.cache_strategy,
            namespace=self.namespace,
            on_evict=self.store.delete,
        )

    def lookup(self, token_ids: Sequence[int], max_tokens: int) -> PrefixHit:
        lease = self.manager.acquire(token_ids, max_tokens=max_tokens)
        blocks = self.store.get_many(lease.hashes)
        # A block admitted by another thread whose tensor is not stored yet ends the usable prefix.
        usable = next((i for i, b in enumerate(blocks) if b is None), len(blocks))
        return PrefixHit(lease=lease, blocks=[b for b in blocks[:usable] if b is not None])

    def store_blocks(self, hit: PrefixHit, token_ids: Sequence[int], kv_source: KVSource) -> int:
        """Offer every full block of `token_ids` beyond those `hit` holds; returns how many new blocks
        were admitted. `token_ids` must be covered by `kv_source`."""
        admitted = self.manager.extend(hit.lease, token_ids)
        if not admitted:
            return 0
        bs = self.block_size
        first, last = admitted[0][0], admitted[-1][0]
        tensors = kv_source(first * bs, (last + 1) * bs)
        self.store.put_many((digest, tensors[index - first]) for index, digest in admitted)
        return len(admitted)

    def release(self, hit: PrefixHit) -> None:
        self.manager.release(hit.lease)

    def clear(self) -> None:
        for digest in self.manager.clear():
            self.store.delete(digest)

    def stats(self) -> dict[str, object]:
        return {**self.manager.stats(), "block_size": self.block_size, "size_bytes": self.store.size_bytes}
