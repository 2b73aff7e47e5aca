"""Mounting the dashboard on the controller's application: routes, errors as pages, headers, background work.

- **Headers.** Every response under `/ui` gets a strict Content-Security-Policy with a fresh nonce
  (no inline script or style, no eval, nothing from another origin, no framing, forms post only
  here), `X-Frame-Options: DENY`, `nosniff`, `Referrer-Policy: same-origin`, and `no-store`
  (pages show what only signed-in people may see).
- **Errors.** A browser (`Accept: text/html`) gets a page: a sign-in redirect for 401, and the
  problem's title and detail otherwise; htmx's live updates are told to go to the sign-in page
  (`HX-Redirect`). Any other client gets the REST API's problem details, so the dashboard's
  routes answer tools and tests exactly as the API does.
- **Background work**, next to the controller's own: the audit index follows the log, sites are
  sampled for their history, and dead sessions are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.errors import ControllerError
from controller.runtime import Runtime
from controller.ui import audit_index, fleet, history, render, sessions
from controller.ui.routes import router

log = logging.getLogger("sitewarden.controller.ui")

SESSION_CLEANUP_S = 600


def csp(nonce: str) -> str:
    return (
        "default-src 'none'; "
        f"script-src 'nonce-{nonce}'; "
        f"style-src 'nonce-{nonce}'; "
        "img-src 'self' data:; "
        "connect-src 'self'; "
        "font-src 'self'; "
        "form-action 'self'; "
        "frame-ancestors 'none'; "
        "base-uri 'none'; "
        "object-src 'none'"
    )


class SecurityHeaders:
    """CSP with a per-response nonce, and the other headers of the module doc, on `/ui` (and `/`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith("/ui") or path == "/"):
            await self.app(scope, receive, send)
            return
        nonce = secrets.token_urlsafe(18)
        scope.setdefault("state", {})["csp_nonce"] = nonce
        static = path.startswith("/ui/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"cache-control" or static]
                headers += [
                    (b"content-security-policy", csp(nonce).encode()),
                    (b"x-frame-options", b"DENY"),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                    (b"cross-origin-opener-policy", b"same-origin"),
                    (b"cross-origin-resource-policy", b"same-origin"),
                    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=()"),
                ]
                if not static:
                    headers += [(b"cache-control", b"no-store"), (b"vary", b"HX-Request, Cookie")]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _wants_page(request: Request) -> bool:
    return request.url.path.startswith("/ui") and (
        "text/html" in request.headers.get("accept", "") or request.headers.get("hx-request") == "true"
    )


def _login_url(request: Request) -> str:
    target = request.headers.get("hx-current-url") or str(request.url)
    path = target.split("://", 1)[-1].partition("/")[2]
    return "/ui/login?next=" + quote("/" + path, safe="")


def _error_page(
    request: Request, status: int, title: str, detail: str, errors: list[dict[str, str]] | None = None
) -> Response:
    if status == 401:
        if request.headers.get("hx-request") == "true":
            return Response(status_code=401, headers={"HX-Redirect": _login_url(request)})
        return RedirectResponse(_login_url(request), status_code=303)
    return render.page(request, "error.html", status=status, title=title, detail=detail, errors=errors or [])


def install(app: FastAPI, runtime: Runtime) -> list[Callable[[], Coroutine[Any, Any, None]]]:
    """Add the dashboard to `app`; returns its background jobs for the application's lifespan to run."""
    app.include_router(router)
    app.state.fleet_summary = fleet.Summary(runtime.sessions)
    app.state.audit_index = audit_index.AuditIndex(runtime.audit.log) if runtime.audit is not None else None
    problem_handlers = dict(app.exception_handlers)

    async def _as_page(request: Request, exc: Exception) -> Response:
        if not _wants_page(request):
            handler = next(problem_handlers[cls] for cls in type(exc).__mro__ if cls in problem_handlers)
            return await handler(request, exc)
        if isinstance(exc, ControllerError):
            return _error_page(request, exc.status, exc.title, exc.detail)
        if isinstance(exc, RequestValidationError):
            errors = [
                {"field": ".".join(str(p) for p in e.get("loc", ())[1:]), "message": e.get("msg", "")}
                for e in exc.errors()
            ]
            return _error_page(request, 422, "Invalid form", "some fields are missing or invalid", errors)
        assert isinstance(exc, StarletteHTTPException)
        return _error_page(
            request, exc.status_code, "Not found" if exc.status_code == 404 else "Error", str(exc.detail)
        )

    for cls in (ControllerError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(cls, _as_page)
    app.add_middleware(SecurityHeaders)

    async def follow_audit_log() -> None:
        index = app.state.audit_index
        while index is not None:
            await asyncio.sleep(audit_index.CATCH_UP_S)
            await _quietly(runtime, index.catch_up, "audit-index")

    async def sample_sites() -> None:
        while True:
            await _quietly(runtime, history.sample, "site-samples")
            await asyncio.sleep(history.SAMPLE_EVERY_S)

    async def forget_sessions() -> None:
        while True:
            await asyncio.sleep(SESSION_CLEANUP_S)
            await _quietly(runtime, sessions.forget_expired, "session-cleanup")

    return [follow_audit_log, sample_sites, forget_sessions]


async def _quietly(runtime: Runtime, job: Callable[[Any], object], name: str) -> None:
    def run() -> None:
        with runtime.session() as db:
            job(db)

    try:
        await run_in_threadpool(run)
    except Exception:
        log.exception("dashboard background job %s failed", name)
