"""Configuration of the Celery integration, read from `BUL_*` environment variables.

Two groups: where Celery talks (`CelerySettings`) and which engine a worker builds (`EngineSettings`,
one optional variable per `KVCacheConfig` field: unset means the field's default)."""

from __future__ import annotations

from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict

from bulk.config import KVCacheConfig
from bulk.errors import InvalidConfigError

DEFAULT_REDIS = "redis://localhost:6379/0"


class CelerySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BUL_", extra="ignore")

    broker_url: str = DEFAULT_REDIS  # BUL_BROKER_URL
    result_backend: str = DEFAULT_REDIS  # BUL_RESULT_BACKEND
    # Results (and the "task was sent" markers) are dropped after this many seconds.
    result_expires: int = 86400  # BUL_RESULT_EXPIRES
    # Retry n (0-based) waits a random time in [d/2, d] with d = min(backoff * 2**n, backoff_max).
    retry_backoff: float = 2.0  # BUL_RETRY_BACKOFF
    retry_backoff_max: float = 600.0  # BUL_RETRY_BACKOFF_MAX
    # A worker child loads the model in `worker_process_init`; Celery kills children that take
    # longer than this to start (its default, 4 s, is shorter than most model loads).
    worker_alive_timeout: float = 300.0  # BUL_WORKER_ALIVE_TIMEOUT


class EngineSettings(BaseSettings):
    """`BUL_<FIELD>` for each `KVCacheConfig` field, e.g. `BUL_MODEL`, `BUL_MAX_TOKENS`."""

    model_config = SettingsConfigDict(env_prefix="BUL_", extra="ignore")

    max_tokens: int | None = None
    cache_strategy: str | None = None
    enable_persistence: bool | None = None
    persistence_path: str | None = None
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    block_size: int | None = None
    quantization: str | None = None
    redis_url: str | None = None
    database_url: str | None = None
    response_cache: bool | None = None
    response_cache_size: int | None = None
    response_cache_ttl: float | None = None
    default_max_new_tokens: int | None = None
    max_new_tokens_limit: int | None = None

    def to_config(self) -> KVCacheConfig:
        try:
            return KVCacheConfig(**self.model_dump(exclude_none=True))
        except InvalidConfigError as exc:
            # Name the variable the operator has to fix, not the dataclass field.
            raise InvalidConfigError(f"BUL_{exc.key.upper()}", exc.message) from None


@lru_cache(maxsize=1)
def celery_settings() -> CelerySettings:
    return CelerySettings()


@lru_cache(maxsize=1)
def engine_config() -> KVCacheConfig:
    """The engine configuration workers build, and the API uses to check requests before enqueuing."""
    return EngineSettings().to_config()
