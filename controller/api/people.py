"""People and their API tokens."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller import auth
from controller.api import pagination
from controller.api.deps import principal, session
from controller.api.schemas import Me, Page, TokenCreate, TokenCreated, TokenInfo
from controller.db import ApiToken

router = APIRouter(prefix="/api/v1", tags=["people"])


def _info(record: ApiToken) -> TokenInfo:
    return TokenInfo(
        id=record.id,
        name=record.name,
        role=record.role,
        created_at=record.created_at,
        created_by=record.created_by,
        expires_at=record.expires_at,
        revoked_at=record.revoked_at,
        last_used_at=record.last_used_at,
    )


@router.get("/me", summary="Who am I", response_model=Me)
def me(caller: auth.Principal = Depends(principal)) -> Me:
    return Me(kind=caller.kind, name=caller.name, role=caller.role.value if caller.role else None)


@router.post("/tokens", status_code=201, summary="Create an API token", response_model=TokenCreated)
def create_token(
    body: TokenCreate, caller: auth.Principal = Depends(principal), db: Session = Depends(session)
) -> TokenCreated:
    role = auth.check_role_name(body.role)
    ttl = timedelta(days=body.ttl_days) if body.ttl_days else None
    record, plaintext = auth.issue_token(db, body.name, role, ttl, caller.name)
    db.commit()
    return TokenCreated(**_info(record).model_dump(), token=plaintext)


@router.get("/tokens", summary="List API tokens (never their secrets)", response_model=Page[TokenInfo])
def list_tokens(
    limit: int = Query(pagination.DEFAULT_LIMIT, ge=1, le=pagination.MAX_LIMIT),
    after: str | None = Query(None, max_length=500),
    db: Session = Depends(session),
) -> Page[TokenInfo]:
    rows = list(db.scalars(pagination.page(select(ApiToken), ApiToken.id, after, limit)))
    rows, nxt = pagination.next_cursor(rows, limit, lambda r: r.id)
    return Page[TokenInfo](items=[_info(r) for r in rows], next=nxt)


@router.post("/tokens/{token_id}/revoke", summary="Revoke an API token at once", response_model=TokenInfo)
def revoke_token(token_id: str, db: Session = Depends(session)) -> TokenInfo:
    return _info(auth.revoke_token(db, token_id))
