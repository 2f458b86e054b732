"""The built-in demo models: Llama-architecture networks with seeded random weights.

They exist so that every code path (prefill, decode, KV reuse, tiers, servers) runs on a machine with
no download and no GPU. Their weights are random, so their text is meaningless; their compute and KV
footprint are those of a real small Llama, which is what the cache and the benchmarks care about."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bulk.models.tokenizer import ByteTokenizer

SEED = 20240917


@dataclass(frozen=True)
class DemoSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    context_length: int = 4096


DEMO_SPECS: dict[str, DemoSpec] = {
    # ~10M parameters: fast enough for the test suite on two CPU cores.
    "demo": DemoSpec(hidden_size=256, num_layers=10, num_heads=4, num_kv_heads=2, intermediate_size=1024),
    # ~50M parameters, 16 KiB of KV per token in float32: the benchmark model.
    "demo-large": DemoSpec(
        hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=3584
    ),
}


def is_demo(name: str) -> bool:
    return name in DEMO_SPECS


def build_demo_model(name: str, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    spec = DEMO_SPECS[name]
    config = LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.context_length,
        bos_token_id=ByteTokenizer.BOS,
        eos_token_id=ByteTokenizer.EOS,
        pad_token_id=ByteTokenizer.PAD,
        tie_word_embeddings=False,
    )
    # Seed a private RNG scope so building a model never disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    # Random weights make random bytes, mostly control characters and broken UTF-8. Zeroing the
    # output rows of every token but printable ASCII and newline pins their logits at 0 while the
    # printable ones spread around it, so the (still meaningless) text prints cleanly.
    printable = torch.zeros(config.vocab_size, dtype=torch.bool)
    printable[32:127] = True
    printable[10] = True
    with torch.no_grad():
        model.lm_head.weight[~printable] = 0.0
    # inference: dropout off. (transformers wraps `to` in a decorator mypy cannot see through)
    return model.to(device=device, dtype=dtype).train(False)  # type: ignore[call-arg]
