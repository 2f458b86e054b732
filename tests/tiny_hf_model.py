"""Tiny Hugging Face models built by the tests themselves (no download): a Llama and BPE tokenizer,
trained and saved, for the tests of the loader and of chat templates; a sliding-window Mistral; a
recurrent hybrid (Qwen3-Next), for the engine's path of models that cannot batch; a Mistral, a Qwen2,
a Qwen3, a Phi-3 and a SmolLM3 laid out as Llama, for the plain step's other families."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

from bulk.models.loader import LoadedModel
from bulk.models.tokenizer import ByteTokenizer

# The tiny decoder every family here is built to: 2 layers, hidden 64, 4 heads over 2 KV heads.
TINY_SHAPE: dict[str, int] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
# ... over the byte tokenizer.
BYTE_VOCAB: dict[str, int] = {
    "vocab_size": ByteTokenizer.vocab_size,
    "bos_token_id": ByteTokenizer.BOS,
    "eos_token_id": ByteTokenizer.EOS,
    "pad_token_id": ByteTokenizer.PAD,
}


def save_tiny_llama(
    path: Path,
    corpus: Sequence[str],
    *,
    seed: int,
    adds_bos: bool = False,
    chat_template: str | None = None,
) -> Path:
    """A 2-layer Llama (hidden 64, 4 heads, 2 KV heads, context 512) and its tokenizer in `path`.
    `adds_bos`: the tokenizer puts BOS before every encoded text (a post-processor, as Llama's does)."""
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        list(corpus), trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    )
    if adds_bos:
        raw.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", raw.token_to_id("<s>"))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        **TINY_SHAPE,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def sliding_window_model(window: int = 16) -> LoadedModel:
    """A tiny Mistral (random weights, the byte tokenizer) whose layers keep a sliding window of
    `window` tokens: batched and with prefix reuse, the pool keeping every layer's KV and attention
    applying the window."""
    config = MistralConfig(**TINY_SHAPE, **BYTE_VOCAB, sliding_window=window)
    torch.manual_seed(5)
    return _loaded("tiny-sliding", MistralForCausalLM(config), ByteTokenizer(), block_reuse=True)


SLIDING_FAMILIES = ("mistral", "qwen2", "gemma2", "gemma3")


def sliding_family_model(family: str, window: int = 8) -> LoadedModel:
    """A tiny random-weight model whose attention keeps a sliding window of `window` tokens on some
    layers, as each family lays it out: Mistral on every layer; Qwen2 (`use_sliding_window`) on the
    layers from `max_window_layers` on; Gemma 2 and Gemma 3 on alternate layers (`layer_types`),
    with their scaled embeddings, sandwich norms and Gemma 2's soft-capping. Batched, with prefix
    reuse, through transformers' forward with our attention."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    shape = {**TINY_SHAPE, **BYTE_VOCAB}
    alternate = ["sliding_attention", "full_attention"]
    torch.manual_seed(13)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**shape, sliding_window=window))
    elif family == "qwen2":
        config = Qwen2Config(**shape, use_sliding_window=True, sliding_window=window, max_window_layers=1)
        model = Qwen2ForCausalLM(config)
    elif family == "gemma2":
        config = Gemma2Config(**shape, head_dim=16, sliding_window=window, layer_types=alternate)
        model = Gemma2ForCausalLM(config)
    elif family == "gemma3":
        config = Gemma3TextConfig(**shape, head_dim=16, sliding_window=window, layer_types=alternate)
        model = Gemma3ForCausalLM(config)
    else:
        raise ValueError(f"no tiny sliding-window {family} model")
    return _loaded(f"tiny-{family}-sliding", model, ByteTokenizer(), block_reuse=True)


def recurrent_model(eos: int | None = None) -> LoadedModel:
    """A tiny Qwen3-Next (random weights, the byte tokenizer): a linear-attention (recurrent) layer
    and a full-attention one. Its recurrent state cannot be rebuilt from KV blocks, so it neither
    reuses KV nor decodes in the batched way: the engine runs it one request at a time
    (`ModelRunner._forward_one_by_one`). `eos`: one more token that ends an answer."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    config = Qwen3NextConfig(
        **TINY_SHAPE,
        **BYTE_VOCAB,
        head_dim=16,
        linear_num_value_heads=2,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        layer_types=["linear_attention", "full_attention"],
    )
    torch.manual_seed(5)
    tokenizer = ByteTokenizer()
    if eos is not None:
        tokenizer.eos_token_ids = frozenset({ByteTokenizer.EOS, eos})
    return _loaded("tiny-recurrent", Qwen3NextForCausalLM(config), tokenizer, block_reuse=False)


def llama_layout_model(family: str) -> LoadedModel:
    """A tiny random-weight model of a family laid out as Llama ("mistral" without a sliding window,
    "qwen2" with its q/k/v biases made non-zero, "qwen3" with its per-head q/k norms, "phi3" with its
    fused q/k/v and gate/up projections, "smollm3" with a layer without rotary embedding), over the
    byte tokenizer: batched, with prefix reuse,
    through the plain step (`bulk.models.llama_step.LLAMA_LAYOUT`)."""
    from transformers import (
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        SmolLM3Config,
        SmolLM3ForCausalLM,
    )

    shape = {**TINY_SHAPE, **BYTE_VOCAB}
    torch.manual_seed(9)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**shape, sliding_window=None))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
        with torch.no_grad():  # their initialisation leaves the biases at zero
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**shape, head_dim=16))
        with torch.no_grad():  # norms that change something: not all ones
            for layer in model.model.layers:
                for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    norm.weight.uniform_(0.5, 1.5)
    elif family == "smollm3":  # the second layer without rotary embedding
        model = SmolLM3ForCausalLM(SmolLM3Config(**shape, no_rope_layers=[1, 0]))
    elif family == "phi3":
        model = Phi3ForCausalLM(Phi3Config(**shape, sliding_window=None))
    else:
        raise ValueError(f"no tiny {family} model")
    return _loaded(f"tiny-{family}", model, ByteTokenizer(), block_reuse=True)


def _loaded(name: str, model: torch.nn.Module, tokenizer: ByteTokenizer, block_reuse: bool) -> LoadedModel:
    """A tiny model of `TINY_SHAPE` (float32, on the CPU) as the loader would hand it to an engine."""
    shape = TINY_SHAPE
    return LoadedModel(
        name=name,
        model=model.train(False),
        tokenizer=tokenizer,
        fingerprint=f"{name}:test",
        device=torch.device("cpu"),
        dtype=torch.float32,
        context_length=shape["max_position_embeddings"],
        num_layers=shape["num_hidden_layers"],
        num_kv_heads=shape["num_key_value_heads"],
        head_dim=shape["hidden_size"] // shape["num_attention_heads"],
        supports_block_reuse=block_reuse,
    )
