"""Request and response bodies of the admin API (pydantic models: types at the boundary)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

NAME = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,199}$"


class Page(BaseModel, Generic[T]):
    items: list[T]
    next: str | None = Field(default=None, description="Pass as `after` to get the next page; null at the end.")


class Me(BaseModel):
    kind: str
    name: str
    role: str | None


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME, description="Who the token is for (a person or a service).")
    role: str = Field(description="admin, operator, approver or auditor.")
    ttl_days: int | None = Field(default=90, ge=1, le=3650, description="Days until expiry; null for no expiry.")


class TokenInfo(BaseModel):
    id: str
    name: str
    role: str
    created_at: datetime
    created_by: str | None
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class TokenCreated(TokenInfo):
    token: str = Field(description="The secret token. Shown once; store it safely.")


class SiteCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=63)
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)


class SiteVkey(BaseModel):
    """One key the site has held, as the vkey of its audit log: exports signed while it was current verify with it."""

    vkey: str
    since: datetime
    until: datetime | None = Field(description="When it stopped being the site's key; null for the current key.")
    ended_by: str | None = Field(
        description="`rotated` (the same log went on with the next key) or `re-enrolled` (a new log began)."
    )
    last_checkpoint: str | None = Field(
        description="The last checkpoint the controller's witness cosigned under this key (signed note)."
    )


class SiteLabels(BaseModel):
    model_config = ConfigDict(extra="forbid")

    labels: dict[str, str] = Field(max_length=64, description="The site's labels, replacing the ones it has.")


class SiteInfo(BaseModel):
    id: str
    name: str
    labels: dict[str, str]
    status: str
    audit_vkey: str | None = Field(
        default=None, description="The vkey of the site's audit log (C2SP, type 0x01), once the site is enrolled."
    )
    audit_vkeys: list[SiteVkey] = Field(
        default_factory=list, description="Every key the site has held, oldest first; the current one last."
    )
    witness_vkey: str | None = Field(
        default=None,
        description="The vkey the site cosigns the controller's audit log with (C2SP, type 0x04), once enrolled: "
        "for an auditor's witness policy (better taken from the site itself, `sitewarden agent keys`).",
    )
    created_at: datetime
    enrolled_at: datetime | None
    disabled_at: datetime | None
    key_rotated_at: datetime | None


class JoinTokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl_seconds: int = Field(default=3600, ge=60, le=7 * 86400)


class JoinTokenCreated(BaseModel):
    token: str = Field(description="The one-time join token for `sitewarden agent enroll --token`.")
    site: str
    expires_at: datetime
    controller_url: str
    root_sha256: str


class ApproverKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    approver: str = Field(pattern=NAME, description="The approver's name, as on their API token.")
    public_key_pem: str = Field(min_length=50, max_length=4000, description="P-256 public key, PEM.")


class ApproverKeyInfo(BaseModel):
    id: str
    approver: str
    fingerprint: str
    public_key_pem: str
    created_at: datetime
    created_by: str | None
    revoked_at: datetime | None


class UploadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0, le=1 << 40)


class UploadInfo(BaseModel):
    id: str | None = Field(description="Upload id; null when the blob was already stored.")
    sha256: str
    size: int
    offset: int
    complete: bool


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=400)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0, le=1 << 40)


class ModelCard(BaseModel):
    """Model card fields; other fields (inputs, outputs, ...) are kept as given."""

    model_config = ConfigDict(extra="allow")

    owner: str = Field(min_length=1, max_length=200)
    intended_purposes: list[str] = Field(default_factory=list, max_length=100)
    risk_tier: str | None = Field(default=None, max_length=50)
    evaluation: dict[str, float] = Field(default_factory=dict, max_length=200)
    licence: str | None = Field(default=None, max_length=200)


class ReleaseCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    version: str = Field(min_length=5, max_length=100, description="Semantic version, e.g. 1.2.0.")
    kind: str = Field(description="model, adapter, policy or app.")
    runtime: str = Field(
        description="onnx or transformers for models; transformers for adapters; rego for policies; flower for "
        "apps (a Flower App: exactly one .fab file)."
    )
    files: list[FileEntry] = Field(min_length=1, max_length=10_000)
    metadata: ModelCard


class ApprovalInfo(BaseModel):
    approver: str
    key_fingerprint: str
    bundle_sha256: str
    created_at: datetime


class RevocationInfo(BaseModel):
    approver: str
    key_fingerprint: str
    bundle_sha256: str
    reason: str
    revoked_at: str = Field(description="When the approver signed the revocation (as signed).")
    created_at: datetime


class ReleaseInfo(BaseModel):
    name: str
    version: str
    kind: str
    runtime: str
    metadata: dict[str, Any]
    manifest_sha256: str
    uploaded_by: str
    created_at: datetime
    files: list[FileEntry]
    approvals: list[ApprovalInfo]
    revocations: list[RevocationInfo] = Field(
        default_factory=list, description="Signed revocations: sites refuse a revoked release."
    )


class ReleaseName(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    version: str = Field(min_length=1, max_length=100)


class RolloutCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,99}$")
    releases: list[ReleaseName] = Field(default_factory=list, max_length=20, description="A model, or base + adapters.")
    policy: ReleaseName | None = Field(default=None, description="A release of kind policy.")
    selector: dict[str, str] = Field(default_factory=dict, max_length=20, description="Labels a site must all have.")
    canary: list[str] = Field(default_factory=list, max_length=100, description="Sites of the first wave, by name.")
    canary_percent: int | None = Field(default=None, ge=1, le=99, description="Or: this share of sites first.")
    auto_promote_after_s: int | None = Field(
        default=None, ge=0, le=30 * 86400, description="Promote once the canaries have been active this long."
    )


class ConditionInfo(BaseModel):
    type: str
    status: str
    reason: str
    message: str


class RolloutSiteInfo(BaseModel):
    site: str
    site_id: str
    wave: int
    released: bool
    superseded: bool
    desired_version: int | None
    observed_version: int | None
    artifacts: dict[str, dict[str, Any]]
    heartbeat_at: datetime | None
    heartbeat_fresh: bool
    agent_version: str | None
    healthy: bool


class RolloutInfo(BaseModel):
    id: str
    name: str
    state: str
    spec: dict[str, Any]
    waves: int
    waves_released: int
    created_by: str
    created_at: datetime
    conditions: list[ConditionInfo]
    sites: list[RolloutSiteInfo]


class DesiredInfo(BaseModel):
    site_id: str
    version: int
    sha256: str
    rollout_id: str | None
    created_at: datetime
    document: dict[str, Any]


class DifferentialPrivacySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    noise_multiplier: float = Field(gt=0, le=100, description="Noise std / clipping norm, per round.")
    clipping_norm: float = Field(gt=0, le=1e6, description="Each site's update is clipped to this L2 norm.")
    delta: float = Field(default=1e-5, gt=0, lt=0.01, description="The delta of the (epsilon, delta) guarantee.")


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,99}$")
    base: ReleaseName = Field(description="An approved ONNX model release to start from.")
    app: ReleaseName = Field(description="The approved Flower App release (kind app) the job runs at every site.")
    model_family: str = Field(default="tabular-logreg", description="tabular-logreg.")
    dataset: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", description="The data set name each site maps to local data."
    )
    selector: dict[str, str] = Field(default_factory=dict, max_length=20, description="Labels a site must all have.")
    rounds: int = Field(ge=1, le=1000)
    min_sites: int = Field(ge=1, le=10_000, description="The job fails unless at least this many sites take part.")
    strategy: str = Field(default="FedAvg", description="FedAvg or FedProx.")
    differential_privacy: DifferentialPrivacySpec | None = None
    secure_aggregation: bool = False
    proximal_mu: float | None = Field(default=None, gt=0, le=100, description="FedProx's proximal term weight.")
    output: ReleaseName | None = Field(
        default=None,
        description="Name and version of the resulting release; default: the base's name, version -ft.<job>.",
    )


class JobInfo(BaseModel):
    id: str
    name: str
    state: str = Field(description="pending, running, finished, failed or cancelled.")
    reason: str
    spec: dict[str, Any]
    sites: list[str] = Field(description="Ids of the sites the selector matched when the job was created.")
    rounds: list[dict[str, Any]] = Field(
        description="Per round: aggregated metrics, the sites that took part, epsilon."
    )
    epsilon_planned: float | None = Field(description="Epsilon after all rounds at the job's delta, if DP is on.")
    epsilon_spent: float | None = Field(description="Epsilon after the rounds done so far, if DP is on.")
    participants: list[str] = Field(description="Ids of the sites that joined (their SuperNodes were registered).")
    declined: dict[str, list[str]] = Field(description="Site id -> the reasons its policy gave for not joining.")
    bytes_exchanged: dict[str, int] | None = Field(description="Fleet API bytes from and to the sites during the run.")
    run_id: str | None = Field(description="The Flower run id (an unsigned 64-bit number, as text).")
    result: dict[str, str] | None = Field(description="The candidate release the job produced (name, version).")
    started_at: datetime | None = Field(description="When the run started (the sites' keys were registered).")
    ended_at: datetime | None = Field(description="When the job finished, failed or was cancelled.")
    created_by: str
    created_at: datetime
    updated_at: datetime
