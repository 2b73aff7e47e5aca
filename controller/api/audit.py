"""The controller's own audit log, for auditors."""

from __future__ import annotations

import shutil

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from controller.api.deps import runtime
from controller.runtime import Runtime

router = APIRouter(prefix="/api/v1", tags=["audit"])


@router.get(
    "/audit/export",
    summary="Export the controller's audit log (C2SP tlog-tiles, .tar.gz) up to a checkpoint signed now",
    response_class=FileResponse,
    responses={200: {"content": {"application/gzip": {}}}},
)
def export(rt: Runtime = Depends(runtime)) -> FileResponse:
    assert rt.audit is not None
    exports = rt.config.data_dir / "exports"
    exports.mkdir(exist_ok=True)
    tarball = rt.audit.export_tarball(exports)
    return FileResponse(
        tarball,
        media_type="application/gzip",
        filename="controller-audit.tar.gz",
        background=BackgroundTask(shutil.rmtree, tarball.parent, ignore_errors=True),
    )
