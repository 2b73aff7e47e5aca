"""The agent channel: sites pull (long-poll) their desired state and report what they observe.

Sites never accept inbound connections: a long poll that the controller answers as soon
as the site's desired state changes is how a push reaches them.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from controller import auth, rollouts
from controller.api.deps import principal, runtime, session
from controller.db import ObservedState, dialect_insert, utcnow
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
    caller: auth.Principal = Depends(principal),
    db: Session = Depends(session),
    rt: Runtime = Depends(runtime),
) -> DesiredPointer:
    site_id = caller.site_id or ""
    with rt.notifier.subscribe(site_id) as changed:
        pointer = await run_in_threadpool(_pointer, db, site_id, after)
        if pointer.changed or wait == 0:
            return pointer
        try:
            await asyncio.wait_for(changed, wait)
        except TimeoutError:
            return pointer
    return await run_in_threadpool(_pointer, db, site_id, after)


@router.post("/status", summary="Report observed state and heartbeat", status_code=204)
def report_status(
    body: StatusReport,
    request: Request,
    caller: auth.Principal = Depends(principal),
    db: Session = Depends(session),
) -> None:
    site_id = caller.site_id or ""
    artifacts = {
        f"{a.name}@{a.version}": {"kind": a.kind, "state": a.state, "reason": a.reason} for a in body.artifacts
    }
    now = utcnow()
    # Core statements rather than ORM objects: every site reports every few seconds.
    previous = db.execute(
        select(ObservedState.artifacts, ObservedState.desired_version).where(ObservedState.site_id == site_id)
    ).first()
    changed = previous is None or previous.artifacts != artifacts or previous.desired_version != body.desired_version
    values = {
        "desired_version": body.desired_version,
        "artifacts": artifacts,
        "agent_version": body.agent_version,
        "checkpoint_size": body.checkpoint_size,
        "heartbeat_at": now,
        **({"changed_at": now} if changed else {}),
    }
    insert = dialect_insert(db)
    db.execute(
        insert(ObservedState)
        .values(site_id=site_id, changed_at=now, **{k: v for k, v in values.items() if k != "changed_at"})
        .on_conflict_do_update(index_elements=["site_id"], set_=values)
    )
    db.commit()
    # Bare heartbeats are telemetry; a change in what the site runs is an audited event.
    request.state.audit = changed
