"""The value codec of the key-value caches: the response cache's entries and the guide's Redis and
PostgreSQL adapters. A value is JSON data or raw bytes, tagged by one leading byte so each comes back
as it went in; never a Python object, so a caller mutating what it got back cannot change what the
next caller gets, and nothing here can ever need pickle."""

from __future__ import annotations

import json
from typing import Any

_JSON, _BYTES = b"j", b"b"


def encode_value(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return _BYTES + bytes(value)
    try:
        return _JSON + json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cache values must be bytes or JSON-serializable data: {exc}") from None


def decode_value(data: bytes) -> Any:
    kind, payload = data[:1], data[1:]
    return payload if kind == _BYTES else json.loads(payload)
