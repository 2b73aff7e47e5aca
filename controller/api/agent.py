"""The agent channel: sites pull (long-poll) their desired state and report what they observe.

Sites never accept inbound connections: a long poll that the controller answers as soon
as the site's desired state changes is how a push reaches them. A site that witnesses the
controller's audit log names the checkpoint size it last cosigned (`audit_after`): the poll
then also answers when a newer checkpoint is signed.
"""

from __future__ import annotations

import asyncio
import functools
import json
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel
from sqlalchemy import Connection, Text, case, cast, or_
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from controller import audit_trail, auth, rollouts
from controller.api.deps import in_site_transaction, json_body, principal, runtime, session
from controller.changes import ObservedStateChanged
from controller.db import ObservedState, utcnow
from controller.runtime import Runtime
from sitewarden.desired import target_path
from sitewarden.wire import DesiredPointer, StatusReport

router = APIRouter(prefix="/api/v1/agent", tags=["agent"])

MAX_WAIT_S = 30


def _pointer(db: Session, site_id: str, after: int) -> DesiredPointer:
    current = rollouts.current_desired(db, site_id)
    version, sha256 = (current.version, current.sha256) if current else (0, None)
    # End the transaction (and give its connection back) before waiting: the next read
    # must see later commits, and a parked long poll must not hold a database connection.
    db.commit()
    return DesiredPointer(version=version, target=target_path(site_id), sha256=sha256, changed=version > after)


@router.get("/desired", summary="Long-poll the site's desired-state version", response_model=DesiredPointer)
async def desired(
    after: int = Query(0, ge=0, description="The version the agent holds; answers at once if a newer one exists."),
    wait: int = Query(MAX_WAIT_S, ge=0, le=MAX_WAIT_S, description="Seconds to hold the request for a change."),
    audit_after: int | None = Query(
        None,
        ge=0,
        description="The size of the controller's audit checkpoint the site last cosigned: the poll also answers "
        "when a newer checkpoint is signed (`audit_size`).",
    ),
    caller: auth.Principal = Depends(principal),
    db: Session = Depends(session),
    rt: Runtime = Depends(runtime),
) -> DesiredPointer:
    site_id = caller.site_id or ""
    trail = rt.audit

    def answer(pointer: DesiredPointer) -> DesiredPointer:
        pointer.audit_size = trail.checkpoint_size if trail is not None else None
        return pointer

    with rt.notifier.subscribe(site_id) as changed, rt.notifier.subscribe_checkpoint() as signed:
        pointer = await run_in_threadpool(_pointer, db, site_id, after)
        newer = audit_after is not None and trail is not None and trail.checkpoint_size > audit_after
        if pointer.changed or wait == 0 or newer:
            return answer(pointer)
        waiting = {changed, signed} if audit_after is not None else {changed}
        done, _ = await asyncio.wait(waiting, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        if changed not in done:
            return answer(pointer)
    return answer(await run_in_threadpool(_pointer, db, site_id, after))


_observed = ObservedState.__table__


@functools.cache
def _observe_statement(dialect: str) -> Any:
    """Upsert a site's observed state in one statement, returning `changed_at` and, on a change, what was before.

    `changed_at` moves only when the desired version or the artifacts differ from the stored
    ones (the row's old values, compared in the database: no read first); a caller sees a
    change when the returned `changed_at` is the time it sent. On a change the old values are
    kept in `previous_*`, and returned for the audit record. Built once per dialect.
    """
    upsert = (postgresql_insert if dialect == "postgresql" else sqlite_insert)(_observed)
    new = upsert.excluded
    if dialect == "postgresql":  # json has no equality; jsonb compares as documents
        artifacts_differ = cast(_observed.c.artifacts, JSONB).is_distinct_from(cast(new.artifacts, JSONB))
    else:  # SQLite keeps the JSON text, written with sorted keys (see `report_status`)
        artifacts_differ = cast(_observed.c.artifacts, Text) != cast(new.artifacts, Text)
    differs = or_(_observed.c.desired_version != new.desired_version, artifacts_differ)
    # In RETURNING the columns are the row as written: its changed_at is its heartbeat_at exactly when it changed.
    changed = _observed.c.changed_at == _observed.c.heartbeat_at
    return upsert.on_conflict_do_update(
        index_elements=[_observed.c.site_id],
        set_={
            "desired_version": new.desired_version,
            "artifacts": new.artifacts,
            "agent_version": new.agent_version,
            "checkpoint_size": new.checkpoint_size,
            "heartbeat_at": new.heartbeat_at,
            "changed_at": case((differs, new.changed_at), else_=_observed.c.changed_at),
            "previous_desired_version": case(
                (differs, _observed.c.desired_version), else_=_observed.c.previous_desired_version
            ),
            "previous_artifacts": case((differs, _observed.c.artifacts), else_=_observed.c.previous_artifacts),
        },
    ).returning(
        _observed.c.changed_at,
        case((changed, _observed.c.previous_desired_version), else_=None),
        case((changed, _observed.c.previous_artifacts), else_=None),
    )


def _artifact_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per artifact whose state or reason changed: what it was and what it is (None where absent)."""
    out = {}
    for key in sorted(set(before) | set(after)):
        was, now = before.get(key), after.get(key)
        if was != now:
            out[key] = {
                "before": {"state": was.get("state"), "reason": was.get("reason", "")} if was else None,
                "after": {"state": now.get("state"), "reason": now.get("reason", "")} if now else None,
            }
    return out


def record_status(db: Connection, site_id: str, report: StatusReport, now: datetime, site_name: str = "") -> bool:
    """Store a site's report as its observed state; True when what it runs changed (recorded in the audit trail)."""
    artifacts = {
        f"{a.name}@{a.version}": {"kind": a.kind, "state": a.state, "reason": a.reason} for a in report.artifacts
    }
    values = {
        "site_id": site_id,
        "desired_version": report.desired_version,
        # Keys sorted: the same artifacts are the same JSON text, whatever order the agent sent them in.
        "artifacts": dict(sorted(artifacts.items())),
        "agent_version": report.agent_version,
        "checkpoint_size": report.checkpoint_size,
        "heartbeat_at": now,
        "changed_at": now,
    }
    changed_at, version_before, artifacts_before = db.execute(_observe_statement(db.dialect.name), values).one()
    if changed_at != now:
        return False
    if isinstance(artifacts_before, str):  # some drivers hand back JSON text from a CASE expression
        artifacts_before = json.loads(artifacts_before)
    change = ObservedStateChanged(
        site_id,
        site_name,
        version_before,
        report.desired_version,
        _artifact_changes(artifacts_before or {}, values["artifacts"]),
    )
    audit_trail.record_on(db, change)
    return True


def _inlined_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its `$defs` put in place (it lives inside an OpenAPI operation)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        return [inline(item) for item in node] if isinstance(node, list) else node

    return inline(schema)


@router.post(
    "/status",
    summary="Report observed state and heartbeat",
    status_code=204,
    response_class=Response,
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": _inlined_schema(StatusReport)}}}
    },
)
async def report_status(request: Request) -> Response:
    # The site is authenticated first, then the body validated and stored: one transaction, one thread hop.
    body = await request.body()
    now = utcnow()

    def store(conn: Connection, caller: auth.Principal) -> bool:
        return record_status(conn, caller.site_id or "", json_body(request, body, StatusReport), now, caller.name)

    # Bare heartbeats are telemetry; a change in what the site runs is recorded with its before and after.
    request.state.audit = await in_site_transaction(request, store)
    return Response(status_code=204)  # returned as is: nothing for FastAPI to serialise
