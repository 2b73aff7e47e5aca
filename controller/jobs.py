"""Federated fine-tuning jobs: what to train, where, with which app, and under which privacy terms.

A job names a base release (a model of the tabular-logreg family), the Flower App release that
runs it (kind `app`, runtime `flower`: one FAB), the data set name each site maps to local data, a
label selector, rounds, the minimum number of sites, the strategy, the differential-privacy
parameters and whether secure aggregation is required. Creating it checks what can be checked
before any site is asked: the base is an approved ONNX model, the app an approved Flower App,
enough enabled sites match, and the DP parameters are sane. The job carries its app as a release
reference (TUF targets, digests, approvals), as a desired state names a model, so that each site
can fetch and verify exactly that FAB. Its planned privacy budget (epsilon after all rounds at the
job's delta, `federation.privacy`) is computed up front, so that an approver can see it; each site
computes it again itself before its policy decides.

States: `pending` (created; sites are asked), `running`, `finished`, `failed` (with a reason),
`cancelled`. `controller.federation` runs them on the SuperLink.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller import audit_trail, registry, rollouts
from controller.blobs import BlobStore
from controller.changes import JobCreated, JobStateChanged, digest
from controller.db import Job, Release, new_id, utcnow
from controller.errors import BadRequest, Conflict, NotFound, Unprocessable
from federation.privacy import epsilon

MODEL_FAMILIES = ("tabular-logreg",)
STRATEGIES = ("FedAvg", "FedProx")
FINAL_STATES = ("finished", "failed", "cancelled")


@dataclass(frozen=True)
class DifferentialPrivacy:
    noise_multiplier: float
    clipping_norm: float
    delta: float

    def epsilon(self, rounds: int) -> float:
        return epsilon(self.noise_multiplier, rounds, self.delta)


@dataclass(frozen=True)
class JobSpec:
    name: str
    base: tuple[str, str]
    app: tuple[str, str]
    dataset: str
    rounds: int
    min_sites: int
    model_family: str = "tabular-logreg"
    strategy: str = "FedAvg"
    selector: dict[str, str] = field(default_factory=dict)
    differential_privacy: DifferentialPrivacy | None = None
    secure_aggregation: bool = False
    proximal_mu: float | None = None
    output: tuple[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        dp = self.differential_privacy
        return {
            "name": self.name,
            "base": {"name": self.base[0], "version": self.base[1]},
            "app": {"name": self.app[0], "version": self.app[1]},
            "model_family": self.model_family,
            "dataset": self.dataset,
            "selector": self.selector,
            "rounds": self.rounds,
            "min_sites": self.min_sites,
            "strategy": self.strategy,
            "differential_privacy": (
                {
                    "enabled": True,
                    "noise_multiplier": dp.noise_multiplier,
                    "clipping_norm": dp.clipping_norm,
                    "delta": dp.delta,
                    "epsilon": dp.epsilon(self.rounds),
                }
                if dp
                else {"enabled": False}
            ),
            "secure_aggregation": self.secure_aggregation,
            "proximal_mu": self.proximal_mu,
            "output": {"name": self.output[0], "version": self.output[1]} if self.output else None,
        }


def app_ref(release: Release, blobs: BlobStore) -> dict[str, Any]:
    """An app release as a desired state names a release: its TUF targets, digests, sizes and approvals."""
    ref = rollouts._release_ref(release)  # the one form of a release reference in a desired state
    for small in [ref["manifest"], *ref["approvals"]]:
        small["size"] = blobs.path(small["sha256"]).stat().st_size
    return ref


def create(session: Session, spec: JobSpec, created_by: str, blobs: BlobStore) -> Job:
    if session.scalar(select(Job.id).where(Job.name == spec.name)):
        raise Conflict(f"job {spec.name!r} already exists")
    if spec.model_family not in MODEL_FAMILIES:
        raise BadRequest(f"model_family {spec.model_family!r} is not supported: use {', '.join(MODEL_FAMILIES)}")
    if spec.strategy not in STRATEGIES:
        raise BadRequest(f"strategy {spec.strategy!r} is not supported: use {', '.join(STRATEGIES)}")
    if spec.proximal_mu is not None and spec.strategy != "FedProx":
        raise BadRequest("proximal_mu applies to the FedProx strategy only")
    if spec.output is not None:
        registry.check_release_identity(*spec.output, "model", "onnx")
        if session.scalar(select(Release.id).where(Release.name == spec.output[0], Release.version == spec.output[1])):
            raise Conflict(f"release {spec.output[0]} {spec.output[1]} exists already: name another output")
    registry.check_release_identity(*spec.base, "model", "onnx")  # a malformed name is a 400, not a lookup
    base = registry.get_release(session, *spec.base)
    if (base.kind, base.runtime) != ("model", "onnx"):
        raise Unprocessable(f"base {base.name} {base.version} is a {base.kind} for {base.runtime}, not an ONNX model")
    if not base.approvals:
        raise Unprocessable(f"base {base.name} {base.version} has no approval: a job starts only from approved weights")
    registry.check_release_identity(*spec.app, "app", "flower")
    app = registry.get_release(session, *spec.app)
    if (app.kind, app.runtime) != ("app", "flower"):
        raise Unprocessable(f"app {app.name} {app.version} is a {app.kind} for {app.runtime}, not a Flower App")
    if not app.approvals:
        raise Unprocessable(f"app {app.name} {app.version} has no approval: sites run only a Flower App they approved")
    # Only enrolled sites can run a SuperNode: they hold the key the controller registers for them.
    sites = [s for s in rollouts.select_sites(session, spec.selector) if s.status == "active"]
    if len(sites) < spec.min_sites:
        raise Unprocessable(
            f"the job needs at least {spec.min_sites} sites; the selector {spec.selector} matches "
            f"{len(sites)} enrolled and enabled"
        )
    job = Job(
        id=new_id(),
        name=spec.name,
        spec={**spec.to_json(), "app": app_ref(app, blobs)},
        state="pending",
        sites=[s.id for s in sites],
        created_by=created_by,
    )
    session.add(job)
    audit_trail.record(session, JobCreated(job.id, job.name, job.spec, digest(job.spec), list(job.sites)))
    session.commit()
    return job


def get(session: Session, ref: str) -> Job:
    job = session.get(Job, ref) or session.scalar(select(Job).where(Job.name == ref))
    if job is None:
        raise NotFound(f"no job {ref!r}")
    return job


def cancel(session: Session, job: Job) -> Job:
    audit_trail.locked(session, job)
    if job.state in FINAL_STATES:
        raise Conflict(f"job {job.name} is already {job.state}")
    reason = "cancelled by an operator"
    audit_trail.record(session, JobStateChanged(job.id, job.name, job.state, "cancelled", reason))
    job.state = "cancelled"
    job.reason = reason
    job.updated_at = utcnow()
    session.commit()
    return job


def describe(job: Job) -> dict[str, Any]:
    progress = job.progress
    answers = progress.get("answers", {})
    return {
        "id": job.id,
        "name": job.name,
        "state": job.state,
        "reason": job.reason,
        "spec": job.spec,
        "sites": list(job.sites),
        "rounds": progress.get("rounds", []),
        "epsilon_planned": job.spec["differential_privacy"].get("epsilon"),
        "epsilon_spent": progress.get("epsilon_spent"),
        "participants": progress.get("participants", []),
        "declined": {site: a.get("reasons", []) for site, a in answers.items() if not a.get("join")},
        "bytes_exchanged": progress.get("bytes"),
        "run_id": progress.get("run_id"),
        "result": progress.get("result"),
        "started_at": progress.get("started_at"),
        "ended_at": progress.get("ended_at"),
        "created_by": job.created_by,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
    }
