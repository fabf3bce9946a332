"""`GET /metrics`: Prometheus text format, without a token.

Scrapers rarely carry per-target credentials, and nothing here needs hiding: no label names a
tenant, a job or a run (kjob.telemetry.metrics), only node names, statuses and counts. A
deployment that wants the aggregate load private keeps /metrics off its public proxy.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from kjob.telemetry import metrics

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    body, content_type = metrics.render()
    return Response(content=body, media_type=content_type)
