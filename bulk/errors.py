"""Every error the engine raises on purpose. Integrations translate these at their boundary
(HTTP 422, gRPC INVALID_ARGUMENT, ...); anything else reaching a boundary is a bug."""

from __future__ import annotations


class BulError(Exception):
    """Base of all BUL KV errors."""


class InvalidConfigError(BulError, ValueError):
    """A `KVCacheConfig` key is unknown or has a bad value. `key` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class InvalidRequestError(BulError, ValueError):
    """A request is malformed. `field` names the offending field (dotted for nested ones)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class PromptTooLongError(InvalidRequestError):
    """The prompt plus the requested new tokens do not fit in the model's context window."""


class ModelLoadError(BulError):
    """The configured model could not be loaded."""


class EngineClosedError(BulError):
    """The engine was shut down; it accepts no more requests."""


class CorruptBlockError(BulError):
    """A stored KV block failed its integrity check or does not parse; it is dropped, never used."""


class TierError(BulError):
    """A storage tier (disk, Redis, PostgreSQL) failed or timed out. Raised inside the storage layer
    only: the tiered store counts it and serves without that tier."""
