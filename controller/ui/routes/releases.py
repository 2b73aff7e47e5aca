"""Releases: versions, files and digests, model cards, approvals, and where each version runs."""

from __future__ import annotations

import threading
import time
from collections import Counter

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from controller import auth, registry
from controller.api import releases as api_releases
from controller.api.deps import principal, session
from controller.db import Approval, ObservedState, Release, Rollout, Site
from controller.ui import render
from controller.ui.routes.common import runtime_of

router = APIRouter()

NAMES_PER_PAGE = 50
RUNNING_TTL_S = 5.0


class Running:
    """Sites per artifact (`name@version`) and state, from every site's observed state, recounted every few seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at = 0.0
        self._counts: dict[str, Counter[str]] = {}

    def counts(self, db: Session) -> dict[str, Counter[str]]:
        with self._lock:
            if time.monotonic() - self._at > RUNNING_TTL_S:
                counts: dict[str, Counter[str]] = {}
                for (artifacts,) in db.execute(select(ObservedState.artifacts)):
                    for key, state in (artifacts or {}).items():
                        counts.setdefault(key, Counter())[state.get("state", "")] += 1
                self._counts, self._at = counts, time.monotonic()
            return self._counts


running = Running()


@router.get("/ui/releases")
def releases_page(
    request: Request, after: str | None = Query(None, max_length=100), db: Session = Depends(session)
) -> Response:
    names_query = select(Release.name).group_by(Release.name).order_by(Release.name)
    if after:
        names_query = names_query.where(Release.name > after)
    names = list(db.scalars(names_query.limit(NAMES_PER_PAGE + 1)))
    more = len(names) > NAMES_PER_PAGE
    names = names[:NAMES_PER_PAGE]
    approvals = func.count(Approval.id).label("approvals")
    rows = (
        db.execute(
            select(Release, approvals)
            .outerjoin(Approval, Approval.release_id == Release.id)
            .where(Release.name.in_(names))
            .group_by(Release.id)
            .order_by(Release.name, Release.created_at.desc())
        ).all()
        if names
        else []
    )
    grouped: dict[str, list[tuple[Release, int]]] = {}
    for release, count in rows:
        grouped.setdefault(release.name, []).append((release, count))
    return render.page(
        request,
        "releases.html",
        grouped=grouped,
        running=running.counts(db),
        next_after=names[-1] if more and names else None,
    )


def _where_it_runs(db: Session, key: str) -> list[tuple[str, str, str]]:
    """(site name, state, reason) of every site that reports this artifact."""
    found = []
    for name, artifacts in db.execute(
        select(Site.name, ObservedState.artifacts)
        .join(ObservedState, ObservedState.site_id == Site.id)
        .order_by(Site.name)
    ):
        state = (artifacts or {}).get(key)
        if state is not None:
            found.append((name, state.get("state", ""), state.get("reason", "")))
    return found


def _rollouts_carrying(db: Session, name: str, version: str) -> list[Rollout]:
    wanted = {"name": name, "version": version}
    return [
        r
        for r in db.scalars(select(Rollout).order_by(Rollout.created_at.desc()))
        if wanted in r.spec.get("releases", []) or r.spec.get("policy") == wanted
    ]


@router.get("/ui/releases/{name}/{version}")
def release_page(
    request: Request,
    name: str,
    version: str,
    db: Session = Depends(session),
    caller: auth.Principal = Depends(principal),
) -> Response:
    info = api_releases.show_release(name, version, db)
    return render.page(
        request,
        "release.html",
        release=info,
        sites=_where_it_runs(db, f"{name}@{version}"),
        rollouts=_rollouts_carrying(db, name, version),
        approved_by_me=any(a.approver == caller.name for a in info.approvals),
    )


@router.get("/ui/releases/{name}/{version}/approve")
def approve_page(
    request: Request,
    name: str,
    version: str,
    db: Session = Depends(session),
    caller: auth.Principal = Depends(principal),
) -> Response:
    """What an approver checks, and the command that signs on their own machine (keys never reach the browser)."""
    release = registry.get_release(db, name, version)
    info = api_releases.show_release(name, version, db)
    return render.page(
        request,
        "approve.html",
        release=info,
        layout=registry.signed_layout(release),
        uploader_is_me=release.uploaded_by == caller.name,
        approved_by_me=any(a.approver == caller.name for a in info.approvals),
        command=f"sitewarden release approve {name} {version} --key approver.pem",
        controller_url=runtime_of(request).config.public_url,
    )
