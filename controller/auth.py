"""Credentials: people's API tokens and sites' JWTs, checked against the access table.

- API tokens are `swt_<id>_<secret>`; the controller stores the SHA-256 of the secret
  (32 random bytes, so a fast hash is enough), with a role, an expiry and a revocation.
- Sites sign short-lived EdDSA JWTs with their enrolled key (`sitewarden.sitejwt`); each
  `jti` is accepted once, and a disabled site is refused at its next request.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import Request
from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from controller.access import JOIN, JTI_IN_ROUTE_TRANSACTION, PUBLIC, SITE, Role, Rule, rule_for
from controller.db import ApiToken, SeenJti, Site, utcnow
from controller.errors import BadRequest, Forbidden, Unauthenticated
from sitewarden import sitejwt
from sitewarden.errors import CredentialError
from sitewarden.keys import decode_public_key

TOKEN_PREFIX = "swt"  # noqa: S105 - a prefix, not a secret
_LAST_USED_GRANULARITY = timedelta(minutes=1)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a person (by token name and role), a site, or nobody (public routes)."""

    kind: str
    name: str
    role: Role | None = None
    token_id: str | None = None
    site_id: str | None = None

    @property
    def audit_name(self) -> str:
        return f"site:{self.name}" if self.kind == "site" else self.name


ANONYMOUS = Principal("anonymous", "anonymous")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def issue_token(
    session: Session, name: str, role: Role, ttl: timedelta | None, created_by: str | None
) -> tuple[ApiToken, str]:
    """Create a token; the plaintext is returned once and never stored."""
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    record = ApiToken(
        id=token_id,
        name=name,
        role=role.value,
        secret_sha256=_sha256(secret),
        created_by=created_by,
        expires_at=utcnow() + ttl if ttl else None,
    )
    session.add(record)
    return record, f"{TOKEN_PREFIX}_{token_id}_{secret}"


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthenticated("Authorization header must be 'Bearer <token>'")
    return value.strip()


def person(session: Session, credential: str, now: datetime | None = None) -> Principal:
    """The person behind an API token; Unauthenticated if it is unknown, expired or revoked."""
    now = now or utcnow()
    parts = credential.split("_", 2)
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise Unauthenticated("not a Sitewarden API token")
    record = session.get(ApiToken, parts[1])
    if record is None or not hmac.compare_digest(record.secret_sha256, _sha256(parts[2])):
        raise Unauthenticated("unknown API token")
    if record.revoked_at is not None:
        raise Unauthenticated("API token was revoked")
    if record.expires_at is not None and record.expires_at <= now:
        raise Unauthenticated("API token has expired")
    if record.last_used_at is None or now - record.last_used_at > _LAST_USED_GRANULARITY:
        record.last_used_at = now
        session.commit()
    return Principal("person", record.name, Role(record.role), token_id=record.id)


def site(session: Session, credential: str, audience: str, *, commit: bool = True) -> Principal:
    """The site behind a site JWT; each token is accepted once.

    The token's jti is committed at once, or with `commit=False` only inserted: it is then
    recorded by the route's own commit (and a replay is still refused here, by the insert).
    """
    try:
        site_id = sitejwt.unverified_site(credential)
    except CredentialError as exc:
        raise Unauthenticated(str(exc)) from exc
    # Core statements rather than ORM objects: this runs for every request of every site.
    record = session.execute(select(Site.id, Site.name, Site.status, Site.public_key).where(Site.id == site_id)).first()
    if record is None or record.public_key is None:
        raise Unauthenticated("site token names an unknown or unenrolled site")
    if record.status == "disabled":
        raise Forbidden(f"site {record.name} is disabled")
    try:
        claims = sitejwt.verify(credential, _site_key(record.public_key), audience)
    except CredentialError as exc:
        raise Unauthenticated(str(exc)) from exc
    seen = {
        "jti": str(claims["jti"])[:64],
        "site_id": site_id,
        "expires_at": datetime.fromtimestamp(claims["exp"], UTC),
    }
    try:
        session.execute(insert(SeenJti).values(**seen))
        # By default committed at once, in its own short transaction: holding the database's
        # write lock for the rest of the request would invert the order with locks the route takes.
        if commit:
            session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise Unauthenticated("site token was already used (replayed jti)") from exc
    return Principal("site", record.name, site_id=record.id)


@functools.lru_cache(maxsize=4096)
def _site_key(public_key: str) -> Ed25519PublicKey:
    """Decoded site keys, by their text: a rotation brings a new text, so nothing stale is served."""
    return decode_public_key(public_key)


def forget_expired_jtis(session: Session, now: datetime | None = None) -> int:
    """Drop replay-protection records of tokens that have expired (plus leeway)."""
    cutoff = (now or utcnow()) - timedelta(seconds=sitejwt.LEEWAY_S)
    result = session.execute(delete(SeenJti).where(SeenJti.expires_at < cutoff))
    session.commit()
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def route_rule(request: Request) -> Rule:
    """The access rule of the matched route; Forbidden when it has none (fail closed)."""
    route = request.scope.get("route")
    method = "GET" if request.method == "HEAD" else request.method
    rule = rule_for(method, getattr(route, "path", ""))
    if rule is None:
        raise Forbidden("no access rule is defined for this route")
    return rule


def authorize(request: Request, session: Session, audience: str) -> Principal:
    """Check the caller against the rule of the matched route (fail closed)."""
    rule = route_rule(request)
    if rule is PUBLIC or rule is JOIN:
        return ANONYMOUS
    credential = _bearer(request)
    if credential is None:
        raise Unauthenticated("this route needs credentials: Authorization: Bearer <token>")
    if rule is SITE:
        if credential.startswith(TOKEN_PREFIX + "_"):
            raise Forbidden("this route is for enrolled sites, not for people")
        in_route = (request.method, getattr(request.scope.get("route"), "path", "")) in JTI_IN_ROUTE_TRANSACTION
        principal = site(session, credential, audience, commit=not in_route)
        request.state.principal = principal
        return principal
    if not credential.startswith(TOKEN_PREFIX + "_"):
        raise Unauthenticated("this route needs a person's API token")
    principal = person(session, credential)
    request.state.principal = principal  # known even when refused: the audit log names who tried
    if principal.role not in rule:
        allowed = ", ".join(sorted(r.value for r in rule))  # type: ignore[union-attr]
        raise Forbidden(f"role {principal.role} may not call this route (allowed: {allowed})")
    return principal


def check_role_name(role: str) -> Role:
    try:
        return Role(role)
    except ValueError as exc:
        raise BadRequest(f"unknown role {role!r}; roles are {', '.join(r.value for r in Role)}") from exc
