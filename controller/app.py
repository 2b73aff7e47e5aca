"""The controller's FastAPI application: routers, access rules, errors, limits, telemetry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.routing import APIRoute
from opentelemetry.sdk.trace.export import SpanExporter
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller import access, auth
from controller.api import agent, audit, deps, jobs, people, releases, rollouts, service, sites, tuf, witness
from controller.api.problems import PROBLEM_RESPONSES, install_handlers, problem
from controller.audit_trail import AuditTrail
from controller.errors import PayloadTooLarge
from controller.runtime import Runtime
from controller.telemetry import Metrics, setup_tracing
from controller.ui import dashboard
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


def _audit_event(scope: Scope, status: int, request_id: str) -> dict[str, Any]:
    """Who did what to which resource, and how it ended."""
    caller: auth.Principal = scope.get("state", {}).get("principal", auth.ANONYMOUS)
    route = getattr(scope.get("route"), "path", scope["path"])
    via = {}
    if scope["path"].startswith("/ui"):
        # A dashboard action is recorded as the REST call it makes (see `access.UI_SAME_AS`).
        route = access.UI_SAME_AS.get((scope["method"], route), ("", route))[1]
        via = {"via": "dashboard"}
    return {
        "type": "request",
        "actor": caller.audit_name,
        "kind": caller.kind,
        "role": caller.role.value if caller.role else None,
        "action": f"{scope['method']} {route}",
        "resource": {k: str(v) for k, v in scope.get("path_params", {}).items()},
        "result": status,
        "outcome": "ok" if status < 400 else "refused" if status < 500 else "failed",
        "request_id": request_id,
        "trace_id": current_trace_id(),
        **via,
    }


class RequestRecorder:
    """Request ids, the audit record of every state-changing request, and request metrics.

    A pure ASGI middleware (no per-request task or stream, unlike `@app.middleware`): the
    response's start is held back until its audit entry is durable, so that an action
    nobody can later find is answered with a 500 instead.
    """

    def __init__(self, app: ASGIApp, trail: AuditTrail, metrics: Metrics) -> None:
        self.app = app
        self.trail = trail
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = next((v.decode() for k, v in scope["headers"] if k == b"x-request-id"), None) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        mutating = scope["method"] in MUTATING
        held: Message | None = None
        status = 500
        replaced = False

        async def recording_send(message: Message) -> None:
            nonlocal held, status, replaced
            if replaced:
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                if mutating and scope["state"].get("audit", True):
                    held = message
                    return
            elif held is not None:
                start, held = held, None
                try:
                    await self.trail.record_async(_audit_event(scope, status, request_id))
                except Exception:
                    log.exception("audit append failed for %s %s", scope["method"], scope["path"])
                    replaced = True
                    failure = problem(500, "Internal error", "the action could not be audited", scope["path"])
                    await failure(scope, receive, send)
                    return
                await send(start)
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.observe(scope, status, time.perf_counter() - started)


def create_app(runtime: Runtime, span_exporter: SpanExporter | None = None) -> FastAPI:
    trail = runtime.audit
    assert trail is not None, "the runtime's audit trail must be open"
    dashboard_jobs: list[Callable[[], Any]] = []

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
            *(asyncio.create_task(job()) for job in dashboard_jobs),
        ]
        runtime.notifier.bind(asyncio.get_running_loop())
        await run_in_threadpool(runtime.tuf.refresh)
        if runtime.federation is not None:
            await run_in_threadpool(runtime.federation.start)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            if runtime.federation is not None:
                await run_in_threadpool(runtime.federation.stop)
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
    # The agent channel first: FastAPI tries routes in order, and 200 sites' status reports and long
    # polls are most of the traffic (its paths overlap no other route).
    routers = [
        agent.router,
        service.router,
        tuf.router,
        people.router,
        sites.router,
        sites.agent_router,
        releases.approvers_router,
        releases.router,
        rollouts.router,
        jobs.router,
        jobs.agent_router,
        witness.router,
        audit.router,
    ]
    _describe_routes(routers)
    for router in routers:
        app.include_router(router, responses=PROBLEM_RESPONSES)
    install_handlers(app)
    dashboard_jobs.extend(dashboard.install(app, runtime))  # the admin dashboard, under /ui
    app.add_middleware(RequestRecorder, trail=trail, metrics=app.state.metrics)
    app.add_middleware(BodyLimit, json_limit=runtime.config.max_json_body, upload_limit=runtime.config.max_upload_chunk)
    tracer = setup_tracing(app, "sitewarden-controller", exporter=span_exporter)
    app.state.tracer_provider = tracer
    return app
