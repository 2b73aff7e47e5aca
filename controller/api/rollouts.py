"""Rollouts: desired state for sites selected by labels, released in waves."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller import auth, rollouts, sites
from controller.api import pagination
from controller.api.deps import principal, runtime, session
from controller.api.schemas import DesiredInfo, Page, RolloutCreate, RolloutInfo
from controller.db import Rollout
from controller.errors import NotFound
from controller.runtime import Runtime

router = APIRouter(prefix="/api/v1", tags=["rollouts"])


def _info(db: Session, rollout: Rollout) -> RolloutInfo:
    return RolloutInfo.model_validate(rollouts.status(db, rollout))


@router.post(
    "/rollouts",
    status_code=201,
    summary="Create a rollout; its first wave is released at once",
    response_model=RolloutInfo,
)
def create(
    body: RolloutCreate,
    caller: auth.Principal = Depends(principal),
    db: Session = Depends(session),
    rt: Runtime = Depends(runtime),
) -> RolloutInfo:
    spec = rollouts.RolloutSpec(
        name=body.name,
        releases=[(r.name, r.version) for r in body.releases],
        policy=(body.policy.name, body.policy.version) if body.policy else None,
        selector=body.selector,
        canary=body.canary,
        canary_percent=body.canary_percent,
        auto_promote_after_s=body.auto_promote_after_s,
    )
    rollout = rollouts.create(db, spec, caller.name)
    rt.reconcile(db, rollout)
    return _info(db, rollout)


@router.get("/rollouts", summary="List rollouts", response_model=Page[RolloutInfo])
def list_rollouts(
    limit: int = Query(pagination.DEFAULT_LIMIT, ge=1, le=pagination.MAX_LIMIT),
    after: str | None = Query(None, max_length=500),
    db: Session = Depends(session),
) -> Page[RolloutInfo]:
    rows = list(db.scalars(pagination.page(select(Rollout), Rollout.name, after, limit)))
    rows, nxt = pagination.next_cursor(rows, limit, lambda r: r.name)
    return Page[RolloutInfo](items=[_info(db, r) for r in rows], next=nxt)


@router.get("/rollouts/{rollout}", summary="A rollout's conditions and per-site state", response_model=RolloutInfo)
def show(rollout: str, db: Session = Depends(session)) -> RolloutInfo:
    return _info(db, rollouts.get(db, rollout))


@router.post("/rollouts/{rollout}/promote", summary="Release the next wave", response_model=RolloutInfo)
def promote(rollout: str, db: Session = Depends(session), rt: Runtime = Depends(runtime)) -> RolloutInfo:
    found = rollouts.get(db, rollout)
    rollouts.promote(db, found)
    rt.reconcile(db, found)
    return _info(db, found)


@router.post(
    "/rollouts/{rollout}/pause",
    summary="Stop promoting waves (released sites keep their state)",
    response_model=RolloutInfo,
)
def pause(rollout: str, db: Session = Depends(session)) -> RolloutInfo:
    found = rollouts.get(db, rollout)
    rollouts.set_paused(found, paused=True)
    db.commit()
    return _info(db, found)


@router.post("/rollouts/{rollout}/resume", summary="Resume promoting waves", response_model=RolloutInfo)
def resume(rollout: str, db: Session = Depends(session), rt: Runtime = Depends(runtime)) -> RolloutInfo:
    found = rollouts.get(db, rollout)
    rollouts.set_paused(found, paused=False)
    rt.reconcile(db, found)
    return _info(db, found)


@router.post(
    "/rollouts/{rollout}/rollback",
    summary="Re-point the rollout's sites to the desired state they had before it",
    response_model=RolloutInfo,
)
def rollback(rollout: str, db: Session = Depends(session), rt: Runtime = Depends(runtime)) -> RolloutInfo:
    found = rollouts.get(db, rollout)
    rt.rollback(db, found)
    return _info(db, found)


@router.get("/sites/{site}/desired", summary="A site's current desired-state document", response_model=DesiredInfo)
def site_desired(site: str, db: Session = Depends(session)) -> DesiredInfo:
    found = sites.get(db, site)
    current = rollouts.current_desired(db, found.id)
    if current is None:
        raise NotFound(f"site {found.name} has no desired state yet")
    return DesiredInfo(
        site_id=found.id,
        version=current.version,
        sha256=current.sha256,
        rollout_id=current.rollout_id,
        created_at=current.created_at,
        document=current.document,
    )
