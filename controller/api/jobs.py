"""Federated fine-tuning jobs."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller import auth, jobs
from controller.api import pagination
from controller.api.deps import principal, runtime, session
from controller.api.schemas import JobCreate, JobInfo, Page
from controller.db import Job
from controller.errors import Conflict, NotFound
from controller.runtime import Runtime
from sitewarden.wire import JobParticipation

router = APIRouter(prefix="/api/v1", tags=["jobs"])
agent_router = APIRouter(prefix="/api/v1/agent", tags=["agent"])


@router.post("/jobs", status_code=201, summary="Create a federated fine-tuning job", response_model=JobInfo)
def create(
    body: JobCreate,
    caller: auth.Principal = Depends(principal),
    db: Session = Depends(session),
    rt: Runtime = Depends(runtime),
) -> JobInfo:
    dp = body.differential_privacy
    spec = jobs.JobSpec(
        name=body.name,
        base=(body.base.name, body.base.version),
        app=(body.app.name, body.app.version),
        dataset=body.dataset,
        rounds=body.rounds,
        min_sites=body.min_sites,
        model_family=body.model_family,
        strategy=body.strategy,
        selector=body.selector,
        differential_privacy=jobs.DifferentialPrivacy(dp.noise_multiplier, dp.clipping_norm, dp.delta) if dp else None,
        secure_aggregation=body.secure_aggregation,
        proximal_mu=body.proximal_mu,
        output=(body.output.name, body.output.version) if body.output else None,
    )
    if rt.federation is None:
        raise Conflict("federation is not enabled on this controller: serve it with --fleet-port")
    job = jobs.create(db, spec, caller.name, rt.blobs)
    rt.republish(db, list(job.sites))  # the job reaches its sites through their desired state
    rt.federation.wake()
    return JobInfo.model_validate(jobs.describe(job))


@router.get("/jobs", summary="List jobs", response_model=Page[JobInfo])
def list_jobs(
    limit: int = Query(pagination.DEFAULT_LIMIT, ge=1, le=pagination.MAX_LIMIT),
    after: str | None = Query(None, max_length=500),
    db: Session = Depends(session),
) -> Page[JobInfo]:
    rows = list(db.scalars(pagination.page(select(Job), Job.name, after, limit)))
    rows, nxt = pagination.next_cursor(rows, limit, lambda j: j.name)
    return Page[JobInfo](items=[JobInfo.model_validate(jobs.describe(j)) for j in rows], next=nxt)


@router.get("/jobs/{job}", summary="A job's state, rounds and privacy budget", response_model=JobInfo)
def show(job: str, db: Session = Depends(session)) -> JobInfo:
    return JobInfo.model_validate(jobs.describe(jobs.get(db, job)))


@router.post("/jobs/{job}/cancel", summary="Cancel a job that has not ended", response_model=JobInfo)
def cancel(job: str, db: Session = Depends(session), rt: Runtime = Depends(runtime)) -> JobInfo:
    found = jobs.get(db, job)
    if rt.federation is not None:
        with rt.federation.lock:
            cancelled = jobs.cancel(db, found)
    else:
        cancelled = jobs.cancel(db, found)
    rt.republish(db, list(cancelled.sites))  # withdrawn from the sites' desired state
    return JobInfo.model_validate(jobs.describe(cancelled))


@agent_router.post(
    "/jobs/{job_id}/participation",
    summary="A site joins or declines a pending job (its federation policy decided)",
    response_model=JobInfo,
)
def participation(
    job_id: str,
    body: JobParticipation,
    caller: auth.Principal = Depends(principal),
    db: Session = Depends(session),
    rt: Runtime = Depends(runtime),
) -> JobInfo:
    if rt.federation is None:
        raise Conflict("federation is not enabled on this controller")
    job = db.get(Job, job_id)
    if job is None or (caller.site_id or "") not in job.sites:
        raise NotFound(f"no job {job_id!r} for this site")
    answer = body.model_dump()
    return JobInfo.model_validate(jobs.describe(rt.federation.participation(db, job, caller.site_id or "", answer)))
