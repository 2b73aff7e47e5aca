"""Dependencies every route shares: the runtime, a database session, the authorised caller."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from controller import auth
from controller.access import JOIN, PUBLIC
from controller.runtime import Runtime


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
    caller = await run_in_threadpool(auth.authorize, request, db, request.app.state.runtime.config.public_url)
    request.state.principal = caller
    return caller
