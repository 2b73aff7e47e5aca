"""Observability of the controller: Prometheus metrics, and OpenTelemetry traces from
`sitewarden.telemetry` (standard `OTEL_*` variables, off when unset).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from sitewarden.telemetry import setup_tracing, tracing_exporter

__all__ = ["Metrics", "setup_tracing", "tracing_exporter"]


class Metrics:
    """Request counts and latencies per route template (never per raw path: bounded cardinality)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sitewarden_http_requests", "HTTP requests handled", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "sitewarden_http_request_seconds", "HTTP request latency", ["method", "route"], registry=self.registry
        )

    def install(self, app: FastAPI) -> None:
        @app.middleware("http")
        async def _measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            started = time.perf_counter()
            status = 500
            try:
                response = await call_next(request)
                status = response.status_code
                return response
            finally:
                route = getattr(request.scope.get("route"), "path", "unmatched")
                self.requests.labels(request.method, route, str(status)).inc()
                self.latency.labels(request.method, route).observe(time.perf_counter() - started)

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
