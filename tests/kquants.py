"""Numpy encoders for llama.cpp's k-quant super-blocks (Q4_K, Q5_K, Q6_K: 256 values each), which the
`gguf` package can read (`gguf.quants.dequantize`) but not write. The bytes are laid out as ggml's
`block_q4_K` / `block_q5_K` / `block_q6_K`, the inverse of gguf-py's `dequantize_blocks` for those
classes up to rounding. The scale choice is the simple one (each sub-block's range, its scale and
minimum quantized against the super-block's `d` / `dmin`), not llama.cpp's error-minimizing search:
enough for test files, which need the layout, not the best accuracy.

- Q4_K (144 bytes): f16 d, f16 dmin, 12 bytes of eight 6-bit (scale, min) pairs, 128 bytes of 4-bit
  values: byte i of chunk c (32 bytes) holds value i of sub-block 2c (low nibble) and 2c+1 (high).
  A value is d * scale[s] * q - dmin * min[s], q in 0..15.
- Q5_K (176 bytes): as Q4_K, with 32 bytes of fifth bits between the scales and the nibbles: bit s of
  byte i is the high bit of value i of sub-block s; q in 0..31.
- Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales (one per
  16 values), f16 d. A value is d * scale[g] * (q - 32), q in 0..63."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

QK_K = 256


def quantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """`data` (float, last axis a multiple of 256) as the bytes of `qtype` blocks: shape
    (*data.shape[:-1], data.shape[-1] // 256 * block_bytes), uint8, as `gguf.quants.quantize` returns
    for the layouts it can write."""
    encode = {
        GGMLQuantizationType.Q4_K: _q4_k,
        GGMLQuantizationType.Q5_K: _q5_k,
        GGMLQuantizationType.Q6_K: _q6_k,
    }[qtype]
    if data.shape[-1] % QK_K:
        raise ValueError(f"{qtype.name} rows must be a multiple of {QK_K} values, not {data.shape[-1]}")
    blocks = np.asarray(data, dtype=np.float32).reshape(-1, QK_K)
    encoded = encode(blocks)
    return encoded.reshape(*data.shape[:-1], data.shape[-1] // QK_K * encoded.shape[-1])


def _f16(values: np.ndarray) -> np.ndarray:
    """float32 (n,) as f16 bytes (n, 2), and the f16 values back as float32."""
    half = values.astype(np.float16)
    return half.reshape(-1, 1).view(np.uint8), half.astype(np.float32)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _scaled_min(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Q4_K / Q5_K header of each block (d, dmin, 12 bytes of scales) and the values q in
    0..levels-1 of its 8 sub-blocks of 32, (n, 8, 32)."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    low = np.minimum(sub.min(axis=-1), 0.0)  # ggml's minimum is never above 0
    scale = (sub.max(axis=-1) - low) / (levels - 1)
    minimum = -low
    d_bytes, d = _f16(scale.max(axis=-1) / 63)
    dmin_bytes, dmin = _f16(minimum.max(axis=-1) / 63)
    sc = np.clip(np.rint(_divide(scale, d[:, None])), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(_divide(minimum, dmin[:, None])), 0, 63).astype(np.uint8)
    # Round against the scale and minimum the reader will use, not the ideal ones.
    step = d[:, None] * sc
    offset = dmin[:, None] * mn
    shifted = sub + offset[..., None]
    q = np.clip(np.rint(_divide(shifted, np.broadcast_to(step[..., None], sub.shape))), 0, levels - 1)
    packed = np.empty((n, 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([d_bytes, dmin_bytes, packed], axis=1), q.astype(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """The low 4 bits of (n, 8, 32) values as 128 bytes: sub-blocks 2c and 2c+1 share chunk c."""
    low = q & 0x0F
    return (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(q.shape[0], 128)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    header, q = _scaled_min(blocks, 16)
    return np.concatenate([header, _nibbles(q)], axis=1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    header, q = _scaled_min(blocks, 32)
    high = ((q >> 4) & 1).astype(np.uint8)  # (n, 8, 32)
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for s in range(8):
        qh |= high[:, s] << s
    return np.concatenate([header, qh, _nibbles(q)], axis=1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    groups = blocks.reshape(n, 16, 16)
    scale = np.abs(groups).max(axis=-1) / 31  # q - 32 in -31..31
    d_bytes, d = _f16(scale.max(axis=-1) / 127)
    sc = np.clip(np.rint(_divide(scale, d[:, None])), 0, 127).astype(np.int8)
    step = d[:, None] * sc.astype(np.float32)
    q = np.clip(np.rint(_divide(groups, np.broadcast_to(step[..., None], groups.shape))), -32, 31) + 32
    q = q.astype(np.uint8).reshape(n, 256)
    # Value e = 128 h + 32 s + k (h in 0..1, s in 0..3, k in 0..31): its low nibble is in byte
    # 64 h + 32 (s % 2) + k of ql (high nibble when s >= 2), its high 2 bits in byte 32 h + k of qh
    # (bits 2 s and 2 s + 1).
    by_half = q.reshape(n, 2, 4, 32)
    low = by_half & 0x0F
    ql = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(n, 128)
    high = by_half >> 4
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d_bytes], axis=1)
