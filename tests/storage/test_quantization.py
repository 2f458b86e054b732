"""Quantized blocks: sizes, error bounds, and agreement measured in decode style: the second request
reuses the prompt's quantized blocks, so every one of its 128 generated tokens attends to KV that
was quantized, stored and decoded back."""

import logging
import random

import pytest
import torch

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.kv.quantization import dequantize, quantize

log = logging.getLogger(__name__)
SHAPE = (10, 2, 2, 16, 64)  # (layers, 2, kv_heads, block, head_dim) of the demo model
GENERATED = 128


@pytest.mark.parametrize("mode,bits,min_ratio", [("int8", 8, 1.9), ("int4", 4, 3.5)])
def test_stored_bytes_and_error_bound(mode, bits, min_ratio):
    block = torch.randn(SHAPE) * torch.linspace(0.1, 4, 64)  # uneven channels, as keys have
    parts = quantize(block, mode)
    assert block.nbytes / sum(p.nbytes for p in parts.values()) >= min_ratio
    back = dequantize(parts, mode, torch.float32, SHAPE)
    assert back.shape == block.shape and back.dtype == torch.float32
    # Asymmetric rounding: error at most half a step of the group's range (plus float16 slack).
    keys, values = block[:, 0], block[:, 1]
    key_step = (keys.amax(dim=2, keepdim=True) - keys.amin(dim=2, keepdim=True)) / (2**bits - 1)
    assert ((back[:, 0] - keys).abs() <= key_step * 0.5 + 2e-2 * keys.abs().amax()).all()
    assert (back[:, 1] - values).abs().max() < values.abs().max() * (0.02 if bits == 8 else 0.2)


def test_memory_budget_counts_real_bytes(demo_model):
    plain = UltraAdaptiveKVCacheEngine(KVCacheConfig(max_tokens=4096), model=demo_model)
    int8 = UltraAdaptiveKVCacheEngine(KVCacheConfig(max_tokens=4096, quantization="int8"), model=demo_model)
    with plain, int8:
        for engine in (plain, int8):
            engine.process_request_sync({"query": "x" * 300, "max_new_tokens": 1})
        p, q = plain.get_stats()["tiers"]["memory"], int8.get_stats()["tiers"]["memory"]
    assert p["blocks"] == q["blocks"] > 0
    assert p["size_bytes"] / q["size_bytes"] >= 1.9
    assert q["capacity_blocks"] >= 1.9 * p["capacity_blocks"]  # the same bytes hold more tokens


def _prompts(n):
    rng = random.Random(11)
    words = [
        "market",
        "bakery",
        "strategy",
        "budget",
        "sourdough",
        "client",
        "season",
        "price",
        "campaign",
        "Madrid",
        "shop",
    ]
    return [" ".join(rng.choice(words) for _ in range(40 + 10 * i)) for i in range(n)]


@pytest.fixture(scope="module")
def reference(demo_model):
    """Exact answers, computed once for the module: {(prompt, temperature): result}."""
    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(response_cache=False), model=demo_model)
    answers = {}
    with engine:
        for prompt in _prompts(3):
            for temperature in (0.0, 1.0):
                request = {
                    "query": prompt,
                    "max_new_tokens": GENERATED,
                    "temperature": temperature,
                    "seed": 5,
                }
                answers[prompt, temperature] = engine.process_request_sync(request)
    return answers


def _agreement(demo_model, reference, mode, temperature=0.0):
    quantized = UltraAdaptiveKVCacheEngine(
        KVCacheConfig(response_cache=False, quantization=mode), model=demo_model
    )
    same = total = 0
    with quantized:
        for prompt in _prompts(3):
            request = {"query": prompt, "max_new_tokens": GENERATED, "temperature": temperature, "seed": 5}
            expected = reference[prompt, temperature]
            quantized.process_request_sync({"query": prompt, "max_new_tokens": 1})  # stores the blocks
            got = quantized.process_request_sync(request)
            assert got["cached_tokens"] >= got["prompt_tokens"] - quantized.config.block_size
            assert expected["completion_tokens"] == got["completion_tokens"] == GENERATED
            # The byte tokenizer gives one character per printable token (sampled text may hold bytes
            # that decode to fewer characters): compare position by position over the longer text.
            a, b = expected["result"], got["result"]
            log.info("%r / %r", a[:40], b[:40])
            same += sum(x == y for x, y in zip(a, b, strict=False))
            total += max(len(a), len(b))
    return same / total


@pytest.mark.slow
def test_int8_keeps_greedy_tokens(demo_model, reference):
    agreement = _agreement(demo_model, reference, "int8")
    log.info("int8 greedy agreement: %.2f%%", agreement * 100)
    assert agreement >= 0.99


@pytest.mark.slow
def test_int4_reports_agreement(demo_model, reference):
    agreement = _agreement(demo_model, reference, "int4")
    log.warning("int4 greedy agreement over 3 x 128 tokens: %.2f%%", agreement * 100)
    # The README's figure: "int4 on about 80 %" of greedy tokens (79.4 % here); far from exact, which
    # is why int4 is not the default, but the decoded KV is the prompt's, not noise.
    assert agreement >= 0.75


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_seeded_sampling_agreement(demo_model, reference, mode):
    """The demo model's greedy text is repetitive, so greedy agreement alone is a weak signal. With
    temperature 1 and a fixed seed, every step draws from the whole distribution: the samples agree
    only while the distributions computed over the decoded KV stay close to the exact ones."""
    agreement = _agreement(demo_model, reference, mode, temperature=1.0)
    log.warning("%s seeded-sampling agreement over 3 x 128 tokens: %.2f%%", mode, agreement * 100)
    # The README's figure for int4: "100 % of seeded samples at temperature 1".
    assert agreement >= (0.95 if mode == "int8" else 0.99)


@pytest.mark.parametrize("head_dim", [80, 96, 128, 16])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_head_dims_of_common_models_round_trip(head_dim, mode):
    shape = (2, 2, 2, 16, head_dim)
    block = torch.randn(shape)
    back = dequantize(quantize(block, mode), mode, torch.float32, shape)
    assert back.shape == shape
    assert (back - block).abs().max() < block.abs().max() * (0.05 if mode == "int8" else 0.3)
