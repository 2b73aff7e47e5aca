"""Rollouts: what each site should run (desired state), released in waves, reconciled level-triggered.

A rollout names releases (a model, or a base model and adapters) and optionally a policy
bundle, selects sites by labels, and splits them into waves: named canary sites or a
percentage first, then the rest. `reconcile` compares what each released site should run
with its current desired-state document and publishes a new version only where they
differ, so running it twice changes nothing. Agents report observed state; `status`
aggregates it into conditions with reasons, like Kubernetes controllers do.

One rollout defines a site's whole desired state; the newest rollout that reached a site
owns it, and older rollouts leave that site alone (it is "superseded" for them).

A desired-state version is committed to the database before it is published to TUF
(`publish` is called after `session.commit()`): a document agents can fetch is always one the
database holds, and a failed transaction never leaves a published version behind that the
next one would reuse. A release's revocations travel in its entry of the desired state, so
that a revocation changes the documents of the sites that run the release and they look again.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import rfc8785
from sqlalchemy import func, select
from sqlalchemy.orm import Session, object_session

from controller import audit_trail, registry
from controller.blobs import BlobStore
from controller.changes import (
    DesiredStatePublished,
    RolloutCreated,
    RolloutPromoted,
    RolloutRolledBack,
    RolloutStateChanged,
    digest,
)
from controller.db import DesiredState, Job, ObservedState, Release, Rollout, RolloutSite, Site, utcnow
from controller.errors import BadRequest, Conflict, NotFound, Unprocessable
from sitewarden.desired import revocation_target, target_path

HEARTBEAT_FRESH = timedelta(seconds=60)
CANARY, REST = 0, 1
SITES_PER_RECORD = 200  # a publication to more sites is recorded in several entries


@dataclass(frozen=True)
class RolloutSpec:
    name: str
    releases: list[tuple[str, str]]
    policy: tuple[str, str] | None = None
    selector: dict[str, str] = field(default_factory=dict)
    canary: list[str] = field(default_factory=list)
    canary_percent: int | None = None
    auto_promote_after_s: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "releases": [{"name": n, "version": v} for n, v in self.releases],
            "policy": {"name": self.policy[0], "version": self.policy[1]} if self.policy else None,
            "selector": self.selector,
            "canary": self.canary,
            "canary_percent": self.canary_percent,
            "auto_promote_after_s": self.auto_promote_after_s,
        }


# -- desired-state documents --------------------------------------------------------------


def _release_ref(release: Release) -> dict[str, Any]:
    prefix = registry.release_prefix(release.name, release.version)
    ref = {
        "name": release.name,
        "version": release.version,
        "kind": release.kind,
        "runtime": release.runtime,
        "manifest": {"target": f"{prefix}/{registry.MANIFEST}", "sha256": release.manifest_sha256, "size": 0},
        "files": [
            {"target": f"{prefix}/files/{f.path}", "path": f.path, "sha256": f.sha256, "size": f.size}
            for f in release.files
        ],
        "approvals": [
            {
                "target": f"{prefix}/approvals/{a.key_fingerprint}.json",
                "sha256": a.bundle_sha256,
                "size": 0,
                "approver": a.approver,
                "key_fingerprint": a.key_fingerprint,
            }
            for a in release.approvals
        ],
    }
    if release.revocations:  # only when there are some: older agents know no such field
        ref["revocations"] = [
            {
                "target": revocation_target(release.name, release.version, r.key_fingerprint),
                "sha256": r.bundle_sha256,
                "size": 0,
                "approver": r.approver,
                "key_fingerprint": r.key_fingerprint,
            }
            for r in release.revocations
        ]
    return ref


def desired_content(session: Session, rollout: Rollout, blobs: BlobStore) -> dict[str, Any]:
    """What every site of this rollout should run, from the registry as it is now (new approvals included)."""
    spec = rollout.spec
    releases = [registry.get_release(session, r["name"], r["version"]) for r in spec["releases"]]
    policy = (
        registry.get_release(session, spec["policy"]["name"], spec["policy"]["version"]) if spec["policy"] else None
    )
    content = {
        "rollout": {"id": rollout.id, "name": rollout.name},
        "releases": [_release_ref(r) for r in releases],
        "policy": _release_ref(policy) if policy else None,
    }
    for ref in [*content["releases"], *([content["policy"]] if content["policy"] else [])]:
        for small in [ref["manifest"], *ref["approvals"], *ref.get("revocations", [])]:
            small["size"] = blobs.path(small["sha256"]).stat().st_size
    return content


EMPTY_CONTENT: dict[str, Any] = {"rollout": None, "releases": [], "policy": None}


def active_jobs_by_site(session: Session) -> dict[str, list[dict[str, Any]]]:
    """Site id -> the pending or running federated jobs it was selected for (desired-state `jobs`)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for job in session.scalars(select(Job).where(Job.state.in_(("pending", "running"))).order_by(Job.name)):
        ref = {
            "id": job.id,
            **job.spec,
            "state": job.state,
            "participants": job.progress.get("participants", []),
            "fleet": job.progress.get("fleet"),
        }
        for site_id in job.sites:
            out.setdefault(site_id, []).append(ref)
    return out


def republish(
    session: Session, site_ids: list[str], blobs: BlobStore, publish: Callable[[Publication], None]
) -> list[str]:
    """Publish the sites' current desired state again, with their jobs as they are now."""
    publication = Publication(blobs)
    current = current_desired_many(session, site_ids)
    for site_id in site_ids:
        held = current.get(site_id)
        content = _content_of(held.document) if held else dict(EMPTY_CONTENT)
        publication.desire(session, site_id, content, held.rollout_id if held else None, held)
    publication.store(session)
    session.commit()
    publish(publication)
    return publication.sites


def _content_of(document: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k not in {"site_id", "version", "generated_at"}}


def current_desired(session: Session, site_id: str) -> DesiredState | None:
    return session.scalar(
        select(DesiredState).where(DesiredState.site_id == site_id).order_by(DesiredState.version.desc()).limit(1)
    )


def current_desired_many(session: Session, site_ids: list[str]) -> dict[str, DesiredState]:
    """The current desired state of many sites, in one query."""
    if not site_ids:
        return {}
    newest = (
        select(DesiredState.site_id, func.max(DesiredState.version).label("version"))
        .where(DesiredState.site_id.in_(site_ids))
        .group_by(DesiredState.site_id)
        .subquery()
    )
    rows = session.scalars(
        select(DesiredState).join(
            newest, (DesiredState.site_id == newest.c.site_id) & (DesiredState.version == newest.c.version)
        )
    )
    return {row.site_id: row for row in rows}


@dataclass
class Publication:
    """Desired-state documents written in one transaction and published in one TUF update."""

    blobs: BlobStore
    targets: dict[str, tuple[int, str]] = field(default_factory=dict)
    sites: list[str] = field(default_factory=list)
    _documents: list[bytes] = field(default_factory=list)
    _jobs: dict[str, list[dict[str, Any]]] | None = None
    _published: list[dict[str, Any]] = field(default_factory=list)
    _rollout_ids: dict[str | None, str | None] = field(default_factory=dict)

    def desire(
        self,
        session: Session,
        site_id: str,
        content: dict[str, Any],
        rollout_id: str | None,
        current: DesiredState | None,
    ) -> int:
        """Make `content` the site's desired state, with the jobs it is asked to join; a no-op (same
        version back) when it already is."""
        if self._jobs is None:
            self._jobs = active_jobs_by_site(session)
        content = {k: v for k, v in content.items() if k != "jobs"}
        if self._jobs.get(site_id):
            content["jobs"] = self._jobs[site_id]
        if current is not None and _content_of(current.document) == content:
            return current.version
        version = (current.version if current else 0) + 1
        document = {
            "site_id": site_id,
            "version": version,
            "generated_at": utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),
            **content,
        }
        data = rfc8785.dumps(document)
        sha256 = hashlib.sha256(data).hexdigest()
        self._documents.append(data)
        session.add(
            DesiredState(site_id=site_id, version=version, document=document, sha256=sha256, rollout_id=rollout_id)
        )
        self.targets[target_path(site_id)] = (len(data), sha256)
        self.sites.append(site_id)
        policy = content.get("policy")
        owner = content.get("rollout") or {}
        self._rollout_ids[owner.get("name")] = owner.get("id")
        self._published.append(
            {
                "site_id": site_id,
                "version": version,
                "sha256": sha256,
                "rollout": owner.get("name"),
                "releases": [f"{r['name']}@{r['version']}" for r in content.get("releases", [])],
                "policy": f"{policy['name']}@{policy['version']}" if policy else None,
                "jobs": [job["id"] for job in content.get("jobs", [])],
            }
        )
        return version

    def store(self, session: Session) -> None:
        """Write the documents' bytes to the blob store (durable, in parallel) and record them."""
        digests = self.blobs.put_many(self._documents)
        sizes = [len(data) for data in self._documents]
        registry.record_blobs(session, list(zip(digests, sizes, strict=True)))
        self._documents.clear()
        # One rollout named when every site's new document is that rollout's (a job's republish spans several).
        rollout = next(iter(self._rollout_ids)) if len(self._rollout_ids) == 1 else None
        for start in range(0, len(self._published), SITES_PER_RECORD):
            chunk = self._published[start : start + SITES_PER_RECORD]
            audit_trail.record(session, DesiredStatePublished(rollout, self._rollout_ids.get(rollout), chunk))
        self._published.clear()
        self._rollout_ids.clear()


# -- creating rollouts ----------------------------------------------------------------------


def _check_releases(session: Session, spec: RolloutSpec) -> None:
    if not spec.releases and spec.policy is None:
        raise BadRequest("a rollout needs at least one release or a policy bundle")
    kinds = []
    for name, version in [*spec.releases, *([spec.policy] if spec.policy else [])]:
        revocation = registry.revoked(registry.get_release(session, name, version))
        if revocation is not None:
            raise Conflict(
                f"{name} {version} was revoked by {revocation.approver} at {revocation.revoked_at}: {revocation.reason}"
            )
    for name, version in spec.releases:
        release = registry.get_release(session, name, version)
        if release.kind == "policy":
            raise BadRequest(f"{name} {version} is a policy bundle: give it as the rollout's policy")
        # An embedding model travels beside a language model's base (agent.lm: card task "embeddings").
        embedding = (
            release.kind == "model"
            and release.runtime == "transformers"
            and ((release.metadata_ or {}).get("task") == "embeddings")
        )
        kinds.append(("embedding" if embedding else release.kind, release.runtime))
    models = [k for k in kinds if k[0] == "model"]
    adapters = [k for k in kinds if k[0] == "adapter"]
    if len(models) > 1:
        raise BadRequest("a rollout carries one model (or one base model with adapters and an embedding model)")
    if adapters and (not models or models[0][1] != "transformers"):
        raise BadRequest("adapters need a base model with the transformers runtime in the same rollout")
    if spec.policy is not None and registry.get_release(session, *spec.policy).kind != "policy":
        raise BadRequest(f"{spec.policy[0]} {spec.policy[1]} is not a policy bundle")


def select_sites(session: Session, selector: dict[str, str]) -> list[Site]:
    """Enabled sites whose labels include every `key=value` of the selector."""
    sites = session.scalars(select(Site).where(Site.status != "disabled").order_by(Site.name)).all()
    return [s for s in sites if all(s.labels.get(k) == v for k, v in selector.items())]


def plan_waves(rollout_id: str, sites: list[Site], canary: list[str], canary_percent: int | None) -> dict[str, int]:
    """Site id -> wave. Named canaries, or a stable pseudo-random percentage, go first."""
    if canary and canary_percent:
        raise BadRequest("name canary sites or give a canary percentage, not both")
    by_name = {s.name: s for s in sites}
    if canary:
        unknown = sorted(set(canary) - set(by_name))
        if unknown:
            raise Unprocessable(f"canary sites {', '.join(unknown)} are not among the selected sites")
        first = {by_name[n].id for n in canary}
    elif canary_percent:
        count = max(1, math.ceil(len(sites) * canary_percent / 100))
        ranked = sorted(sites, key=lambda s: hashlib.sha256(f"{rollout_id}/{s.id}".encode()).digest())
        first = {s.id for s in ranked[:count]}
    else:
        return {s.id: CANARY for s in sites}
    return {s.id: CANARY if s.id in first else REST for s in sites}


def create(session: Session, spec: RolloutSpec, created_by: str) -> Rollout:
    if session.scalar(select(Rollout.id).where(Rollout.name == spec.name)):
        raise Conflict(f"rollout {spec.name!r} already exists")
    _check_releases(session, spec)
    for key in spec.selector:
        if not key:
            raise BadRequest("selector keys must not be empty")
    sites = select_sites(session, spec.selector)
    if not sites:
        raise Unprocessable(f"no enabled site matches the selector {spec.selector}")
    rollout = Rollout(name=spec.name, spec=spec.to_json(), created_by=created_by)
    session.add(rollout)
    session.flush()
    waves = plan_waves(rollout.id, sites, spec.canary, spec.canary_percent)
    current = current_desired_many(session, [site.id for site in sites])
    for site in sites:
        previous = current[site.id].version if site.id in current else 0
        rollout.sites.append(RolloutSite(site_id=site.id, wave=waves[site.id], previous_version=previous))
    selected = [{"site_id": site.id, "site": site.name, "wave": waves[site.id]} for site in sites]
    audit_trail.record(session, RolloutCreated(rollout.id, rollout.name, rollout.spec, digest(rollout.spec), selected))
    return rollout


def get(session: Session, ref: str) -> Rollout:
    rollout = session.get(Rollout, ref) or session.scalar(select(Rollout).where(Rollout.name == ref))
    if rollout is None:
        raise NotFound(f"no rollout {ref!r}")
    return rollout


def wave_count(rollout: Rollout) -> int:
    return 1 + max((rs.wave for rs in rollout.sites), default=0)


# -- reconciling ----------------------------------------------------------------------------


def _owners(session: Session, current: dict[str, DesiredState]) -> dict[str, Rollout]:
    """Site id -> the rollout that owns its current desired state."""
    ids = {d.rollout_id for d in current.values() if d.rollout_id}
    rollouts_by_id = {r.id: r for r in session.scalars(select(Rollout).where(Rollout.id.in_(ids)))} if ids else {}
    return {site: rollouts_by_id[d.rollout_id] for site, d in current.items() if d.rollout_id in rollouts_by_id}


def _newer_owner(rollout: Rollout, owner: Rollout | None) -> bool:
    return owner is not None and owner.id != rollout.id and owner.created_at > rollout.created_at


def _site_healthy(
    observed: ObservedState | None, applied: int | None, releases: list[dict[str, Any]], now: datetime
) -> bool:
    if observed is None or applied is None or observed.desired_version < applied:
        return False
    if now - observed.heartbeat_at > HEARTBEAT_FRESH:
        return False
    return all(observed.artifacts.get(f"{r['name']}@{r['version']}", {}).get("state") == "active" for r in releases)


def canary_healthy_since(session: Session, rollout: Rollout, now: datetime) -> datetime | None:
    """Since when every canary site has run this rollout's releases, or None if one does not."""
    since = rollout.wave_released_at
    for rs in rollout.sites:
        if rs.wave != CANARY:
            continue
        observed = session.get(ObservedState, rs.site_id)
        if not _site_healthy(observed, rs.applied_version, rollout.spec["releases"], now):
            return None
        assert observed is not None
        since = max(since, observed.changed_at)
    return since


def reconcile(
    session: Session, rollout: Rollout, blobs: BlobStore, publish: Callable[[Publication], None]
) -> list[str]:
    """One idempotent step towards the rollout's desired state; returns the sites whose documents changed."""
    if rollout.state == "rolled_back":
        return []
    now = utcnow()
    total = wave_count(rollout)
    after = rollout.spec.get("auto_promote_after_s")
    if rollout.state == "progressing" and rollout.waves_released < total and after is not None:
        since = canary_healthy_since(session, rollout, now)
        if since is not None and now - since >= timedelta(seconds=after):
            change = RolloutPromoted(
                rollout.id, rollout.name, rollout.waves_released, rollout.waves_released + 1, total, automatic=True
            )
            audit_trail.record(session, change)
            rollout.waves_released += 1
            rollout.wave_released_at = now
    content = desired_content(session, rollout, blobs)
    publication = Publication(blobs)
    released = [rs for rs in rollout.sites if rs.wave < rollout.waves_released]
    ids = [rs.site_id for rs in released]
    enabled = set(session.scalars(select(Site.id).where(Site.id.in_(ids), Site.status != "disabled"))) if ids else set()
    current = current_desired_many(session, ids)
    owners = _owners(session, current)
    owned = 0
    for rs in released:
        if rs.site_id not in enabled or _newer_owner(rollout, owners.get(rs.site_id)):
            continue
        owned += 1
        rs.applied_version = publication.desire(session, rs.site_id, content, rollout.id, current.get(rs.site_id))
    if released and not owned and rollout.waves_released >= total and rollout.state != "superseded":
        audit_trail.record(session, RolloutStateChanged(rollout.id, rollout.name, rollout.state, "superseded"))
        rollout.state = "superseded"  # every site runs a newer rollout: nothing left to reconcile
    rollout.updated_at = now
    publication.store(session)
    session.commit()
    publish(publication)
    return publication.sites


def promote(session: Session, rollout: Rollout) -> None:
    audit_trail.locked(session, rollout)
    if rollout.state == "rolled_back":
        raise Conflict(f"rollout {rollout.name} was rolled back")
    total = wave_count(rollout)
    if rollout.waves_released < total:
        change = RolloutPromoted(
            rollout.id, rollout.name, rollout.waves_released, rollout.waves_released + 1, total, automatic=False
        )
        audit_trail.record(session, change)
        rollout.waves_released += 1
        rollout.wave_released_at = utcnow()


def set_paused(rollout: Rollout, paused: bool) -> None:
    session = object_session(rollout)
    if session is not None:
        audit_trail.locked(session, rollout)
    if rollout.state == "rolled_back":
        raise Conflict(f"rollout {rollout.name} was rolled back")
    after = "paused" if paused else "progressing"
    if rollout.state != after and session is not None:
        audit_trail.record(session, RolloutStateChanged(rollout.id, rollout.name, rollout.state, after))
    rollout.state = after


def rollback(session: Session, rollout: Rollout, blobs: BlobStore, publish: Callable[[Publication], None]) -> list[str]:
    """Re-point every site this rollout reached (and still owns) to the desired state it had before."""
    audit_trail.locked(session, rollout)
    publication = Publication(blobs)
    current = current_desired_many(session, [rs.site_id for rs in rollout.sites])
    for rs in rollout.sites:
        held = current.get(rs.site_id)
        if rs.applied_version is None or held is None or held.rollout_id != rollout.id:
            continue
        previous = session.get(DesiredState, (rs.site_id, rs.previous_version)) if rs.previous_version else None
        content = _content_of(previous.document) if previous else EMPTY_CONTENT
        publication.desire(session, rs.site_id, content, previous.rollout_id if previous else None, held)
    if rollout.state != "rolled_back":
        audit_trail.record(session, RolloutRolledBack(rollout.id, rollout.name, rollout.state))
    rollout.state = "rolled_back"
    rollout.updated_at = utcnow()
    publication.store(session)
    session.commit()
    publish(publication)
    return publication.sites


def awaiting_promotion(session: Session) -> list[Rollout]:
    """Rollouts that promote themselves and still have a wave to release: the background's work."""
    found = session.scalars(select(Rollout).where(Rollout.state == "progressing")).all()
    return [r for r in found if r.spec.get("auto_promote_after_s") is not None and r.waves_released < wave_count(r)]


def using_release(session: Session, name: str, version: str) -> list[Rollout]:
    """Live rollouts that carry this release (to reconcile when, say, it gets a new approval)."""
    found = session.scalars(select(Rollout).where(Rollout.state.in_(("progressing", "paused")))).all()
    wanted = {"name": name, "version": version}
    return [r for r in found if wanted in r.spec["releases"] or r.spec.get("policy") == wanted]


# -- status ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str


def status(session: Session, rollout: Rollout) -> dict[str, Any]:
    """The rollout's conditions and a row per site, from the observed state agents reported."""
    now = utcnow()
    total = wave_count(rollout)
    wanted = [f"{r['name']}@{r['version']}" for r in rollout.spec["releases"]]
    rows, problems, pending, superseded = [], [], [], []
    # Three queries for the whole fleet, not three per site.
    ids = [rs.site_id for rs in rollout.sites]
    sites_by_id = {s.id: s for s in session.scalars(select(Site).where(Site.id.in_(ids)))} if ids else {}
    observed_by_id = (
        {o.site_id: o for o in session.scalars(select(ObservedState).where(ObservedState.site_id.in_(ids)))}
        if ids
        else {}
    )
    owners = _owners(session, current_desired_many(session, ids))
    for rs in rollout.sites:
        site = sites_by_id.get(rs.site_id)
        observed = observed_by_id.get(rs.site_id)
        released = rs.wave < rollout.waves_released
        owned = not _newer_owner(rollout, owners.get(rs.site_id))
        states = {key: (observed.artifacts.get(key, {}) if observed else {}) for key in wanted}
        healthy = released and _site_healthy(observed, rs.applied_version, rollout.spec["releases"], now)
        for key, state in states.items():
            if state.get("state") in ("failed", "refused"):
                problems.append(
                    f"{site.name if site else rs.site_id} {state['state']} {key}: {state.get('reason', '')}"
                )
        if not owned:
            superseded.append(site.name if site else rs.site_id)
        elif released and not healthy:
            pending.append(site.name if site else rs.site_id)
        rows.append(
            {
                "site": site.name if site else rs.site_id,
                "site_id": rs.site_id,
                "wave": rs.wave,
                "released": released,
                "superseded": not owned,
                "desired_version": rs.applied_version,
                "observed_version": observed.desired_version if observed else None,
                "artifacts": states,
                "heartbeat_at": observed.heartbeat_at if observed else None,
                "heartbeat_fresh": bool(observed and now - observed.heartbeat_at <= HEARTBEAT_FRESH),
                "agent_version": observed.agent_version if observed else None,
                "healthy": healthy,
            }
        )
    conditions = [
        Condition(
            "Paused",
            "True" if rollout.state == "paused" else "False",
            "PausedByOperator" if rollout.state == "paused" else "NotPaused",
            "",
        )
    ]
    all_released = rollout.waves_released >= total
    if rollout.state == "rolled_back":
        conditions.append(
            Condition("RolledBack", "True", "RolledBackByOperator", "sites re-pointed to their previous desired state")
        )
    elif all_released and not pending and not problems:
        conditions.append(
            Condition("Complete", "True", "AllSitesActive", f"{len(rows) - len(superseded)} sites run the releases")
        )
    else:
        reason = "WaitingForPromotion" if not pending and not all_released else f"Wave{rollout.waves_released}Rolling"
        message = (
            f"waiting for {', '.join(pending)}"
            if pending
            else f"wave {rollout.waves_released + 1} of {total} not released"
        )
        conditions.append(Condition("Progressing", "True", reason, message))
    if total > 1:
        since = canary_healthy_since(session, rollout, now)
        conditions.append(
            Condition(
                "CanaryHealthy",
                "True" if since else "False",
                "CanariesActive" if since else "CanariesNotActive",
                f"since {since:%Y-%m-%dT%H:%M:%SZ}" if since else "",
            )
        )
    conditions.append(
        Condition(
            "Degraded",
            "True" if problems else "False",
            "SitesRefusedOrFailed" if problems else "NoFailures",
            "; ".join(problems),
        )
    )
    if superseded:
        conditions.append(Condition("Superseded", "True", "NewerRollout", ", ".join(superseded)))
    return {
        "id": rollout.id,
        "name": rollout.name,
        "state": rollout.state,
        "spec": rollout.spec,
        "waves": total,
        "waves_released": rollout.waves_released,
        "created_by": rollout.created_by,
        "created_at": rollout.created_at,
        "conditions": [c.__dict__ for c in conditions],
        "sites": rows,
    }
