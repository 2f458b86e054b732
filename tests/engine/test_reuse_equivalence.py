"""Reused KV must change nothing but speed: same greedy tokens, same logits."""

from __future__ import annotations

import random

import pytest
import torch

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.generation.decode import prefill
from bulk.models import hf_cache
from bulk.storage.prefix_cache import PrefixCache
from tests.engine.loop_harness import LoopHarness

NEW_TOKENS = 24


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ,.") for _ in range(n))


def _prompts(share: float, seed: int) -> tuple[str, str]:
    """A warm-up prompt and a test prompt sharing `share` of the test prompt's text."""
    rng = random.Random(seed)
    test = _text(rng, 150)
    shared = int(len(test) * share)
    warm = test[:shared] + _text(rng, 150 - shared) if share < 1.0 else test
    return warm, test


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_greedy_output_identical_with_reused_kv(demo_model, reference, block_size, share):
    warm, test = _prompts(share, seed=block_size)
    config = KVCacheConfig(
        model="demo",
        dtype="float32",
        block_size=block_size,
        response_cache=False,
        default_max_new_tokens=NEW_TOKENS,
    )
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
        engine.process_request_sync({"query": warm})
        result = engine.process_request_sync({"query": test})
    expected = reference(test, NEW_TOKENS)
    assert result["result"] == expected.text
    assert result["completion_tokens"] == len(expected.token_ids)
    prompt_tokens = result["prompt_tokens"]
    if share == 0.0:
        assert result["cached_tokens"] == 0 and not result["cache_hit"]
    elif share == 0.5:
        # ~76 shared prompt tokens (BOS + 75 characters), rounded down to whole blocks
        assert 76 - block_size < result["cached_tokens"] <= 76
    else:
        assert result["cached_tokens"] == min(prompt_tokens // block_size * block_size, prompt_tokens - 1)
        assert result["cache_hit"]


@pytest.mark.parametrize("block_size", [4, 16])
def test_fully_cached_prompt_computes_one_token(demo_model, reference, block_size):
    """A prompt that is a whole number of blocks, all cached: the last block is reused minus its last
    token, which is the only one computed."""
    prompt = _text(random.Random(3), 159)  # BOS + 159 bytes = 160 tokens, a multiple of 4 and 16
    config = KVCacheConfig(
        model="demo",
        dtype="float32",
        block_size=block_size,
        response_cache=False,
        default_max_new_tokens=NEW_TOKENS,
    )
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
        engine.process_request_sync({"query": prompt})
        result = engine.process_request_sync({"query": prompt})
    assert result["prompt_tokens"] == 160 and result["cached_tokens"] == 159
    assert result["result"] == reference(prompt, NEW_TOKENS).text


@pytest.mark.parametrize("block_size", [4, 16])
def test_final_logits_equal_with_reused_blocks(demo_model, block_size):
    ids = demo_model.tokenizer.encode(_text(random.Random(7), 207))  # 208 tokens: trims the last block
    full_logits, _ = prefill(demo_model, ids, None)

    cache = PrefixCache(
        KVCacheConfig(block_size=block_size, dtype="float32"),
        demo_model.fingerprint,
        demo_model.dtype,
        demo_model.block_shape(block_size),
    )
    first = cache.lookup(ids, max_tokens=len(ids) - 1)
    _, kv = prefill(demo_model, ids, None)
    cache.store_blocks(first, ids, lambda s, e: hf_cache.blocks_from_cache(kv, s, e, block_size))
    cache.release(first)

    hit = cache.lookup(ids, max_tokens=len(ids))
    assert hit.num_tokens == len(ids) // block_size * block_size
    reused = min(hit.num_tokens, len(ids) - 1)
    reused_logits, _ = prefill(
        demo_model, ids, hf_cache.cache_from_blocks(demo_model.model, hit.blocks, reused)
    )
    cache.release(hit)
    assert torch.allclose(reused_logits, full_logits, atol=1e-4, rtol=0)
    assert torch.argmax(reused_logits) == torch.argmax(full_logits)


def test_multi_turn_reuses_the_previous_answer(demo_model, reference):
    """Completion blocks are stored too, so a follow-up turn that quotes the answer reuses it."""
    config = KVCacheConfig(
        model="demo", dtype="float32", block_size=8, response_cache=False, default_max_new_tokens=40
    )
    with UltraAdaptiveKVCacheEngine(config, model=demo_model) as engine:
        turn1 = "System: you write marketing plans.\nUser: Create marketing strategy\nAssistant:"
        first = engine.process_request_sync({"query": turn1})
        turn2 = turn1 + first["result"] + "\nUser: shorter please\nAssistant:"
        second = engine.process_request_sync({"query": turn2})
    assert second["cached_tokens"] > first["prompt_tokens"]
    assert second["result"] == reference(turn2, 40).text


def test_a_prompt_cached_but_its_last_token_computes_it_as_a_prompt(demo_model):
    """The second time, every token of the prompt but the last comes from the cache and the last one
    is computed alone, as a one-token chunk: with the attention of the last row of the whole prompt
    (SDPA), not the decode rows' native attention, which sums in another order (a last-bit
    difference there turned a 120-token greedy answer of the random-weight model in bfloat16). The
    rows the native attention gets are the decode rows only."""
    config = KVCacheConfig(model="demo", dtype="float32", response_cache=False, default_max_new_tokens=6)
    harness = LoopHarness(demo_model, config)
    kernel = harness.runner.decode_attention
    assert kernel is not None  # the native code is built on this machine (tests/models/test_native.py)
    rows_seen: list[int] = []

    def counted(query, layer, starts, ends, scaling, float32, softcap):
        rows_seen.append(len(starts))
        return kernel(query, layer, starts, ends, scaling, float32, softcap)

    harness.runner.decode_attention = counted
    # Counted from the Python loop's `attend`: the native decode layers, which take steps of decode
    # rows only (`NativeLayers.takes`), call the same kernel from C++.
    assert harness.runner.plain_step is not None
    harness.runner.plain_step.native = None
    prompt = "question 9, " * 4  # 48 characters and BOS: three full blocks and one token
    (whole,) = harness.run({0: [(prompt, {})]})
    layers = demo_model.num_layers
    assert rows_seen == [1] * (5 * layers)  # 6 tokens: the prompt's, then 5 decode steps
    rows_seen.clear()
    (cached,) = harness.run({harness.steps: [(prompt, {})]})
    assert cached.cached_tokens == len(cached.prompt_ids) - 1
    assert rows_seen == [1] * (5 * layers)  # its one-token chunk went to SDPA
    assert cached.output_ids == whole.output_ids
