"""The prefix cache stores blocks through the codec it is handed (`bulk.kv.quantization`), applied from
outside as the engine does: it encodes every stored block, decodes every reused one, names the
stored records and the hash namespace after it, and falls back to the configuration's codec."""

from __future__ import annotations

import torch

from bulk.config import KVCacheConfig
from bulk.kv import quantization
from bulk.kv.quantization import Parts
from bulk.storage.prefix_cache import PrefixCache

BLOCK = 4
SHAPE = (1, 2, 1, BLOCK, 8)  # (layers, 2, kv_heads, block, head_dim)


class NegatingCodec:
    """A transform that is easy to see: blocks are stored negated and come back as they were."""

    name = "none"  # stands for plain storage: records and namespace as the default codec's

    def __init__(self) -> None:
        self.encoded = self.decoded = 0

    def encode(self, block: torch.Tensor) -> Parts:
        self.encoded += 1
        return {"kv": -block}

    def decode(self, parts: Parts, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        self.decoded += 1
        return -parts["kv"]

    def check_shape(self, shape: tuple[int, ...]) -> None:
        pass


def test_blocks_go_through_the_codec_handed_in():
    codec = NegatingCodec()
    config = KVCacheConfig(block_size=BLOCK, max_tokens=64)
    cache = PrefixCache(config, "fingerprint", torch.float32, SHAPE, codec=codec)
    tokens = list(range(3 * BLOCK))
    blocks = [torch.randn(SHAPE) for _ in range(3)]

    hit = cache.lookup(tokens, max_tokens=len(tokens))
    assert hit.num_tokens == 0
    stored = cache.store_blocks(hit, tokens, lambda start, stop: blocks[start // BLOCK : stop // BLOCK])
    cache.release(hit)
    assert stored == 3 and codec.encoded == 3 + 1  # + the zero block that measures a block's bytes
    record = cache.store.get(cache.manager.digests()[0])
    assert record is not None and record.quantization == codec.name

    again = cache.lookup(tokens, max_tokens=len(tokens))
    assert codec.decoded == 3
    assert all(torch.equal(got, want) for got, want in zip(again.blocks, blocks, strict=True))
    cache.release(again)


def test_the_configured_codec_is_the_default():
    config = KVCacheConfig(block_size=BLOCK, max_tokens=64, quantization="int8")
    cache = PrefixCache(config, "fingerprint", torch.float32, SHAPE)
    assert cache.codec is quantization.codec("int8") and cache.quantization == "int8"
