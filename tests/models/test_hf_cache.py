"""The transformers shim: blocks in and out, and the buffered cache layers, against plain transformers."""

from __future__ import annotations

import pytest
import torch

from bulk.models import hf_cache


@pytest.fixture(scope="module")
def prompt(demo_model):
    return torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(5))


def _decode(lm, logits, cache, steps):
    out = []
    for _ in range(steps):
        token = int(torch.argmax(logits))
        out.append(token)
        logits, cache = hf_cache.forward(lm.model, torch.tensor([[token]]), cache)
    return out, logits


def test_blocks_round_trip_shapes(demo_model, prompt):
    _, cache = hf_cache.forward(demo_model.model, prompt, None)
    blocks = hf_cache.blocks_from_cache(cache, 16, 80, 16)
    assert len(blocks) == 4
    assert blocks[0].shape == (demo_model.num_layers, 2, demo_model.num_kv_heads, 16, demo_model.head_dim)
    assert torch.equal(blocks[1][3, 0], cache.layers[3].keys[0, :, 32:48])
    assert blocks[0].data_ptr() != cache.layers[0].keys.data_ptr()  # copies, not views
    with pytest.raises(ValueError):
        hf_cache.blocks_from_cache(cache, 0, 20, 16)


@pytest.mark.parametrize("capacity", [0, 96 + 12, 100])  # outgrown at once; exact fit; outgrown mid-decode
def test_reused_blocks_decode_like_plain_transformers(demo_model, prompt, capacity):
    lm = demo_model
    logits, plain = hf_cache.forward(lm.model, prompt, None)  # transformers' own DynamicCache
    expected, expected_logits = _decode(lm, logits, plain, 12)

    _, full = hf_cache.forward(lm.model, prompt, None)
    blocks = hf_cache.blocks_from_cache(full, 0, 96, 16)
    cache = hf_cache.cache_from_blocks(lm.model, blocks, 95, capacity=capacity)
    assert hf_cache.cache_length(cache) == 95
    logits, cache = hf_cache.forward(lm.model, prompt[:, 95:], cache)
    got, got_logits = _decode(lm, logits, cache, 12)
    assert got == expected
    assert torch.allclose(got_logits, expected_logits, atol=1e-4, rtol=0)
    assert hf_cache.cache_length(cache) == 96 + 12


def test_buffered_layers_write_in_place(demo_model, prompt):
    cache = hf_cache.new_cache(demo_model.model, capacity=128)
    _, cache = hf_cache.forward(demo_model.model, prompt, cache)
    keys = cache.layers[0].keys
    _, cache = hf_cache.forward(demo_model.model, torch.tensor([[7]]), cache)
    # The second forward wrote into the same buffer instead of concatenating a new tensor.
    assert cache.layers[0].keys.data_ptr() == keys.data_ptr()
    assert hf_cache.cache_length(cache) == 97


def test_num_tokens_may_only_trim_the_last_block(demo_model, prompt):
    _, full = hf_cache.forward(demo_model.model, prompt, None)
    blocks = hf_cache.blocks_from_cache(full, 0, 64, 16)
    with pytest.raises(ValueError):
        hf_cache.cache_from_blocks(demo_model.model, blocks, 40)
    assert hf_cache.cache_length(hf_cache.cache_from_blocks(demo_model.model, blocks, 49)) == 49
    assert hf_cache.cache_length(hf_cache.cache_from_blocks(demo_model.model, [], 0)) == 0


def test_forward_all_scores_every_position(demo_model, prompt):
    """Every position's logits; computed in two chunks over a cache, they are those of one pass."""
    lm = demo_model
    last, _ = hf_cache.forward(lm.model, prompt, None)
    whole, cache = hf_cache.forward_all(lm.model, prompt, None)
    assert whole.shape == (1, 96, lm.tokenizer.vocab_size)
    assert hf_cache.cache_length(cache) == 96
    assert torch.allclose(whole[0, -1], last, atol=1e-5, rtol=0)
    first, cache = hf_cache.forward_all(lm.model, prompt[:, :40], None)
    rest, _ = hf_cache.forward_all(lm.model, prompt[:, 40:], cache)
    assert torch.allclose(torch.cat([first, rest], dim=1), whole, atol=1e-4, rtol=0)


def test_rows_of_blocks_score_side_by_side(demo_model, prompt):
    """Two texts' blocks as two rows of one cache: the next chunk of both in one forward gives each
    row the logits it gets alone, and each row's new blocks come back out of its own row."""
    lm = demo_model
    other = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(6))
    texts = [prompt, other]
    rows, alone = [], []
    for ids in texts:
        _, full = hf_cache.forward(lm.model, ids[:, :64], None)
        rows.append(hf_cache.blocks_from_cache(full, 0, 64, 16))
        logits, grown = hf_cache.forward_all(lm.model, ids[:, 64:], full)
        alone.append((logits[0], hf_cache.blocks_from_cache(grown, 64, 96, 16)))
    cache = hf_cache.cache_from_block_rows(lm.model, rows, capacity=96)
    assert hf_cache.cache_length(cache) == 64
    logits, cache = hf_cache.forward_all(lm.model, torch.cat([t[:, 64:] for t in texts]), cache)
    assert logits.shape[:2] == (2, 32)
    for r, (expected, blocks) in enumerate(alone):
        assert torch.allclose(logits[r], expected, atol=1e-4, rtol=0)
        got = hf_cache.blocks_from_cache(cache, 64, 96, 16, row=r)
        assert all(torch.allclose(g, b, atol=1e-5, rtol=0) for g, b in zip(got, blocks, strict=True))
    with pytest.raises(ValueError):
        hf_cache.cache_from_block_rows(lm.model, [rows[0], rows[1][:2]], capacity=96)
