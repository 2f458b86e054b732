"""`bul grpc`: the gRPC service. Flags default to None so that unset ones fall back to the
`BUL_GRPC_*` environment (see `settings.py`); gRPC itself is imported only in `run`, so other `bul`
commands never pay for it."""

from __future__ import annotations

import argparse
import asyncio
import logging

log = logging.getLogger(__name__)

HELP = "serve BULService over gRPC (port 50051; health and reflection included)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="interface to bind (env BUL_GRPC_HOST, default [::])")
    parser.add_argument("--port", type=int, help="port to bind, 0 for any (env BUL_GRPC_PORT, default 50051)")
    parser.add_argument(
        "--model",
        help="auto, smollm2-135m, demo, demo-large, a .gguf file or a Hugging Face model directory "
        "(env BUL_MODEL, default auto: smollm2-135m when installed, else demo)",
    )
    parser.add_argument(
        "--grace-seconds",
        type=float,
        help="on SIGTERM/SIGINT, how long calls in flight may finish (env BUL_GRPC_GRACE_SECONDS, default 5)",
    )


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from bulk.engine.engine import UltraAdaptiveKVCacheEngine
    from bulk.engine_settings import EngineSettings
    from bulk.errors import BulError
    from bulk.grpc_service.server import serve
    from bulk.grpc_service.settings import GrpcSettings

    flags = {name: getattr(args, name, None) for name in ("host", "port", "model", "grace_seconds")}
    try:
        settings = GrpcSettings(**{name: value for name, value in flags.items() if value is not None})
        # Every other engine option comes from its BUL_<FIELD> variable, as for `bul serve`.
        engine = UltraAdaptiveKVCacheEngine(EngineSettings().engine_config(model=settings.model))
    except (ValidationError, BulError) as exc:
        log.error("bad gRPC settings: %s", exc)
        return 2
    try:
        asyncio.run(serve(engine, settings.host, settings.port, settings.grace_seconds))
    except (BulError, OSError) as exc:
        log.error("gRPC server failed: %s", exc)
        return 1
    finally:
        engine.shutdown()
    return 0
