"""Observability of the controller: Prometheus metrics, and OpenTelemetry traces from
`sitewarden.telemetry` (standard `OTEL_*` variables, off when unset).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import Response
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

    def observe(self, scope: Mapping[str, Any], status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        self.requests.labels(scope["method"], route, str(status)).inc()
        self.latency.labels(scope["method"], route).observe(seconds)

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
