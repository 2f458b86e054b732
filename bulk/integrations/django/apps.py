"""The app config: one engine per process, built in `ready()` from `settings.BUL_CACHE_CONFIG`.

`ready()` may run more than once (test runners, some autoreloaders): only the first call builds. The
model loads on the first request, so `manage.py` commands stay fast; set `BUL_WARMUP = True` to load
and warm it in `ready()` instead (servers that should answer their first request quickly)."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from django.apps import AppConfig

from bulk.integrations.django import APP_LABEL

if TYPE_CHECKING:
    from bulk.engine.engine import UltraAdaptiveKVCacheEngine

log = logging.getLogger(__name__)


class BulConfig(AppConfig):
    name = "bulk.integrations.django"
    label = APP_LABEL
    verbose_name = "BUL KV"
    default_auto_field = "django.db.models.BigAutoField"

    engine: UltraAdaptiveKVCacheEngine | None = None
    _build_lock = threading.Lock()

    def ready(self) -> None:
        with self._build_lock:
            if self.engine is not None:
                return
            from django.conf import settings

            from bulk.config import KVCacheConfig
            from bulk.engine.engine import UltraAdaptiveKVCacheEngine

            config = KVCacheConfig(**_cache_config(getattr(settings, "BUL_CACHE_CONFIG", None)))
            self.engine = UltraAdaptiveKVCacheEngine(config)
            log.info("BUL engine built (model %s)", config.model)
            if getattr(settings, "BUL_WARMUP", False):
                self.engine.warmup_sync()


def _cache_config(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"settings.BUL_CACHE_CONFIG must be a dict, got {type(value).__name__}")
    return value
