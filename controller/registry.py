"""The release registry: resumable blob uploads, immutable releases, approver keys, approvals.

A release is name + semantic version + kind + runtime + files + model card. Kinds: `model`
(`onnx`, `transformers`), `adapter` (`transformers`), `policy` (`rego`) and `app` (`flower`: a
Flower App, exactly one FAB, which federated jobs run). Its files are blobs (content-addressed,
stored once). Creating a release writes its manifest,
`release.json` (RFC 8785 canonical JSON), and publishes manifest and files as TUF
targets under `releases/<name>/<version>/`. An approval is an OpenSSF model-signing
signature over that same layout (`release.json` and `files/<path>`), made by an approver
whose public key an admin registered, who is not the uploader (four eyes); it is
published as `releases/<name>/<version>/approvals/<key fingerprint>.json`. A revocation
(`sitewarden.revocation`) is an approver's signed statement that a release (name, version,
manifest digest) must no longer run; it is published as
`releases/<name>/<version>/revocations/<key fingerprint>.json`, and sites refuse the release.

Names, versions and paths follow `sitewarden.names`, the rules the agent applies again.
Every change is committed to the database first and published to TUF after: TUF never
names a release, an approval or a revocation the database does not hold. The metadata
limits of the TUF repository are checked before the commit (`check_targets`), so that a
release that would flood a hash bin is refused (413) with nothing stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import rfc8785
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from controller import audit_trail
from controller.blobs import BlobStore, is_sha256
from controller.changes import (
    ApprovalAdded,
    ApprovalWithdrawn,
    ApproverKeyRegistered,
    ApproverKeyRevoked,
    ReleaseCreated,
    ReleaseRevoked,
    ReleaseWithdrawn,
    UploadProgressed,
    UploadReset,
    UploadStarted,
)
from controller.db import (
    Approval,
    ApproverKey,
    Blob,
    Release,
    ReleaseFile,
    Revocation,
    Upload,
    dialect_insert,
    new_id,
    utcnow,
)
from controller.errors import BadRequest, Conflict, Forbidden, NotFound, Unprocessable
from controller.tuf_repo import MetadataLimitError
from federation import fab
from sitewarden import desired, names, revocation

RUNTIMES = names.RUNTIMES
MAX_FILES = 10_000
MANIFEST = "release.json"


class Publisher(Protocol):
    """What the registry needs of the TUF repository: a dry run before the commit, the publication after."""

    def check_targets(self, targets: Mapping[str, Any]) -> None: ...

    def add_targets(self, targets: Mapping[str, Any]) -> Any: ...


@dataclass(frozen=True)
class FileSpec:
    path: str
    sha256: str
    size: int


release_prefix = desired.release_prefix


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
    upload = Upload(id=new_id(), sha256=sha256, size=size, created_by=created_by)
    session.add(upload)
    audit_trail.record(session, UploadStarted(upload.id, sha256, size))
    session.commit()
    return upload


def upload_progressed(session: Session, upload: Upload, offset_before: int) -> None:
    """Record that an upload's bytes went from `offset_before` to its offset now (in the caller's transaction)."""
    if upload.offset != offset_before:
        change = UploadProgressed(
            upload.id, upload.sha256, offset_before, upload.offset, upload.size, upload.offset == upload.size
        )
        audit_trail.record(session, change)


def upload_reset(session: Session, upload: Upload, reason: str) -> None:
    """Start an upload over from offset 0 (its bytes did not hash to the declared digest); commits."""
    audit_trail.record(session, UploadReset(upload.id, upload.sha256, upload.offset, reason))
    upload.offset = 0
    session.commit()


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
        names.check_kind_runtime(kind, runtime)
    except names.InvalidName as exc:
        raise BadRequest(str(exc)) from exc


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
    try:
        desired.check_file_set([spec.path for spec in files])
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc
    for spec in files:
        if not is_sha256(spec.sha256):
            raise BadRequest(f"file {spec.path!r}: sha256 must be 64 lowercase hex digits")
        blob = session.get(Blob, spec.sha256)
        if blob is None or not blobs.exists(spec.sha256):
            raise Unprocessable(f"file {spec.path!r}: blob {spec.sha256} has not been uploaded")
        if blob.size != spec.size:
            raise Unprocessable(f"file {spec.path!r}: size {spec.size} differs from the uploaded {blob.size}")
    if kind == "app":
        check_app_files(files, blobs)
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
    targets = release_targets(release, len(document))
    publisher.check_targets(targets)  # a release that would flood a hash bin: 413, nothing stored
    change = ReleaseCreated(
        name, version, kind, runtime, release.manifest_sha256, len(files), sum(f.size for f in files), uploaded_by
    )
    audit_trail.record(session, change)
    session.commit()
    try:
        publisher.add_targets(targets)
    except MetadataLimitError as exc:
        # Another release took the room between the check and now: this one is withdrawn.
        session.delete(release)
        audit_trail.record(session, ReleaseWithdrawn(name, version, str(exc)))
        session.commit()
        raise
    return release


def release_targets(release: Release, manifest_size: int) -> dict[str, tuple[int, str]]:
    """The TUF targets of a release's manifest and files."""
    prefix = release_prefix(release.name, release.version)
    targets = {f"{prefix}/{MANIFEST}": (manifest_size, release.manifest_sha256)}
    targets.update({f"{prefix}/files/{f.path}": (f.size, f.sha256) for f in release.files})
    return targets


def check_app_files(files: list[FileSpec], blobs: BlobStore) -> None:
    """A Flower App release (kind app) is exactly one Flower App Bundle: the FAB its jobs run."""
    if len(files) != 1 or not files[0].path.endswith(fab.FAB_SUFFIX):
        raise BadRequest(f"an app release holds exactly one {fab.FAB_SUFFIX} file (a Flower App Bundle)")
    if files[0].size > fab.MAX_FAB:
        raise Unprocessable(f"file {files[0].path!r}: a FAB is at most {fab.MAX_FAB} bytes (Flower's limit)")
    try:
        fab.inspect(blobs.path(files[0].sha256).read_bytes())
    except fab.FabError as exc:
        raise Unprocessable(f"file {files[0].path!r}: {exc}") from exc


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


def _approvals() -> Any:
    """`sitewarden.approval`, imported when first needed: model-signing takes a second or more to import,
    and every controller start (and every kill -9 round of its tests) would pay it."""
    from sitewarden import approval  # noqa: PLC0415

    return approval


def register_approver_key(session: Session, approver: str, public_key_pem: str, created_by: str) -> ApproverKey:
    approvals_lib = _approvals()
    try:
        fingerprint = approvals_lib.key_fingerprint(public_key_pem.encode())
    except approvals_lib.ApprovalError as exc:
        raise BadRequest(f"public_key: {exc}") from exc
    if session.scalar(select(ApproverKey.id).where(ApproverKey.fingerprint == fingerprint)):
        raise Conflict(f"approver key {fingerprint} is already registered")
    key = ApproverKey(
        id=new_id(), approver=approver, fingerprint=fingerprint, public_key_pem=public_key_pem, created_by=created_by
    )
    session.add(key)
    audit_trail.record(session, ApproverKeyRegistered(key.id, approver, fingerprint))
    session.commit()
    return key


def revoke_approver_key(session: Session, key_id: str) -> ApproverKey:
    key = session.get(ApproverKey, key_id) or session.scalar(
        select(ApproverKey).where(ApproverKey.fingerprint == key_id)
    )
    if key is None:
        raise NotFound(f"no approver key {key_id!r}")
    audit_trail.locked(session, key)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        audit_trail.record(session, ApproverKeyRevoked(key.id, key.approver, key.fingerprint))
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
    approvals_lib = _approvals()
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
    target = desired.approval_target(release.name, release.version, verified.key_fingerprint)
    targets = {target: (len(bundle), bundle_sha256)}
    publisher.check_targets(targets)
    change = ApprovalAdded(
        release.name, release.version, release.manifest_sha256, approver, verified.key_fingerprint, bundle_sha256
    )
    audit_trail.record(session, change)
    session.commit()
    try:
        publisher.add_targets(targets)
    except MetadataLimitError as exc:
        session.delete(record)  # another publication took the room meanwhile: withdrawn
        audit_trail.record(session, ApprovalWithdrawn(release.name, release.version, approver, str(exc)))
        session.commit()
        raise
    return record


def revoked(release: Release) -> Revocation | None:
    """The first revocation of a release, if an approver revoked it."""
    return release.revocations[0] if release.revocations else None


def add_revocation(
    session: Session, blobs: BlobStore, publisher: Publisher, release: Release, *, document: bytes, approver: str
) -> Revocation:
    """Verify and record `approver`'s signed revocation of `release`, and publish it as a TUF target.

    Any approver with a registered key may revoke a release (pulling a model is a risk control,
    unlike approving it, which needs four eyes); the revocation must name exactly this release:
    its name, version and manifest digest.
    """
    keys = session.scalars(
        select(ApproverKey).where(ApproverKey.approver == approver, ApproverKey.revoked_at.is_(None))
    ).all()
    if not keys:
        raise Forbidden(f"no approver key is registered for {approver}; an admin must register one")
    try:
        verified = revocation.verify_revocation(document, {k.fingerprint: k.public_key_pem.encode() for k in keys})
    except revocation.RevocationError as exc:
        raise Unprocessable(f"revocation does not verify: {exc}") from exc
    named = (verified.name, verified.version, verified.manifest_sha256)
    if named != (release.name, release.version, release.manifest_sha256):
        raise Unprocessable(
            f"the revocation names {verified.name} {verified.version} with manifest {verified.manifest_sha256}, "
            f"not {release.name} {release.version} with manifest {release.manifest_sha256}"
        )
    if any(r.key_fingerprint == verified.key_fingerprint for r in release.revocations):
        raise Conflict(f"{approver} has already revoked {release.name} {release.version} with this key")
    bundle_sha256 = blobs.put_bytes(document)
    record_blob(session, bundle_sha256, len(document))
    record = Revocation(
        approver=approver,
        key_fingerprint=verified.key_fingerprint,
        bundle_sha256=bundle_sha256,
        reason=verified.reason,
        revoked_at=verified.revoked_at,
    )
    release.revocations.append(record)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(f"{approver} has already revoked {release.name} {release.version} with this key") from exc
    target = desired.revocation_target(release.name, release.version, verified.key_fingerprint)
    targets = {target: (len(document), bundle_sha256)}
    publisher.check_targets(targets)
    change = ReleaseRevoked(
        release.name,
        release.version,
        release.manifest_sha256,
        approver,
        verified.key_fingerprint,
        bundle_sha256,
        verified.reason,
    )
    audit_trail.record(session, change)
    session.commit()
    publisher.add_targets(targets)
    return record
