"""The controller's audit log: search, each entry with its inclusion proof (C2SP tlog-proof), the latest
checkpoint with its witnesses, and the auditors' export."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from controller.api import audit as api_audit
from controller.api.deps import runtime, session
from controller.db import AuditIndexEntry
from controller.errors import BadRequest, NotFound, Unavailable
from controller.runtime import Runtime
from controller.ui import audit_index, notes, render

router = APIRouter()

OUTCOMES = ("ok", "refused", "failed")
ACTIONS_TTL_S = 60.0


class KnownActions:
    """The actions the log holds, for the search form's suggestions (recounted every minute)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at = 0.0
        self._actions: list[str] = []

    def get(self, db: Session) -> list[str]:
        with self._lock:
            if time.monotonic() - self._at > ACTIONS_TTL_S:
                self._actions = list(
                    db.scalars(select(AuditIndexEntry.action).distinct().order_by(AuditIndexEntry.action))
                )
                self._at = time.monotonic()
            return self._actions


known_actions = KnownActions()


def _when(text: str | None, what: str) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise BadRequest(f"{what}: {text[:40]!r} is not a date and time (YYYY-MM-DDTHH:MM, UTC)") from exc
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _index(request: Request) -> audit_index.AuditIndex:
    index = request.app.state.audit_index
    if index is None:
        raise Unavailable("the controller's audit log is not open")
    return index


@router.get("/ui/audit")
def audit_page(
    request: Request,
    actor: str | None = Query(None, max_length=200),
    action: str | None = Query(None, max_length=300),
    resource: str | None = Query(None, max_length=200),
    outcome: str | None = Query(None, max_length=20),
    since: str | None = Query(None, max_length=40),
    until: str | None = Query(None, max_length=40),
    before: int | None = Query(None, ge=0),
    after: int | None = Query(None, ge=0),
    db: Session = Depends(session),
    rt: Runtime = Depends(runtime),
) -> Response:
    if outcome and outcome not in OUTCOMES:
        raise BadRequest(f"outcome must be one of {', '.join(OUTCOMES)}")
    q = audit_index.Search(
        actor=(actor or "").strip() or None,
        action=(action or "").strip() or None,
        resource=(resource or "").strip() or None,
        outcome=outcome or None,
        since=_when(since, "since"),
        until=_when(until, "until"),
    )
    results = audit_index.search(db, _index(request), q, before=before, after=after)
    assert rt.audit is not None
    log = rt.audit.log
    signed = log.signed_checkpoint
    return render.page(
        request,
        "audit.html",
        search=q,
        results=results,
        outcomes=OUTCOMES,
        actions=known_actions.get(db),
        log_size=log.size,
        checkpoint=notes.describe(signed, [log.vkey] if log.vkey else []) if signed else None,
        vkey=log.vkey,
    )


def _entry(rt: Runtime, index: int) -> bytes:
    assert rt.audit is not None
    if index >= rt.audit.log.size:
        raise NotFound(f"the controller's audit log has no entry {index} (it holds {rt.audit.log.size})")
    return rt.audit.log.entry(index)


@router.get("/ui/audit/entries/{index}")
def entry_page(
    request: Request, index: int = Path(ge=0), db: Session = Depends(session), rt: Runtime = Depends(runtime)
) -> Response:
    data = _entry(rt, index)
    assert rt.audit is not None
    checkpoint = rt.audit.log.last_checkpoint()
    try:
        pretty = json.dumps(json.loads(data), indent=2, sort_keys=True)
    except ValueError:
        pretty = data.decode(errors="replace")
    return render.page(
        request,
        "audit_entry.html",
        index=index,
        pretty=pretty,
        size=len(data),
        row=audit_index.describe(index, data),
        terms=audit_index.terms_of(db, index),
        covered=checkpoint is not None and index < checkpoint.size,
        vkey=rt.audit.log.vkey,
    )


@router.get("/ui/audit/entries/{index}/proof")
async def entry_proof(index: int = Path(ge=0), rt: Runtime = Depends(runtime)) -> Response:
    """A C2SP tlog-proof of the entry in the latest checkpoint (signed now if the entry is newer than it)."""

    def prove() -> str:
        _entry(rt, index)
        assert rt.audit is not None
        checkpoint = rt.audit.log.last_checkpoint()
        if checkpoint is None or index >= checkpoint.size:
            rt.audit.checkpoint()
        return rt.audit.log.tlog_proof(index).format()

    proof = await run_in_threadpool(prove)
    return Response(
        proof,
        media_type="text/plain; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="controller-audit-{index}.tlog-proof"'},
    )


@router.get("/ui/audit/entries/{index}/entry")
async def entry_bytes(index: int = Path(ge=0), rt: Runtime = Depends(runtime)) -> Response:
    """The entry's exact bytes, as `sitewarden audit verify-proof --entry` needs them."""
    data = await run_in_threadpool(_entry, rt, index)
    return Response(
        data,
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="controller-audit-{index}.json"'},
    )


@router.get("/ui/audit/export")
def export(rt: Runtime = Depends(runtime)) -> Response:
    return api_audit.export(rt)
