"""The response cache: whole answers to identical deterministic requests, and the guide's
`get_from_cache` / `store_in_cache` key-value API (used by its HTTP middleware).

Values are kept as JSON text or raw bytes (`bulk.storage.values`), never as Python objects: a caller
mutating what it got back cannot change what the next caller gets, and nothing here can ever need pickle."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from json.encoder import encode_basestring
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar

from bulk.engine.result import PER_REQUEST_FIELDS
from bulk.storage.values import decode_value, encode_value

LONG_PROMPT = 1024
_NOT_DERIVED = object()
T = TypeVar("T")


class ResponseCache:
    """A bounded LRU map with a time-to-live, safe to share between threads."""

    def __init__(self, max_entries: int, ttl_seconds: float) -> None:
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        # key -> (expires, stored bytes, what `get_derived` computed from them or _NOT_DERIVED)
        self._entries: OrderedDict[Hashable, tuple[float, bytes, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        data = self._lookup(key)
        return None if data is None else decode_value(data[1])

    def get_derived(self, key: Hashable, derive: Callable[[bytes], T]) -> T | None:
        """`derive(stored bytes)` for the entry at `key` (None when absent), computed once per stored
        entry and kept with it, so a hot entry is not decoded again on every hit. Counts a hit or a
        miss like `get`. `derive` must return immutable data (it is shared by every later caller)
        and must always be the same function for a given key space."""
        entry = self._lookup(key)
        if entry is None:
            return None
        expires, data, derived = entry
        if derived is _NOT_DERIVED:
            derived = derive(data)
            with self._lock:
                if self._entries.get(key) is entry:
                    self._entries[key] = (expires, data, derived)
        return derived

    def _lookup(self, key: Hashable) -> tuple[float, bytes, Any] | None:
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
            return entry

    def put(self, key: Hashable, value: Any, ttl_seconds: float | None = None) -> None:
        if self.max_entries == 0:
            return
        data = encode_value(value)
        expires = time.monotonic() + (self.ttl_seconds if ttl_seconds is None else ttl_seconds)
        with self._lock:
            self._entries[key] = (expires, data, _NOT_DERIVED)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def delete(self, key: Hashable) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        return {"entries": len(self), "hits": self.hits, "misses": self.misses, "size_bytes": self.size_bytes}

    @property
    def size_bytes(self) -> int:
        return sum(len(entry[1]) for entry in list(self._entries.values()))


def request_key(model_fingerprint: str, prompt: str, params: Any) -> Hashable:
    """What makes two requests the same answer: the weights, the prompt and every sampling knob.

    A plain tuple: exact, and hashed by the dict at no extra cost (no digest per request on the hit
    path). A prompt longer than `LONG_PROMPT` characters is kept as its SHA-256 digest, which bounds
    the memory a key holds. Keys live only in this process's memory; they never need to be stable."""
    text: str | bytes = prompt if len(prompt) <= LONG_PROMPT else hashlib.sha256(prompt.encode()).digest()
    return (
        "req",
        model_fingerprint,
        text,
        params.max_new_tokens,
        params.temperature,
        params.top_p,
        params.seed,
        tuple(params.stop),
        # An answer forced past the end of sequence (or to a minimum length) is another answer.
        params.ignore_eos,
        params.min_tokens,
        # The logit changes make other answers (logprobs are never cached: `use_response_cache`).
        params.presence_penalty,
        params.frequency_penalty,
        params.repetition_penalty,
        params.logit_bias,
        params.stop_token_ids,
        params.constraint,
    )


# ---- answers as JSON bytes (`engine.process_request_json`) ------------------------------------------


class StoredAnswer(NamedTuple):
    """A stored engine result, split once (`ResponseCache.get_derived`) for answering hits as JSON:
    its token counts, its fields that do not depend on the request (a read-only view: it is shared by
    every hit; engine results hold only strings, numbers and booleans) and the JSON text of those
    fields, ready to be appended to the per-request ones."""

    prompt_tokens: int
    completion_tokens: int
    fields: Mapping[str, Any]
    tail: bytes

    @classmethod
    def from_stored(cls, data: bytes) -> StoredAnswer:
        stored = decode_value(data)
        fields = MappingProxyType({k: v for k, v in stored.items() if k not in PER_REQUEST_FIELDS})
        text = json_bytes(dict(fields))
        # '{"result":...}' -> ',"result":...}' so that it follows the per-request fields.
        tail = b"," + text[1:] if fields else b"}"
        return cls(stored["prompt_tokens"], stored["completion_tokens"], fields, tail)

    def answer_json(self, latency_ms: float, request_id: str) -> bytes:
        """The answer's JSON: the per-request fields (`PER_REQUEST_FIELDS`, as `answer` sets them), then
        the stored ones. Floats are written as `json` writes them (`repr`). Written out by hand, not
        encoded from `answer`'s dict: this is the hot path of a cached answer (a test checks both
        agree with `RESULT_FIELDS`)."""
        head = (
            f'{{"cache_hit":true,"response_cached":true,"cached_tokens":{self.prompt_tokens},'
            f'"latency":{latency_ms!r},"ttft_ms":{latency_ms!r},'
            f'"request_id":{encode_basestring(request_id)}'
        )
        return head.encode() + self.tail

    def answer(self, latency_ms: float, request_id: str, **extra: Any) -> dict[str, Any]:
        """The same answer as a new dict, plus `extra` (listeners get it with `status="ok"`)."""
        return {
            **self.fields,
            "cache_hit": True,
            "response_cached": True,
            "cached_tokens": self.prompt_tokens,
            "latency": latency_ms,
            "ttft_ms": latency_ms,
            "request_id": request_id,
            **extra,
        }


def json_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON, the encoding of `engine.process_request_json`."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
