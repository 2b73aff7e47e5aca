"""The desired-state document and the release manifest: what one site should run, and what a release is.

The controller publishes the desired state as the TUF target `sites/<site-id>/desired.json`;
the agent verifies it before it acts on it. Every change bumps `version`. Each release lists
the TUF targets of its manifest, its files, its approvals and its revocations, so that the
agent can fetch and verify all of them. `release.json`, the manifest, is what approvers sign.

A hostile controller is the threat model (DESIGN.md), so both models check every name,
version, path, fingerprint and id with the registry's own rules (`sitewarden.names`) and tie
every target path to the release it belongs to: a document that names `../keys/site.pem` as a
file, a fingerprint that is not one, or another release's bytes as this one's is malformed,
refused before anything is fetched or written. Sizes and counts are bounded so that a document
cannot ask for unbounded work. Validation errors are pydantic `ValidationError`s (a
`ValueError`), whose messages name the field and the rule.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from sitewarden import names

MAX_FILES = 10_000
MAX_APPROVALS = 100
MAX_REVOCATIONS = 100
MAX_RELEASES = 20
MAX_JOBS = 100
MAX_TARGET_SIZE = 1 << 40  # 1 TiB: a bound, not a quota
MANIFEST = "release.json"

ReleaseName = Annotated[str, AfterValidator(names.check_release_name)]
Version = Annotated[str, AfterValidator(names.check_version)]
Sha256 = Annotated[str, AfterValidator(names.check_sha256)]
Fingerprint = Annotated[str, AfterValidator(names.check_fingerprint)]
ReleasePath = Annotated[str, AfterValidator(names.check_release_path)]
PersonName = Annotated[str, AfterValidator(names.check_person_name)]
SiteId = Annotated[str, AfterValidator(lambda v: names.check_id(v, "site id"))]
JobId = Annotated[str, AfterValidator(lambda v: names.check_id(v, "job id"))]
RolloutId = Annotated[str, AfterValidator(lambda v: names.check_id(v, "rollout id"))]
JobName = Annotated[str, AfterValidator(lambda v: names.check_object_name(v, "job"))]
RolloutName = Annotated[str, AfterValidator(lambda v: names.check_object_name(v, "rollout"))]
DatasetName = Annotated[str, AfterValidator(names.check_dataset_name)]
Size = Annotated[int, Field(ge=0, le=MAX_TARGET_SIZE)]


def release_prefix(name: str, version: str) -> str:
    """Where a release's targets live in the TUF repository."""
    return f"releases/{name}/{version}"


def approval_target(name: str, version: str, fingerprint: str) -> str:
    return f"{release_prefix(name, version)}/approvals/{fingerprint}.json"


def revocation_target(name: str, version: str, fingerprint: str) -> str:
    return f"{release_prefix(name, version)}/revocations/{fingerprint}.json"


class TargetRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str = Field(max_length=1024, description="TUF target path.")
    sha256: Sha256
    size: Size


class FileRef(TargetRef):
    path: ReleasePath = Field(description="The file's path inside the release.")


class ApprovalRef(TargetRef):
    approver: PersonName
    key_fingerprint: Fingerprint


class RevocationRef(TargetRef):
    """A signed revocation of the release (DSSE, `sitewarden.revocation`): a hint that makes the
    document change; the site looks revocations up in TUF by the approver keys it trusts."""

    approver: PersonName
    key_fingerprint: Fingerprint


class ReleaseRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ReleaseName
    version: Version
    kind: str
    runtime: str
    manifest: TargetRef
    files: list[FileRef] = Field(max_length=MAX_FILES)
    approvals: list[ApprovalRef] = Field(max_length=MAX_APPROVALS)
    revocations: list[RevocationRef] = Field(default_factory=list, max_length=MAX_REVOCATIONS)

    @model_validator(mode="after")
    def _targets_belong_to_the_release(self) -> ReleaseRef:
        names.check_kind_runtime(self.kind, self.runtime)
        prefix = release_prefix(self.name, self.version)
        if self.manifest.target != f"{prefix}/{MANIFEST}":
            raise ValueError(f"manifest target {self.manifest.target!r} is not {prefix}/{MANIFEST}")
        check_file_set([f.path for f in self.files])
        for f in self.files:
            if f.target != f"{prefix}/files/{f.path}":
                raise ValueError(f"file {f.path!r}: target {f.target!r} is not {prefix}/files/{f.path}")
        for kind, refs, where in (
            ("approval", self.approvals, approval_target),
            ("revocation", self.revocations, revocation_target),
        ):
            seen: set[str] = set()
            for ref in refs:
                if ref.key_fingerprint in seen:
                    raise ValueError(f"two {kind}s by key {ref.key_fingerprint}")
                seen.add(ref.key_fingerprint)
                if ref.target != where(self.name, self.version, ref.key_fingerprint):
                    raise ValueError(f"{kind} target {ref.target!r} is not where key {ref.key_fingerprint}'s goes")
        return self


def check_file_set(paths: list[str]) -> None:
    """A release's file paths: each listed once, and none both a file and a directory ('a' and 'a/b')."""
    seen = set(paths)
    if len(seen) != len(paths):
        duplicate = next(p for p in paths if paths.count(p) > 1)
        raise ValueError(f"file {duplicate!r} is listed twice")
    for path in paths:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in seen:
                raise ValueError(f"{'/'.join(parts[:i])!r} is a file and the directory of {path!r}")


class RolloutRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: RolloutId
    name: RolloutName


def _release_name_ref(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is not None:
        if set(value) != {"name", "version"}:
            raise ValueError(f"a release reference has exactly name and version, not {sorted(value)}")
        names.check_release_name(value["name"])
        names.check_version(value["version"])
    return value


class JobRef(BaseModel):
    """A federated fine-tuning job the site is asked to join (its federation decision decides)."""

    model_config = ConfigDict(extra="forbid")

    id: JobId
    name: JobName
    base: Annotated[dict[str, str], AfterValidator(_release_name_ref)]
    model_family: str = Field(max_length=100)
    dataset: DatasetName
    selector: dict[str, str] = Field(default_factory=dict, max_length=20)
    rounds: int = Field(ge=1, le=10_000)
    min_sites: int = Field(ge=1, le=10_000)
    strategy: str = Field(max_length=50)
    differential_privacy: dict[str, float | bool] = Field(max_length=20)
    secure_aggregation: bool
    proximal_mu: float | None = None
    output: Annotated[dict[str, str] | None, AfterValidator(_release_name_ref)] = None
    app: ReleaseRef | None = Field(
        default=None, description="The Flower App release (kind app, runtime flower) the job runs; sites verify it."
    )
    state: Literal["pending", "running"] = "pending"
    participants: list[SiteId] = Field(
        default_factory=list, max_length=10_000, description="Sites whose SuperNodes were registered."
    )
    fleet: str | None = Field(
        default=None, max_length=300, description="host:port of the controller's Flower Fleet API."
    )


class DesiredState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    site_id: SiteId
    version: int = Field(ge=1)
    generated_at: str = Field(max_length=40)
    rollout: RolloutRef | None
    releases: list[ReleaseRef] = Field(max_length=MAX_RELEASES)
    policy: ReleaseRef | None = None
    jobs: list[JobRef] = Field(default_factory=list, max_length=MAX_JOBS)

    @model_validator(mode="after")
    def _each_release_once(self) -> DesiredState:
        named = [(r.name, r.version) for r in [*self.releases, *([self.policy] if self.policy else [])]]
        if len(set(named)) != len(named):
            raise ValueError("a release is named twice")
        if len({j.id for j in self.jobs}) != len(self.jobs):
            raise ValueError("a job is named twice")
        return self


class ManifestFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: ReleasePath
    sha256: Sha256
    size: Size


class ReleaseManifest(BaseModel):
    """`release.json` (RFC 8785 JSON, written by the controller's registry, signed by approvers)."""

    model_config = ConfigDict(extra="forbid")

    name: ReleaseName
    version: Version
    kind: str
    runtime: str
    files: list[ManifestFile] = Field(min_length=1, max_length=MAX_FILES)
    metadata: dict[str, Any] = Field(default_factory=dict)
    uploaded_by: str = Field(min_length=1, max_length=200, description="A person, or `federation:<job>`.")
    created_at: str = Field(max_length=40)

    @model_validator(mode="after")
    def _consistent(self) -> ReleaseManifest:
        names.check_kind_runtime(self.kind, self.runtime)
        check_file_set([f.path for f in self.files])
        return self

    def digests(self) -> dict[str, str]:
        """Path -> SHA-256 of every file."""
        return {f.path: f.sha256 for f in self.files}


def target_path(site_id: str) -> str:
    return f"sites/{site_id}/desired.json"


ARTIFACT_STATES = ("pending", "downloading", "verifying", "active", "failed", "refused")
