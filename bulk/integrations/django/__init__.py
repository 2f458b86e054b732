"""Django integration: add `"bulk.integrations.django"` to `INSTALLED_APPS`, set `BUL_CACHE_CONFIG`
(a dict of `KVCacheConfig` fields) and include `bulk.integrations.django.urls`:

    urlpatterns = [path("", include("bulk.integrations.django.urls"))]  # POST /api/query, GET /api/stats

The app's `ready()` builds one engine (see `apps.BulConfig`); views reach it with `get_engine()`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bulk.engine.engine import UltraAdaptiveKVCacheEngine

APP_LABEL = "bul"


def get_engine() -> UltraAdaptiveKVCacheEngine:
    """The engine built by this app's `ready()`."""
    from django.apps import apps

    engine = apps.get_app_config(APP_LABEL).engine
    if engine is None:
        raise RuntimeError("the BUL app is not ready: is 'bulk.integrations.django' in INSTALLED_APPS?")
    return engine
