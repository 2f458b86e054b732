"""The BUL API app factory: `create_app(settings=None, engine=None)`.

The engine is built once, in the lifespan (not at import time, not per request), and handed to the
routes through `Depends` (see `deps.py`). The model warms up in the background, so the server
accepts connections at once and `/health` says 503 until the model is ready; queries sent meanwhile
simply wait for it. Passing `engine=` serves an engine the caller built (and shuts down) itself: any
`ServingEngine`, such as a cluster's client (`bulk.cluster.app`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from bulk.engine.engine import UltraAdaptiveKVCacheEngine
from bulk.engine.protocol import ServingEngine
from bulk.metrics import PrometheusExporter
from bulk.server import openai_routes, routes_api, routes_metrics, websocket
from bulk.server.body_limit import BodyLimitMiddleware
from bulk.server.cache_middleware import CacheMiddleware
from bulk.server.deps import ServerState
from bulk.server.errors import install_error_handlers
from bulk.server.openapi import install_openapi
from bulk.server.protection import ProtectionMiddleware
from bulk.server.settings import ServerSettings
from bulk.server.tasks import TaskRegistry

log = logging.getLogger(__name__)

DESCRIPTION = (
    "BUL KV: queries answered by an LLM engine that keeps transformer KV state between requests. "
    "The guide's REST routes, a WebSocket, an OpenAI-compatible API and Prometheus metrics."
)


def create_app(settings: ServerSettings | None = None, engine: ServingEngine | None = None) -> FastAPI:
    settings = settings if settings is not None else ServerSettings()
    # Checked now, so a bad BUL_* value fails `bul serve` before it binds a port.
    config = settings.engine_config() if engine is None else engine.config

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The engine this app built and owns (None when it was handed one), and the one it serves.
        local: UltraAdaptiveKVCacheEngine | None = None
        served: ServingEngine
        if engine is None:
            served = local = UltraAdaptiveKVCacheEngine(config)
        else:
            served = engine
        app.state.engine = served
        app.state.metrics = PrometheusExporter(served)
        app.state.tasks = TaskRegistry(settings.task_registry_size)
        app.state.warmup_error = None
        app.state.bul = ServerState(served, settings, app.state.metrics, app.state.tasks)
        warming = asyncio.create_task(_warm_up(app, served), name="bul-warmup")
        try:
            yield
        finally:
            warming.cancel()
            await app.state.tasks.aclose()
            if local is not None:
                # shutdown() waits for the running request; keep the event loop free meanwhile.
                await asyncio.to_thread(local.shutdown)

    app = FastAPI(
        title="BUL API",
        description=DESCRIPTION,
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    routes_api.add_query_route(app)
    app.include_router(routes_api.router)
    app.include_router(websocket.router)
    app.include_router(openai_routes.router)
    app.include_router(routes_metrics.router)
    if settings.celery:
        # Imported only when asked for: it needs the celery extra and a broker.
        from bulk.server.celery_routes import router as celery_router

        app.include_router(celery_router)
    # /openapi.json states the limits that the engine and these settings enforce.
    install_openapi(app, settings, config.max_new_tokens_limit)

    # Middleware added last runs first: protection, the body limit, the optional answer cache, then
    # the routes. All are pure ASGI: a BaseHTTPMiddleware would cost more than a cached answer.
    if settings.cache_middleware:
        app.add_middleware(
            CacheMiddleware,
            get_engine=lambda: app.state.engine,
            ttl=settings.cache_middleware_ttl,
            max_body_bytes=settings.max_body_bytes,
        )
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.api_keys or settings.rate_limit_per_minute:
        app.add_middleware(
            ProtectionMiddleware,
            api_keys=settings.api_keys,
            rate_limit_per_minute=settings.rate_limit_per_minute,
            rate_limit_burst=settings.rate_limit_burst,
            unauthenticated_per_minute=settings.unauthenticated_rate_limit_per_minute,
            unauthenticated_burst=settings.unauthenticated_rate_limit_burst,
        )
    return app


async def _warm_up(app: FastAPI, engine: ServingEngine) -> None:
    try:
        await engine.warmup()
        log.info("model %s is ready", app.state.settings.model_name)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        # /health reports it; the server stays up so that the failure can be seen and fixed.
        app.state.warmup_error = f"{type(exc).__name__}: {exc}"
        log.error("model warmup failed: %s", app.state.warmup_error)
