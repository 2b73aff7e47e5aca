"""The witness: sites submit audit checkpoints (C2SP tlog-witness `add-checkpoint`), people read
the latest cosigned checkpoint of a site. The rules live in `controller.witness`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from controller import auth, sites, witness
from controller.api.deps import principal, runtime, session
from controller.api.problems import PROBLEM_JSON, Problem
from controller.runtime import Runtime

router = APIRouter(prefix="/api/v1", tags=["witness"])

# One lock per site, for the life of the process: see `witness.SiteLocks`.
_LOCKS = witness.SiteLocks()


class WitnessedCheckpointInfo(BaseModel):
    site_id: str
    origin: str = Field(description="The checkpoint's origin, `sitewarden/<site id>`.")
    size: int = Field(description="Tree size: number of entries in the site's audit log.")
    root: str = Field(description="Root hash of the tree, hex.")
    note: str = Field(
        description="The checkpoint as a signed note: the site's signature and the witness's cosignature."
    )
    cosigned_at: datetime
    witness_vkey: str = Field(description="The controller's witness key (cosigner, type 0x04) to verify it with.")


def _problem_schema() -> dict[str, Any]:
    return {"schema": Problem.model_json_schema()}


_ADD_CHECKPOINT_BODY = {
    "required": True,
    "content": {
        "text/plain": {
            "schema": {"type": "string"},
            "example": "old 0\n\nsitewarden/<site id>\n12\n<base64 root hash>\n\n— sitewarden/<site id> <signature>\n",
        }
    },
    "description": (
        "`old <size>` (the size last cosigned, 0 at first), up to 63 base64 consistency-proof hashes one per "
        "line, an empty line, then the checkpoint signed by the site's key (C2SP tlog-witness)."
    ),
}

_ADD_CHECKPOINT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The witness's cosignature line(s) (C2SP tlog-cosignature) for the checkpoint, now stored.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    },
    400: {
        "description": "Malformed body, or an old size larger than the checkpoint's.",
        "content": {PROBLEM_JSON: _problem_schema()},
    },
    403: {
        "description": "Not the calling site's own log, or not signed by the site's enrolled key.",
        "content": {PROBLEM_JSON: _problem_schema()},
    },
    409: {
        "description": (
            "The old size is not the size of the latest cosigned checkpoint: the body is that size and a newline, "
            "`text/x.tlog.size`. Or, at the same size, the root differs from the witnessed one (a fork: refused, "
            "recorded in the controller's audit log; problem details)."
        ),
        "content": {
            witness.SIZE_CONTENT_TYPE: {"schema": {"type": "string", "pattern": "^(0|[1-9][0-9]*)\n$"}},
            PROBLEM_JSON: _problem_schema(),
        },
    },
    422: {
        "description": "The consistency proof does not verify (refused and recorded as a possible fork).",
        "content": {PROBLEM_JSON: _problem_schema()},
    },
}


@router.post(
    "/witness/add-checkpoint",
    summary="Submit a site's audit checkpoint for cosigning (C2SP tlog-witness add-checkpoint)",
    description=(
        "The controller checks the site's signature and consistency with the checkpoint it last cosigned for "
        "this site, cosigns it (Ed25519 cosignature/v1), stores it and returns the cosignature line."
    ),
    response_class=PlainTextResponse,
    responses=_ADD_CHECKPOINT_RESPONSES,
    openapi_extra={"requestBody": _ADD_CHECKPOINT_BODY},
)
async def add_checkpoint(
    request: Request,
    caller: auth.Principal = Depends(principal),
    db: Session = Depends(session),
    rt: Runtime = Depends(runtime),
) -> Response:
    body = await request.body()
    trail = rt.audit
    assert trail is not None

    def cosign() -> witness.Cosigned:
        site = sites.get(db, caller.site_id or "")
        return witness.add_checkpoint(db, site, body, signer=rt.witness_signer, locks=_LOCKS, on_fork=trail.record)

    try:
        done = await run_in_threadpool(cosign)
    except witness.SizeConflict as exc:
        # tlog-witness: the body is the current size, with this exact content type (no charset).
        return Response(f"{exc.current_size}\n", status_code=409, headers={"Content-Type": witness.SIZE_CONTENT_TYPE})
    return PlainTextResponse(done.lines)


@router.get(
    "/sites/{site}/checkpoint",
    summary="The latest checkpoint of a site's audit log that the witness cosigned (site by id or name)",
    response_model=WitnessedCheckpointInfo,
)
def latest_checkpoint(
    site: str, db: Session = Depends(session), rt: Runtime = Depends(runtime)
) -> WitnessedCheckpointInfo:
    record = witness.latest(db, sites.get(db, site))
    return WitnessedCheckpointInfo(
        site_id=record.site_id,
        origin=record.origin,
        size=record.size,
        root=record.root_hash,
        note=record.note,
        cosigned_at=record.cosigned_at,
        witness_vkey=rt.witness_signer.vkey,
    )
