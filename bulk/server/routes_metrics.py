"""`GET /metrics`: the Prometheus text format, every kv_cache_* metric of this server's engine."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from bulk.server.deps import Metrics

router = APIRouter()


@router.get("/metrics", tags=["monitoring"], response_class=Response)
async def metrics(exporter: Metrics) -> Response:
    """Scraped by Prometheus (see deploy/prometheus.yml)."""
    return Response(exporter.generate_latest(), media_type=exporter.content_type)
