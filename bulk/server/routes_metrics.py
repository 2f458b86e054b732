"""`GET /metrics`: the Prometheus text format, every kv_cache_* metric of this server's engine (through a
cluster's ingress: the totals, and per-replica figures labelled `replica`)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from bulk.server.deps import Engine, Metrics

router = APIRouter()


@router.get("/metrics", tags=["monitoring"], response_class=Response)
async def metrics(exporter: Metrics, engine: Engine) -> Response:
    """Scraped by Prometheus (see deploy/prometheus.yml)."""
    stats = await engine.fetch_stats()
    return Response(exporter.generate_latest(stats), media_type=exporter.content_type)
