"""Every option of `bul serve`, read from `BUL_*` environment variables (and `--flags`, which win).

The server's own options sit beside one field per `KVCacheConfig` field, with the same name and
default (generated from the dataclass, so they never drift), so any engine option can be set as
`BUL_<FIELD>` (`BUL_MAX_TOKENS=16384`, `BUL_CACHE_STRATEGY=lru`). `engine_config()` turns them into
the engine's validated dataclass."""

from __future__ import annotations

import dataclasses
import enum
import typing
from typing import Annotated, Any

from pydantic import Field, ValidationInfo, create_model, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bulk.config import KVCacheConfig
from bulk.models.registry import AUTO, resolve_model_name


class ServerOptions(BaseSettings):
    """The server's own options; `ServerSettings` adds one field per engine option."""

    model_config = SettingsConfigDict(env_prefix="BUL_", extra="ignore", validate_default=True)

    # ---- the HTTP server -----------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8002, ge=0, le=65535)
    log_level: str = "info"
    access_log: bool = True
    # Name shown by /v1/models and echoed in OpenAI answers; defaults to `model`.
    served_model_name: str | None = None

    # ---- protection ------------------------------------------------------------------------------
    # Comma-separated bearer keys. Empty: no authentication (the default, for local use).
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Requests per minute per key (per client address when no keys are set); 0 turns it off.
    rate_limit_per_minute: int = Field(0, ge=0)
    # Requests a key may send at once before the per-minute rate applies.
    rate_limit_burst: int = Field(20, ge=1)
    # With API keys on: requests without a valid key, per client address (429 past it, not 401), so
    # that a flood of them is slowed like any other; 0 turns it off. A valid key is never refused by it.
    unauthenticated_rate_limit_per_minute: int = Field(60, ge=0)
    unauthenticated_rate_limit_burst: int = Field(20, ge=1)
    max_body_bytes: int = Field(1_048_576, ge=1024)
    max_query_chars: int = Field(100_000, ge=1)
    min_priority: int = -1000
    max_priority: int = 1000
    # Queries per POST /api/batch (the engine's own `max_batch_size` bounds requests decoded at once).
    max_batch_queries: int = Field(256, ge=1)
    # Batch tasks kept for /api/task/{id}; the oldest finished ones are forgotten first.
    task_registry_size: int = Field(10_000, ge=1)

    # ---- optional parts --------------------------------------------------------------------------
    # The integration guide's CacheMiddleware: whole HTTP answers keyed by method, path and body hash.
    cache_middleware: bool = False
    cache_middleware_ttl: float = Field(300.0, gt=0)
    # Serve POST /api/process and Celery task status (needs `bul worker` and the celery extra).
    celery: bool = False

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object, info: ValidationInfo) -> object:
        # BUL_REDIS_URL= (empty) means "not set" for every optional option.
        return None if value == "" and info.field_name in _OPTIONAL else value

    def engine_config(self) -> KVCacheConfig:
        """The engine's configuration; raises `InvalidConfigError` naming a bad key."""
        return KVCacheConfig(**{name: getattr(self, name) for name in ENGINE_FIELDS})

    @property
    def model_name(self) -> str:
        # `auto` is shown as what it resolves to (the real model when installed, else `demo`).
        return self.served_model_name or resolve_model_name(getattr(self, "model", AUTO))


def _engine_fields() -> dict[str, Any]:
    """One settings field per `KVCacheConfig` field, same name and default, built from the dataclass
    so that a new engine option is a `BUL_*` variable at once. Enums are read as their string value;
    the engine's own validation then names a bad one."""
    hints = typing.get_type_hints(KVCacheConfig)
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(KVCacheConfig):
        kind = hints[field.name]
        default = field.default
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            kind, default = str, default.value
        fields[field.name] = (kind, default)
    return fields


ENGINE_FIELDS = tuple(f.name for f in dataclasses.fields(KVCacheConfig))
_OPTIONAL = frozenset(
    name for name, (kind, _) in _engine_fields().items() if type(None) in typing.get_args(kind)
) | {"served_model_name"}

ServerSettings = create_model(
    "ServerSettings",
    __base__=ServerOptions,
    __doc__="Every `bul serve` option: the server's own and one per `KVCacheConfig` field (`BUL_<NAME>`).",
    **_engine_fields(),
)
