"""`bul grpc` settings from `BUL_GRPC_*` environment variables; command-line flags override them."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from bulk.engine_settings import BulSettings


class GrpcSettings(BulSettings):
    model_config = SettingsConfigDict(env_prefix="BUL_GRPC_", extra="ignore", populate_by_name=True)

    # The interface to bind.
    host: str = "[::]"
    # The port to bind (0: any free one).
    port: int = Field(default=50051, ge=0, le=65535)
    # The model; without this variable, BUL_MODEL, shared with the other services, so that one variable
    # picks the model everywhere.
    model: str = Field(default="auto", validation_alias=AliasChoices("BUL_GRPC_MODEL", "BUL_MODEL"))
    # On SIGTERM/SIGINT, how long calls in flight may finish.
    grace_seconds: float = Field(default=5.0, ge=0.0)
