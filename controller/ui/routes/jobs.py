"""Federated jobs: participants, declines and their reasons, per-round metrics and epsilon (charts), the
candidate release and its lineage; cancelling one behind a confirmation."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller import jobs, registry
from controller.api import jobs as api_jobs
from controller.api.deps import runtime, session
from controller.api.schemas import JobInfo
from controller.db import Release, Site
from controller.runtime import Runtime
from controller.ui import render
from controller.ui.routes.common import after_action

router = APIRouter()

PER_PAGE = 50


@router.get("/ui/jobs")
def jobs_page(
    request: Request, after: str | None = Query(None, max_length=500), db: Session = Depends(session)
) -> Response:
    page = api_jobs.list_jobs(limit=PER_PAGE, after=after, db=db)
    return render.page(request, "jobs.html", jobs=page.items, next_cursor=page.next)


def _charts(info: JobInfo) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-round metrics (every numeric metric the rounds carry) and epsilon spent, for uPlot."""
    rounds = sorted(info.rounds, key=lambda r: r.get("round", 0))
    x = [int(r.get("round", i + 1)) for i, r in enumerate(rounds)]
    names: list[tuple[str, str]] = []
    for r in rounds:
        for phase in ("evaluate", "train"):
            for key, value in (r.get(phase) or {}).items():
                if isinstance(value, int | float) and (phase, key) not in names:
                    names.append((phase, key))
    metrics = {
        "time": False,
        "xlabel": "round",
        "x": x,
        "empty": "No round has finished yet.",
        "series": [
            {"label": f"{phase}: {key}", "values": [(r.get(phase) or {}).get(key) for r in rounds]}
            for phase, key in names
        ],
    }
    epsilon = {
        "time": False,
        "xlabel": "round",
        "x": x,
        "empty": "No round has finished yet, or the job runs without differential privacy.",
        "series": [{"label": "epsilon spent", "values": [r.get("epsilon") for r in rounds]}],
    }
    if info.epsilon_planned is not None and x:
        epsilon["series"].append({"label": "epsilon planned (all rounds)", "values": [info.epsilon_planned for _ in x]})
    if all(v is None for v in epsilon["series"][0]["values"]):
        epsilon["x"] = []
    return metrics, epsilon


def _context(db: Session, info: JobInfo) -> dict[str, Any]:
    ids = set(info.sites) | set(info.participants) | set(info.declined)
    names = dict(db.execute(select(Site.id, Site.name).where(Site.id.in_(ids))).all()) if ids else {}
    candidate = None
    if info.result:
        candidate = db.scalar(
            select(Release).where(
                Release.name == info.result.get("name"), Release.version == info.result.get("version")
            )
        )
    metrics, epsilon = _charts(info)
    return {
        "job": info,
        "names": names,
        "candidate": candidate,
        "lineage": (candidate.metadata_ or {}).get("lineage") if candidate else None,
        "metrics_chart": metrics,
        "epsilon_chart": epsilon,
        "final": info.state in jobs.FINAL_STATES,
        "base_key": f"{info.spec['base']['name']}@{info.spec['base']['version']}",
    }


@router.get("/ui/jobs/{job}")
def job_page(request: Request, job: str, db: Session = Depends(session)) -> Response:
    info = api_jobs.show(job, db)
    template = "_job_live.html" if render.fragment(request) else "job.html"
    return render.page(request, template, **_context(db, info))


@router.get("/ui/jobs/{job}/cancel")
def cancel_confirm(request: Request, job: str, db: Session = Depends(session)) -> Response:
    found = jobs.get(db, job)
    changes = [
        f"Job {found.name} ({found.state}) is cancelled: its run on the SuperLink is stopped.",
        f"It leaves the desired state of its {len(found.sites)} sites, which stop their SuperNodes for it.",
        "No candidate release is registered. This cannot be undone; start a new job instead.",
    ]
    return render.page(
        request,
        "confirm.html",
        title=f"Cancel job {found.name}?",
        changes=changes,
        action=f"/ui/jobs/{found.name}/cancel",
        button=f"Cancel {found.name}",
        cancel=f"/ui/jobs/{found.name}",
        danger=True,
    )


@router.post("/ui/jobs/{job}/cancel")
def cancel(job: str, db: Session = Depends(session), rt: Runtime = Depends(runtime)) -> Response:
    info = api_jobs.cancel(job, db, rt)
    return after_action(f"/ui/jobs/{info.name}", "cancelled")


__all__ = ["registry", "router"]
