"""Dependencies every route shares: the runtime, a database session, the authorised caller."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from controller import auth
from controller.runtime import Runtime


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def session(request: Request) -> Iterator[Session]:
    with request.app.state.runtime.sessions() as s:
        yield s


def principal(request: Request, db: Session = Depends(session)) -> auth.Principal:
    """Runs for every API route: checks the caller against the access table."""
    caller = auth.authorize(request, db, request.app.state.runtime.config.public_url)
    request.state.principal = caller
    return caller
