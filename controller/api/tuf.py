"""The TUF repository over HTTP: signed metadata and targets, for enrolled sites and people only.

Who may call is the access table's `SITE_OR_PERSON` rule (a site JWT or a person's token,
checked by the app-wide `principal` dependency); which target a caller may read is
`controller.tuf_access`'s decision. A target the caller may not read is a 404, exactly like
a target that does not exist.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from controller import auth, tuf_access
from controller.api.deps import principal, runtime, session
from controller.errors import NotFound
from controller.runtime import Runtime

router = APIRouter(prefix="/tuf", tags=["tuf"])


@router.get(
    "/metadata/{name}",
    summary="TUF metadata (root, timestamp, snapshot, targets, bins; versioned names)",
    response_class=FileResponse,
    responses={200: {"content": {"application/json": {}}}},
)
async def metadata(name: str, rt: Runtime = Depends(runtime)) -> FileResponse:
    path = rt.tuf.metadata_file(name)
    if path is None:
        raise NotFound(f"no TUF metadata {name!r}")
    return FileResponse(path, media_type="application/json")


@router.get(
    "/targets/{path:path}",
    summary="A TUF target, by its consistent-snapshot path `<dir>/<sha256>.<name>`",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def target(
    path: str,
    caller: auth.Principal = Depends(principal),
    db: Session = Depends(session),
    rt: Runtime = Depends(runtime),
) -> FileResponse:
    logical = tuf_access.target_path(path)
    sha256 = rt.tuf.resolve_target(path)
    if logical is None or sha256 is None:
        raise NotFound(f"no TUF target {path!r}")
    if caller.kind == "site":
        allowed = await run_in_threadpool(rt.tuf_access.site_may_read, db, caller.site_id or "", logical)
    else:
        allowed = caller.kind == "person" and tuf_access.person_may_read(caller, logical)
    if not allowed or not rt.blobs.exists(sha256):
        raise NotFound(f"no TUF target {path!r}")
    return FileResponse(rt.blobs.path(sha256), media_type="application/octet-stream")
