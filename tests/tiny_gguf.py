"""A tiny llama.cpp-format (GGUF) Llama, written by the tests themselves with the `gguf` package (no
download): 2 layers, hidden 64, a byte-level BPE tokenizer trained here, a ChatML chat template with
`<|im_end|>` as end of turn, like SmolLM2's file. The matrices are stored Q8_0-quantized, so loading
it exercises the dequantization a real quantized file needs; the norms stay float32."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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


def write_tiny_gguf(path: Path, seed: int = 7) -> Path:
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

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-test")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
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
    head_dim = HIDDEN // HEADS

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.08).astype(np.float32)

    def add_quantized(name: str, data: np.ndarray) -> None:
        quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(
            name, quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0
        )

    add_quantized("token_embd.weight", matrix(len(tokens), HIDDEN))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    add_quantized("output.weight", matrix(len(tokens), HIDDEN))
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        add_quantized(f"blk.{i}.attn_q.weight", matrix(HIDDEN, HIDDEN))
        add_quantized(f"blk.{i}.attn_k.weight", matrix(KV_HEADS * head_dim, HIDDEN))
        add_quantized(f"blk.{i}.attn_v.weight", matrix(KV_HEADS * head_dim, HIDDEN))
        add_quantized(f"blk.{i}.attn_output.weight", matrix(HIDDEN, HIDDEN))
        add_quantized(f"blk.{i}.ffn_gate.weight", matrix(FFN, HIDDEN))
        add_quantized(f"blk.{i}.ffn_up.weight", matrix(FFN, HIDDEN))
        add_quantized(f"blk.{i}.ffn_down.weight", matrix(HIDDEN, FFN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
