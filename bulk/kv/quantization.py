"""Quantization of stored KV blocks: int8 and int4, asymmetric (a scale and a minimum per group).

Following KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"):
keys are quantized per channel (each channel's values over the block's tokens share a scale),
values per token (each token's channels, in groups of `VALUE_GROUP`, share one). Keys carry a few
outlier channels of large magnitude; per-token groups would let those channels set every token's
scale and flatten the rest. Values have no such channels, and their error is averaged by attention.

Scales and minimums are float16: at 16-token key groups and 32-channel value groups they add about
0.19 bytes per element, so a float32 block shrinks 3.4x under int8 and 6x under int4.

Blocks are quantized when stored and dequantized when a request reuses them; the model always
computes in its own dtype. A codec (`BlockCodec`: `PlainCodec`, or `KIVICodec` at 8 or 4 bits) is a
transform the engine hands to the prefix cache (`codec(config.quantization)`); the prefix cache only
calls it, and the attention code never sees it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

VALUE_GROUP = 32  # channels per value group, or the largest divisor of head_dim below it
SCALE_DTYPE = torch.float16
BITS = {"int8": 8, "int4": 4}

Parts = dict[str, torch.Tensor]


class BlockCodec(Protocol):
    """Blocks <-> the named tensors stored for them. `name` is the `quantization` setting it stands
    for: recorded in every stored block and in the hash namespace, so blocks of two codecs never mix."""

    @property
    def name(self) -> str: ...

    def encode(self, block: torch.Tensor) -> Parts:
        """`block`: (layers, 2, kv_heads, block, head_dim). Returns named tensors to store."""
        ...

    def decode(self, parts: Parts, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """Rebuild a (layers, 2, kv_heads, block, head_dim) block in `dtype` from `encode`'s parts."""
        ...

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise ValueError when a block of `shape` cannot be stored this way."""
        ...


class PlainCodec:
    """Blocks stored as they are (`quantization="none"`)."""

    name = "none"

    def encode(self, block: torch.Tensor) -> Parts:
        return {"kv": block}

    def decode(self, parts: Parts, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return parts["kv"]

    def check_shape(self, shape: tuple[int, ...]) -> None:
        pass


@dataclass(frozen=True)
class KIVICodec:
    """KIVI's asymmetric quantization (the module docstring) at `bits` 8 or 4."""

    bits: int

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def encode(self, block: torch.Tensor) -> Parts:
        return _quantize(block, self.bits)

    def decode(self, parts: Parts, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return _dequantize(parts, self.bits, dtype, shape)

    def check_shape(self, shape: tuple[int, ...]) -> None:
        head_dim = shape[-1]
        if head_dim % 2:  # int4 packs channel pairs; every model we know has an even head_dim
            raise ValueError(f"head_dim {head_dim} is odd: blocks cannot be quantized")


CODECS: dict[str, BlockCodec] = {
    "none": PlainCodec(),
    **{name: KIVICodec(bits) for name, bits in BITS.items()},
}


def codec(quantization: str) -> BlockCodec:
    """The codec of a `quantization` setting ("none", "int8", "int4")."""
    return CODECS[quantization]


def quantize(block: torch.Tensor, quantization: str) -> Parts:
    """`codec(quantization).encode(block)`."""
    return CODECS[quantization].encode(block)


def dequantize(parts: Parts, quantization: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """`codec(quantization).decode(parts, dtype, shape)`."""
    return CODECS[quantization].decode(parts, dtype, shape)


def _quantize(block: torch.Tensor, bits: int) -> Parts:
    keys, values = block[:, 0].float(), block[:, 1].float()  # (layers, kv_heads, block, head_dim)
    k_q, k_scale, k_min = _quantize_groups(keys, dim=2, bits=bits)  # per channel, over tokens
    grouped = _value_groups(values)  # (layers, kv_heads, block, head_dim // G, G)
    v_q, v_scale, v_min = _quantize_groups(grouped, dim=4, bits=bits)  # per token, over channels
    return {
        "k_q": _pack(k_q, bits),
        "k_scale": k_scale,
        "k_min": k_min,
        "v_q": _pack(v_q, bits),
        "v_scale": v_scale,
        "v_min": v_min,
    }


def _dequantize(parts: Parts, bits: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    layers, _, heads, tokens, head_dim = shape
    group = value_group(head_dim)
    k_q = _unpack(parts["k_q"], bits, (layers, heads, tokens, head_dim))
    v_q = _unpack(parts["v_q"], bits, (layers, heads, tokens, head_dim // group, group))
    keys = k_q.float() * parts["k_scale"].float() + parts["k_min"].float()
    values = (v_q.float() * parts["v_scale"].float() + parts["v_min"].float()).reshape(
        layers, heads, tokens, head_dim
    )
    return torch.stack((keys, values), dim=1).to(dtype)


def value_group(head_dim: int) -> int:
    """Channels per value group: 32 when it divides head_dim (64, 128, 96...), else a divisor (80: 16)."""
    return math.gcd(VALUE_GROUP, head_dim)


def _value_groups(values: torch.Tensor) -> torch.Tensor:
    layers, heads, tokens, head_dim = values.shape
    group = value_group(head_dim)
    return values.reshape(layers, heads, tokens, head_dim // group, group)


def _quantize_groups(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    levels = (1 << bits) - 1
    low = x.amin(dim=dim, keepdim=True)
    high = x.amax(dim=dim, keepdim=True)
    # Round the scale and minimum to their stored dtype first, so that quantizing and dequantizing
    # use the same numbers.
    scale = ((high - low) / levels).clamp_min(1e-8).to(SCALE_DTYPE)
    low = low.to(SCALE_DTYPE)
    q = torch.round((x - low.float()) / scale.float()).clamp_(0, levels).to(torch.uint8)
    return q, scale, low


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int4: two values per byte along the last dimension (low nibble first)."""
    if bits == 8:
        return q
    return q[..., 0::2] | (q[..., 1::2] << 4)


def _unpack(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    if bits == 8:
        return packed.reshape(shape)
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(shape)
