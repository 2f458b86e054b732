"""Redis as a key-value store: the Redis KV tier and the guide's `RedisCacheAdapter` are both this
class with different key prefixes, so connection handling, timeouts and error translation exist once.

Every key lives under a prefix (`bul:kv:v1:` for blocks: versioned, so a new block format never
reads an old one), expires after `ttl` seconds, and has its TTL refreshed when read. Batched reads
and writes are pipelined: one round trip for a whole prefix. Any redis-py error becomes `TierError`
here; the client does not retry by itself (a dead server must cost one failed call, not a
back-off loop on the request path; the tiered store owns retrying).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from bulk.errors import TierError
from bulk.storage.base import BlockStore

BLOCK_PREFIX = "bul:kv:v1:"
_SCAN_BATCH = 500


@contextlib.contextmanager
def _translate_errors() -> Iterator[None]:
    try:
        yield
    except redis.RedisError as exc:
        raise TierError(f"redis: {type(exc).__name__}: {exc}") from exc


def connect(url: str, timeout: float, on_connect: Callable[[], None] | None = None) -> redis.Redis:
    """A client that fails fast; `on_connect` is called for every connection it opens."""

    def opened(connection: redis.connection.AbstractConnection) -> None:
        connection.on_connect()  # what redis-py does when no function is given
        if on_connect is not None:
            on_connect()

    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
        redis_connect_func=opened,
    )


class RedisStore(BlockStore[bytes]):
    name = "redis"

    def __init__(self, url: str, *, prefix: str = BLOCK_PREFIX, ttl: int | None = None, timeout: float = 0.5):
        self.prefix = prefix
        self.ttl = ttl
        # redis-py replaces a dead connection by itself, so a Redis restarted empty between two calls
        # never shows up as a failed call: a new connection is the only sign that it may have been.
        self.connections_opened = 0
        self.client = connect(url, timeout, self._opened)

    def _opened(self) -> None:
        self.connections_opened += 1

    def _key(self, key: bytes | str) -> str:
        return self.prefix + (key.hex() if isinstance(key, bytes) else key)

    def contains(self, key: bytes | str) -> bool:
        with _translate_errors():
            return bool(self.client.exists(self._key(key)))

    def get(self, key: bytes | str) -> bytes | None:
        return self.get_many([key])[0]

    def put(self, key: bytes | str, value: bytes, ttl: int | None = None) -> None:
        with _translate_errors():
            self.client.set(self._key(key), value, ex=ttl or self.ttl)

    def delete(self, key: bytes | str) -> None:
        with _translate_errors():
            self.client.delete(self._key(key))

    def clear(self) -> None:
        """Delete every key under the prefix, walking with SCAN (KEYS would block the server)."""
        with _translate_errors():
            batch: list[bytes] = []
            for key in self.client.scan_iter(match=self.prefix + "*", count=_SCAN_BATCH):
                batch.append(key)
                if len(batch) >= _SCAN_BATCH:
                    self.client.unlink(*batch)
                    batch.clear()
            if batch:
                self.client.unlink(*batch)

    def close(self) -> None:
        self.client.close()

    def get_many(self, keys: Sequence[bytes | str]) -> list[bytes | None]:
        if not keys:
            return []
        with _translate_errors():
            if self.ttl is None:
                # Values come back as bytes: the client does not decode responses.
                return cast("list[bytes | None]", self.client.mget([self._key(k) for k in keys]))
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.getex(self._key(key), ex=self.ttl)
            return pipe.execute()

    def put_many(self, items: Iterable[tuple[bytes | str, bytes]]) -> None:
        with _translate_errors():
            pipe = self.client.pipeline(transaction=False)
            for key, value in items:
                pipe.set(self._key(key), value, ex=self.ttl)
            pipe.execute()

    def sizes(self, keys: Sequence[bytes | str]) -> list[int | None]:
        """The stored length of each key, None where absent: one pipelined round trip, and unlike a
        read it leaves the TTL alone. A stored value is never empty, so STRLEN's 0 means absent."""
        if not keys:
            return []
        with _translate_errors():
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.strlen(self._key(key))
            return [size or None for size in pipe.execute()]

    def ping(self) -> bool:
        with _translate_errors():
            return bool(self.client.ping())
