"""Signing in and out, the dashboard's home, and its static assets."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from controller import access, auth
from controller.api.deps import principal, session
from controller.errors import Forbidden, NotFound, Unauthenticated
from controller.ui import render, sessions

router = APIRouter()


def _local(target: str | None) -> str:
    """Where to go after signing in: a dashboard path of this origin only (no open redirect)."""
    if target and target.startswith("/ui") and not target.startswith("/ui/login") and "\\" not in target:
        return target
    return "/ui"


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=303)


@router.get("/ui")
async def home(caller: auth.Principal = Depends(principal)) -> RedirectResponse:
    """The first page a role may see: the fleet, or the releases for approvers."""
    first = "/ui/fleet" if access.allows(caller.role, "GET", "/ui/fleet") else "/ui/releases"
    return RedirectResponse(first, status_code=303)


def _login_page(request: Request, status: int = 200, error: str | None = None, target: str | None = None) -> Response:
    token = sessions.new_login_token()
    response = render.page(request, "login.html", status=status, error=error, login_token=token, next=_local(target))
    response.set_cookie(
        sessions.LOGIN_COOKIE,
        token,
        max_age=sessions.LOGIN_TTL_S,
        path="/",
        secure=True,
        httponly=True,
        samesite="strict",
    )
    return response


@router.get("/ui/login")
async def login_form(request: Request, next: str | None = None) -> Response:
    return _login_page(request, target=next)


@router.post("/ui/login")
def login(
    request: Request,
    token: str = Form(max_length=200),
    login_token: str = Form(max_length=100),
    next: str = Form("/ui", max_length=2000),
    db: Session = Depends(session),
) -> Response:
    """Exchange an API token for a session; the audit entry names who signed in (or that it failed)."""
    if not sessions.login_token_matches(request.cookies.get(sessions.LOGIN_COOKIE), login_token):
        raise Forbidden("the sign-in form has expired or was not sent by this page: reload it and try again")
    try:
        caller = auth.person(db, token.strip())
    except Unauthenticated as exc:
        return _login_page(request, status=401, error=exc.detail, target=next)
    request.state.principal = caller
    secret, signed_in = sessions.start(db, caller)
    response = RedirectResponse(_local(next), status_code=303)
    response.set_cookie(
        sessions.SESSION_COOKIE,
        secret,
        max_age=max(1, int((signed_in.expires_at - sessions.utcnow()).total_seconds())),
        path="/",
        secure=True,
        httponly=True,
        samesite="strict",
    )
    response.delete_cookie(sessions.LOGIN_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


@router.post("/ui/logout")
async def logout(request: Request, db: Session = Depends(session), _: auth.Principal = Depends(principal)) -> Response:
    await run_in_threadpool(sessions.end, db, request.cookies.get(sessions.SESSION_COOKIE))
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(sessions.SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


@router.get("/ui/static/{path:path}")
async def static(path: str) -> Response:
    """A vendored or own asset, from the fixed list `render.ASSETS` (nothing else on disk is reachable)."""
    asset = render.ASSETS.get(path)
    if asset is None:
        raise NotFound(f"no dashboard asset {path[:200]!r}")
    return Response(
        asset.data,
        media_type=asset.media_type,
        headers={"Cache-Control": "public, max-age=604800, immutable", "ETag": f'"{asset.integrity}"'},
    )
