"""Flask extension: `BUL(app)` or `bul = BUL(); bul.init_app(app)`.

Builds one engine from `app.config["BUL_CACHE_CONFIG"]` (a dict of `KVCacheConfig` fields, or a
`KVCacheConfig`), warms it up in `init_app` (Flask 3 has no `before_first_request`; set
`BUL_WARMUP = False` to skip), keeps it in `app.extensions["bul"]`, and registers:

- `POST /api/query`: a request dict (`{"query": ..., "priority": ...}`) -> the engine's result;
- `GET /api/stats`: `engine.get_stats()`.

Bad input answers 422 with the body every BUL HTTP face sends (`bulk.errors.error_body`: `detail` and
`error.param` name the field); a body that is not a JSON object is a 422 naming `body`. The views are
plain `def`: under WSGI each request already has its own thread, and the engine's sync call queues it
for the model like the async one does."""

from __future__ import annotations

import atexit
import logging
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from bulk.config import KVCacheConfig
from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.errors import BulError, InvalidRequestError, engine_error_body, invalid_request_body

log = logging.getLogger(__name__)

EXTENSION_KEY = "bul"


class BUL:
    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        if EXTENSION_KEY in app.extensions:
            return  # one engine per app, however often init_app runs
        engine = UltraAdaptiveKVCacheEngine(_config(app.config.get("BUL_CACHE_CONFIG")))
        if app.config.get("BUL_WARMUP", True):
            engine.warmup_sync()
        # The model thread is a daemon; stop it cleanly anyway so queued requests are failed, not lost.
        atexit.register(engine.shutdown)
        app.extensions[EXTENSION_KEY] = engine
        app.register_blueprint(_blueprint())

    @staticmethod
    def engine(app: Flask | None = None) -> UltraAdaptiveKVCacheEngine:
        """The engine of `app` (default: the current app)."""
        return (app or current_app).extensions[EXTENSION_KEY]


def _config(value: Any) -> KVCacheConfig:
    if value is None:
        return KVCacheConfig()
    if isinstance(value, KVCacheConfig):
        return value
    if isinstance(value, dict):
        return KVCacheConfig(**value)  # InvalidConfigError names a bad key at startup
    raise TypeError(f"BUL_CACHE_CONFIG must be a dict or a KVCacheConfig, got {type(value).__name__}")


def _blueprint() -> Blueprint:
    # A fresh blueprint per app: its routes read the engine of whichever app serves the request.
    bp = Blueprint("bul", __name__)
    bp.add_url_rule("/api/query", "query", _process_query, methods=["POST"])
    bp.add_url_rule("/api/stats", "stats", _get_stats, methods=["GET"])
    bp.register_error_handler(InvalidRequestError, _invalid_request)
    bp.register_error_handler(BulError, _engine_unavailable)
    return bp


def _process_query() -> ResponseReturnValue:
    query = request.get_json(silent=True)
    if not isinstance(query, dict):
        raise InvalidRequestError("body", 'must be a JSON object such as {"query": "..."}')
    return jsonify(BUL.engine().process_request_sync(query))


def _get_stats() -> ResponseReturnValue:
    return jsonify(BUL.engine().get_stats())


def _invalid_request(exc: InvalidRequestError) -> ResponseReturnValue:
    return jsonify(invalid_request_body(exc)), 422


def _engine_unavailable(exc: BulError) -> ResponseReturnValue:
    # Model not loadable, engine shut down: the service is unavailable, the request was fine.
    log.error("engine error on %s: %s", request.path, exc)
    return jsonify(engine_error_body(exc)), 503
