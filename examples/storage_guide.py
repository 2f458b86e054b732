# Changed from the guide: its RedisCacheAdapter and PostgresCacheAdapter pickled their values, and anyone
# able to write to Redis or PostgreSQL could then run code in the engine; the package ships both adapters
# (same methods, same `kv_cache:{key}` keys and `cache_entries` table, JSON or bytes values, `clear` by
# SCAN), so they are imported instead of defined. URLs come from BUL_REDIS_URL / BUL_DATABASE_URL.
# ruff: noqa
# fmt: off
import os

from bulk.adapters import PostgresCacheAdapter, RedisCacheAdapter

# Uso con KV Cache Engine
from bulk.core.ultra_adaptive_kv_cache_engine import UltraAdaptiveKVCacheEngine

redis_adapter = RedisCacheAdapter(os.environ.get("BUL_REDIS_URL", "redis://localhost:6379/0"))
# Integrar con engine según necesidad

postgres_adapter = PostgresCacheAdapter(os.environ.get("BUL_DATABASE_URL", "postgresql://postgres@localhost/test"))
