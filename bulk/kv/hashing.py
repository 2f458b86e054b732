"""Chained block hashes: the identity of a cached KV block.

A block's KV state depends on every token before it, not only on its own tokens, so a block is named
by a chain: digest_i = sha256(digest_{i-1} || tokens of block i), with the first block chained onto a
*namespace* digest that pins the model, block size, dtype and quantization. Two prompts share a block
exactly when they share the whole prefix up to and including it, under the same namespace.

The hashes are stable across processes, machines and restarts (they name blocks on disk and in
shared tiers): sha256 over a fixed byte encoding, never Python's `hash()` and never a random seed.
Only full blocks are hashed; a trailing partial block has no identity yet.
"""

from __future__ import annotations

import hashlib
import operator
import struct
from collections.abc import Sequence
from typing import Any

# Bump when the encoding below changes: old digests must not alias new ones.
_NAMESPACE_VERSION = b"bul-kv-v1"
TOKEN_ID_LIMIT = 2**32
DIGEST_SIZE = 32


def _field(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def namespace_digest(model_fingerprint: str, block_size: int, dtype: str, quantization: str) -> bytes:
    """The root of every chain for one model configuration: sha256 over a versioned, length-prefixed
    encoding of the four fields, so no two different configurations can encode alike."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    for name, value in (
        ("model_fingerprint", model_fingerprint),
        ("dtype", dtype),
        ("quantization", quantization),
    ):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
    encoded = (
        _field(_NAMESPACE_VERSION)
        + _field(model_fingerprint.encode("utf-8"))
        + _field(struct.pack("<Q", block_size))
        + _field(dtype.encode("utf-8"))
        + _field(quantization.encode("utf-8"))
    )
    return hashlib.sha256(encoded).digest()


def _pack_tokens(tokens: Sequence[int]) -> bytes:
    try:
        return struct.pack(f"<{len(tokens)}I", *tokens)
    except (struct.error, TypeError):
        bad = next((t for t in tokens if not _is_token(t)), None)
        raise ValueError(f"token ids must be integers in [0, 2**32), got {bad!r}") from None


def _is_token(value: Any) -> bool:
    try:
        index = operator.index(value)
    except TypeError:
        return False
    return 0 <= index < TOKEN_ID_LIMIT


def chain_hashes(
    token_ids: Sequence[int], block_size: int, namespace: bytes, parent: bytes | None = None
) -> list[bytes]:
    """One 32-byte digest per full block of `token_ids`, in order. The first block chains onto
    `parent` when given (to continue a chain whose earlier blocks were hashed before), else onto
    `namespace`. Every token id, including those of a trailing partial block, must be an integer in
    [0, 2**32); ValueError otherwise."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if not isinstance(namespace, bytes | bytearray):
        raise ValueError("namespace must be bytes")
    if parent is not None and not isinstance(parent, bytes | bytearray):
        raise ValueError("parent must be bytes or None")
    packed = _pack_tokens(token_ids)
    previous = bytes(parent if parent is not None else namespace)
    stride = 4 * block_size
    digests: list[bytes] = []
    for start in range(0, (len(token_ids) // block_size) * stride, stride):
        previous = hashlib.sha256(previous + packed[start : start + stride]).digest()
        digests.append(previous)
    return digests
