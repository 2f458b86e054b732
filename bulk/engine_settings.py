"""`BUL_*` environment variables: the one generator of every service's settings.

Every service (`bul serve`, `bul worker`, `bul grpc`, `bul cluster`) reads its options with a
`BulSettings` subclass, and every engine option with one field per `KVCacheConfig` field,
generated from the dataclass (same names, same defaults) by `with_engine_fields`, so a new engine
option is a `BUL_*` variable at once, everywhere. pydantic-settings lives here, at the service edge;
the core only knows the dataclass.

One rule for values: an empty variable means "not set" for an optional option; enums are read as
their string value; and a bad value, whoever checks it (pydantic or the dataclass), raises
`InvalidConfigError` naming the variable the operator has to fix (`BUL_MAX_TOKENS: must be >= 1`).
docs/settings.md lists every variable (`make settings-doc`, `python -m bulk.cli.settings_doc`, writes it
from these classes)."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any

from pydantic import AliasChoices, SecretStr, ValidationError, ValidationInfo, create_model, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bulk.config import KVCacheConfig, Secret
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
        elif Secret in typing.get_args(kind):
            # pydantic's own secret type: masked in the settings' repr and dumps as the config's
            # `Secret` is; `KVCacheConfig` unwraps it (`get_secret_value`).
            kind = SecretStr | None
        fields[field.name] = (kind, default)
    return fields


def _optional(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation) or annotation is types.NoneType


class BulSettings(BaseSettings):
    """Base of every BUL settings class (`BUL_` prefix unless a subclass sets its own)."""

    model_config = SettingsConfigDict(env_prefix="BUL_", extra="ignore")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = str(error["loc"][0]) if error.get("loc") else ""
            raise InvalidConfigError(self.env_name(name), str(error.get("msg", "invalid value"))) from None

    @classmethod
    def env_name(cls, name: str) -> str:
        """The environment variable of field `name` (its first alias when it has several)."""
        field = cls.model_fields.get(name)
        if field is None:
            return name
        alias = field.validation_alias
        if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
            return alias.choices[0]
        if isinstance(alias, str):
            return alias
        return f"{cls.model_config.get('env_prefix', '')}{name}".upper()

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object, info: ValidationInfo) -> object:
        # BUL_REDIS_URL= (empty) means "not set" for every optional option.
        if value == "" and info.field_name is not None:
            field = cls.model_fields.get(info.field_name)
            if field is not None and _optional(field.annotation):
                return None
        return value


class EngineOptions(BulSettings):
    """Settings that build an engine: `with_engine_fields` adds one field per `KVCacheConfig` field."""

    def engine_config(self, **overrides: Any) -> KVCacheConfig:
        """The engine's configuration (flags in `overrides` win); `InvalidConfigError` names the
        `BUL_*` variable of a bad value."""
        values = {name: getattr(self, name) for name in ENGINE_FIELDS}
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return KVCacheConfig(**values)
        except InvalidConfigError as exc:
            raise InvalidConfigError(self.env_name(exc.key), exc.message) from None


def with_engine_fields(name: str, base: type[EngineOptions], doc: str) -> Any:
    """`base` plus one field per `KVCacheConfig` field: the settings class a service reads."""
    return create_model(name, __base__=base, __doc__=doc, __module__=base.__module__, **engine_fields())


EngineSettings = with_engine_fields(
    "EngineSettings", EngineOptions, "One `BUL_<FIELD>` variable per `KVCacheConfig` field."
)
