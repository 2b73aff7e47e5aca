"""The controller's FastAPI application: routers, access rules, errors, limits, telemetry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.routing import APIRoute
from opentelemetry.sdk.trace.export import SpanExporter
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller import access, audit_trail, auth, changes
from controller.api import agent, audit, deps, jobs, people, releases, rollouts, service, sites, tuf, witness
from controller.api.problems import PROBLEM_RESPONSES, install_handlers, problem
from controller.audit_trail import AuditTrail, AuditUnavailable
from controller.errors import PayloadTooLarge
from controller.outbox import Outbox
from controller.runtime import Runtime
from controller.telemetry import Metrics, setup_tracing
from controller.ui import dashboard
from sitewarden import __version__
from sitewarden.telemetry import serve_metrics

log = logging.getLogger("sitewarden.controller")

TUF_REFRESH_S = 60
JTI_CLEANUP_S = 300
AUDIT_CHECKPOINT_S = 1  # how often to look: `audit_trail.CHECKPOINT_EVERY_S` says when one is due
AUDIT_MAINTAIN_S = 1
RECONCILE_S = 5
UPLOAD_EXPIRY_S = 300
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
    """Every route's OpenAPI description states who may call it (the access table) and, for a
    state-changing route, what it records in the audit trail (`controller.changes.ROUTES`)."""
    for router in routers:
        for route in router.routes:
            if not isinstance(route, APIRoute) or access.ACCESS_MARK in (route.description or ""):
                continue
            for method in route.methods:
                rule = access.rule_for(method, route.path)
                if rule is not None:
                    route.description = f"{route.description or ''}\n\n{access.describe(rule)}".strip()
                record = changes.record_for(method, route.path)
                if record is not None:
                    route.description = f"{route.description}\n\n{changes.describe(record)}"


async def _every(seconds: float, job: Callable[[], Any], name: str) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await run_in_threadpool(job)
        except Exception:
            log.exception("background job %s failed", name)


def _outcome(status: int) -> str:
    return "ok" if status < 400 else "refused" if status < 500 else "failed"


class RequestRecorder:
    """Request ids, the audit trail of every request that changes (or tries to change) state, metrics.

    A pure ASGI middleware, the outermost of the application's own (only Starlette's error
    middleware is outside it), so that it sees whatever any layer below answers or raises:

    1. The client's `X-Request-ID` is taken when well formed, else the controller's own id is used
       and what was given is recorded, truncated and marked (`audit_trail.request_id`).
    2. A state-changing method is let in only while the audit log takes writes
       (`AuditTrail.ready`); otherwise it is answered 503 before it reaches a route: nothing is
       committed.
    3. The request is the acting context: changes its service calls record name its caller.
    4. The response's start is held until the audit work is done: the outbox rows the request
       committed are moved into the log (`Outbox.drain`), and a request that committed no change
       record (a refusal, a failure, a no-op) gets an entry of its own. If that cannot be written,
       the answer becomes a 503 and the change, if any, waits in the outbox.
    5. An exception from any layer below is recorded the same way, with its class (never its
       message or trace), then propagates to the error handler (a 500).

    With `audited=False` (the benchmark's baseline only) it keeps request ids and metrics alone.
    """

    def __init__(
        self, app: ASGIApp, trail: AuditTrail, outbox: Outbox | None, metrics: Metrics, audited: bool = True
    ) -> None:
        self.app = app
        self.trail = trail
        self.outbox = outbox
        self.metrics = metrics
        self.audited = audited

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        request_id, refused_id = audit_trail.request_id(given)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode())
        mutating = scope["method"] in MUTATING
        who = audit_trail.RequestActor(scope=scope, request_id=request_id, given_id=refused_id)
        held: Message | None = None
        status = 500
        replaced = False
        audited = False

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), id_header]
            await send(message)

        if self.audited and mutating:
            try:
                await self.trail.ready()
            except AuditUnavailable as exc:
                status = 503
                await problem(503, "Audit log unavailable", exc.detail, scope["path"])(scope, receive, send_with_id)
                self.metrics.observe(scope, status, time.perf_counter() - started)
                return

        async def audit(error: BaseException | None) -> bool:
            nonlocal audited
            if audited or not self.audited:
                return True
            audited = True
            try:
                if who.unmoved and self.outbox is not None:  # most are moved on the route's thread already
                    await run_in_threadpool(self.outbox.drain, list(who.unmoved))
                await self._record_request(scope, who, status, error, mutating)
            except Exception:
                log.exception("the audit entry of %s %s could not be written", scope["method"], scope["path"])
                return False
            return True

        async def recording_send(message: Message) -> None:
            nonlocal held, status, replaced
            if replaced:
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), id_header]
                if self.audited and (mutating or who.seqs):
                    held = message
                    return
            elif held is not None:
                start, held = held, None
                if not await audit(None):
                    replaced = True
                    failure = problem(
                        503,
                        "Audit log unavailable",
                        "the audit log cannot be written: the request is not acknowledged, and any change it made "
                        "waits in the outbox with its audit record",
                        scope["path"],
                    )
                    await failure(scope, receive, send_with_id)
                    return
                await send(start)
            await send(message)

        try:
            with audit_trail.serving(who):
                await self.app(scope, receive, recording_send)
        except Exception as exc:
            status = 500
            await audit(exc)
            raise
        finally:
            who.finished = True
            self.metrics.observe(scope, status, time.perf_counter() - started)

    async def _record_request(
        self,
        scope: Scope,
        who: audit_trail.RequestActor,
        status: int,
        error: BaseException | None,
        mutating: bool,
    ) -> None:
        """The request's own entry, when it needs one: refusals, failures, and changes nobody recorded."""
        state = scope.get("state", {})
        if error is None and status < 400 and (who.seqs or not mutating or state.get("audit") is False):
            return  # its change records say what it did, or it changed nothing worth an entry
        fields = who.fields()
        if fields["kind"] == "anonymous" and 400 <= status < 500 and fields.get("client"):
            alone, evicted = self.trail.limiter.allow(fields["client"], status, fields["action"])
            for summary in evicted:
                await self.trail.record_async(summary)
            if not alone:
                return
        event: dict[str, Any] = {"type": "request", **fields, "result": status, "outcome": _outcome(status)}
        failure = error or state.get("error")
        if failure is not None:
            kind = failure if isinstance(failure, type) else type(failure)
            event["error"] = f"{kind.__module__}.{kind.__qualname__}"
        if who.seqs:
            event["changes"] = len(who.seqs)  # committed before the failure, each with its own entry
        await self.trail.record_async(event)


def create_app(
    runtime: Runtime,
    span_exporter: SpanExporter | None = None,
    metrics_listen: tuple[str, int] | None = None,
    *,
    audited: bool = True,
) -> FastAPI:
    """The controller's application; `metrics_listen` (host, port) serves its metrics on a listener of their own.
    `audited=False` is for `bench/audit_trail_bench.py`'s baseline only."""
    trail = runtime.audit
    assert trail is not None, "the runtime's audit trail must be open"
    dashboard_jobs: list[Callable[[], Any]] = []

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        def forget_jtis() -> None:
            with runtime.session() as s:
                auth.forget_expired_jtis(s)

        tasks = [
            asyncio.create_task(_every(TUF_REFRESH_S, runtime.refresh_tuf, "tuf-refresh")),
            asyncio.create_task(_every(JTI_CLEANUP_S, forget_jtis, "jti-cleanup")),
            asyncio.create_task(_every(AUDIT_CHECKPOINT_S, trail.checkpoint_if_due, "audit-checkpoint")),
            asyncio.create_task(_every(AUDIT_MAINTAIN_S, runtime.maintain_audit, "audit-maintenance")),
            asyncio.create_task(_every(RECONCILE_S, runtime.reconcile_all, "rollout-reconcile")),
            asyncio.create_task(_every(UPLOAD_EXPIRY_S, runtime.expire_uploads, "upload-expiry")),
            *(asyncio.create_task(job()) for job in dashboard_jobs),
        ]
        listener = serve_metrics(*metrics_listen, app.state.metrics.registry) if metrics_listen else None
        runtime.notifier.bind(asyncio.get_running_loop())
        await run_in_threadpool(runtime.refresh_tuf)
        if runtime.federation is not None:
            await run_in_threadpool(runtime.federation.start)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            if listener is not None:
                listener.close()
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
        audit.agent_router,
    ]
    _describe_routes(routers)
    for router in routers:
        app.include_router(router, responses=PROBLEM_RESPONSES)
    install_handlers(app)
    dashboard_jobs.extend(dashboard.install(app, runtime))  # the admin dashboard, under /ui
    app.add_middleware(BodyLimit, json_limit=runtime.config.max_json_body, upload_limit=runtime.config.max_upload_chunk)
    # Added last, so outermost: it sees what BodyLimit answers and whatever any layer raises.
    app.add_middleware(RequestRecorder, trail=trail, outbox=runtime.outbox, metrics=app.state.metrics, audited=audited)
    tracer = setup_tracing(app, "sitewarden-controller", exporter=span_exporter)
    app.state.tracer_provider = tracer
    return app
