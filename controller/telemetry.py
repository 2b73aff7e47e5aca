"""Observability: OpenTelemetry traces (standard `OTEL_*` variables, off when unset) and
Prometheus metrics. Nothing is exported anywhere unless an operator configures it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Mapping

from fastapi import FastAPI, Request, Response
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def tracing_exporter(env: Mapping[str, str]) -> SpanExporter | None:
    """The span exporter the standard variables ask for, or None when tracing is not configured.

    Tracing is on only when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`)
    or an OTLP endpoint is set, and `OTEL_SDK_DISABLED` is not true.
    """
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names:
        names = ["otlp"] if any(env.get(v) for v in _ENDPOINT_VARS) else []
    if not names or names == ["none"]:
        return None
    if names[0] == "console":
        return ConsoleSpanExporter()
    if names[0] == "otlp":
        # Imported only when asked for: the OTLP exporter reads its own OTEL_EXPORTER_OTLP_* variables.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

        return OTLPSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER={names[0]!r} is not supported (use otlp, console or none)")


def setup_tracing(
    app: FastAPI, service_name: str, env: Mapping[str, str] | None = None, exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """Instrument the app when tracing is configured; returns the provider (to shut down), or None."""
    env = os.environ if env is None else env
    exporter = exporter or tracing_exporter(env)
    if exporter is None:
        return None
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, excluded_urls="metrics,healthz,readyz")
    return provider


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
