"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from controller.api.deps import runtime
from controller.errors import Unavailable
from controller.runtime import Runtime

router = APIRouter(tags=["service"])


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: the database answers")
def readyz(rt: Runtime = Depends(runtime)) -> dict[str, str]:
    if not rt.ready():
        raise Unavailable("the database does not answer")
    return {"status": "ready"}


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
def metrics(request: Request) -> Response:
    return request.app.state.metrics.render()
