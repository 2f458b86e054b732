"""The guide's cache adapters: Redis and PostgreSQL as plain key-value caches for JSON data or bytes.

They are thin faces over the storage tiers' backends (`bulk.storage.redis_store`,
`bulk.storage.postgres_store`): one connection setup, one error translation, no pickle. Backend
failures raise `bulk.errors.TierError`."""

from bulk.adapters.postgres import PostgresCacheAdapter
from bulk.adapters.redis import RedisCacheAdapter

__all__ = ["PostgresCacheAdapter", "RedisCacheAdapter"]
