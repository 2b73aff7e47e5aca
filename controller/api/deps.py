"""Dependencies every route shares: the runtime, a database session, the authorised caller.

Most routes get their caller from `principal`; the dashboard's (`/ui`) also from a session cookie
(`controller.ui.sessions`). The routes of `auth.SITE_AUTH_IN_ROUTE` (the agent's
status report, the busiest) authenticate their site themselves with `in_site_transaction`: the
token check and the route's writes are then one transaction, committed once, on one worker thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from sqlalchemy import Connection
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from controller import audit_trail, auth
from controller.access import JOIN, PUBLIC
from controller.runtime import Runtime
from controller.ui import sessions

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


async def runtime(request: Request) -> Runtime:
    return request.app.state.runtime  # async: a sync dependency would cost a thread hop


async def session(request: Request) -> AsyncIterator[Session]:
    """A session for the request; routes commit what they change, the rest is rolled back at the end."""
    db = request.app.state.runtime.sessions()
    try:
        yield db
    finally:
        if db.in_transaction():
            await run_in_threadpool(db.close)  # gives the connection back: I/O
        else:
            db.close()  # nothing was read or written: no thread hop


async def principal(request: Request, db: Session = Depends(session)) -> auth.Principal:
    """Runs for every route: checks the caller against the access table (public routes stay off threads)."""
    rule = auth.route_rule(request)
    if rule is PUBLIC or rule is JOIN:
        request.state.principal = auth.ANONYMOUS
        return auth.ANONYMOUS
    if auth.authenticates_in_route(request):
        # Not yet authenticated: the route does it first, in its own transaction (`in_site_transaction`).
        return auth.ANONYMOUS
    if sessions.uses_session(request):
        # A dashboard page or action with the session cookie: same rule, plus the session's CSRF token.
        csrf = await _csrf_token(request) if request.method in sessions.MUTATING else None
        signed_in = await run_in_threadpool(sessions.authorize, db, request, rule, csrf)
        return signed_in.principal
    caller = await run_in_threadpool(auth.authorize, request, db, request.app.state.runtime.config.public_url)
    request.state.principal = caller
    return caller


async def _csrf_token(request: Request) -> str | None:
    """The CSRF token of a dashboard request: htmx's header, or the form field."""
    header = request.headers.get(sessions.CSRF_HEADER)
    if header:
        return header
    if request.headers.get("content-type", "").startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        value = (await request.form()).get(sessions.CSRF_FIELD)
        return value if isinstance(value, str) else None
    return None


async def in_site_transaction(request: Request, work: Callable[[Connection, auth.Principal], T]) -> T:
    """Authenticate the calling site, then run `work` in the same transaction, on one worker thread.

    For the routes of `auth.SITE_AUTH_IN_ROUTE` only (any other is refused). The token's jti, the
    check that its site is still enabled with that key, and what `work` writes commit together or
    not at all: a refusal or an error in `work` (an invalid body, say) records nothing, as when
    `principal` inserts the jti and the route does not commit.
    """
    rt: Runtime = request.app.state.runtime

    def run() -> T:
        rows: list[tuple[int, str]] = []
        try:
            with rt.engine.begin() as conn:
                conn.info[audit_trail.CONNECTION_ROWS] = rows  # the change records `work` makes
                try:
                    caller = auth.authorize_site_on(request, conn, rt.config.public_url)
                    result = work(conn, caller)
                finally:
                    del conn.info[audit_trail.CONNECTION_ROWS]
        except BaseException:
            audit_trail.abandoned(rt.engine, rows)  # rolled back with the change
            raise
        audit_trail.committed(rt.engine, rows)  # moved before the answer
        return result

    return await run_in_threadpool(run)


def json_body(request: Request, body: bytes, model: type[M]) -> M:
    """A body read by the route itself, validated as FastAPI validates a body parameter.

    For routes that must authenticate before they look at their body (`in_site_transaction`):
    a body that is not JSON, or not a valid `model`, is a RequestValidationError (422, naming
    the fields under `body`).
    """
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    main, _, sub = media_type.partition("/")
    is_json = main == "application" and (sub == "json" or sub.endswith("+json"))
    try:
        # Not JSON: the bytes themselves are validated, and refused, as FastAPI does.
        return model.model_validate_json(body) if is_json else model.model_validate(body)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        raise RequestValidationError(errors, body=body) from None
