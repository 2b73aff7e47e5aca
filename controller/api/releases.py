"""Uploads, releases, release files, approver keys and approvals."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from controller import auth, registry
from controller.api import pagination
from controller.api.deps import principal, runtime, session
from controller.api.schemas import (
    ApprovalInfo,
    ApproverKeyCreate,
    ApproverKeyInfo,
    FileEntry,
    Page,
    ReleaseCreate,
    ReleaseInfo,
    RevocationInfo,
    UploadCreate,
    UploadInfo,
)
from controller.db import ApproverKey, Release, Revocation, Upload
from controller.errors import BadRequest, Conflict
from controller.runtime import Runtime
from controller.uploads import check_owner

router = APIRouter(prefix="/api/v1", tags=["releases"])
approvers_router = APIRouter(prefix="/api/v1", tags=["approvers"])

_FLUSH_BYTES = 8 << 20


def _release_info(release: Release) -> ReleaseInfo:
    return ReleaseInfo(
        name=release.name,
        version=release.version,
        kind=release.kind,
        runtime=release.runtime,
        metadata=release.metadata_,
        manifest_sha256=release.manifest_sha256,
        uploaded_by=release.uploaded_by,
        created_at=release.created_at,
        files=[FileEntry(path=f.path, sha256=f.sha256, size=f.size) for f in release.files],
        approvals=[
            ApprovalInfo(
                approver=a.approver,
                key_fingerprint=a.key_fingerprint,
                bundle_sha256=a.bundle_sha256,
                created_at=a.created_at,
            )
            for a in release.approvals
        ],
        revocations=[_revocation_info(r) for r in release.revocations],
    )


def _revocation_info(record: Revocation) -> RevocationInfo:
    return RevocationInfo(
        approver=record.approver,
        key_fingerprint=record.key_fingerprint,
        bundle_sha256=record.bundle_sha256,
        reason=record.reason,
        revoked_at=record.revoked_at,
        created_at=record.created_at,
    )


def _upload_info(upload: Upload) -> UploadInfo:
    return UploadInfo(
        id=upload.id,
        sha256=upload.sha256,
        size=upload.size,
        offset=upload.offset,
        complete=upload.completed_at is not None,
    )


# -- uploads --------------------------------------------------------------------------


@router.post(
    "/uploads",
    status_code=201,
    summary="Start a resumable upload of one blob (SHA-256 and size declared up front)",
    response_model=UploadInfo,
)
def start_upload(
    body: UploadCreate,
    caller: auth.Principal = Depends(principal),
    db: Session = Depends(session),
    rt: Runtime = Depends(runtime),
) -> UploadInfo:
    upload = registry.start_upload(db, rt.blobs, body.sha256, body.size, caller.name)
    if upload is None:
        return UploadInfo(id=None, sha256=body.sha256, size=body.size, offset=body.size, complete=True)
    if upload.offset == 0 and not rt.uploads.path(upload.id).exists():
        rt.uploads.create(upload.id)
    upload.offset = rt.uploads.offset(upload.id)
    return _upload_info(upload)


@router.get("/uploads/{upload_id}", summary="How far an upload has come", response_model=UploadInfo)
def upload_status(
    upload_id: str,
    caller: auth.Principal = Depends(principal),
    db: Session = Depends(session),
    rt: Runtime = Depends(runtime),
) -> UploadInfo:
    upload = check_owner(registry.get_upload(db, upload_id), caller.name)
    if upload.completed_at is None:
        upload.offset = rt.uploads.offset(upload_id)
    return _upload_info(upload)


@router.patch(
    "/uploads/{upload_id}",
    summary="Send bytes of an upload from `Upload-Offset`; resumable after any interruption",
    response_model=UploadInfo,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
    responses={409: {"description": "Offset mismatch: the problem's `offset` says where to continue."}},
)
async def upload_bytes(
    upload_id: str,
    request: Request,
    upload_offset: int = Header(alias="Upload-Offset", ge=0, description="Offset of the first byte sent."),
    caller: auth.Principal = Depends(principal),
    db: Session = Depends(session),
    rt: Runtime = Depends(runtime),
) -> UploadInfo:
    # Only whoever started an upload continues it; anyone else is told it does not exist.
    upload = check_owner(await run_in_threadpool(registry.get_upload, db, upload_id), caller.name)
    if upload.completed_at is not None:
        raise Conflict("upload is already complete", offset=upload.size)
    offset_before = upload.offset
    async with rt.uploads.writing(upload_id) as state:
        if upload_offset != state.offset:
            raise Conflict(f"upload is at offset {state.offset}, not {upload_offset}", offset=state.offset)
        buffer = bytearray()
        try:
            async for chunk in request.stream():
                if state.offset + len(buffer) + len(chunk) > upload.size:
                    raise BadRequest(f"more bytes than the declared size of {upload.size}")
                buffer += chunk
                if len(buffer) >= _FLUSH_BYTES:
                    await run_in_threadpool(state.write, bytes(buffer))
                    buffer.clear()
        except ClientDisconnect:
            pass  # keep what arrived: the client resumes from the new offset
        finally:
            if buffer:
                await run_in_threadpool(state.write, bytes(buffer))
        upload.offset = state.offset
        if state.offset == upload.size:
            await run_in_threadpool(rt.finish_upload, db, upload, state, offset_before)
        else:
            registry.upload_progressed(db, upload, offset_before)
            await run_in_threadpool(db.commit)
    return _upload_info(upload)


# -- releases -------------------------------------------------------------------------


@router.post("/releases", status_code=201, summary="Register an immutable release", response_model=ReleaseInfo)
def create_release(
    body: ReleaseCreate,
    caller: auth.Principal = Depends(principal),
    db: Session = Depends(session),
    rt: Runtime = Depends(runtime),
) -> ReleaseInfo:
    release = registry.create_release(
        db,
        rt.blobs,
        rt.publisher,
        name=body.name,
        version=body.version,
        kind=body.kind,
        runtime=body.runtime,
        files=[registry.FileSpec(f.path, f.sha256, f.size) for f in body.files],
        metadata=body.metadata.model_dump(exclude_none=True),
        uploaded_by=caller.name,
    )
    return _release_info(release)


@router.get("/releases", summary="List releases", response_model=Page[ReleaseInfo])
def list_releases(
    name: str | None = Query(None, max_length=100, description="Only releases of this name."),
    limit: int = Query(pagination.DEFAULT_LIMIT, ge=1, le=pagination.MAX_LIMIT),
    after: str | None = Query(None, max_length=500),
    db: Session = Depends(session),
) -> Page[ReleaseInfo]:
    query = select(Release)
    if name is not None:
        query = query.where(Release.name == name)
    rows = list(db.scalars(pagination.page(query, Release.id, after, limit)))
    rows, nxt = pagination.next_cursor(rows, limit, lambda r: r.id)
    return Page[ReleaseInfo](items=[_release_info(r) for r in rows], next=nxt)


@router.get(
    "/releases/{name}/{version}", summary="Show a release with its files and approvals", response_model=ReleaseInfo
)
def show_release(name: str, version: str, db: Session = Depends(session)) -> ReleaseInfo:
    return _release_info(registry.get_release(db, name, version))


@router.get(
    "/releases/{name}/{version}/files/{path:path}",
    summary="Download a release file ('release.json' for the manifest)",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_file(
    name: str, version: str, path: str, db: Session = Depends(session), rt: Runtime = Depends(runtime)
) -> FileResponse:
    release = registry.get_release(db, name, version)
    if path == registry.MANIFEST:
        return FileResponse(rt.blobs.path(release.manifest_sha256), media_type="application/json")
    entry = registry.release_file(release, path)
    return FileResponse(
        rt.blobs.path(entry.sha256), media_type="application/octet-stream", filename=path.rsplit("/", 1)[-1]
    )


@router.post(
    "/releases/{name}/{version}/approvals",
    status_code=201,
    summary="Approve a release with a model-signing signature bundle (four eyes: not by its uploader)",
    response_model=ApprovalInfo,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object", "description": "Signature bundle."}}},
        }
    },
)
async def approve(
    name: str,
    version: str,
    request: Request,
    caller: auth.Principal = Depends(principal),
    db: Session = Depends(session),
    rt: Runtime = Depends(runtime),
) -> ApprovalInfo:
    bundle = await request.body()
    if not bundle:
        raise BadRequest("the body must be the signature bundle written by `sitewarden release approve`")

    def _approve() -> ApprovalInfo:
        release = registry.get_release(db, name, version)
        record = registry.add_approval(db, rt.blobs, rt.publisher, release, bundle=bundle, approver=caller.name)
        rt.reconcile_release(db, name, version)  # sites running it get the approval in their desired state
        return ApprovalInfo(
            approver=record.approver,
            key_fingerprint=record.key_fingerprint,
            bundle_sha256=record.bundle_sha256,
            created_at=record.created_at,
        )

    return await run_in_threadpool(_approve)


@router.post(
    "/releases/{name}/{version}/revocations",
    status_code=201,
    summary="Revoke a release with a signed revocation (DSSE, made by `sitewarden release revoke`)",
    response_model=RevocationInfo,
    description=(
        "The body is the DSSE envelope `sitewarden release revoke` writes: the release's name, version and "
        "manifest digest, a reason and a time, signed with the caller's registered approver key. The controller "
        "checks it, publishes it as the TUF target `releases/<name>/<version>/revocations/<key fingerprint>.json` "
        "and gives the sites that run the release a new desired state: they refuse it, and fall back to their "
        "last-known-good release when it is the one they serve. 409: already revoked with this key; 422: the "
        "signature does not verify or names another release."
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object", "description": "DSSE envelope."}}},
        }
    },
)
async def revoke(
    name: str,
    version: str,
    request: Request,
    caller: auth.Principal = Depends(principal),
    db: Session = Depends(session),
    rt: Runtime = Depends(runtime),
) -> RevocationInfo:
    document = await request.body()
    if not document:
        raise BadRequest("the body must be the signed revocation written by `sitewarden release revoke`")

    def _revoke() -> RevocationInfo:
        release = registry.get_release(db, name, version)
        record = registry.add_revocation(db, rt.blobs, rt.publisher, release, document=document, approver=caller.name)
        rt.reconcile_release(db, name, version)  # sites running it get a new desired state and look again
        return _revocation_info(record)

    return await run_in_threadpool(_revoke)


# -- approver keys --------------------------------------------------------------------


def _key_info(key: ApproverKey) -> ApproverKeyInfo:
    return ApproverKeyInfo(
        id=key.id,
        approver=key.approver,
        fingerprint=key.fingerprint,
        public_key_pem=key.public_key_pem,
        created_at=key.created_at,
        created_by=key.created_by,
        revoked_at=key.revoked_at,
    )


@approvers_router.post(
    "/approvers", status_code=201, summary="Register an approver's public key", response_model=ApproverKeyInfo
)
def add_approver_key(
    body: ApproverKeyCreate, caller: auth.Principal = Depends(principal), db: Session = Depends(session)
) -> ApproverKeyInfo:
    return _key_info(registry.register_approver_key(db, body.approver, body.public_key_pem, caller.name))


@approvers_router.get("/approvers", summary="List approver keys", response_model=Page[ApproverKeyInfo])
def list_approver_keys(
    limit: int = Query(pagination.DEFAULT_LIMIT, ge=1, le=pagination.MAX_LIMIT),
    after: str | None = Query(None, max_length=500),
    db: Session = Depends(session),
) -> Page[ApproverKeyInfo]:
    rows = list(db.scalars(pagination.page(select(ApproverKey), ApproverKey.id, after, limit)))
    rows, nxt = pagination.next_cursor(rows, limit, lambda r: r.id)
    return Page[ApproverKeyInfo](items=[_key_info(r) for r in rows], next=nxt)


@approvers_router.post("/approvers/{key_id}/revoke", summary="Revoke an approver key", response_model=ApproverKeyInfo)
def revoke_approver_key(key_id: str, db: Session = Depends(session)) -> ApproverKeyInfo:
    return _key_info(registry.revoke_approver_key(db, key_id))
