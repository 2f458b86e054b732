"""`bul grpc` settings from `BUL_GRPC_*` environment variables; command-line flags override them."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class GrpcSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BUL_GRPC_", extra="ignore", populate_by_name=True)

    host: str = "[::]"
    port: int = Field(default=50051, ge=0, le=65535)
    # BUL_MODEL is shared with the other services, so one variable picks the model everywhere.
    model: str = Field(default="auto", validation_alias=AliasChoices("BUL_GRPC_MODEL", "BUL_MODEL"))
    grace_seconds: float = Field(default=5.0, ge=0.0)
