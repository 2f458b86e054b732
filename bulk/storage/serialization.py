"""The byte format of a stored KV block: a typed header, the raw tensor bytes, an integrity tag.

    b"BULKV" | version (1 byte) | header length (4 bytes, little-endian) | header (JSON)
    | tensor bytes, in header order | tag (32 bytes)

The header names the format version, the block's dtype, shape and quantization, its token ids
(compared with the request's tokens on every hit: a collision guard that does not rely on the hash
alone) and, per stored tensor, its name, dtype and shape. The tag covers the block's key, header and
bytes: HMAC-SHA256 under the cache secret when one is configured, a plain SHA-256 otherwise. Binding
the key means a valid entry copied to another key is refused as well.

Nothing here can run code: the header is JSON checked field by field, the tensors are rebuilt with
`torch.frombuffer` from a whitelist of dtypes. Anyone able to write to Redis, PostgreSQL or the
persistence directory can at worst make us recompute. No pickle.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
from dataclasses import dataclass

import torch

from bulk.errors import CorruptBlockError

MAGIC = b"BULKV"
FORMAT_VERSION = 1
TAG_SIZE = 32
_PREFIX = struct.Struct("<5sBI")
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
}
_MAX_HEADER = 1 << 20


@dataclass(frozen=True)
class BlockRecord:
    """One cached block as stored: its tokens and the tensors that encode its KV."""

    tokens: tuple[int, ...]
    quantization: str
    dtype: str  # the model's dtype, which the block is decoded to
    shape: tuple[int, ...]  # (layers, 2, kv_heads, block, head_dim)
    parts: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.parts.values())


def dumps(key: bytes, record: BlockRecord, secret: bytes | None) -> bytes:
    header = {
        "format": FORMAT_VERSION,
        "quantization": record.quantization,
        "dtype": record.dtype,
        "shape": list(record.shape),
        "tokens": list(record.tokens),
        "parts": [[name, _dtype_name(t.dtype), list(t.shape)] for name, t in record.parts.items()],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    body = b"".join(_raw_bytes(t) for t in record.parts.values())
    data = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)) + head + body
    return data + _tag(key, data, secret)


def loads(key: bytes, data: bytes, secret: bytes | None) -> BlockRecord:
    """Parse and verify; any defect raises CorruptBlockError."""
    view = memoryview(data)
    if len(view) < _PREFIX.size + TAG_SIZE:
        raise CorruptBlockError("block too short")
    magic, version, head_len = _PREFIX.unpack_from(view)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise CorruptBlockError(f"unknown block format {magic!r} v{version}")
    if not hmac.compare_digest(bytes(view[-TAG_SIZE:]), _tag(key, view[:-TAG_SIZE], secret)):
        raise CorruptBlockError("integrity tag mismatch")
    if head_len > _MAX_HEADER or _PREFIX.size + head_len > len(view) - TAG_SIZE:
        raise CorruptBlockError("bad header length")
    try:
        header = json.loads(bytes(view[_PREFIX.size : _PREFIX.size + head_len]))
        return _record(header, view[_PREFIX.size + head_len : -TAG_SIZE])
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptBlockError(f"malformed block: {exc}") from None


def _record(header: dict, body: memoryview) -> BlockRecord:
    if header["format"] != FORMAT_VERSION or header["dtype"] not in _DTYPES:
        raise ValueError("bad format or dtype")
    layout = []
    offset = 0
    for name, dtype_name, shape in header["parts"]:
        dtype = _DTYPES[dtype_name]
        if not isinstance(name, str) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError("bad part")
        size = math.prod(shape) * dtype.itemsize
        layout.append((name, dtype, shape, offset, size))
        offset += size
    if offset != len(body):
        raise ValueError("part sizes do not match the block's length")
    # One copy of the body into memory torch may own (the stored bytes are read-only); every part
    # is a view into it.
    buffer = torch.frombuffer(bytearray(body) or bytearray(1), dtype=torch.uint8)  # frombuffer needs 1 byte
    parts = {}
    for name, dtype, shape, start, size in layout:
        raw = buffer[start : start + size]
        if start % dtype.itemsize:  # a view must start on an element boundary
            raw = raw.clone()
        parts[name] = raw.view(dtype).reshape(shape)
    tokens = tuple(header["tokens"])
    if not all(isinstance(t, int) for t in tokens):
        raise ValueError("bad tokens")
    return BlockRecord(
        tokens=tokens,
        quantization=str(header["quantization"]),
        dtype=header["dtype"],
        shape=tuple(int(d) for d in header["shape"]),
        parts=parts,
    )


def _tag(key: bytes, data: bytes | memoryview, secret: bytes | None) -> bytes:
    message = struct.pack("<I", len(key)) + key
    if secret:
        mac = hmac.new(secret, message, hashlib.sha256)
        mac.update(data)
        return mac.digest()
    digest = hashlib.sha256(message)
    digest.update(data)
    return digest.digest()


def _raw_bytes(t: torch.Tensor) -> bytes:
    # Through uint8 so that bfloat16, which NumPy lacks, serializes too.
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"cannot store tensors of dtype {name}")
    return name
