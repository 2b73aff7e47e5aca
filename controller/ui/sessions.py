"""Dashboard sign-in: an API token exchanged for a short-lived session cookie, and CSRF tokens.

- **Sign-in.** A person pastes an existing API token (`swt_…`); `auth.person` checks it as for any
  REST call, and a session is created bound to that token: its role is the token's role, and it
  ends when the token is revoked or expires (checked at every request, in the same query that
  finds the session), when the person signs out, or after `SESSION_TTL`, whichever comes first.
- **The cookie** holds 32 random bytes; the database keeps only their SHA-256. It is
  `__Host-` prefixed (Secure, Path=/, no Domain), `HttpOnly` and `SameSite=Strict`.
- **CSRF.** Each session has its own random CSRF token, put in every form of the dashboard (and
  in the header htmx sends). A state-changing request authenticated by the cookie must carry it,
  or it is refused with 403 before anything happens. The sign-in form itself is protected by a
  double-submit token: a random value in a `SameSite=Strict` cookie that the form must repeat.
- A request that carries a bearer token instead of the cookie is checked by `auth.authorize`
  exactly as on the REST API (no CSRF applies: browsers never attach bearer tokens by themselves).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from fastapi import Request
from sqlalchemy import bindparam, delete, or_, select
from sqlalchemy.orm import Session

from controller import auth
from controller.access import Role, Rule
from controller.db import ApiToken, UiSession, utcnow
from controller.errors import Forbidden, Unauthenticated

SESSION_COOKIE = "__Host-sitewarden-session"
LOGIN_COOKIE = "__Host-sitewarden-login"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SESSION_TTL = timedelta(hours=1)
LOGIN_TTL_S = 600  # how long a sign-in form stays usable
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class SignedIn:
    """What a page needs of its session: who, and the CSRF token to put in its forms."""

    principal: auth.Principal
    csrf_token: str
    expires_at: datetime


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def uses_session(request: Request) -> bool:
    """A dashboard request that authenticates with the session cookie (no bearer token)."""
    return request.url.path.startswith("/ui") and "authorization" not in request.headers


def start(db: Session, caller: auth.Principal, now: datetime | None = None) -> tuple[str, SignedIn]:
    """A new session for the person behind a checked API token; returns the cookie's secret once."""
    now = now or utcnow()
    token = db.get(ApiToken, caller.token_id)
    assert token is not None, "auth.person returned a principal without its token"
    expires_at = now + SESSION_TTL
    if token.expires_at is not None:
        expires_at = min(expires_at, token.expires_at)
    secret = secrets.token_urlsafe(32)
    record = UiSession(
        id=_digest(secret),
        token_id=token.id,
        csrf_token=secrets.token_urlsafe(32),
        created_at=now,
        expires_at=expires_at,
    )
    db.add(record)
    db.commit()
    return secret, SignedIn(caller, record.csrf_token, expires_at)


_FIND = (
    select(
        UiSession.ended_at,
        UiSession.expires_at,
        UiSession.csrf_token,
        ApiToken.id,
        ApiToken.name,
        ApiToken.role,
        ApiToken.revoked_at,
        ApiToken.expires_at.label("token_expires_at"),
    )
    .join(ApiToken, ApiToken.id == UiSession.token_id)
    .where(UiSession.id == bindparam("id"))
)


def find(db: Session, secret: str | None, now: datetime | None = None) -> SignedIn:
    """The live session behind a cookie; Unauthenticated says why there is none (one query)."""
    if not secret:
        raise Unauthenticated("sign in to the dashboard first")
    now = now or utcnow()
    row = db.connection().execute(_FIND, {"id": _digest(secret)}).first()
    if row is None:
        raise Unauthenticated("unknown dashboard session: sign in again")
    if row.ended_at is not None:
        raise Unauthenticated("this dashboard session was signed out")
    if row.expires_at <= now:
        raise Unauthenticated("this dashboard session has expired: sign in again")
    if row.revoked_at is not None:
        raise Unauthenticated("the API token of this session was revoked")
    if row.token_expires_at is not None and row.token_expires_at <= now:
        raise Unauthenticated("the API token of this session has expired")
    principal = auth.Principal("person", row.name, Role(row.role), token_id=row.id)
    return SignedIn(principal, row.csrf_token, row.expires_at)


def authorize(db: Session, request: Request, rule: Rule, csrf_token: str | None) -> SignedIn:
    """Check a dashboard request made with the session cookie against the route's rule.

    The order is the REST API's, with CSRF between authentication and the role check: no session
    (401), a state-changing request without this session's CSRF token (403), a role the rule does
    not name (403). The principal is known to the audit log from the first check on.
    """
    signed_in = find(db, request.cookies.get(SESSION_COOKIE))
    request.state.principal = signed_in.principal
    request.state.signed_in = signed_in
    if request.method in MUTATING and not (
        csrf_token and hmac.compare_digest(csrf_token.encode(), signed_in.csrf_token.encode())
    ):
        raise Forbidden("the form's CSRF token is missing or not this session's: reload the page and try again")
    if not isinstance(rule, frozenset) or signed_in.principal.role not in rule:
        allowed = ", ".join(sorted(r.value for r in rule)) if isinstance(rule, frozenset) else str(rule)
        raise Forbidden(f"role {signed_in.principal.role} may not call this route (allowed: {allowed})")
    return signed_in


def end(db: Session, secret: str | None) -> None:
    """Sign out: the session cannot be used again, even if its cookie was copied."""
    if secret:
        record = db.get(UiSession, _digest(secret))
        if record is not None and record.ended_at is None:
            record.ended_at = utcnow()
            db.commit()


def forget_expired(db: Session, now: datetime | None = None) -> int:
    """Drop sessions that ended or expired a day ago (kept a while so a late request is told why)."""
    cutoff = (now or utcnow()) - timedelta(days=1)
    result = db.execute(delete(UiSession).where(or_(UiSession.expires_at < cutoff, UiSession.ended_at < cutoff)))
    db.commit()
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def new_login_token() -> str:
    return secrets.token_urlsafe(32)


def login_token_matches(cookie: str | None, form_value: str | None) -> bool:
    """The sign-in form's double-submit check: the form repeats the random value of its cookie."""
    return bool(cookie and form_value) and hmac.compare_digest(cookie.encode(), form_value.encode())  # type: ignore[union-attr]
