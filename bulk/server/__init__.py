"""The BUL API server (`bul serve`): FastAPI routes over one engine.

`create_app` and `ServerSettings` are imported lazily: `bul` imports `bulk.server.cli` to list its
commands, and that must not pay for FastAPI."""

from __future__ import annotations

from typing import Any

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from bulk.server.app import create_app

        return create_app
    if name == "ServerSettings":
        from bulk.server.settings import ServerSettings

        return ServerSettings
    raise AttributeError(name)
