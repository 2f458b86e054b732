# Changed from the guide: `name` is the app's full module path ('apps.bul_integration'; Django rejects the
# bare 'bul_integration'), and ready() sets the engine on the class, since the guide's view reads
# `BulIntegrationConfig.cache_engine` from the class (an attribute set on `self` is not visible there).
# ruff: noqa
# fmt: off
# (lint and format are off: the code below is kept as the guide writes it)
# apps/bul_integration/apps.py
from django.apps import AppConfig
from bulk.core.ultra_adaptive_kv_cache_engine import (
    UltraAdaptiveKVCacheEngine,
    KVCacheConfig
)

class BulIntegrationConfig(AppConfig):
    default_auto_field = 'django.db.models.BigAutoField'
    name = 'apps.bul_integration'
    
    def ready(self):
        """Inicializar cache engine."""
        from django.conf import settings
        config = KVCacheConfig(**settings.BUL_CACHE_CONFIG)
        BulIntegrationConfig.cache_engine = UltraAdaptiveKVCacheEngine(config)
