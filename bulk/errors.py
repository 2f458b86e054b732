"""Every error the engine raises on purpose. Integrations translate these at their boundary
(HTTP 422, gRPC INVALID_ARGUMENT, ...); anything else reaching a boundary is a bug."""

from __future__ import annotations

from typing import Any


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


# ---- errors as data, across a process boundary ------------------------------------------------
# A replica of a cluster (`bulk.cluster.app`) answers a failed request with the error's
# class name, field and message, never a pickled exception; the caller raises the same class again, so
# an `InvalidRequestError` raised on a replica is the same 422 at the ingress as in `bul serve`.

_BY_NAME: dict[str, type[BulError]] = {
    cls.__name__: cls
    for cls in (
        BulError,
        InvalidConfigError,
        InvalidRequestError,
        PromptTooLongError,
        ModelLoadError,
        EngineClosedError,
        CorruptBlockError,
        TierError,
    )
}


class RemoteError(Exception):
    """An unexpected error (a bug, not one of ours) on the other side of a process boundary: only its
    class name crosses (`type`); the servers answer it as any bug, a 500."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name


def error_data(exc: BaseException) -> dict[str, str | None]:
    """`exc` as plain data: `{"type", "field", "message"}` (JSON-ready). One of our errors keeps its
    message; any other exception is only named (its text may hold anything)."""
    if isinstance(exc, InvalidRequestError):
        return {"type": type(exc).__name__, "field": exc.field, "message": exc.message}
    if isinstance(exc, InvalidConfigError):
        return {"type": type(exc).__name__, "field": exc.key, "message": exc.message}
    if type(exc).__name__ in _BY_NAME and isinstance(exc, BulError):
        return {"type": type(exc).__name__, "field": None, "message": str(exc)}
    return {"type": "RemoteError", "field": None, "message": type(exc).__name__}


def error_from_data(data: dict[str, object]) -> Exception:
    """The exception `error_data` described: the same class for ours, `RemoteError` otherwise."""
    name, field, message = data.get("type"), data.get("field"), data.get("message")
    message = message if isinstance(message, str) else ""
    cls = _BY_NAME.get(name) if isinstance(name, str) else None
    if cls is not None and issubclass(cls, InvalidRequestError):
        return cls(field if isinstance(field, str) else "query", message)
    if cls is InvalidConfigError:
        return InvalidConfigError(field if isinstance(field, str) else "config", message)
    if cls is not None:
        return cls(message)
    return RemoteError(message or "Exception", "")


# ---- errors as HTTP answers -----------------------------------------------------------------------
# One body for every HTTP face (FastAPI, Flask, Django, the ASGI middlewares), so a client parses an
# error the same way whichever one it talks to: FastAPI's `detail` list (what `bul serve` has always
# sent) beside an OpenAI-style `error` object (where the `openai` package looks). Plain dicts, no web
# framework: each face only wraps it in its own response class.


def error_body(status: int, message: str, field: str | None = None, detail: Any = None) -> dict[str, Any]:
    """The JSON body of an error answer with HTTP `status`; `field` names the bad input, if any."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if detail is None:
        detail = [{"loc": ["body", field], "msg": message, "type": "value_error"}] if field else message
    return {"detail": detail, "error": {"message": message, "type": kind, "param": field, "code": status}}


def invalid_request_body(exc: InvalidRequestError, field: str | None = None) -> dict[str, Any]:
    """The 422 body of `exc`; `field` renames its field (the OpenAI routes' names for ours)."""
    field = field or exc.field
    return error_body(422, f"{field}: {exc.message}", field)


def engine_error_body(exc: BulError) -> dict[str, Any]:
    """The 503 body of one of our errors that is not bad input (`InvalidRequestError` is a 422)."""
    if isinstance(exc, EngineClosedError):
        return error_body(503, "the server is shutting down")
    if isinstance(exc, ModelLoadError):
        return error_body(503, f"the model could not be loaded: {exc}")
    return error_body(503, str(exc))


def unexpected_error_body(exc: BaseException) -> dict[str, Any]:
    """The 500 body of a bug: only the exception's class is named (its text may hold anything)."""
    return error_body(500, f"internal error ({type(exc).__name__})")
