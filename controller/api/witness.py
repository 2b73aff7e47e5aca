"""The witness: sites' audit checkpoints, verified and cosigned (being written)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/api/v1", tags=["witness"])
