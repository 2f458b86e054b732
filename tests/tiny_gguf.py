"""A tiny llama.cpp-format (GGUF) Llama, written by the tests themselves with the `gguf` package (no
download): 2 layers, hidden 64, a byte-level BPE tokenizer trained here, a ChatML chat template with
`<|im_end|>` as end of turn, like SmolLM2's file. The matrices are stored Q8_0-quantized, so loading
it exercises the dequantization a real quantized file needs; the norms stay float32.

`layout` picks the matrices' layout as the usual downloads have them: Q8_0, Q5_0, Q5_1, Q6_K, and
Q4_K / Q5_K written as llama.cpp's Q4_K_M / Q5_K_M (the head and, in the first block, attn_v and
ffn_down at Q6_K). The k-quants come from `tests.kquants` (the `gguf` package cannot write them), and
need rows of 256 values, so those files have hidden size 256 and feed-forward 512 (about 1 MB).
`architecture` names `general.architecture` (the tensors stay Llama's), for files we must refuse.

`write_family_gguf` writes the other decoder families transformers reads from GGUF (Qwen 2 and 3,
Phi-3, Gemma 2 and 3, Mistral) and `write_hybrid_gguf` the hybrids its newer GGUF path reads (LFM2,
Qwen 3.5), each as llama.cpp's converter writes it, in the same layouts; `write_qwen35moe_gguf` Qwen
3.5's mixture of experts. `write_model_gguf` writes any other architecture transformers' older reader
maps (the MoE Qwens, StarCoder 2, StableLM, Falcon, GPT-2, BLOOM, Nemotron, MiniMax-M2...) from a tiny
random transformers model, by inverting that reader, in the same layouts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tests import kquants

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Create marketing strategy for a small bakery in Madrid.",
    "You are a helpful assistant. Answer in one sentence.",
] * 20
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 64, 2, 4, 2, 128, 256
K_HIDDEN, K_FFN = 256, 512  # k-quant rows are super-blocks of 256 values
# layout -> (the file type llama.cpp names it by, the layout of its head and its few wider matrices)
LAYOUTS = {
    "Q8_0": (LlamaFileType.MOSTLY_Q8_0, "Q8_0"),
    "Q5_0": (LlamaFileType.MOSTLY_Q5_0, "Q5_0"),
    "Q5_1": (LlamaFileType.MOSTLY_Q5_1, "Q5_1"),
    "Q4_K": (LlamaFileType.MOSTLY_Q4_K_M, "Q6_K"),
    "Q5_K": (LlamaFileType.MOSTLY_Q5_K_M, "Q6_K"),
    "Q6_K": (LlamaFileType.MOSTLY_Q6_K, "Q6_K"),
}


def quantize(data: np.ndarray, layout: str) -> np.ndarray:
    """`data` as the bytes of `layout` blocks."""
    qtype = GGMLQuantizationType[layout]
    if layout.endswith("_K"):
        return kquants.quantize(data, qtype)
    return gguf.quants.quantize(data, qtype)


def bpe_vocabulary() -> tuple[list[str], list[str]]:
    """The byte-level BPE vocabulary (tokens in id order) and merges `write_tiny_gguf` trains."""
    raw = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS))
    vocab = sorted(raw.get_vocab().items(), key=lambda item: item[1])
    merges = [
        " ".join(pair) if isinstance(pair, list) else pair
        for pair in json.loads(raw.to_str())["model"]["merges"]
    ]
    return [token for token, _ in vocab], merges


def _tensor_writers(writer: Any, layout: str, seed: int) -> tuple[np.random.Generator, Any, Any]:
    """A file's random generator, `matrix(rows, cols)` (random weights of a trained model's scale)
    and `add_quantized(name, data, as_layout=layout)` (`data` stored as `as_layout` blocks)."""
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.08).astype(np.float32)

    def add_quantized(name: str, data: np.ndarray, as_layout: str = layout) -> None:
        quantized = quantize(data, as_layout)
        writer.add_tensor(
            name, quantized, raw_shape=quantized.shape, raw_dtype=GGMLQuantizationType[as_layout]
        )

    return rng, matrix, add_quantized


def _add_feed_forward(add_quantized: Any, matrix: Any, i: int, hidden: int, ffn: int, wide: str) -> None:
    """Block i's gated feed-forward (gate, up, down), its down projection at `wide` (the _M mixes
    keep more bits there in the first blocks)."""
    add_quantized(f"blk.{i}.ffn_gate.weight", matrix(ffn, hidden))
    add_quantized(f"blk.{i}.ffn_up.weight", matrix(ffn, hidden))
    add_quantized(f"blk.{i}.ffn_down.weight", matrix(hidden, ffn), wide)


def _finish(writer: Any) -> None:
    """Header, metadata and tensors written, the file closed."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_gguf(path: Path, seed: int = 7, layout: str = "Q8_0", architecture: str = "llama") -> Path:
    file_type, wide_layout = LAYOUTS[layout]
    hidden, ffn = (K_HIDDEN, K_FFN) if layout.endswith("_K") else (HIDDEN, FFN)
    tokens, merges = bpe_vocabulary()

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama-test")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(hidden)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(hidden // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(file_type)
    _add_tokenizer(writer, tokens, merges)

    head_dim = hidden // HEADS
    _, matrix, add_quantized = _tensor_writers(writer, layout, seed)

    add_quantized("token_embd.weight", matrix(len(tokens), hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    add_quantized("output.weight", matrix(len(tokens), hidden), wide_layout)
    for i in range(LAYERS):
        # As llama.cpp's _M mixes: some of the first blocks' attn_v and ffn_down keep more bits.
        wide = wide_layout if i == 0 else layout
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        add_quantized(f"blk.{i}.attn_q.weight", matrix(hidden, hidden))
        add_quantized(f"blk.{i}.attn_k.weight", matrix(KV_HEADS * head_dim, hidden))
        add_quantized(f"blk.{i}.attn_v.weight", matrix(KV_HEADS * head_dim, hidden), wide)
        add_quantized(f"blk.{i}.attn_output.weight", matrix(hidden, hidden))
        _add_feed_forward(add_quantized, matrix, i, hidden, ffn, wide)
    _finish(writer)
    return path


# ---- other architectures ----------------------------------------------------------------------------
# Tiny files of the other decoder families transformers reads from GGUF, as llama.cpp's converter
# writes them (`convert_hf_to_gguf.py`): its architecture string, its metadata keys and its tensor
# names (`gguf.MODEL_TENSORS`). Per family, what differs from Llama's file above:
#   qwen2   - biases on attn_q / attn_k / attn_v (float32).
#   qwen3   - per-head RMS norms attn_q_norm / attn_k_norm, and head_dim 128, which the file states
#             (`attention.key_length`) but transformers does not read: it takes Qwen3's default, 128.
#   phi3    - fused attn_qkv (q, k, v rows stacked) and ffn_up holding gate and up stacked.
#   gemma2  - no output matrix (tied to token_embd), post_attention_norm / post_ffw_norm, head_dim
#             from `attention.key_length`, `attention.sliding_window`; layers alternate sliding and
#             full (transformers' Gemma 2 pattern). llama.cpp stores its norms as 1 + weight.
#   gemma3  - as gemma2, plus attn_q_norm / attn_k_norm; one layer in 6 is full (transformers' and
#             llama.cpp's Gemma 3 pattern), so the file has 6 layers.
#   mistral - a Llama file: llama.cpp writes Mistral as architecture "llama", and transformers reads it
#             as Llama (its Mistral rename needs `general.name` exactly "mistral", then fails in gguf-py).
FAMILIES = ("qwen2", "qwen3", "phi3", "gemma2", "gemma3", "mistral")
FAMILY_WINDOW = 8  # the sliding window of the Gemma files: every test prompt crosses it
_FAMILY_LAYERS = {"gemma3": 6}
_FAMILY_HEAD_DIM = {"qwen3": 128}


def write_family_gguf(path: Path, family: str, layout: str = "Q8_0", seed: int = 7) -> Path:
    """A tiny GGUF file of `family` (one of `FAMILIES`), its matrices in `layout` (a key of
    `LAYOUTS`: Q4_K / Q5_K as llama.cpp's _M mixes), the norms and biases float32. Hidden size 64
    (256 for the k-quants, whose rows are 256 values), 4 heads, 2 KV heads, 2 layers (Gemma 3: 6)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: one of {FAMILIES}")
    file_type, wide_layout = LAYOUTS[layout]
    hidden, ffn = (K_HIDDEN, K_FFN) if layout.endswith("_K") else (HIDDEN, FFN)
    layers = _FAMILY_LAYERS.get(family, LAYERS)
    head_dim = _FAMILY_HEAD_DIM.get(family, hidden // HEADS)
    gemma = family.startswith("gemma")
    arch = "llama" if family == "mistral" else family
    tokens, merges = bpe_vocabulary()

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{family}-test")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    if family == "mistral":
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6 if gemma else 1e-5)
    if gemma:
        writer.add_sliding_window(FAMILY_WINDOW)
    if family == "gemma2":
        writer.add_attn_logit_softcapping(50.0)
        writer.add_final_logit_softcapping(30.0)
    writer.add_file_type(file_type)
    _add_tokenizer(writer, tokens, merges)

    rng, matrix, add_quantized = _tensor_writers(writer, layout, seed)

    def add_norm(name: str, size: int) -> None:
        writer.add_tensor(name, np.ones(size, dtype=np.float32))  # gemma: 1 + 0, as llama.cpp writes it

    q_rows, kv_rows = HEADS * head_dim, KV_HEADS * head_dim
    # Gemma's head is its embedding (no output matrix), which llama.cpp then keeps at the head's bits.
    add_quantized("token_embd.weight", matrix(len(tokens), hidden), wide_layout if gemma else layout)
    add_norm("output_norm.weight", hidden)
    if not gemma:
        add_quantized("output.weight", matrix(len(tokens), hidden), wide_layout)
    for i in range(layers):
        wide = wide_layout if i == 0 else layout  # as llama.cpp's _M mixes
        add_norm(f"blk.{i}.attn_norm.weight", hidden)
        add_norm(f"blk.{i}.ffn_norm.weight", hidden)
        if family == "phi3":
            # The _M mixes keep attn_v at more bits; fused into attn_qkv, it stays at the file's.
            add_quantized(f"blk.{i}.attn_qkv.weight", matrix(q_rows + 2 * kv_rows, hidden))
            add_quantized(f"blk.{i}.ffn_up.weight", matrix(2 * ffn, hidden))
        else:
            add_quantized(f"blk.{i}.attn_q.weight", matrix(q_rows, hidden))
            add_quantized(f"blk.{i}.attn_k.weight", matrix(kv_rows, hidden))
            add_quantized(f"blk.{i}.attn_v.weight", matrix(kv_rows, hidden), wide)
            add_quantized(f"blk.{i}.ffn_gate.weight", matrix(ffn, hidden))
            add_quantized(f"blk.{i}.ffn_up.weight", matrix(ffn, hidden))
        add_quantized(f"blk.{i}.attn_output.weight", matrix(hidden, q_rows))
        add_quantized(f"blk.{i}.ffn_down.weight", matrix(hidden, ffn), wide)
        if family == "qwen2":
            for name, size in (("attn_q", q_rows), ("attn_k", kv_rows), ("attn_v", kv_rows)):
                bias = (rng.standard_normal(size) * 0.02).astype(np.float32)
                writer.add_tensor(f"blk.{i}.{name}.bias", bias)
        if family in ("qwen3", "gemma3"):
            add_norm(f"blk.{i}.attn_q_norm.weight", head_dim)
            add_norm(f"blk.{i}.attn_k_norm.weight", head_dim)
        if gemma:
            add_norm(f"blk.{i}.post_attention_norm.weight", hidden)
            add_norm(f"blk.{i}.post_ffw_norm.weight", hidden)
    _finish(writer)
    return path


# ---- hybrid architectures (transformers 5's newer GGUF path) ------------------------------------------
# Architectures transformers reads through `transformers.integrations.gguf` (its own config and weight
# mappings, `GGUF_CONFIG_ARCHS` / `GGUF_ARCHS`), whose layers are not all attention:
#   lfm2   - LFM2: short-convolution layers (`shortconv.in_proj` 3 x hidden rows, a depthwise
#            `shortconv.conv` kernel of `shortconv.l_cache` taps stored 2-D, `shortconv.out_proj`)
#            with full attention (q / k norms) on some; `attention.head_count_kv` is one count per
#            layer, 0 on the convolution ones, which is how the file says which layer is which. The
#            final norm is `token_embd_norm`, the head is tied to the embedding (no output matrix),
#            and the norms carry no offset.
#   qwen35 - Qwen 3.5: Gated DeltaNet linear-attention layers with full attention every
#            `full_attention_interval`-th layer (here 2: linear, full). A linear layer has the fused
#            `attn_qkv` (in_proj_qkv), `attn_gate` (z), `ssm_alpha` / `ssm_beta` (one row per value
#            head), the depthwise `ssm_conv1d` stored 2-D, `ssm_a` (-exp(A_log)), `ssm_dt.bias`,
#            `ssm_norm` and `ssm_out`; a full one a gated `attn_q` (query and gate rows, 2 x heads x
#            head_dim) with q / k norms; both a `post_attention_norm`. Norms are stored as 1 + w
#            (but `ssm_norm`), the rotary embedding is an mrope over `rope.dimension_sections`.
HYBRID_FAMILIES = ("lfm2", "qwen35")
LFM2_LAYER_KINDS = ("conv", "full_attention", "conv")
LFM2_CONV_TAPS = 3
QWEN35_LAYERS, QWEN35_CONV_TAPS = 2, 4
QWEN35_KEY_HEADS, QWEN35_VALUE_HEADS = 2, 4  # the linear layers' heads: two value heads per key head
QWEN35MOE_EXPERTS, QWEN35MOE_USED = 4, 2


def write_hybrid_gguf(path: Path, family: str, layout: str = "Q8_0", seed: int = 7) -> Path:
    """A tiny GGUF file of the hybrid `family` (one of `HYBRID_FAMILIES`), as llama.cpp's converter
    writes it, its matrices in `layout` (a key of `LAYOUTS`), norms and convolution kernels float32
    (llama.cpp keeps 1-D tensors and rows too short for a block unquantized)."""
    if family not in HYBRID_FAMILIES:
        raise ValueError(f"unknown hybrid family {family!r}: one of {HYBRID_FAMILIES}")
    if family == "qwen35":
        return _write_qwen35_gguf(path, layout, seed)
    file_type, wide_layout = LAYOUTS[layout]
    hidden, ffn = (K_HIDDEN, K_FFN) if layout.endswith("_K") else (HIDDEN, FFN)
    head_dim = hidden // HEADS
    tokens, merges = bpe_vocabulary()
    kinds = LFM2_LAYER_KINDS

    writer = gguf.GGUFWriter(str(path), family)
    writer.add_name(f"tiny-{family}-test")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(hidden)
    writer.add_block_count(len(kinds))
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv([KV_HEADS if kind == "full_attention" else 0 for kind in kinds])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_shortconv_l_cache(LFM2_CONV_TAPS)
    writer.add_file_type(file_type)
    _add_tokenizer(writer, tokens, merges)

    rng, matrix, add_quantized = _tensor_writers(writer, layout, seed)

    def add_norm(name: str, size: int) -> None:
        writer.add_tensor(name, (1 + rng.standard_normal(size) * 0.05).astype(np.float32))

    # The head is the embedding, which llama.cpp then keeps at the head's bits.
    add_quantized("token_embd.weight", matrix(len(tokens), hidden), wide_layout)
    add_norm("token_embd_norm.weight", hidden)
    for i, kind in enumerate(kinds):
        wide = wide_layout if i == 0 else layout  # as llama.cpp's _M mixes
        add_norm(f"blk.{i}.attn_norm.weight", hidden)
        add_norm(f"blk.{i}.ffn_norm.weight", hidden)
        if kind == "conv":
            add_quantized(f"blk.{i}.shortconv.in_proj.weight", matrix(3 * hidden, hidden))
            kernel = (rng.standard_normal((hidden, LFM2_CONV_TAPS)) * 0.3).astype(np.float32)
            writer.add_tensor(f"blk.{i}.shortconv.conv.weight", kernel)
            add_quantized(f"blk.{i}.shortconv.out_proj.weight", matrix(hidden, hidden))
        else:
            add_quantized(f"blk.{i}.attn_q.weight", matrix(HEADS * head_dim, hidden))
            add_quantized(f"blk.{i}.attn_k.weight", matrix(KV_HEADS * head_dim, hidden))
            add_quantized(f"blk.{i}.attn_v.weight", matrix(KV_HEADS * head_dim, hidden), wide)
            add_quantized(f"blk.{i}.attn_output.weight", matrix(hidden, HEADS * head_dim))
            add_norm(f"blk.{i}.attn_q_norm.weight", head_dim)
            add_norm(f"blk.{i}.attn_k_norm.weight", head_dim)
        _add_feed_forward(add_quantized, matrix, i, hidden, ffn, wide)
    _finish(writer)
    return path


def _write_qwen35_gguf(path: Path, layout: str, seed: int, moe: bool = False) -> Path:
    """`write_hybrid_gguf` for Qwen 3.5 (see the notes above `HYBRID_FAMILIES`); `moe`: its
    mixture-of-experts variant (`write_qwen35moe_gguf`)."""
    file_type, wide_layout = LAYOUTS[layout]
    hidden, ffn = (K_HIDDEN, K_FFN) if layout.endswith("_K") else (HIDDEN, FFN)
    head_dim = hidden // HEADS  # the full layers' heads, and the linear layers' key and value heads
    key_heads, value_heads = QWEN35_KEY_HEADS, QWEN35_VALUE_HEADS
    qkv_rows = 2 * key_heads * head_dim + value_heads * head_dim
    tokens, merges = bpe_vocabulary()

    arch = "qwen35moe" if moe else "qwen35"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}-test")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(hidden)
    writer.add_block_count(QWEN35_LAYERS)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_full_attention_interval(QWEN35_LAYERS)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim // 2)  # partial rotary: half of each head
    writer.add_rope_dimension_sections([2, 1, 1, 0])  # of the rotary half's head_dim // 4 pairs
    writer.add_ssm_conv_kernel(QWEN35_CONV_TAPS)
    writer.add_ssm_state_size(head_dim)
    writer.add_ssm_group_count(key_heads)
    writer.add_ssm_time_step_rank(value_heads)
    writer.add_ssm_inner_size(value_heads * head_dim)
    if moe:
        writer.add_expert_feed_forward_length(ffn)
        writer.add_expert_shared_feed_forward_length(ffn)
        writer.add_expert_count(QWEN35MOE_EXPERTS)
        writer.add_expert_used_count(QWEN35MOE_USED)
    writer.add_file_type(file_type)
    _add_tokenizer(writer, tokens, merges)

    rng, matrix, add_quantized = _tensor_writers(writer, layout, seed)

    def add_vector(name: str, values: np.ndarray) -> None:
        writer.add_tensor(name, values.astype(np.float32))

    def add_norm(name: str, size: int) -> None:  # stored as 1 + w, as llama.cpp writes Qwen 3.5's
        add_vector(name, 1 + rng.standard_normal(size) * 0.05)

    add_quantized("token_embd.weight", matrix(len(tokens), hidden))
    add_norm("output_norm.weight", hidden)
    add_quantized("output.weight", matrix(len(tokens), hidden), wide_layout)
    for i in range(QWEN35_LAYERS):
        wide = wide_layout if i == 0 else layout  # as llama.cpp's _M mixes
        add_norm(f"blk.{i}.attn_norm.weight", hidden)
        add_norm(f"blk.{i}.post_attention_norm.weight", hidden)
        if (i + 1) % QWEN35_LAYERS:  # a linear-attention layer
            add_quantized(f"blk.{i}.attn_qkv.weight", matrix(qkv_rows, hidden))
            add_quantized(f"blk.{i}.attn_gate.weight", matrix(value_heads * head_dim, hidden))
            add_quantized(f"blk.{i}.ssm_alpha.weight", matrix(value_heads, hidden))
            add_quantized(f"blk.{i}.ssm_beta.weight", matrix(value_heads, hidden))
            add_vector(f"blk.{i}.ssm_conv1d.weight", rng.standard_normal((qkv_rows, QWEN35_CONV_TAPS)) * 0.3)
            add_vector(f"blk.{i}.ssm_a", -np.exp(rng.uniform(-1, 1, value_heads)))
            add_vector(f"blk.{i}.ssm_dt.bias", rng.standard_normal(value_heads) * 0.1)
            add_vector(f"blk.{i}.ssm_norm.weight", 1 + rng.standard_normal(head_dim) * 0.05)
            add_quantized(f"blk.{i}.ssm_out.weight", matrix(hidden, value_heads * head_dim))
        else:
            add_quantized(f"blk.{i}.attn_q.weight", matrix(2 * HEADS * head_dim, hidden))
            add_quantized(f"blk.{i}.attn_k.weight", matrix(KV_HEADS * head_dim, hidden))
            add_quantized(f"blk.{i}.attn_v.weight", matrix(KV_HEADS * head_dim, hidden), wide)
            add_quantized(f"blk.{i}.attn_output.weight", matrix(hidden, HEADS * head_dim))
            add_norm(f"blk.{i}.attn_q_norm.weight", head_dim)
            add_norm(f"blk.{i}.attn_k_norm.weight", head_dim)
        if moe:
            experts = QWEN35MOE_EXPERTS
            add_quantized(f"blk.{i}.ffn_gate_inp.weight", matrix(experts, hidden))  # the router
            for name in ("ffn_gate_exps", "ffn_up_exps"):  # one [ffn, hidden] matrix per expert
                add_quantized(
                    f"blk.{i}.{name}.weight", np.stack([matrix(ffn, hidden) for _ in range(experts)])
                )
            add_quantized(
                f"blk.{i}.ffn_down_exps.weight", np.stack([matrix(hidden, ffn) for _ in range(experts)]), wide
            )
            add_vector(f"blk.{i}.ffn_gate_inp_shexp.weight", rng.standard_normal(hidden) * 0.08)
            add_quantized(f"blk.{i}.ffn_gate_shexp.weight", matrix(ffn, hidden))
            add_quantized(f"blk.{i}.ffn_up_shexp.weight", matrix(ffn, hidden))
            add_quantized(f"blk.{i}.ffn_down_shexp.weight", matrix(hidden, ffn), wide)
        else:
            _add_feed_forward(add_quantized, matrix, i, hidden, ffn, wide)
    _finish(writer)
    return path


def write_qwen35moe_gguf(path: Path, layout: str = "Q8_0", seed: int = 7) -> Path:
    """A tiny GGUF file of Qwen 3.5's mixture-of-experts variant (`qwen35moe`, read through transformers'
    newer GGUF path like Qwen 3.5): Qwen 3.5's layers (`write_hybrid_gguf`), each feed-forward a router
    (`ffn_gate_inp`) over `QWEN35MOE_EXPERTS` experts stored stacked (`ffn_gate_exps` / `ffn_up_exps` /
    `ffn_down_exps`, [experts, rows, columns]) and a shared expert (`ffn_*_shexp`) with its 1-row gate
    (`ffn_gate_inp_shexp`, stored as a vector), the experts' widths in `expert_feed_forward_length`
    and `expert_shared_feed_forward_length`, `expert_count` / `expert_used_count`."""
    return _write_qwen35_gguf(path, layout, seed, moe=True)


def _add_tokenizer(writer: Any, tokens: list[str], merges: list[str]) -> None:
    """The byte-level BPE vocabulary, its special tokens and the ChatML template, as llama.cpp
    writes a GPT-2-style tokenizer."""
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_unk_token_id(tokens.index("<|endoftext|>"))
    writer.add_pad_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)


# ---- serving a file -------------------------------------------------------------------------------

# layout -> the bits `weight_quantization="auto"` serves a file mostly in it at (`bulk.models.gguf.
# layout_bits`): Q4_K at 4, the 5- to 8-bit layouts at 8 (4 would lose precision they have).
SERVED_BITS = {"Q4_K": 4, "Q5_K": 8, "Q6_K": 8, "Q5_0": 8, "Q5_1": 8, "Q8_0": 8}

# Random weights may well choose the end of text first: `min_tokens` makes every file answer something.
QUERY = {"query": "What is the capital of France?", "max_new_tokens": 6, "min_tokens": 6}


def gguf_config(path: Path, cache: Path, **kw: Any) -> Any:
    """The engine's configuration for the GGUF file `path`, converted under `cache`."""
    from bulk.config import KVCacheConfig

    return KVCacheConfig(
        **{"model": str(path), "model_cache_path": str(cache), "device": "cpu", "response_cache": False, **kw}
    )


def assert_served_at_file_bits(config: Any, layout: str, bits: int, caplog: Any) -> None:
    """An engine on `config` (`weight_quantization="auto"`, bfloat16) serves the file at its own
    bits, its load log line says so and why, and the same question gets the same answer again and
    again once its prefix is cached (the first answer computed the whole prompt: with quantized
    weights its last token went through the kernel for that many rows, which may round otherwise
    than the one-row kernel a reused prefix leaves it to, and a random-weight model's near-tied
    logits can turn on that)."""
    import logging

    from bulk.engine.engine import UltraAdaptiveKVCacheEngine

    with (
        caplog.at_level(logging.INFO, logger="bulk.models.loader"),
        UltraAdaptiveKVCacheEngine(config) as engine,
    ):
        engine.process_request_sync(QUERY)
        first = engine.process_request_sync(QUERY)
        second = engine.process_request_sync(QUERY)
        served = engine.model.weight_quantization
    assert served == f"int{bits}"
    loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
    assert len(loaded) == 1
    assert f"(bfloat16, weights int{bits}: the file's blocks are {layout})" in loaded[0]
    assert first["completion_tokens"] > 0
    assert (first["result"], first["completion_tokens"]) == (second["result"], second["completion_tokens"])


def greedy_from_nothing(model: Any, ids: list[int], steps: int) -> list[int]:
    """The greedy continuation of `ids` by the transformers `model`, each token from a forward over
    the whole sequence so far (no cache of any kind: a reference for any engine path)."""
    import torch

    ids = list(ids)
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[-steps:]


# ---- any architecture transformers' older GGUF reader maps (generic) ----------------------------------
# `write_model_gguf` writes a tiny GGUF file of any architecture transformers reads through
# `modeling_gguf_pytorch_utils` by inverting its reader: a random tiny transformers model is built
# from the config class, with the sizes the reader takes from the file (`GGUF_CONFIG_MAPPING`) set
# small and everything else at the class's default (which is what the reader leaves it at); each
# parameter is written under the GGUF name transformers maps back to it (`get_gguf_hf_weights_map`),
# undoing its value transforms (the tensor processors: Conv1D transposes, BLOOM's fused qkv order,
# Mamba's -exp(A_log), Nemotron's 1 + w norms, the experts' gate and up halves). Matrices whose rows
# hold whole blocks are stored in the file's layout (`_generic_layout`: Q4_K / Q5_K as llama.cpp's _M
# mixes, and rows that are not whole 256-value super-blocks at llama.cpp's fallback for them), the rest
# float32; the model returned holds the values as the file stores them (quantized and back), so a
# loaded model must equal it parameter for parameter. The tiny sizes depend on the layout (`tiny_sizes`):
# hidden 64 and feed-forward 128, or 256 and 512 for the k-quants, whose rows are 256 values. The sizes
# transformers does not read from the file stay at the class's default (Qwen 2 MoE's experts, 1408
# wide, so its ffn_down_exps rows fall back to Q5_0 in a Q4_K_M file, as in the real one's).
# architecture -> (its `general.architecture` in the file, the model type transformers reads it as)
GENERIC_ARCHITECTURES = {
    "qwen3_moe": ("qwen3moe", "qwen3_moe"),
    "qwen2_moe": ("qwen2moe", "qwen2_moe"),
    "gpt_oss": ("gpt-oss", "gpt_oss"),
    "gemma4": ("gemma4", "gemma4_text"),
    "starcoder2": ("starcoder2", "starcoder2"),
    "stablelm": ("stablelm", "stablelm"),
    "falcon": ("falcon", "falcon"),
    "gpt2": ("gpt2", "gpt2"),
    "bloom": ("bloom", "bloom"),
    "mamba": ("mamba", "mamba"),
    "nemotron": ("nemotron", "nemotron"),
    "deci": ("deci", "deci"),
    "minimax_m2": ("minimax-m2", "minimax_m2"),
}
# llama.cpp's fallback for a k-quant matrix whose rows are not whole super-blocks (`llama_tensor_get_type`)
_K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def tiny_sizes(layout: str = "Q8_0") -> dict[str, int]:
    """The tiny value of each config attribute transformers' reader takes from the file, for a file
    whose matrices are `layout` (a key of `LAYOUTS`): the one place the generic files' shapes are chosen."""
    hidden, ffn = (K_HIDDEN, K_FFN) if layout.endswith("_K") else (HIDDEN, FFN)
    return {
        "hidden_size": hidden,
        "n_embd": hidden,
        "num_hidden_layers": LAYERS,
        "n_layer": LAYERS,
        "intermediate_size": ffn,
        "feed_forward_length": ffn,
        "num_attention_heads": HEADS,
        "n_head": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": CONTEXT,
        "n_ctx": CONTEXT,
        "num_experts": 4,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "head_dim": hidden // HEADS,
        "global_head_dim": hidden // HEADS,
        "sliding_window": FAMILY_WINDOW,
        "conv_kernel": 4,
        "state_size": 16,
        "time_step_rank": 4,
        "rotary_dim": hidden // HEADS,
    }


def _config_value(config: Any, attribute: str, tiny: dict[str, int]) -> Any:
    if attribute in tiny and not hasattr(config, attribute):  # an argument the config keeps elsewhere
        return tiny[attribute]
    if attribute == "rope_theta" and not hasattr(config, "rope_theta"):
        return (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if attribute == "n_ctx" and not hasattr(config, "n_ctx"):
        return config.n_positions
    if attribute == "scoring_func":  # llama.cpp's expert_gating_func: 1 softmax, 2 sigmoid
        return {"softmax": 1, "sigmoid": 2}.get(getattr(config, attribute, "sigmoid"), 2)
    return getattr(config, attribute, None)


def tiny_model(architecture: str, seed: int = 7, layout: str = "Q8_0", **overrides: Any) -> Any:
    """The random tiny transformers model of `architecture` (a key of `GENERIC_ARCHITECTURES`), of the
    sizes `tiny_sizes(layout)`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import GGUF_CONFIG_MAPPING

    _, model_type = GENERIC_ARCHITECTURES[architecture]
    tokens, _ = bpe_vocabulary()
    mapped = GGUF_CONFIG_MAPPING[architecture].values()
    sizes = {name: value for name, value in tiny_sizes(layout).items() if name in mapped}
    sizes["vocab_size"] = len(tokens)
    sizes["tie_word_embeddings"] = architecture in ("falcon", "bloom")  # transformers ties these always
    for special, token in (("bos", "<|im_start|>"), ("eos", "<|im_end|>"), ("pad", "<|im_end|>")):
        sizes[f"{special}_token_id"] = tokens.index(token)
    config = AutoConfig.for_model(model_type, **{**sizes, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # weights of a trained model's scale, norms near 1
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0, 0.08)
            elif "norm" in name or "ln" in name:
                param.normal_(1, 0.05)
            else:
                param.normal_(0, 0.05)
    return model.eval()


def write_model_gguf(
    path: Path, architecture: str, seed: int = 7, layout: str = "Q8_0", **overrides: Any
) -> tuple[Path, Any]:
    """A tiny GGUF file of `architecture`, its matrices in `layout` (a key of `LAYOUTS`: Q4_K / Q5_K as
    llama.cpp's _M mixes), and the transformers model that holds exactly its values (see the notes
    above `GENERIC_ARCHITECTURES`)."""
    import torch
    from transformers.integrations import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    gguf_arch, _ = GENERIC_ARCHITECTURES[architecture]
    model = tiny_model(architecture, seed, layout, **overrides)
    config = model.config
    tokens, merges = bpe_vocabulary()

    writer = gguf.GGUFWriter(str(path), gguf_arch)
    writer.add_name(f"tiny-{architecture}-test")
    file_type, wide_layout = LAYOUTS[layout]
    writer.add_file_type(file_type)
    for key, attribute in GGUF_CONFIG_MAPPING[architecture].items():
        if attribute is None or attribute == "vocab_size":
            continue
        value = _config_value(config, attribute, tiny_sizes(layout))
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{architecture}: cannot write {attribute}={value!r} as {key}")
        full = f"{gguf_arch}.{key}"
        if isinstance(value, int):
            writer.add_uint32(full, value)
        else:
            writer.add_float32(full, value)
    _add_tokenizer(writer, tokens, merges)

    processor = TENSOR_PROCESSORS.get(gguf_arch, TensorProcessor)(config=config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    state = model.state_dict()
    stored: dict[str, np.ndarray] = {}
    for gguf_name, hf_name in sorted(names.items()):
        if gguf_name == "output.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes the head only when it is not the embedding
        value = state[hf_name].detach().numpy()
        stored[gguf_name] = _to_file(architecture, gguf_name, value, config)
    # transformers maps the experts' stacked tensors without their suffix; llama.cpp writes ".weight"
    file_name = {name: f"{name}.weight" if name.endswith("_exps") else name for name in stored}
    assigned: dict[str, np.ndarray] = {}
    tied = "output.weight" not in stored
    for gguf_name, data in stored.items():
        as_layout = _generic_layout(gguf_name, data, layout, wide_layout, tied)
        if as_layout != "F32":
            quantized = quantize(data, as_layout)
            qtype = GGMLQuantizationType[as_layout]
            writer.add_tensor(file_name[gguf_name], quantized, raw_shape=quantized.shape, raw_dtype=qtype)
            data = gguf.quants.dequantize(quantized, qtype).reshape(data.shape)
        else:
            writer.add_tensor(file_name[gguf_name], np.ascontiguousarray(data, dtype=np.float32))
        assigned[gguf_name] = np.asarray(data, dtype=np.float32)
    _finish(writer)
    # The model then holds what the file holds: each parameter back from its stored values.
    with torch.no_grad():
        for gguf_name, data in assigned.items():
            hf_name = names[gguf_name]
            _from_file(architecture, gguf_name, data, state[hf_name], config)
    return path, model


def _generic_layout(gguf_name: str, data: np.ndarray, layout: str, wide_layout: str, tied: bool) -> str:
    """The layout `write_model_gguf` stores the tensor `gguf_name` in, in a file of `layout`: as
    llama.cpp's mixes, the head (the embedding when tied to it) and the first block's attn_v and
    ffn_down (experts' and shared expert's too) at `wide_layout`; a fused attn_qkv stays at `layout`
    (as `write_family_gguf`'s Phi-3). Vectors and norms stay float32, as do rows of no whole block."""
    if data.ndim < 2 or "norm" in gguf_name:
        return "F32"
    wide = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    wide = wide or gguf_name.startswith(("blk.0.attn_v.", "blk.0.ffn_down"))
    as_layout = wide_layout if wide else layout
    if as_layout.endswith("_K") and data.shape[-1] % kquants.QK_K:
        as_layout = _K_FALLBACK[as_layout]
    return as_layout if data.shape[-1] % 32 == 0 else "F32"


def _conv1d(architecture: str, gguf_name: str) -> bool:
    """Whether `gguf_name` is one of GPT-2's Conv1D weights, which transformers stores [in, out]."""
    parts = ("attn_qkv.weight", "ffn_down.weight", "ffn_up.weight", "attn_output.weight")
    return architecture == "gpt2" and gguf_name != "output.weight" and any(p in gguf_name for p in parts)


def _to_file(architecture: str, gguf_name: str, value: np.ndarray, config: Any) -> np.ndarray:
    """The parameter `value` as llama.cpp stores it under `gguf_name` (transformers' transform, undone)."""
    if "ffn_gate_exps" in gguf_name or "ffn_up_exps" in gguf_name:
        half = value.shape[1] // 2  # gate_up_proj [experts, 2 x ffn, hidden]: gate rows, then up rows
        return value[:, :half] if "ffn_gate_exps" in gguf_name else value[:, half:]
    if "ffn_gate_inp_shexp" in gguf_name:
        return value.reshape(-1)
    if _conv1d(architecture, gguf_name):
        return value.T
    if architecture == "bloom" and "attn_qkv" in gguf_name:
        heads, hidden = config.n_head, config.hidden_size
        per_head = value.reshape(heads, 3, hidden // heads, *value.shape[1:])  # q, k, v per head
        return np.swapaxes(per_head, 0, 1).reshape(value.shape)  # all q, then all k, then all v
    if architecture == "mamba" and "ssm_conv1d.weight" in gguf_name:
        return value.squeeze(1)
    if architecture == "mamba" and "ssm_a" in gguf_name:
        return -np.exp(value)
    if architecture == "nemotron" and "norm.weight" in gguf_name:
        return value + 1
    return value


def _from_file(architecture: str, gguf_name: str, data: np.ndarray, param: Any, config: Any) -> None:
    """Sets `param` to what transformers reads back from the stored `data` (the inverse of `_to_file`)."""
    import torch

    if "ffn_gate_exps" in gguf_name or "ffn_up_exps" in gguf_name:
        half = param.shape[1] // 2
        target = param[:, :half] if "ffn_gate_exps" in gguf_name else param[:, half:]
        target.copy_(torch.from_numpy(data))
        return
    if _conv1d(architecture, gguf_name):
        data = data.T
    elif architecture == "bloom" and "attn_qkv" in gguf_name:
        heads, hidden = config.n_head, config.hidden_size
        grouped = data.reshape(3, heads, hidden // heads, *data.shape[1:])
        data = np.swapaxes(grouped, 0, 1).reshape(data.shape)
    elif architecture == "mamba" and "ssm_a" in gguf_name:
        data = np.log(-data)
    elif architecture == "nemotron" and "norm.weight" in gguf_name:
        data = data - 1
    param.copy_(torch.from_numpy(np.ascontiguousarray(data)).reshape(param.shape))
