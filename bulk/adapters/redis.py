"""`RedisCacheAdapter`, as the guide uses it: `get`, `set(key, value, ttl=3600)`, `delete`, `clear`,
keys `kv_cache:{key}`. Values are JSON data or bytes, tagged so each comes back as it went in;
`clear` walks the prefix with SCAN rather than KEYS, which would block the server."""

from __future__ import annotations

from typing import Any

from bulk.storage.redis_store import RedisStore
from bulk.storage.values import decode_value, encode_value

PREFIX = "kv_cache:"


class RedisCacheAdapter:
    def __init__(self, redis_url: str = "redis://localhost:6379/0", *, timeout: float = 5.0) -> None:
        self._store = RedisStore(redis_url, prefix=PREFIX, ttl=None, timeout=timeout)
        self.redis_client = self._store.client  # the guide's attribute, for direct access

    def get(self, key: str) -> Any | None:
        data = self._store.get(key)
        return None if data is None else decode_value(data)

    def set(self, key: str, value: Any, ttl: int = 3600) -> None:
        self._store.put(key, encode_value(value), ttl=ttl)

    def delete(self, key: str) -> None:
        self._store.delete(key)

    def clear(self) -> None:
        self._store.clear()

    def close(self) -> None:
        self._store.close()
