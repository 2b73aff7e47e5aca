"""Wire formats shared by the controller and the agent (pydantic models)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EnrollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=10, max_length=4096, description="The one-time join token.")
    public_key: str = Field(
        min_length=40, max_length=100, description="The site's Ed25519 public key: base64 of its 32 raw bytes."
    )
    agent_version: str | None = Field(default=None, max_length=100)


class EnrollResponse(BaseModel):
    site_id: str
    site_name: str
    controller_url: str = Field(description="Where the agent sends requests; also the `aud` of its site JWTs.")
    root: str = Field(description="Base64 of the exact bytes of the TUF root.json whose SHA-256 the token carries.")
    witness_vkey: str = Field(
        description="The controller's witness key (C2SP vkey, type 0x04): it cosigns audit checkpoints."
    )
    audit_vkey: str | None = Field(
        default=None,
        description="The key of the controller's own audit log (C2SP vkey, type 0x01): the site pins it and "
        "witnesses that log.",
    )


class RotateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    public_key: str = Field(min_length=40, max_length=100, description="The new Ed25519 public key (base64, raw).")
    proof: str = Field(
        min_length=20, max_length=4096, description="A site JWT signed by the new key: proof of possession."
    )


class SiteIdentity(BaseModel):
    site_id: str
    site_name: str
    labels: dict[str, str]
    status: str


class DesiredPointer(BaseModel):
    """The long-poll answer: which desired-state version is current and where its TUF target is."""

    version: int = Field(description="0 when the site has no desired state yet.")
    target: str
    sha256: str | None
    changed: bool = Field(description="True when `version` is newer than the `after` the agent sent.")
    audit_size: int | None = Field(
        default=None, description="The size of the controller's latest signed audit checkpoint, for its witnesses."
    )


class ArtifactState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    version: str = Field(min_length=1, max_length=100)
    kind: str = Field(max_length=20)
    state: Literal["pending", "downloading", "verifying", "active", "failed", "refused"]
    reason: str = Field(default="", max_length=2000)


class JobParticipation(BaseModel):
    """A site's answer to a pending federated job, after its `sitewarden/federation` decision.

    Joining carries the site's Flower SuperNode public key (OpenSSH, ECDSA: the controller
    registers it for the job) and the SHA-256 of the local dataset it will train on (a digest
    for the lineage record, never data). Declining carries the policy's reasons.
    """

    model_config = ConfigDict(extra="forbid")

    join: bool
    reasons: list[str] = Field(default_factory=list, max_length=20)
    supernode_public_key: str | None = Field(default=None, max_length=1000)
    dataset_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    examples: int | None = Field(default=None, ge=0)


class StatusReport(BaseModel):
    """What an agent observes: its desired version, each artifact's state, and its audit log size."""

    model_config = ConfigDict(extra="forbid")

    desired_version: int = Field(ge=0)
    agent_version: str = Field(max_length=100)
    checkpoint_size: int | None = Field(default=None, ge=0)
    artifacts: list[ArtifactState] = Field(default_factory=list, max_length=100)
