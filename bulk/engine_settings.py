"""`BUL_<FIELD>` environment variables for every `KVCacheConfig` field, shared by every service
(`bul serve`, `bul worker`, `bul grpc`): one variable sets one engine option everywhere.

pydantic-settings lives here, at the service edge; the core only knows the dataclass. The settings
fields are generated from the dataclass (same names, same defaults), so a new engine option is a
`BUL_*` variable at once. Enums are read as their string value, and an empty variable means "not
set" for optional options; the dataclass's own validation then names a bad value, as the variable
the operator has to fix (`BUL_MAX_TOKENS: must be >= 1`)."""

from __future__ import annotations

import dataclasses
import enum
import typing
from typing import Any

from pydantic import ValidationInfo, create_model, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bulk.config import KVCacheConfig
from bulk.errors import InvalidConfigError

ENGINE_FIELDS = tuple(f.name for f in dataclasses.fields(KVCacheConfig))


def engine_fields() -> dict[str, Any]:
    """(type, default) for each `KVCacheConfig` field, as pydantic's `create_model` takes them."""
    hints = typing.get_type_hints(KVCacheConfig)
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(KVCacheConfig):
        kind, default = hints[field.name], field.default
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            kind, default = str, default.value
        fields[field.name] = (kind, default)
    return fields


OPTIONAL_ENGINE_FIELDS = frozenset(
    name for name, (kind, _) in engine_fields().items() if type(None) in typing.get_args(kind)
)


class _EngineBase(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BUL_", extra="ignore")

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object, info: ValidationInfo) -> object:
        return None if value == "" and info.field_name in OPTIONAL_ENGINE_FIELDS else value

    def engine_config(self, **overrides: Any) -> KVCacheConfig:
        """The engine's configuration (flags in `overrides` win); `InvalidConfigError` names the
        `BUL_*` variable of a bad value."""
        values = {name: getattr(self, name) for name in ENGINE_FIELDS}
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return KVCacheConfig(**values)
        except InvalidConfigError as exc:
            raise InvalidConfigError(f"BUL_{exc.key.upper()}", exc.message) from None


EngineSettings = create_model(
    "EngineSettings",
    __base__=_EngineBase,
    __doc__="One `BUL_<FIELD>` variable per `KVCacheConfig` field.",
    **engine_fields(),
)
