"""The public surface is pinned: changing it is a decision, not an accident."""

from __future__ import annotations

import subprocess
import sys

import bulk


def test_all_is_pinned():
    assert sorted(bulk.__all__) == [
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
    for name in bulk.__all__:
        assert getattr(bulk, name) is not None


def test_the_guides_import_path():
    from bulk.core.ultra_adaptive_kv_cache_engine import (
        CacheStrategy,
        KVCacheConfig,
        UltraAdaptiveKVCacheEngine,
    )

    assert UltraAdaptiveKVCacheEngine is bulk.UltraAdaptiveKVCacheEngine
    assert KVCacheConfig is bulk.KVCacheConfig and CacheStrategy is bulk.CacheStrategy


def _loaded_after(statement: str, modules: tuple[str, ...]) -> str:
    code = f"import sys; {statement}; print(sorted(m for m in {modules!r} if m in sys.modules))"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


WEB = ("fastapi", "starlette", "flask", "django", "celery", "grpc", "ray")


def test_importing_the_config_does_not_load_torch_or_web_frameworks():
    assert _loaded_after("import bulk, bulk.config", ("torch", *WEB)) == "[]"


def test_engine_core_imports_no_web_framework():
    assert _loaded_after("import bulk.engine.engine", WEB) == "[]"


def test_routing_and_the_serving_interface_import_no_cluster_or_web_framework():
    modules = "bulk.engine.protocol, bulk.routing.policy, bulk.routing.chains, bulk.routing.cluster_stats"
    assert _loaded_after(f"import {modules}", WEB) == "[]"


def test_storage_clients_load_only_when_configured():
    backends = ("redis", "sqlalchemy", "psycopg")
    assert _loaded_after("import bulk.engine.engine, bulk.storage.factory", backends) == "[]"
    configured = (
        "from bulk.config import KVCacheConfig; from bulk.storage.factory import build_lower_tiers; "
        "build_lower_tiers(KVCacheConfig(redis_url='redis://127.0.0.1:1/0', cache_secret='test')).close()"
    )
    assert _loaded_after(configured, backends) == "['redis']"
