"""The request routers of this process, by (application, deployment), held weakly.

A cluster's router lives inside the process holding the deployment handle (the ingress), where the
ingress reads its replicas and decision counts for `/api/stats`. It registers itself here, in a module
of its own: Ray Serve ships a router's own module to that process by value (a copy of its globals), so
state kept there would not be the state the ingress reads."""

from __future__ import annotations

import threading
import weakref
from typing import Any

_ROUTERS: dict[tuple[str, str], weakref.ReferenceType[Any]] = {}
_LOCK = threading.Lock()


def register_router(app_name: str, deployment: str, router: Any) -> None:
    with _LOCK:
        _ROUTERS[(app_name, deployment)] = weakref.ref(router)


def find_router(app_name: str, deployment: str) -> Any | None:
    """The router of this process for `deployment` of `app_name` (None before its first request)."""
    with _LOCK:
        ref = _ROUTERS.get((app_name, deployment))
    return ref() if ref is not None else None
