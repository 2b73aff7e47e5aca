"""Credentials: people's API tokens and sites' JWTs, checked against the access table.

- API tokens are `swt_<id>_<secret>`; the controller stores the SHA-256 of the secret
  (32 random bytes, so a fast hash is enough), with a role, an expiry and a revocation.
- Sites sign short-lived EdDSA JWTs with their enrolled key (`sitewarden.sitejwt`); each
  `jti` is accepted once, and a disabled site is refused at its next request.

A site's token is checked with one statement on the hot path: the jti is inserted only if
the site row still has the name and key the token was verified with and is not disabled.
Which key that is comes from `SiteHints`, a per-process memory of site rows that is never
trusted on its own: the insert re-checks it in the database, so a disabled site or a
rotated key is refused at once by every controller process sharing the database.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import Request
from sqlalchemy import Connection, bindparam, delete, insert, literal, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from controller import audit_trail
from controller.access import JOIN, JTI_IN_ROUTE_TRANSACTION, PUBLIC, SITE, SITE_OR_PERSON, Role, Rule, rule_for
from controller.changes import TokenCreated, TokenRevoked
from controller.db import ApiToken, SeenJti, Site, utcnow
from controller.errors import BadRequest, Forbidden, NotFound, Unauthenticated
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
    audit_trail.record(session, TokenCreated(token_id, name, role.value, record.expires_at))
    return record, f"{TOKEN_PREFIX}_{token_id}_{secret}"


def revoke_token(session: Session, token_id: str) -> ApiToken:
    """Revoke a token at once (its next request is refused); revoking it again changes nothing."""
    record = session.get(ApiToken, token_id)
    if record is None:
        raise NotFound(f"no token {token_id!r}")
    audit_trail.locked(session, record)
    if record.revoked_at is None:
        record.revoked_at = utcnow()
        audit_trail.record(session, TokenRevoked(record.id, record.name, record.role))
        session.commit()
    return record


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


@dataclass(frozen=True)
class SiteHint:
    """What authenticating a site needs of its row: its name and enrolled key (text and decoded)."""

    name: str
    public_key: str
    key: Ed25519PublicKey


class SiteHints:
    """Site rows by id, remembered so that a request need not read its site row before the jti insert.

    A hint is never trusted on its own: `_RECORD_JTI` inserts the jti only where the site's
    row in the database still has the hint's name and key and is not disabled, so a stale
    hint (the site was disabled or its key rotated, here or by another controller process)
    costs one more read of the row, never a wrong answer. Bounded: past `limit` sites the
    oldest hints go.
    """

    def __init__(self, limit: int = 65536) -> None:
        self.limit = limit
        self._hints: dict[str, SiteHint] = {}
        self._lock = threading.Lock()

    def get(self, site_id: str) -> SiteHint | None:
        return self._hints.get(site_id)

    def remember(self, site_id: str, hint: SiteHint) -> None:
        with self._lock:
            self._hints.pop(site_id, None)
            while len(self._hints) >= self.limit:
                del self._hints[next(iter(self._hints))]
            self._hints[site_id] = hint

    def forget(self, site_id: str | None = None) -> None:
        """Drop one site's hint (or all): not needed for correctness, it only spares a failed fast path."""
        with self._lock:
            if site_id is None:
                self._hints.clear()
            else:
                self._hints.pop(site_id, None)


site_hints = SiteHints()

_sites = Site.__table__
_seen_jtis = SeenJti.__table__

# INSERT INTO seen_jtis SELECT :jti, id, :expires_at FROM sites WHERE id, name and key are the
# ones the token was verified with and the site is not disabled, RETURNING jti (what was inserted,
# on both databases: PostgreSQL's rowcount is not kept). Built once: SQLAlchemy caches its
# compiled form, and checking the site costs no extra round trip.
_RECORD_JTI = (
    insert(_seen_jtis)
    .from_select(
        ["jti", "site_id", "expires_at"],
        select(
            bindparam("jti", type_=_seen_jtis.c.jti.type),
            _sites.c.id,
            bindparam("expires_at", type_=_seen_jtis.c.expires_at.type),
        ).where(
            _sites.c.id == bindparam("site_id"),
            _sites.c.name == bindparam("name"),
            _sites.c.public_key == bindparam("public_key"),
            _sites.c.status != literal("disabled"),
        ),
    )
    .returning(_seen_jtis.c.jti)
)
_SITE_ROW = select(_sites.c.name, _sites.c.status, _sites.c.public_key).where(_sites.c.id == bindparam("site_id"))


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _unverified_subject(credential: str) -> str:
    """The token's `sub`, read without verification to know which key verifies it.

    One decode of header and claims; anything unusual is left to `sitejwt.unverified_site`,
    whose errors are the ones clients see. The verified claims must name the same subject.
    """
    parts = credential.split(".")
    if len(parts) == 3:  # header, claims, signature
        try:
            header, claims = json.loads(_b64url(parts[0])), json.loads(_b64url(parts[1]))
        except ValueError:  # binascii, UTF-8 and JSON errors alike
            pass
        else:
            if isinstance(header, dict) and isinstance(claims, dict) and header.get("alg") == sitejwt.ALGORITHM:
                sub = claims.get("sub")
                if isinstance(sub, str) and sub:
                    return sub
    try:
        return sitejwt.unverified_site(credential)
    except CredentialError as exc:
        raise Unauthenticated(str(exc)) from exc


def _verified_claims(credential: str, hint: SiteHint, audience: str, site_id: str) -> dict[str, object]:
    try:
        claims = sitejwt.verify(credential, hint.key, audience)
    except CredentialError as exc:
        raise Unauthenticated(str(exc)) from exc
    if claims["sub"] != site_id:
        raise Unauthenticated("site token subject does not match")
    return claims


def _read_site(db: Connection, site_id: str) -> SiteHint:
    """The site's row as a hint, or why its tokens are refused (before any signature check, as always)."""
    row = db.execute(_SITE_ROW, {"site_id": site_id}).first()
    if row is None or row.public_key is None:
        raise Unauthenticated("site token names an unknown or unenrolled site")
    if row.status == "disabled":
        raise Forbidden(f"site {row.name} is disabled")
    return SiteHint(row.name, row.public_key, _site_key(row.public_key))


def _record_jti(db: Connection, site_id: str, hint: SiteHint, claims: dict[str, object]) -> bool:
    """Insert the token's jti if the site row still matches the hint; False if it no longer does.

    A jti seen before raises IntegrityError (the primary key), whatever the hint.
    """
    params = {
        "jti": str(claims["jti"])[:64],
        "expires_at": datetime.fromtimestamp(claims["exp"], UTC),  # type: ignore[arg-type]
        "site_id": site_id,
        "name": hint.name,
        "public_key": hint.public_key,
    }
    return db.execute(_RECORD_JTI, params).first() is not None


def site_on(db: Connection, credential: str, audience: str) -> Principal:
    """The site behind a site JWT, its jti inserted on `db` (in the caller's transaction).

    Each token is accepted once: a replay fails the insert (IntegrityError, which the caller
    turns into Unauthenticated after rolling back). With a hint, the row is not read first;
    when the token does not verify with the hint's key or the insert finds the site changed,
    the decision is taken again from the site's current row, exactly as without a hint.
    """
    site_id = _unverified_subject(credential)
    hint = site_hints.get(site_id)
    if hint is not None:
        try:
            claims = _verified_claims(credential, hint, audience, site_id)
        except Unauthenticated:
            pass  # perhaps the key was rotated: decide on the current row
        else:
            if _record_jti(db, site_id, hint, claims):
                return Principal("site", hint.name, site_id=site_id)
        site_hints.forget(site_id)
    hint = _read_site(db, site_id)
    claims = _verified_claims(credential, hint, audience, site_id)
    if not _record_jti(db, site_id, hint, claims):
        # Disabled, re-keyed or renamed between the read and the insert: refuse, the agent signs again.
        raise Unauthenticated("the site changed while its token was checked; send a new token")
    site_hints.remember(site_id, hint)
    return Principal("site", hint.name, site_id=site_id)


def site(session: Session, credential: str, audience: str, *, commit: bool = True) -> Principal:
    """The site behind a site JWT; each token is accepted once.

    The token's jti is committed at once, or with `commit=False` only inserted: it is then
    recorded by the route's own commit (and a replay is still refused here, by the insert).
    """
    try:
        principal = site_on(session.connection(), credential, audience)
        # By default committed at once, in its own short transaction: holding the database's
        # write lock for the rest of the request would invert the order with locks the route takes.
        if commit:
            session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise Unauthenticated("site token was already used (replayed jti)") from exc
    return principal


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


# Site routes that authenticate their caller themselves, first thing in their own transaction
# (`authorize_site_on`, through `controller.api.deps.in_site_transaction`): the app-wide `principal`
# dependency leaves them alone, so that the token check and the route's writes are one transaction
# on one worker thread. Each must be tested to refuse bad credentials before it reads its body.
SITE_AUTH_IN_ROUTE = frozenset({("POST", "/api/v1/agent/status")})


def _route_key(request: Request) -> tuple[str, str]:
    method = "GET" if request.method == "HEAD" else request.method
    return method, getattr(request.scope.get("route"), "path", "")


def route_rule(request: Request) -> Rule:
    """The access rule of the matched route; Forbidden when it has none (fail closed)."""
    rule = rule_for(*_route_key(request))
    if rule is None:
        raise Forbidden("no access rule is defined for this route")
    return rule


def authenticates_in_route(request: Request) -> bool:
    """Whether the matched route authenticates its site itself (`SITE_AUTH_IN_ROUTE`)."""
    return _route_key(request) in SITE_AUTH_IN_ROUTE


def _credential(request: Request) -> str:
    credential = _bearer(request)
    if credential is None:
        raise Unauthenticated("this route needs credentials: Authorization: Bearer <token>")
    return credential


def _site_credential(request: Request) -> str:
    credential = _credential(request)
    if credential.startswith(TOKEN_PREFIX + "_"):
        raise Forbidden("this route is for enrolled sites, not for people")
    return credential


def authorize(request: Request, session: Session, audience: str) -> Principal:
    """Check the caller against the rule of the matched route (fail closed)."""
    rule = route_rule(request)
    if rule is PUBLIC or rule is JOIN:
        return ANONYMOUS
    if rule is SITE:
        credential = _site_credential(request)
        in_route = _route_key(request) in JTI_IN_ROUTE_TRANSACTION
        principal = site(session, credential, audience, commit=not in_route)
        request.state.principal = principal
        return principal
    credential = _credential(request)
    if rule is SITE_OR_PERSON:
        if credential.startswith(TOKEN_PREFIX + "_"):
            principal = person(session, credential)  # any role
        else:
            principal = site(session, credential, audience)
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


def authorize_site_on(request: Request, db: Connection, audience: str) -> Principal:
    """The calling site of a `SITE_AUTH_IN_ROUTE` route, its token's jti inserted in `db`'s transaction.

    The checks and refusals of `authorize` for a site route, in the same order. Any other route
    is refused (fail closed): `principal` has authenticated its caller already, or it is no site
    route. A replayed jti is Unauthenticated; the caller's transaction must then be rolled back.
    """
    if route_rule(request) is not SITE or not authenticates_in_route(request):
        raise Forbidden("this route does not authenticate sites in its own transaction")
    credential = _site_credential(request)
    try:
        principal = site_on(db, credential, audience)
    except IntegrityError as exc:
        raise Unauthenticated("site token was already used (replayed jti)") from exc
    request.state.principal = principal
    return principal


def check_role_name(role: str) -> Role:
    try:
        return Role(role)
    except ValueError as exc:
        raise BadRequest(f"unknown role {role!r}; roles are {', '.join(r.value for r in Role)}") from exc
