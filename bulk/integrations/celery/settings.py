"""Configuration of the Celery integration, read from `BUL_*` environment variables.

Two groups: where Celery talks (`CelerySettings`) and which engine a worker builds (the shared
`bulk.engine_settings.EngineSettings`: one `BUL_<FIELD>` variable per `KVCacheConfig` field)."""

from __future__ import annotations

from functools import lru_cache

from pydantic_settings import SettingsConfigDict

from bulk.config import KVCacheConfig
from bulk.engine_settings import BulSettings, EngineSettings

DEFAULT_REDIS = "redis://localhost:6379/0"


class CelerySettings(BulSettings):
    model_config = SettingsConfigDict(env_prefix="BUL_", extra="ignore")

    # The Celery broker.
    broker_url: str = DEFAULT_REDIS  # BUL_BROKER_URL
    # Where task results are kept.
    result_backend: str = DEFAULT_REDIS  # BUL_RESULT_BACKEND
    # Results (and the "task was sent" markers) are dropped after this many seconds.
    result_expires: int = 86400  # BUL_RESULT_EXPIRES
    # Retry n (0-based) waits a random time in [d/2, d] with d = min(backoff * 2**n, backoff_max).
    retry_backoff: float = 2.0  # BUL_RETRY_BACKOFF
    retry_backoff_max: float = 600.0  # BUL_RETRY_BACKOFF_MAX
    # A worker child loads the model in `worker_process_init`; Celery kills children that take
    # longer than this to start (its default, 4 s, is shorter than most model loads).
    worker_alive_timeout: float = 300.0  # BUL_WORKER_ALIVE_TIMEOUT


@lru_cache(maxsize=1)
def celery_settings() -> CelerySettings:
    return CelerySettings()


@lru_cache(maxsize=1)
def engine_config() -> KVCacheConfig:
    """The engine configuration workers build, and the API uses to check requests before enqueuing."""
    return EngineSettings().engine_config()
