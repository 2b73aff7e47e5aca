"""RFC 9457 problem details for every error the controller's HTTP layer can meet.

`install_handlers` turns controller errors, request validation errors, unknown routes
and anything unexpected into `application/problem+json`. Nothing from a stack trace
leaves the server.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from controller.errors import ControllerError

log = logging.getLogger("sitewarden.controller")

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://sitewarden.dev/problems/"


class FieldError(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details; `errors` lists invalid fields, `offset` where an upload stands."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str
    errors: list[FieldError] | None = None
    offset: int | None = None


def _problem_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_JSON: {"schema": Problem.model_json_schema()}}}


# Documented on every route, so that clients and schema checkers know the error shapes.
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _problem_response("Bad request: the detail says what is wrong."),
    401: _problem_response("No credentials, or unknown, expired or revoked ones."),
    403: _problem_response("The caller may not do this."),
    404: _problem_response("No such resource."),
    409: _problem_response("Conflict with the current state."),
    413: _problem_response("Request body too large."),
    422: _problem_response("Invalid request: `errors` names the fields."),
    500: _problem_response("Internal error; nothing about it leaves the server."),
}


def problem(status: int, title: str, detail: str, instance: str, slug: str | None = None, **extra: Any) -> JSONResponse:
    body = {
        "type": PROBLEM_BASE + slug if slug else "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
        **extra,
    }
    headers = {"WWW-Authenticate": 'Bearer realm="sitewarden"'} if status == 401 else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _field(loc: tuple[Any, ...]) -> str:
    """'body.files.0.sha256' from a pydantic location, without the leading 'body'."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in {"body", "query", "path", "header"} and len(parts) > 1:
        return ".".join(parts[1:]) if parts[0] == "body" else f"{parts[0]}.{'.'.join(parts[1:])}"
    return ".".join(parts)


def install_handlers(app: FastAPI) -> None:
    # Each handler leaves the error's class in the request state: the audit entry of a refusal names it.
    @app.exception_handler(ControllerError)
    async def _controller_error(request: Request, exc: ControllerError) -> JSONResponse:
        request.state.error = type(exc)
        return problem(exc.status, exc.title, exc.detail, request.url.path, exc.slug, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        request.state.error = type(exc)
        errors = [{"field": _field(tuple(e.get("loc", ()))), "message": e.get("msg", "")} for e in exc.errors()]
        fields = ", ".join(e["field"] for e in errors) or "request"
        return problem(422, "Invalid request", f"invalid {fields}", request.url.path, "validation", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        request.state.error = type(exc)
        titles = {404: "Not found", 405: "Method not allowed", 413: "Payload too large"}
        detail = exc.detail if isinstance(exc.detail, str) else titles.get(exc.status_code, "HTTP error")
        response = problem(exc.status_code, titles.get(exc.status_code, "HTTP error"), detail, request.url.path)
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # Not a failure of the controller: nobody reads this answer, but the refusal is recorded.
        request.state.error = type(exc)
        return problem(400, "Bad request", "the client went away before its request body arrived", request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The trace goes to the server log, never to the client (the audit log has the class).
        request_id = request.scope.get("state", {}).get("request_id", "")
        log.exception("unhandled error on %s %s (request id %s)", request.method, request.url.path, request_id)
        return problem(500, "Internal error", "the controller failed to handle this request", request.url.path)
