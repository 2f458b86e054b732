"""The running requests' KV working memory: one tensor, cut into a contiguous range per request.

    pool    # (layers, 2, kv_heads, tokens, head_dim): keys at [:, 0], values at [:, 1]
    slot    # pool[:, :, :, start:start + capacity], one request's range (a view, no copy)

A request's range is sized once for its prompt and its answer (`bulk.kv.slots` decides where), the
cached prefix blocks are copied into it once, prefill and decode write into it in place, and the
batched decode step writes every row's new token with one `index_copy_` per layer. One tensor,
reused by every request, rather than an allocation per request: freshly allocated memory is faulted
in page by page on first touch, which costs about as much as copying the KV into it.

The pool holds the model's dtype, or float32 where attention runs in float32
(`batched_attention.pool_dtype`); blocks come out in the model's dtype either way.

The tensor is allocated on first use; on a CPU its pages are only backed once written, so memory
grows with the longest batch actually served, up to `tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KVPool:
    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        tokens: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.shape = (num_layers, 2, kv_heads, tokens, head_dim)
        self.dtype, self.device = dtype, device
        self.tokens = tokens
        self._buffer: torch.Tensor | None = None

    @property
    def buffer(self) -> torch.Tensor:
        """(layers, 2, kv_heads, tokens, head_dim)"""
        if self._buffer is None:
            self._buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self._buffer

    @property
    def bytes_per_token(self) -> int:
        layers, two, heads, _, head_dim = self.shape
        return layers * two * heads * head_dim * torch.zeros((), dtype=self.dtype).element_size()

    def slot(self, start: int, capacity: int) -> torch.Tensor:
        """(layers, 2, kv_heads, capacity, head_dim): a view of tokens [start, start + capacity)."""
        if start < 0 or start + capacity > self.tokens:
            raise ValueError(f"range {start}:{start + capacity} is outside the pool's {self.tokens} tokens")
        return self.buffer[:, :, :, start : start + capacity]


def copy_blocks_in(slot: torch.Tensor, blocks: Sequence[torch.Tensor], num_tokens: int) -> None:
    """Copy the first `num_tokens` tokens of the concatenated `blocks`, each (layers, 2, kv_heads,
    block, head_dim), to the start of `slot` (converted to the pool's dtype where it differs)."""
    start = 0
    for block in blocks:
        take = min(block.shape[3], num_tokens - start)
        if take <= 0:
            break
        slot[:, :, :, start : start + take] = block[:, :, :, :take]
        start += take
    if start != num_tokens:
        raise ValueError(f"the blocks hold {start} tokens, not the {num_tokens} asked for")


def blocks_out(
    slot: torch.Tensor, start: int, stop: int, block_size: int, dtype: torch.dtype | None = None
) -> list[torch.Tensor]:
    """Copies of tokens [start, stop) of `slot` as blocks, each (layers, 2, kv_heads, block, head_dim),
    in `dtype` (the model's, where the pool holds float32; default the pool's), each owning its
    memory (evicting one block must free it). `stop - start` must be a multiple of `block_size`."""
    if (stop - start) % block_size:
        raise ValueError(f"range {start}:{stop} is not a whole number of {block_size}-token blocks")
    dtype = slot.dtype if dtype is None else dtype
    return [
        slot[:, :, :, s : s + block_size].to(dtype, memory_format=torch.contiguous_format, copy=True)
        for s in range(start, stop, block_size)
    ]
