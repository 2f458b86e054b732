"""The import path the BUL integration guide uses; the code lives in `bulk.engine` and `bulk.config`."""

from bulk.config import CacheStrategy, KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.errors import BulError, InvalidRequestError, PromptTooLongError

__all__ = [
    "BulError",
    "CacheStrategy",
    "InvalidRequestError",
    "KVCacheConfig",
    "PromptTooLongError",
    "UltraAdaptiveKVCacheEngine",
]
