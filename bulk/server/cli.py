"""`bul serve`: the BUL API (REST, WebSocket, OpenAI-compatible, /metrics) on port 8002.

Every option is also a `BUL_*` environment variable (see docs/server.md); a flag given on the
command line wins over the environment."""

from __future__ import annotations

import argparse
import logging

HELP = "serve the BUL API (REST, WebSocket, OpenAI-compatible, /metrics) on :8002"

log = logging.getLogger("bulk.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to bind (BUL_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (BUL_PORT, default 8002)")
    parser.add_argument(
        "--model",
        help="auto (default: smollm2-135m when installed, else demo), smollm2-135m, demo, demo-large, "
        "a .gguf file or a Hugging Face model directory (BUL_MODEL)",
    )
    parser.add_argument("--log-level", help="uvicorn log level (BUL_LOG_LEVEL, default info)")
    parser.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        help="require this bearer key; repeat for several (BUL_API_KEYS, comma-separated)",
    )
    parser.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        default=None,
        help="do not log each request (BUL_ACCESS_LOG=false)",
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from bulk.errors import InvalidConfigError
    from bulk.server.app import create_app
    from bulk.server.settings import ServerSettings

    flags = {
        name: getattr(args, name, None)
        for name in ("host", "port", "model", "log_level", "api_keys", "access_log")
    }
    try:
        settings = ServerSettings(**{k: v for k, v in flags.items() if v is not None})
        app = create_app(settings)
    except (ValidationError, InvalidConfigError) as exc:
        log.error("bad configuration: %s", exc)
        return 2
    log.info("serving model %s on http://%s:%d", settings.model_name, settings.host, settings.port)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=settings.access_log,
        ws_max_size=settings.max_body_bytes,
    )
    return 0
