"""OpenTelemetry traces for the controller and the agent: configured by the standard `OTEL_*`
variables and off when they are unset. Nothing is exported anywhere unless an operator
configures it. And the separate Prometheus metrics listener both can run (`serve_metrics`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from prometheus_client import CollectorRegistry, start_http_server

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


def current_trace_id() -> str | None:
    """The current span's trace id (32 hex digits), for audit entries; None outside a traced request."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


class MetricsListener:
    """A running metrics listener (prometheus_client's HTTP server, in a daemon thread)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port = self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> MetricsListener:
    """Serve `registry` at `http://host:port/metrics` (plain HTTP, no credential) apart from the API.

    The operator says where it binds (loopback by default in the CLIs): a scraper reaches it
    there, and the API's own `/metrics` asks for a credential.
    """
    return MetricsListener(host, port, registry)
