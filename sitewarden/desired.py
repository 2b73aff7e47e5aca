"""The desired-state document: what one site should run, published by the controller as the
TUF target `sites/<site-id>/desired.json` and verified by the agent before it acts on it.

Every change bumps `version`. Each release lists the TUF targets of its manifest, its
files and its approvals, so that the agent can fetch and verify all of them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TargetRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="TUF target path.")
    sha256: str
    size: int


class FileRef(TargetRef):
    path: str = Field(description="The file's path inside the release.")


class ApprovalRef(TargetRef):
    approver: str
    key_fingerprint: str


class ReleaseRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    kind: str
    runtime: str
    manifest: TargetRef
    files: list[FileRef]
    approvals: list[ApprovalRef]


class RolloutRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    name: str


class JobRef(BaseModel):
    """A federated fine-tuning job the site is asked to join (its federation decision decides)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    base: dict[str, str]
    model_family: str
    dataset: str
    selector: dict[str, str] = Field(default_factory=dict)
    rounds: int = Field(ge=1)
    min_sites: int = Field(ge=1)
    strategy: str
    differential_privacy: dict[str, float | bool]
    secure_aggregation: bool
    proximal_mu: float | None = None
    output: dict[str, str] | None = None
    app: ReleaseRef | None = Field(
        default=None, description="The Flower App release (kind app, runtime flower) the job runs; sites verify it."
    )
    state: Literal["pending", "running"] = "pending"
    participants: list[str] = Field(default_factory=list, description="Sites whose SuperNodes were registered.")
    fleet: str | None = Field(default=None, description="host:port of the controller's Flower Fleet API.")


class DesiredState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    site_id: str
    version: int = Field(ge=1)
    generated_at: str
    rollout: RolloutRef | None
    releases: list[ReleaseRef]
    policy: ReleaseRef | None = None
    jobs: list[JobRef] = Field(default_factory=list)


def target_path(site_id: str) -> str:
    return f"sites/{site_id}/desired.json"


ARTIFACT_STATES = ("pending", "downloading", "verifying", "active", "failed", "refused")
