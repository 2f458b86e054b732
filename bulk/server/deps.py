"""FastAPI dependencies: what the lifespan built, handed to routes with `Depends`.

The engine, settings, metrics and task registry live on `app.state`, set once by the lifespan; a
route never builds or looks up anything global. The engine is typed by `ServingEngine`, the one
interface the routes use: the local engine (`bul serve`) or a cluster's client (`bul cluster`). The
getters are `async def` on purpose: FastAPI runs a plain `def` dependency in a thread pool, a
hand-off that cost more than a whole cached answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from bulk.engine.protocol import ServingEngine
from bulk.metrics import PrometheusExporter
from bulk.server.json_body import ParsedBodies
from bulk.server.settings import ServerSettings
from bulk.server.tasks import TaskRegistry


@dataclass(frozen=True)
class ServerState:
    """Everything the lifespan built, in one object (`app.state.bul`): the hot path (`POST /api/query`)
    reads it with one attribute access instead of resolving four dependencies (each resolution costs
    FastAPI some microseconds)."""

    engine: ServingEngine
    settings: ServerSettings
    metrics: PrometheusExporter
    tasks: TaskRegistry
    parsed_bodies: ParsedBodies = field(default_factory=ParsedBodies)


async def get_engine(conn: HTTPConnection) -> ServingEngine:
    return conn.app.state.engine


async def get_settings(conn: HTTPConnection) -> ServerSettings:
    return conn.app.state.settings


async def get_metrics(conn: HTTPConnection) -> PrometheusExporter:
    return conn.app.state.metrics


async def get_tasks(conn: HTTPConnection) -> TaskRegistry:
    return conn.app.state.tasks


Engine = Annotated[ServingEngine, Depends(get_engine)]
Settings = Annotated[ServerSettings, Depends(get_settings)]
Metrics = Annotated[PrometheusExporter, Depends(get_metrics)]
Tasks = Annotated[TaskRegistry, Depends(get_tasks)]
