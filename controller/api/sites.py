"""Sites, join tokens, enrollment, and the agent's own identity routes."""

from __future__ import annotations

import base64
from datetime import timedelta

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.note import verifier_key
from controller import auth, log_witnesses, sites
from controller.api import pagination
from controller.api.deps import principal, runtime, session
from controller.api.schemas import JoinTokenCreate, JoinTokenCreated, Page, SiteCreate, SiteInfo, SiteLabels, SiteVkey
from controller.db import Site, SiteKey
from controller.runtime import Runtime
from sitewarden.wire import EnrollRequest, EnrollResponse, RotateKeyRequest, SiteIdentity

router = APIRouter(prefix="/api/v1", tags=["sites"])
agent_router = APIRouter(prefix="/api/v1", tags=["agent"])


def _audit_vkey(site_id: str, public_key: str | None) -> str | None:
    """A site key, as the vkey of the site's audit log (origin `sitewarden/<site-id>`)."""
    if not public_key:
        return None
    return verifier_key(f"sitewarden/{site_id}", base64.b64decode(public_key))


def _history(db: Session, site_ids: list[str]) -> dict[str, list[SiteVkey]]:
    """The key history of many sites in one query, as vkeys, oldest first."""
    found: dict[str, list[SiteVkey]] = {site_id: [] for site_id in site_ids}
    if site_ids:
        rows = db.scalars(select(SiteKey).where(SiteKey.site_id.in_(site_ids)).order_by(SiteKey.id))
        for row in rows:
            vkey = _audit_vkey(row.site_id, row.public_key)
            if vkey is not None:
                found[row.site_id].append(
                    SiteVkey(
                        vkey=vkey,
                        since=row.since,
                        until=row.until,
                        ended_by=row.ended_by,
                        last_checkpoint=row.last_checkpoint,
                    )
                )
    return found


def _info(site: Site, history: list[SiteVkey] | None = None) -> SiteInfo:
    return SiteInfo(
        id=site.id,
        name=site.name,
        labels=site.labels,
        status=site.status,
        audit_vkey=_audit_vkey(site.id, site.public_key),
        audit_vkeys=history or [],
        witness_vkey=log_witnesses.site_witness_vkey(site),
        created_at=site.created_at,
        enrolled_at=site.enrolled_at,
        disabled_at=site.disabled_at,
        key_rotated_at=site.key_rotated_at,
    )


@router.post("/sites", status_code=201, summary="Create a site", response_model=SiteInfo)
def create_site(
    body: SiteCreate, caller: auth.Principal = Depends(principal), db: Session = Depends(session)
) -> SiteInfo:
    return _info(sites.create(db, body.name, body.labels, caller.name))


@router.get("/sites", summary="List sites", response_model=Page[SiteInfo])
def list_sites(
    limit: int = Query(pagination.DEFAULT_LIMIT, ge=1, le=pagination.MAX_LIMIT),
    after: str | None = Query(None, max_length=500),
    db: Session = Depends(session),
) -> Page[SiteInfo]:
    rows = list(db.scalars(pagination.page(select(Site), Site.name, after, limit)))
    rows, nxt = pagination.next_cursor(rows, limit, lambda r: r.name)
    history = _history(db, [r.id for r in rows])
    return Page[SiteInfo](items=[_info(r, history[r.id]) for r in rows], next=nxt)


@router.get("/sites/{site}", summary="Show a site (by id or name)", response_model=SiteInfo)
def show_site(site: str, db: Session = Depends(session)) -> SiteInfo:
    found = sites.get(db, site)
    return _info(found, _history(db, [found.id])[found.id])


@router.put("/sites/{site}/labels", summary="Replace a site's labels (by id or name)", response_model=SiteInfo)
def set_labels(site: str, body: SiteLabels, db: Session = Depends(session)) -> SiteInfo:
    return _info(sites.set_labels(db, site, body.labels))


@router.post("/sites/{site}/disable", summary="Disable a site: its agent is refused at once", response_model=SiteInfo)
def disable_site(site: str, db: Session = Depends(session)) -> SiteInfo:
    return _info(sites.disable(db, site))


@router.post(
    "/sites/{site}/join-tokens", status_code=201, summary="Issue a one-time join token", response_model=JoinTokenCreated
)
def create_join_token(
    site: str,
    body: JoinTokenCreate,
    caller: auth.Principal = Depends(principal),
    db: Session = Depends(session),
    rt: Runtime = Depends(runtime),
) -> JoinTokenCreated:
    token = sites.issue_join_token(
        db,
        site,
        timedelta(seconds=body.ttl_seconds),
        controller_url=rt.config.public_url,
        root_sha256=rt.tuf.root_sha256(),
        created_by=caller.name,
    )
    return JoinTokenCreated(
        token=token.encode(),
        site=token.site,
        expires_at=token.expires_at,
        controller_url=token.controller_url,
        root_sha256=token.root_sha256,
    )


@agent_router.post(
    "/enroll", summary="Enroll a site with a join token and its public key", response_model=EnrollResponse
)
def enroll(body: EnrollRequest, db: Session = Depends(session), rt: Runtime = Depends(runtime)) -> EnrollResponse:
    site, root = sites.enroll(db, body.token, body.public_key, rt.root_by_sha256)
    return EnrollResponse(
        site_id=site.id,
        site_name=site.name,
        controller_url=rt.config.public_url,
        root=base64.b64encode(root).decode(),
        witness_vkey=rt.witness_signer.vkey,
        audit_vkey=rt.audit.log.vkey if rt.audit is not None else None,
    )


@agent_router.get("/agent/whoami", summary="The calling site's identity", response_model=SiteIdentity)
def whoami(caller: auth.Principal = Depends(principal), db: Session = Depends(session)) -> SiteIdentity:
    site = sites.get(db, caller.site_id or "")
    return SiteIdentity(site_id=site.id, site_name=site.name, labels=site.labels, status=site.status)


@agent_router.post(
    "/agent/rotate-key", summary="Rotate the site key (request signed by the old key)", response_model=SiteIdentity
)
def rotate_key(
    body: RotateKeyRequest,
    caller: auth.Principal = Depends(principal),
    db: Session = Depends(session),
    rt: Runtime = Depends(runtime),
) -> SiteIdentity:
    site = sites.rotate_key(db, caller.site_id or "", body.public_key, body.proof, rt.config.public_url)
    return SiteIdentity(site_id=site.id, site_name=site.name, labels=site.labels, status=site.status)
