"""Wire formats shared by the controller and the agent (pydantic models)."""

from __future__ import annotations

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
