"""People and keys (admins): API tokens — a new token's secret is shown once — and approver keys."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError
from sqlalchemy.orm import Session

from controller import auth
from controller.api import people as api_people
from controller.api import releases as api_releases
from controller.api.deps import principal, session
from controller.api.schemas import ApproverKeyCreate, TokenCreate
from controller.db import ApiToken, ApproverKey
from controller.errors import ControllerError, NotFound
from controller.ui import render
from controller.ui.routes.common import after_action

router = APIRouter()

PER_PAGE = 100
ROLES = ("admin", "operator", "approver", "auditor")


def _page(request: Request, db: Session, after: str | None, status: int = 200, **extra: object) -> Response:
    tokens = api_people.list_tokens(limit=PER_PAGE, after=after, db=db)
    keys = api_releases.list_approver_keys(limit=PER_PAGE, after=None, db=db)
    return render.page(
        request,
        "people.html",
        status=status,
        tokens=tokens.items,
        next_cursor=tokens.next,
        keys=keys.items,
        roles=ROLES,
        error=extra.get("error"),
        key_error=extra.get("key_error"),
        form=extra.get("form", {}),
    )


def _errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


@router.get("/ui/people")
def people_page(
    request: Request, after: str | None = Query(None, max_length=500), db: Session = Depends(session)
) -> Response:
    return _page(request, db, after)


@router.post("/ui/tokens")
def create_token(
    request: Request,
    name: str = Form(max_length=200),
    role: str = Form(max_length=20),
    ttl_days: str = Form("90", max_length=5),
    caller: auth.Principal = Depends(principal),
    db: Session = Depends(session),
) -> Response:
    """The REST API's token creation; the page that answers shows the secret once and is never cached."""
    form = {"name": name, "role": role, "ttl_days": ttl_days}
    try:
        body = TokenCreate(name=name.strip(), role=role, ttl_days=int(ttl_days) if ttl_days.strip() else None)
        created = api_people.create_token(body, caller, db)
    except ValidationError as exc:
        return _page(request, db, None, status=422, error=_errors(exc), form=form)
    except ValueError:
        return _page(request, db, None, status=422, error=f"days: {ttl_days[:10]!r} is not a whole number", form=form)
    except ControllerError as exc:
        db.rollback()
        return _page(request, db, None, status=exc.status, error=exc.detail, form=form)
    return render.page(request, "token_created.html", status=201, token=created)


@router.get("/ui/tokens/{token_id}/revoke")
def revoke_token_confirm(request: Request, token_id: str, db: Session = Depends(session)) -> Response:
    record = db.get(ApiToken, token_id)
    if record is None:
        raise NotFound(f"no token {token_id!r}")
    return render.page(
        request,
        "confirm.html",
        title=f"Revoke the token of {record.name}?",
        changes=[
            f"Token {record.id} ({record.role}, for {record.name}) is refused from now on, by the API and the CLI.",
            "Every dashboard session signed in with it ends at its next request.",
            "This cannot be undone: create a new token instead.",
        ],
        action=f"/ui/tokens/{record.id}/revoke",
        button="Revoke the token",
        cancel="/ui/people",
        danger=True,
    )


@router.post("/ui/tokens/{token_id}/revoke")
def revoke_token(token_id: str, db: Session = Depends(session)) -> Response:
    api_people.revoke_token(token_id, db)
    return after_action("/ui/people", "revoked")


@router.post("/ui/approvers")
def add_approver_key(
    request: Request,
    approver: str = Form(max_length=200),
    public_key_pem: str = Form(max_length=4000),
    caller: auth.Principal = Depends(principal),
    db: Session = Depends(session),
) -> Response:
    form = {"approver": approver, "public_key_pem": public_key_pem}
    try:
        body = ApproverKeyCreate(approver=approver.strip(), public_key_pem=public_key_pem.strip() + "\n")
        api_releases.add_approver_key(body, caller, db)
    except ValidationError as exc:
        return _page(request, db, None, status=422, key_error=_errors(exc), form=form)
    except ControllerError as exc:
        db.rollback()
        return _page(request, db, None, status=exc.status, key_error=exc.detail, form=form)
    return after_action("/ui/people", "key-added")


@router.get("/ui/approvers/{key_id}/revoke")
def revoke_key_confirm(request: Request, key_id: str, db: Session = Depends(session)) -> Response:
    key = db.get(ApproverKey, key_id)
    if key is None:
        raise NotFound(f"no approver key {key_id!r}")
    return render.page(
        request,
        "confirm.html",
        title=f"Revoke {key.approver}'s approver key?",
        changes=[
            f"Key {key.fingerprint} of {key.approver} can no longer approve releases on this controller.",
            "Approvals it already made stay recorded; sites decide for themselves which approver keys they trust.",
        ],
        action=f"/ui/approvers/{key.id}/revoke",
        button="Revoke the key",
        cancel="/ui/people",
        danger=True,
    )


@router.post("/ui/approvers/{key_id}/revoke")
def revoke_key(key_id: str, db: Session = Depends(session)) -> Response:
    api_releases.revoke_approver_key(key_id, db)
    return after_action("/ui/people", "key-revoked")
