"""The TUF repository over HTTP: signed metadata and targets, public by design.

The routes are async: they only look up a file in memory, and every agent of a rollout
fetches at once, so a thread hop per request would only queue them.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from controller.api.deps import runtime
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
async def target(path: str, rt: Runtime = Depends(runtime)) -> FileResponse:
    sha256 = rt.tuf.resolve_target(path)
    if sha256 is None or not rt.blobs.exists(sha256):
        raise NotFound(f"no TUF target {path!r}")
    return FileResponse(rt.blobs.path(sha256), media_type="application/octet-stream")
