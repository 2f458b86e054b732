"""BUL KV: an LLM serving engine built around an adaptive, multi-tier KV prefix cache.

The public surface is `__all__`. The engine is imported lazily, so `import bulk` (and reading its
configuration) does not load torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bulk.config import CacheStrategy, KVCacheConfig
from bulk.errors import (
    BulError,
    CorruptBlockError,
    EngineClosedError,
    InvalidConfigError,
    InvalidRequestError,
    ModelLoadError,
    PromptTooLongError,
    TierError,
)

if TYPE_CHECKING:
    from bulk.engine.engine import UltraAdaptiveKVCacheEngine

__version__ = "0.1.0"

__all__ = [
    "BulError",
    "CacheStrategy",
    "CorruptBlockError",
    "EngineClosedError",
    "InvalidConfigError",
    "InvalidRequestError",
    "KVCacheConfig",
    "ModelLoadError",
    "PromptTooLongError",
    "TierError",
    "UltraAdaptiveKVCacheEngine",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "UltraAdaptiveKVCacheEngine":
        from bulk.engine.engine import UltraAdaptiveKVCacheEngine

        return UltraAdaptiveKVCacheEngine
    raise AttributeError(f"module 'bulk' has no attribute {name!r}")
