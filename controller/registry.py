"""The release registry: resumable blob uploads, immutable releases, approver keys, approvals.

A release is name + semantic version + kind + runtime + files + model card. Its files
are blobs (content-addressed, stored once). Creating a release writes its manifest,
`release.json` (RFC 8785 canonical JSON), and publishes manifest and files as TUF
targets under `releases/<name>/<version>/`. An approval is an OpenSSF model-signing
signature over that same layout (`release.json` and `files/<path>`), made by an approver
whose public key an admin registered, who is not the uploader (four eyes); it is
published as `releases/<name>/<version>/approvals/<key fingerprint>.json`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import rfc8785
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from controller.blobs import BlobStore, is_sha256
from controller.db import Approval, ApproverKey, Blob, Release, ReleaseFile, Upload, dialect_insert, utcnow
from controller.errors import BadRequest, Conflict, Forbidden, NotFound, Unprocessable
from sitewarden import approval as approvals_lib
from sitewarden import names

RUNTIMES = {"model": {"onnx", "transformers"}, "adapter": {"transformers"}, "policy": {"rego"}}
MAX_FILES = 10_000
MANIFEST = "release.json"


class Publisher(Protocol):
    """What the registry needs of the TUF repository."""

    def add_targets(self, targets: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class FileSpec:
    path: str
    sha256: str
    size: int


def release_prefix(name: str, version: str) -> str:
    return f"releases/{name}/{version}"


def check_path(path: str) -> str:
    """A release file path (`sitewarden.names.check_release_path`), refused with a 400."""
    try:
        return names.check_release_path(path)
    except names.InvalidName as exc:
        raise BadRequest(str(exc)) from exc


# -- uploads --------------------------------------------------------------------------


def start_upload(session: Session, blobs: BlobStore, sha256: str, size: int, created_by: str) -> Upload | None:
    """Begin (or resume) a resumable upload; None when the blob is already stored (nothing to send).

    The same person uploading the same bytes again gets their unfinished upload back, so a
    client that was interrupted, even killed, continues from where the bytes stopped.
    """
    if not is_sha256(sha256):
        raise BadRequest("sha256 must be 64 lowercase hex digits")
    if size < 0:
        raise BadRequest("size must not be negative")
    existing = session.get(Blob, sha256)
    if existing is not None and blobs.exists(sha256):
        if existing.size != size:
            raise Conflict(f"blob {sha256} is stored with size {existing.size}, not {size}")
        return None
    unfinished = session.scalar(
        select(Upload)
        .where(
            Upload.sha256 == sha256,
            Upload.size == size,
            Upload.created_by == created_by,
            Upload.completed_at.is_(None),
        )
        .order_by(Upload.created_at.desc())
    )
    if unfinished is not None:
        return unfinished
    upload = Upload(sha256=sha256, size=size, created_by=created_by)
    session.add(upload)
    session.commit()
    return upload


def get_upload(session: Session, upload_id: str) -> Upload:
    upload = session.get(Upload, upload_id)
    if upload is None:
        raise NotFound(f"no upload {upload_id!r}")
    return upload


def record_blob(session: Session, sha256: str, size: int) -> None:
    """Record a stored blob in the caller's transaction; a concurrent record of the same bytes is fine."""
    record_blobs(session, [(sha256, size)])


def record_blobs(session: Session, blobs: Iterable[tuple[str, int]]) -> None:
    """Record stored blobs (sha256, size) in the caller's transaction, in one statement; known ones are skipped."""
    rows = [{"sha256": sha256, "size": size, "created_at": utcnow()} for sha256, size in dict(blobs).items()]
    if not rows:
        return
    insert = dialect_insert(session)
    for start in range(0, len(rows), 1000):  # well within the databases' limits on bound parameters
        chunk = rows[start : start + 1000]
        session.execute(insert(Blob).values(chunk).on_conflict_do_nothing(index_elements=["sha256"]))


# -- releases -------------------------------------------------------------------------


def check_release_identity(name: str, version: str, kind: str, runtime: str) -> None:
    try:
        names.check_release_name(name)
        names.check_version(version)
    except names.InvalidName as exc:
        raise BadRequest(str(exc)) from exc
    if kind not in RUNTIMES:
        raise BadRequest(f"kind {kind!r} must be one of {', '.join(sorted(RUNTIMES))}")
    if runtime not in RUNTIMES[kind]:
        raise BadRequest(f"runtime {runtime!r} is not valid for kind {kind}: use {', '.join(sorted(RUNTIMES[kind]))}")


def manifest_document(release: Release) -> bytes:
    """The canonical `release.json` of a release: what the agent activates and the approver signs."""
    return rfc8785.dumps(
        {
            "name": release.name,
            "version": release.version,
            "kind": release.kind,
            "runtime": release.runtime,
            "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in release.files],
            "metadata": release.metadata_,
            "uploaded_by": release.uploaded_by,
            "created_at": release.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    )


def signed_layout(release: Release) -> dict[str, str]:
    """Paths and SHA-256 digests an approval signature must cover, exactly."""
    layout = {MANIFEST: release.manifest_sha256}
    layout.update({f"files/{f.path}": f.sha256 for f in release.files})
    return layout


def create_release(
    session: Session,
    blobs: BlobStore,
    publisher: Publisher,
    *,
    name: str,
    version: str,
    kind: str,
    runtime: str,
    files: list[FileSpec],
    metadata: dict[str, Any],
    uploaded_by: str,
) -> Release:
    check_release_identity(name, version, kind, runtime)
    if not files:
        raise BadRequest("a release needs at least one file")
    if len(files) > MAX_FILES:
        raise BadRequest(f"a release may have at most {MAX_FILES} files")
    seen: set[str] = set()
    for spec in files:
        check_path(spec.path)
        if spec.path in seen:
            raise BadRequest(f"file {spec.path!r} is listed twice")
        seen.add(spec.path)
        if not is_sha256(spec.sha256):
            raise BadRequest(f"file {spec.path!r}: sha256 must be 64 lowercase hex digits")
        blob = session.get(Blob, spec.sha256)
        if blob is None or not blobs.exists(spec.sha256):
            raise Unprocessable(f"file {spec.path!r}: blob {spec.sha256} has not been uploaded")
        if blob.size != spec.size:
            raise Unprocessable(f"file {spec.path!r}: size {spec.size} differs from the uploaded {blob.size}")
    if session.scalar(select(Release.id).where(Release.name == name, Release.version == version)):
        raise Conflict(f"release {name} {version} already exists; releases are immutable")
    if kind == "adapter":
        check_adapter_base(session, metadata)

    release = Release(
        name=name,
        version=version,
        kind=kind,
        runtime=runtime,
        metadata_=metadata,
        uploaded_by=uploaded_by,
        created_at=utcnow().replace(microsecond=0),
        manifest_sha256="",
    )
    release.files = [ReleaseFile(path=f.path, sha256=f.sha256, size=f.size) for f in sorted(files, key=_by_path)]
    document = manifest_document(release)
    release.manifest_sha256 = blobs.put_bytes(document)
    record_blob(session, release.manifest_sha256, len(document))
    session.add(release)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(f"release {name} {version} already exists; releases are immutable") from exc
    prefix = release_prefix(name, version)
    targets = {f"{prefix}/{MANIFEST}": (len(document), release.manifest_sha256)}
    targets.update({f"{prefix}/files/{f.path}": (f.size, f.sha256) for f in release.files})
    publisher.add_targets(targets)
    session.commit()
    return release


def check_adapter_base(session: Session, metadata: dict[str, Any]) -> None:
    """An adapter's card names its base (`"base": {"name", "version", "digest"}`): a transformers model
    release in this registry whose manifest SHA-256 is `digest`. Caught here at push time; every agent
    checks it again against the base it runs (agent.lm.site)."""
    base = metadata.get("base")
    if not isinstance(base, dict) or not all(isinstance(base.get(k), str) for k in ("name", "version", "digest")):
        raise BadRequest('an adapter\'s metadata names its base: "base": {"name", "version", "digest"}')
    found = session.scalar(select(Release).where(Release.name == base["name"], Release.version == base["version"]))
    if found is None:
        raise Unprocessable(f"the adapter's base {base['name']} {base['version']} is not a release of this registry")
    if found.kind != "model" or found.runtime != "transformers":
        raise Unprocessable(
            f"the adapter's base {base['name']} {base['version']} is a {found.kind} release of runtime "
            f"{found.runtime}, not a transformers model"
        )
    if found.manifest_sha256 != base["digest"]:
        raise Unprocessable(
            f"the adapter names base {base['name']} {base['version']} with manifest digest {base['digest'][:12]}…, "
            f"but that release's manifest digest is {found.manifest_sha256[:12]}…"
        )


def _by_path(spec: FileSpec) -> str:
    return spec.path


def get_release(session: Session, name: str, version: str) -> Release:
    release = session.scalar(select(Release).where(Release.name == name, Release.version == version))
    if release is None:
        raise NotFound(f"no release {name} {version}")
    return release


def release_file(release: Release, path: str) -> ReleaseFile:
    for f in release.files:
        if f.path == path:
            return f
    raise NotFound(f"release {release.name} {release.version} has no file {path!r}")


# -- approver keys and approvals ------------------------------------------------------


def register_approver_key(session: Session, approver: str, public_key_pem: str, created_by: str) -> ApproverKey:
    try:
        fingerprint = approvals_lib.key_fingerprint(public_key_pem.encode())
    except approvals_lib.ApprovalError as exc:
        raise BadRequest(f"public_key: {exc}") from exc
    if session.scalar(select(ApproverKey.id).where(ApproverKey.fingerprint == fingerprint)):
        raise Conflict(f"approver key {fingerprint} is already registered")
    key = ApproverKey(approver=approver, fingerprint=fingerprint, public_key_pem=public_key_pem, created_by=created_by)
    session.add(key)
    session.commit()
    return key


def revoke_approver_key(session: Session, key_id: str) -> ApproverKey:
    key = session.get(ApproverKey, key_id) or session.scalar(
        select(ApproverKey).where(ApproverKey.fingerprint == key_id)
    )
    if key is None:
        raise NotFound(f"no approver key {key_id!r}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.commit()
    return key


def add_approval(
    session: Session, blobs: BlobStore, publisher: Publisher, release: Release, *, bundle: bytes, approver: str
) -> Approval:
    """Verify and record an approval by `approver` (four eyes: never the uploader)."""
    if approver == release.uploaded_by:
        raise Forbidden(f"four eyes: {approver} uploaded {release.name} {release.version} and cannot approve it")
    keys = session.scalars(
        select(ApproverKey).where(ApproverKey.approver == approver, ApproverKey.revoked_at.is_(None))
    ).all()
    if not keys:
        raise Forbidden(f"no approver key is registered for {approver}; an admin must register one")
    trusted = {k.fingerprint: k.public_key_pem.encode() for k in keys}
    try:
        verified = approvals_lib.verify_approval(bundle, signed_layout(release), trusted)
    except approvals_lib.ApprovalError as exc:
        raise Unprocessable(f"approval does not verify: {exc}") from exc
    if any(a.approver == approver for a in release.approvals):
        raise Conflict(f"{approver} has already approved {release.name} {release.version}")
    bundle_sha256 = blobs.put_bytes(bundle)
    record_blob(session, bundle_sha256, len(bundle))
    record = Approval(approver=approver, key_fingerprint=verified.key_fingerprint, bundle_sha256=bundle_sha256)
    release.approvals.append(record)  # through the relationship, so the loaded release sees it at once
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(f"{approver} has already approved {release.name} {release.version}") from exc
    path = f"{release_prefix(release.name, release.version)}/approvals/{verified.key_fingerprint}.json"
    publisher.add_targets({path: (len(bundle), bundle_sha256)})
    session.commit()
    return record
