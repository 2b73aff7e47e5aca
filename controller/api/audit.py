"""The controller's own audit log: its export for auditors, its checkpoints and consistency proofs for
anyone, and the sites' cosignatures of it (`controller.log_witnesses`)."""

from __future__ import annotations

import base64
import shutil

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from controller import auth, log_witnesses, sites
from controller.api.deps import principal, runtime, session
from controller.runtime import Runtime

router = APIRouter(prefix="/api/v1", tags=["audit"])
agent_router = APIRouter(prefix="/api/v1/agent", tags=["agent"])

_TEXT = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}


@router.get(
    "/audit/export",
    summary="Export the controller's audit log (C2SP tlog-tiles, .tar.gz) with the sites' cosignatures",
    description=(
        "With `witnesses=0` the export is cut at a checkpoint signed now. With `witnesses=K` it is cut at the newest "
        "checkpoint at least K sites cosigned, so that `sitewarden audit verify --policy` can check a quorum of K. "
        "Every site's latest cosignature travels with it: those of the export's checkpoint inside `checkpoint` (at "
        "most 99), the others under `cosigned/` with a consistency proof to it."
    ),
    response_class=FileResponse,
    responses={200: {"content": {"application/gzip": {}}}},
)
def export(
    witnesses: int = Query(0, ge=0, le=100_000, description="Cut at the newest checkpoint this many sites cosigned."),
    db: Session = Depends(session),
    rt: Runtime = Depends(runtime),
) -> FileResponse:
    assert rt.audit is not None
    exports = rt.config.data_dir / "exports"
    exports.mkdir(exist_ok=True)
    tarball = log_witnesses.export(db, rt.audit, exports, witnesses)
    return FileResponse(
        tarball,
        media_type="application/gzip",
        filename="controller-audit.tar.gz",
        background=BackgroundTask(shutil.rmtree, tarball.parent, ignore_errors=True),
    )


@router.get(
    "/audit/checkpoint",
    summary="The latest checkpoint of the controller's audit log, with the sites' cosignatures (signed note)",
    description=(
        "A C2SP signed note: the tlog-checkpoint signed by the controller's audit key, and the cosignatures "
        "(tlog-cosignature) of the sites that witnessed it, as many as a note carries (99). Check consistency with "
        "an earlier copy with `/api/v1/audit/consistency`."
    ),
    response_class=PlainTextResponse,
    responses=_TEXT,
)
def checkpoint(db: Session = Depends(session), rt: Runtime = Depends(runtime)) -> PlainTextResponse:
    assert rt.audit is not None
    return PlainTextResponse(log_witnesses.latest(db, rt.audit))


@router.get(
    "/audit/consistency",
    summary="A consistency proof between two checkpoints of the controller's audit log (RFC 9162 §2.1.4)",
    description="One base64 hash per line, from the tree of size `old` to the tree of size `new` (at most the "
    "latest signed checkpoint's size).",
    response_class=PlainTextResponse,
    responses=_TEXT,
)
def consistency(
    old: int = Query(ge=1, le=1 << 62, description="The size of the earlier checkpoint."),
    new: int = Query(ge=1, le=1 << 62, description="The size of the later checkpoint."),
    rt: Runtime = Depends(runtime),
) -> PlainTextResponse:
    assert rt.audit is not None
    proof = log_witnesses.consistency(rt.audit, old, new)
    return PlainTextResponse("".join(base64.b64encode(h).decode() + "\n" for h in proof))


_COSIGNATURE_BODY = {
    "required": True,
    "content": {"text/plain": {"schema": {"type": "string"}}},
    "description": "The checkpoint as the controller signed it (note text), an empty line, and the site's "
    "cosignature line (tlog-cosignature, by its witness key `sitewarden/<site id>/witness`).",
}


@agent_router.post(
    "/audit-cosignatures",
    status_code=204,
    summary="A site's cosignature of one of the controller's audit checkpoints",
    response_class=Response,
    openapi_extra={"requestBody": _COSIGNATURE_BODY},
)
async def cosign(
    request: Request,
    caller: auth.Principal = Depends(principal),
    db: Session = Depends(session),
) -> Response:
    body = await request.body()

    def store() -> None:
        log_witnesses.accept(db, sites.get(db, caller.site_id or ""), body)

    await run_in_threadpool(store)
    request.state.audit = False  # kept with the log, not recorded in it: see `controller.changes.ROUTES`
    return Response(status_code=204)


class AuditRefusal(BaseModel):
    """Why a site refused a checkpoint of the controller's audit log, and the two checkpoints involved."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000)
    cosigned_size: int | None = Field(default=None, ge=0, description="The size the site cosigned last.")
    cosigned_root: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    presented_size: int | None = Field(default=None, ge=0, description="The size of the checkpoint refused.")
    presented_root: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    checkpoint_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


@agent_router.post(
    "/audit-refusals",
    status_code=204,
    summary="A site reports a checkpoint of the controller's audit log it refused (inconsistent, or badly signed)",
    response_class=Response,
)
def refusal(
    body: AuditRefusal, caller: auth.Principal = Depends(principal), db: Session = Depends(session)
) -> Response:
    log_witnesses.refused(db, sites.get(db, caller.site_id or ""), body.model_dump())
    return Response(status_code=204)
