"""Sites: creation with labels, label changes, one-time join tokens, enrollment, disabling, key rotation.

Enrollment is how a site joins without trust on first use: an admin issues a join token
carrying the controller's URL and the SHA-256 of its TUF root; the agent presents the
token with the public key it generated on site and receives its site id and that exact
root, which it checks against the hash before trusting anything else.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from controller import audit_trail
from controller.changes import (
    JoinTokenIssued,
    SiteCreated,
    SiteDisabled,
    SiteEnrolled,
    SiteKeyRotated,
    SiteLabelsChanged,
    key_sha256,
)
from controller.db import JoinTokenRecord, Site, new_id, utcnow
from controller.errors import BadRequest, Conflict, Forbidden, NotFound
from sitewarden import jointoken, sitejwt
from sitewarden.errors import CredentialError
from sitewarden.keys import decode_public_key

SITE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
LABEL_KEY = re.compile(r"[a-z0-9](?:[a-z0-9._/-]{0,61}[a-z0-9])?")
LABEL_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?")
MAX_JOIN_TTL = timedelta(days=7)


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):
            raise BadRequest(f"label key {key!r} must be lowercase letters, digits, '.', '_', '/', '-'")
        if not isinstance(value, str) or not LABEL_VALUE.fullmatch(value):
            raise BadRequest(f"label {key}: value {value!r} must be up to 63 letters, digits, '.', '_', '-'")
    return labels


def create(session: Session, name: str, labels: dict[str, str], created_by: str) -> Site:
    if not SITE_NAME.fullmatch(name):
        raise BadRequest(f"site name {name!r} must be a DNS label: lowercase letters, digits and '-', up to 63")
    if session.scalar(select(Site.id).where(Site.name == name)) is not None:
        raise Conflict(f"site {name!r} already exists")
    site = Site(id=new_id(), name=name, labels=check_labels(labels), created_by=created_by)
    session.add(site)
    audit_trail.record(session, SiteCreated(site.id, site.name, dict(site.labels)))
    session.commit()
    return site


def set_labels(session: Session, ref: str, labels: dict[str, str]) -> Site:
    """Replace a site's labels (rollouts and jobs created from now on select by them)."""
    check_labels(labels)
    site = audit_trail.locked(session, get(session, ref))
    if site.labels != labels:
        before = dict(site.labels)
        site.labels = dict(labels)
        audit_trail.record(session, SiteLabelsChanged(site.id, site.name, before, dict(labels)))
        session.commit()
    return site


def get(session: Session, ref: str) -> Site:
    """A site by id or by name."""
    site = session.get(Site, ref) or session.scalar(select(Site).where(Site.name == ref))
    if site is None:
        raise NotFound(f"no site {ref!r}")
    return site


def disable(session: Session, ref: str) -> Site:
    site = audit_trail.locked(session, get(session, ref))
    if site.status != "disabled":
        audit_trail.record(session, SiteDisabled(site.id, site.name, site.status))
        site.status = "disabled"
        site.disabled_at = utcnow()
        session.commit()
    return site


def issue_join_token(
    session: Session, ref: str, ttl: timedelta, *, controller_url: str, root_sha256: str, created_by: str
) -> jointoken.JoinToken:
    site = get(session, ref)
    if site.status == "disabled":
        raise Conflict(f"site {site.name} is disabled; it cannot join")
    if not timedelta(minutes=1) <= ttl <= MAX_JOIN_TTL:
        raise BadRequest(f"join token lifetime must be between 1 minute and {MAX_JOIN_TTL.days} days")
    token = jointoken.JoinToken(
        token_id=secrets.token_hex(8),
        secret=jointoken.new_secret(),
        controller_url=controller_url,
        root_sha256=root_sha256,
        site=site.name,
        expires_at=(utcnow() + ttl).replace(microsecond=0),
    )
    session.add(
        JoinTokenRecord(
            id=token.token_id,
            site_id=site.id,
            secret_sha256=hashlib.sha256(token.secret.encode()).hexdigest(),
            created_by=created_by,
            expires_at=token.expires_at,
        )
    )
    audit_trail.record(session, JoinTokenIssued(site.id, site.name, token.token_id, token.expires_at))
    session.commit()
    return token


def enroll(
    session: Session, token_text: str, public_key: str, root_for_hash: Callable[[str], bytes | None]
) -> tuple[Site, bytes]:
    """Redeem a join token: bind the site to its public key; return the site and the TUF root the token names."""
    try:
        token = jointoken.parse(token_text)
        decode_public_key(public_key)
    except CredentialError as exc:
        raise BadRequest(str(exc)) from exc
    record = session.get(JoinTokenRecord, token.token_id)
    if record is None or not hmac.compare_digest(
        record.secret_sha256, hashlib.sha256(token.secret.encode()).hexdigest()
    ):
        raise Forbidden("join token was not issued by this controller")
    if record.used_at is not None:
        raise Forbidden("join token was already used")
    now = utcnow()
    if record.expires_at <= now:
        raise Forbidden("join token has expired")
    site = session.get(Site, record.site_id)
    assert site is not None
    if site.status == "disabled":
        raise Forbidden(f"site {site.name} is disabled")
    root = root_for_hash(token.root_sha256)
    if root is None:
        raise Forbidden("join token names a TUF root this controller does not have")
    # Single use even under concurrent redemption: only one UPDATE can match.
    claimed = session.execute(
        update(JoinTokenRecord)
        .where(JoinTokenRecord.id == record.id, JoinTokenRecord.used_at.is_(None))
        .values(used_at=now)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        raise Forbidden("join token was already used")
    site.public_key = public_key
    site.status = "active"
    site.enrolled_at = now
    audit_trail.record(session, SiteEnrolled(site.id, site.name, key_sha256(public_key), record.id))
    session.commit()
    return site, root


def rotate_key(session: Session, site_id: str, new_public_key: str, proof: str, audience: str) -> Site:
    """Replace a site's key: the request is signed by the old key, `proof` is a site JWT by the new one."""
    try:
        new_key = decode_public_key(new_public_key)
        claims = sitejwt.verify(proof, new_key, audience)
    except CredentialError as exc:
        raise BadRequest(f"key rotation proof: {exc}") from exc
    site = get(session, site_id)
    if claims["sub"] != site.id:
        raise BadRequest("key rotation proof names another site")
    if new_public_key == site.public_key:
        raise Conflict("the new key is the current key")
    audit_trail.record(
        session, SiteKeyRotated(site.id, site.name, key_sha256(site.public_key), key_sha256(new_public_key))
    )
    site.public_key = new_public_key
    site.key_rotated_at = utcnow()
    session.commit()
    return site
