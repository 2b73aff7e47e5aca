"""What each state change records in the controller's audit trail: one typed record per kind of change.

A service function that changes state calls `controller.audit_trail.record(session, <Change>)`
before it commits; the record rides in the same transaction (the outbox) and becomes one entry of
the controller's audit log, next to who did it (`actor`, `role`), through which route or background
step (`action`) and with which request id. Every caller of the service function (the REST API, the
dashboard, a background loop) therefore produces the same entry.

Each record names the resource it changed (`RESOURCE`: the fields that identify it) and says what
changed: new values, or `before`/`after`. Secrets never go in: a new token is recorded by id, role
and name; a key by its fingerprint.

`ROUTES` says, for every state-changing route of the access table, which kinds of change it
records (or why it records none); a dashboard route records what its REST twin does
(`controller.access.UI_SAME_AS`), with `"via": "dashboard"` in its entries. A test walks the
application's routes, calls each, and checks
that its entry names the resource and the change: a new state-changing route needs a line here,
its record in the service function, and a scenario in that test.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, ClassVar

import rfc8785

from controller.access import UI_SAME_AS


def digest(document: Any) -> str:
    """SHA-256 (hex) of a JSON document in its RFC 8785 canonical form: the digest a spec is recorded with."""
    return hashlib.sha256(rfc8785.dumps(document)).hexdigest()


def key_sha256(public_key: str | None) -> str | None:
    """The fingerprint a public key (as the controller stores it, text) is recorded by."""
    return hashlib.sha256(public_key.encode()).hexdigest() if public_key else None


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    return value


@dataclass(frozen=True)
class Change:
    """A typed record of one state change. Subclasses set `KIND` and `RESOURCE`."""

    KIND: ClassVar[str] = ""
    RESOURCE: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict[str, Any]:
        values = {f.name: _plain(getattr(self, f.name)) for f in fields(self)}
        assert "kind" not in values, f"{type(self).__name__}: `kind` names the record's kind, not a field"
        return {"kind": self.KIND, **values}


# -- people and keys -------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenCreated(Change):
    KIND, RESOURCE = "token.created", ("token_id", "name")
    token_id: str
    name: str
    role: str
    expires_at: datetime | None


@dataclass(frozen=True)
class TokenRevoked(Change):
    KIND, RESOURCE = "token.revoked", ("token_id", "name")
    token_id: str
    name: str
    role: str


@dataclass(frozen=True)
class ApproverKeyRegistered(Change):
    KIND, RESOURCE = "approver_key.registered", ("key_id", "fingerprint")
    key_id: str
    approver: str
    fingerprint: str


@dataclass(frozen=True)
class ApproverKeyRevoked(Change):
    KIND, RESOURCE = "approver_key.revoked", ("key_id", "fingerprint")
    key_id: str
    approver: str
    fingerprint: str


# -- uploads, releases, approvals ------------------------------------------------------------


@dataclass(frozen=True)
class UploadStarted(Change):
    KIND, RESOURCE = "upload.started", ("upload_id", "sha256")
    upload_id: str
    sha256: str
    size: int


@dataclass(frozen=True)
class UploadProgressed(Change):
    KIND, RESOURCE = "upload.progressed", ("upload_id", "sha256")
    upload_id: str
    sha256: str
    offset_before: int
    offset_after: int
    size: int
    complete: bool


@dataclass(frozen=True)
class UploadReset(Change):
    KIND, RESOURCE = "upload.reset", ("upload_id", "sha256")
    upload_id: str
    sha256: str
    offset_before: int
    reason: str


@dataclass(frozen=True)
class UploadExpired(Change):
    """An unfinished upload that received no byte for `upload_ttl_s`, removed with its bytes."""

    KIND, RESOURCE = "upload.expired", ("upload_id", "sha256")
    upload_id: str
    sha256: str
    started_by: str
    bytes_received: int
    idle_since: datetime


@dataclass(frozen=True)
class ReleaseCreated(Change):
    KIND, RESOURCE = "release.created", ("name", "version")
    name: str
    version: str
    release_kind: str
    runtime: str
    manifest_sha256: str
    files: int
    bytes: int
    uploaded_by: str


@dataclass(frozen=True)
class ApprovalAdded(Change):
    KIND, RESOURCE = "approval.added", ("release", "version")
    release: str
    version: str
    manifest_sha256: str
    approver: str
    key_fingerprint: str
    bundle_sha256: str


@dataclass(frozen=True)
class ApprovalWithdrawn(Change):
    """An approval taken back before it was published: its TUF hash bin filled up meanwhile."""

    KIND, RESOURCE = "approval.withdrawn", ("release", "version")
    release: str
    version: str
    approver: str
    reason: str


@dataclass(frozen=True)
class ReleaseWithdrawn(Change):
    """A release taken back before it was published: its TUF hash bin filled up meanwhile."""

    KIND, RESOURCE = "release.withdrawn", ("name", "version")
    name: str
    version: str
    reason: str


@dataclass(frozen=True)
class ReleaseRevoked(Change):
    KIND, RESOURCE = "release.revoked", ("release", "version")
    release: str
    version: str
    manifest_sha256: str
    approver: str
    key_fingerprint: str
    bundle_sha256: str
    reason: str


# -- sites -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteCreated(Change):
    KIND, RESOURCE = "site.created", ("site_id", "name")
    site_id: str
    name: str
    labels: dict[str, str]


@dataclass(frozen=True)
class SiteLabelsChanged(Change):
    KIND, RESOURCE = "site.labels_changed", ("site_id", "name")
    site_id: str
    name: str
    before: dict[str, str]
    after: dict[str, str]


@dataclass(frozen=True)
class SiteDisabled(Change):
    KIND, RESOURCE = "site.disabled", ("site_id", "name")
    site_id: str
    name: str
    status_before: str


@dataclass(frozen=True)
class JoinTokenIssued(Change):
    KIND, RESOURCE = "join_token.issued", ("site_id", "site_name")
    site_id: str
    site_name: str
    token_id: str
    expires_at: datetime


@dataclass(frozen=True)
class SiteEnrolled(Change):
    KIND, RESOURCE = "site.enrolled", ("site_id", "name")
    site_id: str
    name: str
    public_key_sha256: str | None
    join_token_id: str


@dataclass(frozen=True)
class SiteKeyRotated(Change):
    KIND, RESOURCE = "site.key_rotated", ("site_id", "name")
    site_id: str
    name: str
    old_key_sha256: str | None
    new_key_sha256: str | None


@dataclass(frozen=True)
class ObservedStateChanged(Change):
    """What a site reported running changed: per artifact, its state and reason before and after."""

    KIND, RESOURCE = "site.status_changed", ("site_id", "site_name")
    site_id: str
    site_name: str
    desired_version_before: int | None
    desired_version_after: int
    artifacts: dict[str, dict[str, Any]]


# -- rollouts and desired state --------------------------------------------------------------


@dataclass(frozen=True)
class RolloutCreated(Change):
    KIND, RESOURCE = "rollout.created", ("rollout_id", "name")
    rollout_id: str
    name: str
    spec: dict[str, Any]
    spec_sha256: str
    sites: list[dict[str, Any]]


@dataclass(frozen=True)
class RolloutPromoted(Change):
    KIND, RESOURCE = "rollout.promoted", ("rollout_id", "name")
    rollout_id: str
    name: str
    waves_released_before: int
    waves_released_after: int
    waves: int
    automatic: bool


@dataclass(frozen=True)
class RolloutStateChanged(Change):
    KIND, RESOURCE = "rollout.state_changed", ("rollout_id", "name")
    rollout_id: str
    name: str
    before: str
    after: str


@dataclass(frozen=True)
class RolloutRolledBack(Change):
    KIND, RESOURCE = "rollout.rolled_back", ("rollout_id", "name")
    rollout_id: str
    name: str
    state_before: str


@dataclass(frozen=True)
class DesiredStatePublished(Change):
    """New desired-state versions: which sites, which versions, carrying what."""

    KIND, RESOURCE = "desired_state.published", ("rollout",)
    rollout: str | None
    rollout_id: str | None
    sites: list[dict[str, Any]]


# -- federated jobs --------------------------------------------------------------------------


@dataclass(frozen=True)
class JobCreated(Change):
    KIND, RESOURCE = "job.created", ("job_id", "name")
    job_id: str
    name: str
    spec: dict[str, Any]
    spec_sha256: str
    sites: list[str]


@dataclass(frozen=True)
class JobStateChanged(Change):
    KIND, RESOURCE = "job.state_changed", ("job_id", "name")
    job_id: str
    name: str
    before: str
    after: str
    reason: str


@dataclass(frozen=True)
class JobAnswered(Change):
    KIND, RESOURCE = "job.answered", ("job_id", "name", "site_id")
    job_id: str
    name: str
    site_id: str
    join: bool
    reasons: list[str]
    dataset_sha256: str | None
    supernode_key_sha256: str | None


@dataclass(frozen=True)
class JobRound(Change):
    KIND, RESOURCE = "job.round", ("job_id", "name")
    job_id: str
    name: str
    round: int
    sites: list[str]
    train: dict[str, Any]
    evaluate: dict[str, Any]
    epsilon: float | None


# -- witnessing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointWitnessed(Change):
    """The controller cosigned a site's audit checkpoint (it witnesses the site's log)."""

    KIND, RESOURCE = "witness.cosigned", ("site_id", "site_name")
    site_id: str
    site_name: str
    origin: str
    old_size: int
    size: int
    root: str


@dataclass(frozen=True)
class ControllerLogRefused(Change):
    """A site, witnessing the controller's audit log, refused a checkpoint and reported it."""

    KIND, RESOURCE = "audit.refused_by_site", ("site_id", "site_name")
    site_id: str
    site_name: str
    reason: str
    cosigned_size: int | None
    cosigned_root: str | None
    presented_size: int | None
    presented_root: str | None
    checkpoint_sha256: str | None


# -- dashboard sessions ----------------------------------------------------------------------


@dataclass(frozen=True)
class SessionStarted(Change):
    """Someone signed in to the dashboard with an API token (the session is recorded by its token)."""

    KIND, RESOURCE = "session.started", ("token_id", "name")
    token_id: str
    name: str
    role: str
    expires_at: datetime


@dataclass(frozen=True)
class SessionEnded(Change):
    KIND, RESOURCE = "session.ended", ("token_id", "name")
    token_id: str
    name: str
    role: str


# -- the table of routes ---------------------------------------------------------------------


@dataclass(frozen=True)
class Exempt:
    """A state-changing route whose success records no change entry, and why (refusals are recorded)."""

    reason: str


RouteRecord = frozenset[str] | Exempt

ROUTES: dict[tuple[str, str], RouteRecord] = {
    ("POST", "/api/v1/tokens"): frozenset({TokenCreated.KIND}),
    ("POST", "/api/v1/tokens/{token_id}/revoke"): frozenset({TokenRevoked.KIND}),
    ("POST", "/api/v1/sites"): frozenset({SiteCreated.KIND}),
    ("PUT", "/api/v1/sites/{site}/labels"): frozenset({SiteLabelsChanged.KIND}),
    ("POST", "/api/v1/sites/{site}/disable"): frozenset({SiteDisabled.KIND}),
    ("POST", "/api/v1/sites/{site}/join-tokens"): frozenset({JoinTokenIssued.KIND}),
    ("POST", "/api/v1/enroll"): frozenset({SiteEnrolled.KIND}),
    ("POST", "/api/v1/agent/rotate-key"): frozenset({SiteKeyRotated.KIND}),
    ("POST", "/api/v1/approvers"): frozenset({ApproverKeyRegistered.KIND}),
    ("POST", "/api/v1/approvers/{key_id}/revoke"): frozenset({ApproverKeyRevoked.KIND}),
    ("POST", "/api/v1/uploads"): frozenset({UploadStarted.KIND}),
    ("PATCH", "/api/v1/uploads/{upload_id}"): frozenset({UploadProgressed.KIND, UploadReset.KIND}),
    ("POST", "/api/v1/releases"): frozenset({ReleaseCreated.KIND}),
    ("POST", "/api/v1/releases/{name}/{version}/approvals"): frozenset({ApprovalAdded.KIND}),
    ("POST", "/api/v1/releases/{name}/{version}/revocations"): frozenset({ReleaseRevoked.KIND}),
    ("POST", "/api/v1/rollouts"): frozenset({RolloutCreated.KIND}),
    ("POST", "/api/v1/rollouts/{rollout}/promote"): frozenset({RolloutPromoted.KIND}),
    ("POST", "/api/v1/rollouts/{rollout}/pause"): frozenset({RolloutStateChanged.KIND}),
    ("POST", "/api/v1/rollouts/{rollout}/resume"): frozenset({RolloutStateChanged.KIND}),
    ("POST", "/api/v1/rollouts/{rollout}/rollback"): frozenset({RolloutRolledBack.KIND}),
    ("POST", "/api/v1/jobs"): frozenset({JobCreated.KIND}),
    ("POST", "/api/v1/jobs/{job}/cancel"): frozenset({JobStateChanged.KIND}),
    ("POST", "/api/v1/agent/status"): frozenset({ObservedStateChanged.KIND}),
    ("POST", "/api/v1/agent/jobs/{job_id}/participation"): frozenset({JobAnswered.KIND}),
    ("POST", "/api/v1/witness/add-checkpoint"): frozenset({CheckpointWitnessed.KIND}),
    ("POST", "/api/v1/agent/audit-refusals"): frozenset({ControllerLogRefused.KIND}),
    ("POST", "/ui/login"): frozenset({SessionStarted.KIND}),
    ("POST", "/ui/logout"): frozenset({SessionEnded.KIND}),
    ("POST", "/api/v1/agent/audit-cosignatures"): Exempt(
        "a site's cosignature of the controller's checkpoint is evidence about the log, kept with it and exported "
        "with it; recording each one would grow the log and make every checkpoint cause the next"
    ),
}

AUDIT_MARK = "Audit trail: "


def describe(record: RouteRecord) -> str:
    """The sentence the OpenAPI description of a state-changing route carries."""
    if isinstance(record, Exempt):
        return AUDIT_MARK + f"refusals are recorded; success records no change ({record.reason})."
    return AUDIT_MARK + "records " + ", ".join(sorted(record)) + "; refusals are recorded too."


def record_for(method: str, path: str) -> RouteRecord | None:
    """What a route records; a dashboard route records what its REST twin does (`access.UI_SAME_AS`)."""
    return ROUTES.get(UI_SAME_AS.get((method, path), (method, path)))
