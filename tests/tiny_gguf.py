"""A tiny llama.cpp-format (GGUF) Llama, written by the tests themselves with the `gguf` package (no
download): 2 layers, hidden 64, a byte-level BPE tokenizer trained here, a ChatML chat template with
`<|im_end|>` as end of turn, like SmolLM2's file. The matrices are stored Q8_0-quantized, so loading
it exercises the dequantization a real quantized file needs; the norms stay float32.

`layout` picks the matrices' layout as the usual downloads have them: Q8_0, Q5_0, Q5_1, Q6_K, and
Q4_K / Q5_K written as llama.cpp's Q4_K_M / Q5_K_M (the head and, in the first block, attn_v and
ffn_down at Q6_K). The k-quants come from `tests.kquants` (the `gguf` package cannot write them), and
need rows of 256 values, so those files have hidden size 256 and feed-forward 512 (about 1 MB).
`architecture` names `general.architecture` (the tensors stay Llama's), for files we must refuse."""

from __future__ import annotations

import json
from pathlib import Path

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


def write_tiny_gguf(path: Path, seed: int = 7, layout: str = "Q8_0", architecture: str = "llama") -> Path:
    file_type, wide_layout = LAYOUTS[layout]
    hidden, ffn = (K_HIDDEN, K_FFN) if layout.endswith("_K") else (HIDDEN, FFN)
    raw = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS))
    vocab = sorted(raw.get_vocab().items(), key=lambda item: item[1])
    tokens = [token for token, _ in vocab]
    merges = [
        " ".join(pair) if isinstance(pair, list) else pair
        for pair in json.loads(raw.to_str())["model"]["merges"]
    ]

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
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(file_type)
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

    rng = np.random.default_rng(seed)
    head_dim = hidden // HEADS

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.08).astype(np.float32)

    def add_quantized(name: str, data: np.ndarray, as_layout: str = layout) -> None:
        quantized = quantize(data, as_layout)
        writer.add_tensor(
            name, quantized, raw_shape=quantized.shape, raw_dtype=GGMLQuantizationType[as_layout]
        )

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
        add_quantized(f"blk.{i}.ffn_gate.weight", matrix(ffn, hidden))
        add_quantized(f"blk.{i}.ffn_up.weight", matrix(ffn, hidden))
        add_quantized(f"blk.{i}.ffn_down.weight", matrix(hidden, ffn), wide)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
