"""Sliding-window and hybrid attention in the pool and the prefix cache: tiny random-weight Mistral
(every layer sliding), Qwen2 (`use_sliding_window` on the later layers), Gemma 2 (alternate layers,
soft-capped scores) and Gemma 3 (alternate layers), each with a window of 8 tokens that every test
prompt crosses. Against transformers' own forward and cache (`generate_without_cache`: its
sliding-window cache and mask): 16 requests decoding as one batch give each its solo greedy answer
with logits within 1e-4; a prompt reused from the prefix cache past the window and extended gives
the same greedy tokens as computing it whole; a recurrent hybrid stays at batch 1 with the log line
saying so (`tests/engine/test_engine_batching.py`)."""

from __future__ import annotations

import random

import pytest
import torch

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.generation.decode import prefill
from bulk.models import hf_cache
from tests.conftest import generate_without_cache
from tests.engine.loop_harness import LoopHarness
from tests.tiny_hf_model import SLIDING_FAMILIES, sliding_family_model

NEW_TOKENS = 12


@pytest.fixture(scope="module", params=SLIDING_FAMILIES)
def lm(request):
    return sliding_family_model(request.param)


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ,.") for _ in range(n))


def test_some_layer_slides(lm):
    windows = hf_cache.attention_windows(lm.model)
    assert windows is not None and 8 in windows


def test_sixteen_requests_decode_as_one_batch_each_as_alone(lm):
    rng = random.Random(1)
    prompts = [_text(rng, rng.randint(20, 60)) for _ in range(16)]
    config = KVCacheConfig(model="demo", dtype="float32", response_cache=False, max_batch_size=16)
    harness = LoopHarness(lm, config)
    # Every answer NEW_TOKENS long (`ignore_eos`), so that none leaves the batch early.
    sequences = harness.run({0: [(p, {"max_new_tokens": NEW_TOKENS, "ignore_eos": True}) for p in prompts]})
    assert max(harness.batch_sizes) == 16
    for prompt, seq in zip(prompts, sequences, strict=True):
        expected = generate_without_cache(lm, prompt, NEW_TOKENS, ignore_eos=True)
        assert harness.results[seq.request.request_id]["result"] == expected.text
        # The first token's logits: the batched prefill against transformers' whole-prompt forward.
        solo, _ = prefill(lm, lm.tokenizer.encode(prompt), None)
        first = harness.logits[seq.request.request_id][0]
        assert torch.allclose(first, solo.float(), atol=1e-4), (first - solo).abs().max()


@pytest.mark.parametrize("block_size", [4, 16])
def test_a_prefix_reused_past_the_window_gives_the_same_tokens(lm, block_size):
    rng = random.Random(block_size)
    shared = _text(rng, 70)  # ~9 windows of 8 tokens, several blocks
    warm, test = shared + _text(rng, 30), shared + _text(rng, 25)
    config = KVCacheConfig(
        model="demo",
        dtype="float32",
        block_size=block_size,
        response_cache=False,
        default_max_new_tokens=NEW_TOKENS,
    )
    with UltraAdaptiveKVCacheEngine(config, model=lm) as engine:
        engine.process_request_sync({"query": warm})
        reused = engine.process_request_sync({"query": test})
        again = engine.process_request_sync({"query": test})  # the whole prompt cached but its last token
    assert reused["cached_tokens"] >= 70 - block_size and reused["cached_tokens"] > 8
    expected = generate_without_cache(lm, test, NEW_TOKENS).text
    assert reused["result"] == expected
    assert again["result"] == expected and again["cached_tokens"] >= reused["cached_tokens"]
