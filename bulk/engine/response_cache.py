"""The response cache: whole answers to identical deterministic requests, and the guide's
`get_from_cache` / `store_in_cache` key-value API (used by its HTTP middleware).

Values are kept as JSON text or raw bytes, never as Python objects: a caller mutating what it got
back cannot change what the next caller gets, and nothing here can ever need pickle."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
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


class ResponseCache:
    """A bounded LRU map with a time-to-live, safe to share between threads."""

    def __init__(self, max_entries: int, ttl_seconds: float) -> None:
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Any | None:
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] < now:
                if entry is not None:
                    del self._entries[key]
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            data = entry[1]
        return decode_value(data)

    def put(self, key: str, value: Any, ttl_seconds: float | None = None) -> None:
        if self.max_entries == 0:
            return
        data = encode_value(value)
        expires = time.monotonic() + (self.ttl_seconds if ttl_seconds is None else ttl_seconds)
        with self._lock:
            self._entries[key] = (expires, data)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def delete(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return sum(len(data) for _, data in list(self._entries.values()))


def request_key(model_fingerprint: str, prompt: str, params: Any) -> str:
    """What makes two requests the same answer: the weights, the prompt and every sampling knob."""
    canonical = json.dumps(
        {
            "model": model_fingerprint,
            "prompt": prompt,
            "max_new_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": params.seed,
            "stop": list(params.stop),
        },
        sort_keys=True,
    )
    return "req:" + hashlib.sha256(canonical.encode()).hexdigest()
