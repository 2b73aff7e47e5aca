"""Rollouts: waves with per-site progress and conditions, live; creating one; promote, pause, resume
and rollback, each behind a confirmation that names what will change."""

from __future__ import annotations

from collections import Counter
from typing import Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller import auth, rollouts
from controller.api import rollouts as api_rollouts
from controller.api.deps import principal, runtime, session
from controller.api.schemas import RolloutCreate, RolloutInfo
from controller.db import DesiredState, Release, Rollout, Site
from controller.errors import ControllerError
from controller.runtime import Runtime
from controller.ui import render
from controller.ui.routes.common import after_action, int_or_none, pairs, release_ref, words

router = APIRouter()

PER_PAGE = 50
SITES_SHOWN = 200
ACTIONS = ("promote", "pause", "resume", "rollback")


def _choices(db: Session) -> dict[str, list[str]]:
    """Releases a rollout can carry, newest first: models and adapters, and policy bundles."""
    rows = db.execute(
        select(Release.name, Release.version, Release.kind).order_by(Release.name, Release.created_at.desc())
    )
    out: dict[str, list[str]] = {"releases": [], "policies": []}
    for name, version, kind in rows:
        out["policies" if kind == "policy" else "releases"].append(f"{name}@{version}")
    return out


def _list_page(request: Request, db: Session, after: str | None, status: int = 200, **form: Any) -> Response:
    page = api_rollouts.list_rollouts(limit=PER_PAGE, after=after, db=db)
    return render.page(
        request,
        "rollouts.html",
        status=status,
        rollouts=page.items,
        next_cursor=page.next,
        choices=_choices(db),
        form=form.get("form", {}),
        error=form.get("error"),
    )


@router.get("/ui/rollouts")
def rollouts_page(
    request: Request, after: str | None = Query(None, max_length=500), db: Session = Depends(session)
) -> Response:
    return _list_page(request, db, after)


@router.post("/ui/rollouts")
def create(
    request: Request,
    name: str = Form(max_length=100),
    release: list[str] = Form(default_factory=list),
    policy: str = Form("", max_length=210),
    selector: str = Form("", max_length=2000),
    canary: str = Form("", max_length=5000),
    canary_percent: str = Form("", max_length=10),
    auto_promote_after_s: str = Form("", max_length=10),
    caller: auth.Principal = Depends(principal),
    db: Session = Depends(session),
    rt: Runtime = Depends(runtime),
) -> Response:
    """The REST API's rollout creation, from the form; a refusal shows the form again with the reason."""
    form = {
        "name": name,
        "release": release,
        "policy": policy,
        "selector": selector,
        "canary": canary,
        "canary_percent": canary_percent,
        "auto_promote_after_s": auto_promote_after_s,
    }
    try:
        body = RolloutCreate(
            name=name.strip(),
            releases=[release_ref(r, "release") for r in release if r],
            policy=release_ref(policy, "policy") if policy else None,
            selector=pairs(selector, "selector"),
            canary=words(canary),
            canary_percent=int_or_none(canary_percent, "canary percent"),
            auto_promote_after_s=int_or_none(auto_promote_after_s, "promote automatically after"),
        )
    except (ValueError, ValidationError) as exc:
        message = (
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            if isinstance(exc, ValidationError)
            else str(exc)
        )
        return _list_page(request, db, None, status=422, form=form, error=message)
    try:
        created = api_rollouts.create(body, caller, db, rt)
    except ControllerError as exc:
        db.rollback()
        return _list_page(request, db, None, status=exc.status, form=form, error=exc.detail)
    return after_action(f"/ui/rollouts/{created.name}", "created")


@router.get("/ui/rollouts/{rollout}")
def rollout_page(request: Request, rollout: str, db: Session = Depends(session)) -> Response:
    info = api_rollouts.show(rollout, db)
    template = "_rollout_live.html" if render.fragment(request) else "rollout.html"
    return render.page(request, template, rollout=info, waves=_waves(info), actions=_available(info))


def _waves(info: RolloutInfo) -> list[dict[str, Any]]:
    """Per wave: its sites' progress, and the sites worth looking at first (problems, then pending)."""
    waves = []
    for wave in range(info.waves):
        rows = [s for s in info.sites if s.wave == wave]
        counts: Counter[str] = Counter()
        for s in rows:
            counts[_site_state(s)] += 1
        rank = {"refused": 0, "failed": 0, "stale": 1, "pending": 2, "superseded": 3, "healthy": 4, "not released": 5}
        shown = sorted(rows, key=lambda s: (rank.get(_site_state(s), 9), s.site))[:SITES_SHOWN]
        waves.append(
            {
                "number": wave,
                "name": "canary" if wave == rollouts.CANARY and info.waves > 1 else f"wave {wave + 1}",
                "released": wave < info.waves_released,
                "total": len(rows),
                "counts": counts,
                "healthy": counts["healthy"],
                "sites": [(s, _site_state(s)) for s in shown],
                "hidden": max(0, len(rows) - SITES_SHOWN),
            }
        )
    return waves


def _site_state(s: Any) -> str:
    if not s.released:
        return "not released"
    if s.superseded:
        return "superseded"
    states = {a.get("state") for a in s.artifacts.values()}
    if "refused" in states:
        return "refused"
    if "failed" in states:
        return "failed"
    if s.healthy:
        return "healthy"
    if not s.heartbeat_fresh:
        return "stale"
    return "pending"


def _available(info: RolloutInfo) -> list[str]:
    out = []
    if info.state != "rolled_back":
        if info.waves_released < info.waves:
            out.append("promote")
        out.append("pause" if info.state != "paused" else "resume")
        out.append("rollback")
    return out


def _describe_release_set(spec: dict[str, Any] | None) -> str:
    if not spec:
        return "nothing (no desired state)"
    names = [f"{r['name']} {r['version']}" for r in spec.get("releases", [])]
    if spec.get("policy"):
        names.append(f"policy {spec['policy']['name']} {spec['policy']['version']}")
    return ", ".join(names) or "nothing"


def _names(db: Session, ids: list[str]) -> dict[str, str]:
    return dict(db.execute(select(Site.id, Site.name).where(Site.id.in_(ids))).all()) if ids else {}


def _changes(db: Session, found: Rollout, action: str) -> list[str]:
    """What an action will change, in the words of the confirmation page."""
    spec = found.spec
    carries = _describe_release_set(spec)
    total = rollouts.wave_count(found)
    if action == "promote":
        wave = found.waves_released
        ids = [rs.site_id for rs in found.sites if rs.wave == wave]
        names = sorted(_names(db, ids).values())
        shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        return [
            f"Wave {wave + 1} of {total} is released: {len(names)} sites ({shown}) get a new desired state.",
            f"They will be asked to run {carries}.",
        ]
    if action == "pause":
        return [
            f"Rollout {found.name} stops promoting waves (automatic promotion too).",
            "Sites already released keep their desired state; nothing is withdrawn.",
        ]
    if action == "resume":
        return [
            f"Rollout {found.name} resumes: released sites are reconciled towards {carries}, and waves promote again."
        ]
    reached = [rs for rs in found.sites if rs.applied_version is not None]
    names = _names(db, [rs.site_id for rs in reached])
    previous = {}
    for rs in reached:
        prior = db.get(DesiredState, (rs.site_id, rs.previous_version)) if rs.previous_version else None
        owner = db.get(Rollout, prior.rollout_id) if prior is not None and prior.rollout_id else None
        previous[rs.site_id] = (
            f"{_describe_release_set(owner.spec)} (rollout {owner.name})" if owner else "no desired state"
        )
    lines = [
        f"Rollout {found.name} is rolled back for good: it can no longer be promoted or resumed.",
        f"{len(reached)} sites it reached (and still owns) go back to what they were asked to run before:",
    ]
    lines += [
        f"{names.get(sid, sid)} → {what}"
        for sid, what in sorted(previous.items(), key=lambda kv: names.get(kv[0], ""))[:50]
    ]
    if len(reached) > 50:
        lines.append(f"… and {len(reached) - 50} more sites.")
    return lines


def _confirm(request: Request, rollout: str, action: str, db: Session) -> Response:
    found = rollouts.get(db, rollout)
    return render.page(
        request,
        "confirm.html",
        title=f"{action.capitalize()} rollout {found.name}?",
        changes=_changes(db, found, action),
        action=f"/ui/rollouts/{found.name}/{action}",
        button=f"{action.capitalize()} {found.name}",
        cancel=f"/ui/rollouts/{found.name}",
        danger=action == "rollback",
    )


def _act(rollout: str, action: str, db: Session, rt: Runtime) -> Response:
    handlers = {
        "promote": lambda: api_rollouts.promote(rollout, db, rt),
        "pause": lambda: api_rollouts.pause(rollout, db),
        "resume": lambda: api_rollouts.resume(rollout, db, rt),
        "rollback": lambda: api_rollouts.rollback(rollout, db, rt),
    }
    info = handlers[action]()
    return after_action(f"/ui/rollouts/{info.name}", action)


def _routes(action: str) -> None:
    def confirm(request: Request, rollout: str, db: Session = Depends(session)) -> Response:
        return _confirm(request, rollout, action, db)

    def act(rollout: str, db: Session = Depends(session), rt: Runtime = Depends(runtime)) -> Response:
        return _act(rollout, action, db, rt)

    router.add_api_route(f"/ui/rollouts/{{rollout}}/{action}", confirm, methods=["GET"], name=f"confirm_{action}")
    router.add_api_route(f"/ui/rollouts/{{rollout}}/{action}", act, methods=["POST"], name=action)


for _action in ACTIONS:
    _routes(_action)
