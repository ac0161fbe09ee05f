"""The monitoring listener (``[metrics] listen``): ``GET /metrics`` (Prometheus text format) and
``GET /stats/summary/json`` (Acrobits-compatible), plain HTTP in the core's own loop.

In the loop, not in prometheus_client's server thread: a scrape reads the core's live read models
(the instance index syncs on read), which only the loop may touch; what it reads is a few dozen
numbers, so it costs the loop well under a millisecond (``bench/metrics_scrape.py``).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sipis.api.server import ApiServer
from sipis.metrics.acrobits import stats_summary
from sipis.metrics.collector import CoreMetrics


def create_metrics_app(metrics: CoreMetrics) -> Starlette:
    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def summary(request: Request) -> Response:
        return JSONResponse(stats_summary(metrics.ctx))

    return Starlette(routes=[Route("/metrics", prometheus, methods=["GET"]),
                             Route("/stats/summary/json", summary, methods=["GET"])])


def metrics_server(metrics: CoreMetrics, host: str, port: int) -> ApiServer:
    return ApiServer(create_metrics_app(metrics), host, port, tls=False, name="metrics")
