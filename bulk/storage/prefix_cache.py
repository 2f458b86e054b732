"""The prefix cache: the block manager's bookkeeping joined to the stores that hold the blocks.

A request asks for the longest cached prefix of its prompt (`lookup`), runs the model on the rest,
then offers its full blocks back (`store_blocks`). Blocks it holds stay pinned until `release`.

Memory is the first tier; when the memory chain ends, the lower tiers (disk, Redis, PostgreSQL) are
asked for the blocks that follow, and those found are promoted into memory under the same pins.
Blocks are kept as `BlockRecord`s, through the codec the engine hands in (`bulk.kv.quantization`:
plain, or quantized when the configuration says so); the memory budget is `max_tokens` of KV in the
model's dtype, and quantized blocks count their real bytes, so more of them fit.

It lives in storage, above kv: it composes kv's block manager, hashing and codecs with the tiers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bulk.config import KVCacheConfig
from bulk.errors import InvalidConfigError
from bulk.kv import quantization
from bulk.kv.block_manager import BlockManager, PrefixLease
from bulk.kv.hashing import chain_hashes, namespace_digest
from bulk.kv.quantization import BlockCodec
from bulk.storage.memory import MemoryBlockStore
from bulk.storage.serialization import BlockRecord
from bulk.storage.tiers import LowerTiers

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
    def __init__(
        self,
        config: KVCacheConfig,
        model_fingerprint: str,
        dtype: torch.dtype,
        block_shape: tuple[int, ...],
        lower: LowerTiers | None = None,
        codec: BlockCodec | None = None,
    ) -> None:
        """`block_shape`: (layers, 2, kv_heads, block_size, head_dim) of one block. `codec`: how blocks
        are stored (the engine passes `quantization.codec(config.quantization)`, the default)."""
        self.block_size = config.block_size
        self.codec = codec if codec is not None else quantization.codec(config.quantization)
        self.quantization = self.codec.name
        self.dtype = dtype
        self.dtype_name = str(dtype).removeprefix("torch.")
        self.block_shape = tuple(block_shape)
        try:
            self.codec.check_shape(self.block_shape)
        except ValueError as exc:
            raise InvalidConfigError("quantization", f"{exc} (this model's KV blocks)") from None
        self.namespace = namespace_digest(
            model_fingerprint, config.block_size, self.dtype_name, self.quantization
        )
        self.block_bytes = self.encode(torch.zeros(self.block_shape, dtype=dtype), ()).nbytes
        full_bytes = torch.zeros((), dtype=dtype).element_size() * torch.Size(self.block_shape).numel()
        self.store: MemoryBlockStore[BlockRecord] = MemoryBlockStore()
        self.lower = lower
        if lower is not None:
            lower.source = self.store.get  # for retrying writes that failed
        self.memory_misses = 0  # lookups whose memory chain ended before the prompt's full blocks
        self.manager = BlockManager(
            capacity_blocks=config.max_blocks * full_bytes // self.block_bytes,
            block_size=config.block_size,
            strategy=config.cache_strategy,
            namespace=self.namespace,
            on_evict=self._evicted,
        )

    # ---- the codec: blocks <-> records ------------------------------------------------------

    def encode(self, block: torch.Tensor, tokens: tuple[int, ...]) -> BlockRecord:
        return BlockRecord(
            tokens=tokens,
            quantization=self.quantization,
            dtype=self.dtype_name,
            shape=self.block_shape,
            parts=self.codec.encode(block),
        )

    def decode(self, record: BlockRecord) -> torch.Tensor:
        return self.codec.decode(record.parts, self.dtype, self.block_shape)

    def _fits(self, record: BlockRecord, tokens: Sequence[int]) -> bool:
        """A lower tier's block is used only for exactly these tokens, in this configuration."""
        return (
            record.tokens == tuple(tokens)
            and record.shape == self.block_shape
            and record.dtype == self.dtype_name
            and record.quantization == self.quantization
        )

    # ---- requests ----------------------------------------------------------------------------

    def lookup(self, token_ids: Sequence[int], max_tokens: int) -> PrefixHit:
        lease = self.manager.acquire(token_ids, max_tokens=max_tokens)
        records = self.store.get_many(lease.hashes)
        # A block admitted by another thread whose record is not stored yet ends the usable prefix.
        usable = next((i for i, r in enumerate(records) if r is None), len(records))
        wanted = min(len(token_ids), max_tokens) // self.block_size
        if usable == len(lease.hashes) < wanted:
            self.memory_misses += 1
            if self.lower is not None:
                records = [*records, *self._promote(lease, token_ids, wanted)]
                usable = len(records)
        return PrefixHit(lease=lease, blocks=[self.decode(r) for r in records[:usable] if r is not None])

    def cached_blocks(self, hashes: Sequence[bytes]) -> int:
        """How many of a prompt's block hashes are in the memory tier now, from the first (the
        scheduler's view: `bulk.engine.scheduler.PrefixView`)."""
        return self.manager.cached_blocks(hashes)

    def _promote(self, lease: PrefixLease, token_ids: Sequence[int], wanted: int) -> list[BlockRecord]:
        """Fetch the blocks after the lease's from the lower tiers, admit them into memory, pin them."""
        assert self.lower is not None
        bs, start = self.block_size, len(lease.hashes)
        parent = lease.hashes[-1] if lease.hashes else None
        keys = chain_hashes(token_ids[start * bs : wanted * bs], bs, self.namespace, parent)
        found = self.lower.fetch_chain(
            keys, lambda i, record: self._fits(record, token_ids[(start + i) * bs : (start + i + 1) * bs])
        )
        if not found:
            return []
        admitted = self.manager.extend(lease, token_ids[: (start + len(found)) * bs])
        self.store.put_many((digest, found[index - start]) for index, digest in admitted)
        usable = len(lease.hashes) - start  # the memory budget may have stopped extend early
        return found[:usable]

    def store_blocks(self, hit: PrefixHit, token_ids: Sequence[int], kv_source: KVSource) -> int:
        """Offer every full block of `token_ids` beyond those `hit` holds; returns how many new blocks
        were admitted. `token_ids` must be covered by `kv_source`."""
        admitted = self.manager.extend(hit.lease, token_ids)
        if not admitted:
            return 0
        bs = self.block_size
        first, last = admitted[0][0], admitted[-1][0]
        tensors = kv_source(first * bs, (last + 1) * bs)
        items = [
            (digest, self.encode(tensors[index - first], tuple(token_ids[index * bs : (index + 1) * bs])))
            for index, digest in admitted
        ]
        self.store.put_many(items)
        if self.lower is not None:
            self.lower.write(items)
        return len(admitted)

    def release(self, hit: PrefixHit) -> None:
        self.manager.release(hit.lease)

    def _evicted(self, digest: bytes) -> None:
        record = self.store.get(digest)
        self.store.delete(digest)
        if self.lower is not None:
            self.lower.evicted(digest, record)

    def clear(self, lower_tiers: bool = True) -> None:
        """Drop every unpinned block from memory and, unless told not to, every block from the
        lower tiers."""
        for digest in self.manager.clear():
            self.store.delete(digest)
        if lower_tiers and self.lower is not None:
            self.lower.clear()

    def flush(self, timeout: float | None = None) -> bool:
        return self.lower.flush(timeout) if self.lower is not None else True

    def close(self) -> None:
        if self.lower is not None:
            self.lower.close()

    def stats(self) -> dict[str, dict[str, Any]]:
        manager = self.manager.stats()
        memory: dict[str, Any] = {
            **manager,
            "hits": manager["token_hits"] // self.block_size,
            "misses": self.memory_misses,
            "errors": 0,
            "healthy": True,
            "block_size": self.block_size,
            "block_bytes": self.block_bytes,
            "size_bytes": self.store.size_bytes,
        }
        if self.lower is None:
            return {"memory": memory}
        memory["dropped_writes"] = self.lower.dropped_writes
        return {"memory": memory, **self.lower.stats()}
