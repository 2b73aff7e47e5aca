"""The controller's FastAPI application: routers, access rules, errors, limits, telemetry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.routing import APIRoute
from opentelemetry.sdk.trace.export import SpanExporter
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller import access, auth
from controller.api import agent, audit, deps, people, releases, rollouts, service, sites, tuf, witness
from controller.api.problems import PROBLEM_RESPONSES, install_handlers, problem
from controller.errors import PayloadTooLarge
from controller.runtime import Runtime
from controller.telemetry import Metrics, setup_tracing
from sitewarden import __version__
from sitewarden.telemetry import current_trace_id

log = logging.getLogger("sitewarden.controller")

TUF_REFRESH_S = 60
JTI_CLEANUP_S = 300
AUDIT_CHECKPOINT_S = 10
RECONCILE_S = 5
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class BodyLimit:
    """Refuses request bodies over a limit with 413, by Content-Length up front or while streaming.

    Upload routes get the large limit; everything else the JSON limit. When the limit is
    crossed mid-stream, reading stops and whatever the application answers is replaced by
    the 413 problem (FastAPI would otherwise report a body parsing error).
    """

    def __init__(self, app: ASGIApp, json_limit: int, upload_limit: int) -> None:
        self.app = app
        self.json_limit = json_limit
        self.upload_limit = upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_upload = scope["method"] == "PATCH" and scope["path"].startswith("/api/v1/uploads/")
        limit = self.upload_limit if is_upload else self.json_limit
        too_large = problem(413, "Payload too large", f"request body over {limit} bytes", scope["path"])
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await too_large(scope, receive, send)
                return
        seen = 0
        exceeded = False
        replaced = False

        async def limited_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise PayloadTooLarge(f"request body over {limit} bytes")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal replaced
            if not exceeded:
                await send(message)
            elif not replaced and message["type"] == "http.response.start":
                replaced = True
                await too_large(scope, receive, send)

        await self.app(scope, limited_receive, guarded_send)


def _describe_routes(routers: list[APIRouter]) -> None:
    """Every route's OpenAPI description states who may call it, from the access table."""
    for router in routers:
        for route in router.routes:
            if not isinstance(route, APIRoute) or access.ACCESS_MARK in (route.description or ""):
                continue
            for method in route.methods:
                rule = access.rule_for(method, route.path)
                if rule is not None:
                    route.description = f"{route.description or ''}\n\n{access.describe(rule)}".strip()


async def _every(seconds: float, job: Callable[[], Any], name: str) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await run_in_threadpool(job)
        except Exception:
            log.exception("background job %s failed", name)


def _audit_event(request: Request, status: int, request_id: str) -> dict[str, Any]:
    """Who did what to which resource, and how it ended."""
    caller: auth.Principal = getattr(request.state, "principal", auth.ANONYMOUS)
    route = getattr(request.scope.get("route"), "path", request.url.path)
    return {
        "type": "request",
        "actor": caller.audit_name,
        "kind": caller.kind,
        "role": caller.role.value if caller.role else None,
        "action": f"{request.method} {route}",
        "resource": {k: str(v) for k, v in request.path_params.items()},
        "result": status,
        "outcome": "ok" if status < 400 else "refused" if status < 500 else "failed",
        "request_id": request_id,
        "trace_id": current_trace_id(),
    }


def create_app(runtime: Runtime, span_exporter: SpanExporter | None = None) -> FastAPI:
    trail = runtime.audit
    assert trail is not None, "the runtime's audit trail must be open"

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        def forget_jtis() -> None:
            with runtime.session() as s:
                auth.forget_expired_jtis(s)

        tasks = [
            asyncio.create_task(_every(TUF_REFRESH_S, runtime.tuf.refresh, "tuf-refresh")),
            asyncio.create_task(_every(JTI_CLEANUP_S, forget_jtis, "jti-cleanup")),
            asyncio.create_task(_every(AUDIT_CHECKPOINT_S, trail.checkpoint_if_due, "audit-checkpoint")),
            asyncio.create_task(_every(RECONCILE_S, runtime.reconcile_all, "rollout-reconcile")),
        ]
        runtime.notifier.bind(asyncio.get_running_loop())
        await run_in_threadpool(runtime.tuf.refresh)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            if tracer is not None:
                tracer.shutdown()

    app = FastAPI(
        title="Sitewarden controller",
        version=__version__,
        description=(
            "Central control plane: people and roles, sites and enrollment, the release registry with "
            "four-eyes approvals, and the TUF repository every site verifies against. Errors are RFC 9457 "
            "problem details (application/problem+json)."
        ),
        dependencies=[Depends(deps.principal)],
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.metrics = Metrics()
    routers = [
        service.router,
        tuf.router,
        people.router,
        sites.router,
        sites.agent_router,
        releases.approvers_router,
        releases.router,
        rollouts.router,
        agent.router,
        witness.router,
        audit.router,
    ]
    _describe_routes(routers)
    for router in routers:
        app.include_router(router, responses=PROBLEM_RESPONSES)
    install_handlers(app)
    app.state.metrics.install(app)

    @app.middleware("http")
    async def _request_id_and_audit(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = request_id
        response = await call_next(request)
        response.headers["X-Request-ID"] = request_id
        if request.method in MUTATING and getattr(request.state, "audit", True):
            # Durable before the response leaves: an action nobody can later find is worse than a 500.
            try:
                await run_in_threadpool(trail.record, _audit_event(request, response.status_code, request_id))
            except Exception:
                log.exception("audit append failed for %s %s", request.method, request.url.path)
                return problem(500, "Internal error", "the action could not be audited", request.url.path)
        return response

    app.add_middleware(BodyLimit, json_limit=runtime.config.max_json_body, upload_limit=runtime.config.max_upload_chunk)
    tracer = setup_tracing(app, "sitewarden-controller", exporter=span_exporter)
    app.state.tracer_provider = tracer
    return app
