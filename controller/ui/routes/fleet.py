"""The fleet page and the site page (with disabling a site)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller import access, auth, rollouts, sites
from controller.api import sites as api_sites
from controller.api.deps import principal, session
from controller.db import JoinTokenRecord, ObservedState, Site, WitnessedCheckpoint
from controller.ui import audit_index, fleet, fragments, history, notes, render
from controller.ui.routes.common import after_action, runtime_of

router = APIRouter()

SITE_AUDIT_ENTRIES = 20


@router.get("/ui/fleet")
def fleet_page(
    request: Request,
    label: str | None = Query(None, max_length=500),
    state: str | None = Query(None, max_length=20),
    after: str | None = Query(None, max_length=100),
    before: str | None = Query(None, max_length=100),
    db: Session = Depends(session),
) -> Response:
    filters = fleet.Filters.parse(label, state)
    found = fleet.page(db, filters, after=after, before=before)
    counts, counted_at = request.app.state.fleet_summary.counts(db)
    template = "_fleet_table.html" if render.fragment(request) else "fleet.html"
    return render.page(
        request,
        template,
        page=found,
        filters=filters,
        counts=counts,
        counted_at=counted_at,
        states=fleet.STATES,
        fleet_row=fragments.fleet_row,
    )


@dataclass(frozen=True)
class ArtifactLine:
    """One artifact of a site: whether it should run it, and what the site says of it."""

    key: str
    kind: str
    desired: bool
    state: str | None
    reason: str


def _artifacts(document: dict | None, observed: ObservedState | None) -> list[ArtifactLine]:
    wanted: dict[str, str] = {}
    if document:
        for ref in document.get("releases", []):
            wanted[f"{ref['name']}@{ref['version']}"] = ref.get("kind", "")
        if document.get("policy"):
            wanted[f"{document['policy']['name']}@{document['policy']['version']}"] = "policy"
        for job in document.get("jobs", []):
            wanted[f"job:{job.get('name', job.get('id'))}"] = "job"
    seen = observed.artifacts if observed else {}
    lines = []
    for key in sorted(set(wanted) | set(seen)):
        state = seen.get(key, {})
        lines.append(
            ArtifactLine(
                key,
                wanted.get(key) or state.get("kind", ""),
                key in wanted,
                state.get("state"),
                state.get("reason", ""),
            )
        )
    return lines


def _site_context(request: Request, db: Session, site: Site) -> dict:
    observed = db.get(ObservedState, site.id)
    desired = rollouts.current_desired(db, site.id)
    witnessed = db.get(WitnessedCheckpoint, site.id)
    info = api_sites.show_site(site.id, db)
    vkeys = [v for v in (info.audit_vkey, runtime_of(request).witness_signer.vkey) if v]
    return {
        "site": info,
        "row": fleet.row(db, site.id),
        "observed": observed,
        "desired": desired,
        "artifacts": _artifacts(desired.document if desired else None, observed),
        "witnessed": witnessed,
        "witnessed_note": notes.describe(witnessed.note, vkeys) if witnessed else None,
    }


@router.get("/ui/sites/{site}")
def site_page(
    request: Request, site: str, db: Session = Depends(session), caller: auth.Principal = Depends(principal)
) -> Response:
    found = sites.get(db, site)
    context = _site_context(request, db, found)
    if render.fragment(request):
        return render.page(request, "_site_live.html", **context)
    joins = db.scalars(
        select(JoinTokenRecord).where(JoinTokenRecord.site_id == found.id).order_by(JoinTokenRecord.created_at.desc())
    ).all()
    entries = None
    index = request.app.state.audit_index
    if index is not None and access.allows(caller.role, "GET", "/ui/audit"):
        # Enrollment, key rotations and every action on the site, from the controller's own log.
        results = [
            audit_index.search(db, index, audit_index.Search(resource=term), limit=SITE_AUDIT_ENTRIES).rows
            for term in (found.name, found.id)
        ]
        results.append(
            audit_index.search(db, index, audit_index.Search(actor=f"site:{found.name}"), limit=SITE_AUDIT_ENTRIES).rows
        )
        merged = {
            e.idx: e
            for rows in results
            for e in rows
            if e.actor != f"site:{found.name}" or "rotate" in e.action or "enroll" in e.action
        }
        entries = sorted(merged.values(), key=lambda e: e.idx, reverse=True)[:SITE_AUDIT_ENTRIES]
    history_chart = history.series(db, found.id).chart()
    return render.page(request, "site.html", joins=joins, entries=entries, history_chart=history_chart, **context)


@router.get("/ui/sites/{site}/disable")
def disable_confirm(request: Request, site: str, db: Session = Depends(session)) -> Response:
    found = sites.get(db, site)
    changes = [
        f"Site {found.name}'s agent is refused at its next request: it gets no new desired state and its "
        "checkpoints are no longer witnessed.",
        "Rollouts skip it from now on. It keeps serving what it last activated, on its own.",
        "Disabling cannot be undone here: a disabled site cannot enroll again under this name.",
    ]
    return render.page(
        request,
        "confirm.html",
        title=f"Disable site {found.name}?",
        changes=changes,
        action=f"/ui/sites/{found.name}/disable",
        button="Disable the site",
        cancel=f"/ui/sites/{found.name}",
        danger=True,
    )


@router.post("/ui/sites/{site}/disable")
def disable(site: str, db: Session = Depends(session)) -> Response:
    info = api_sites.disable_site(site, db)
    return after_action(f"/ui/sites/{info.name}", "disabled")
