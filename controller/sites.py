"""Sites: creation with labels, label changes, one-time join tokens, enrollment, disabling, key rotation.

Enrollment is how a site joins without trust on first use: an admin issues a join token
carrying the controller's URL and the SHA-256 of its TUF root; the agent presents the
token with the public key it generated on site and receives its site id and that exact
root, which it checks against the hash before trusting anything else.

Every key a site holds is kept in its key history (`SiteKey`), published with the site as
the vkeys of its audit log, so that an export signed before a rotation or a re-enrollment
stays verifiable. A rotation keeps the log (and what the witness cosigned of it); a
re-enrollment starts a new log, so the witness's record of the old one moves into the old
key's history entry and the new log is witnessed from size 0.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta

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
from controller.db import JoinTokenRecord, Site, SiteKey, WitnessedCheckpoint, new_id, utcnow
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
    if site.public_key is not None:
        # A new agent, a new log: what the witness holds of the old log goes with the old key.
        witnessed = session.get(WitnessedCheckpoint, site.id)
        _retire_key(session, site, now, "re-enrolled", witnessed)
        if witnessed is not None:
            session.delete(witnessed)
    session.add(SiteKey(site_id=site.id, public_key=public_key, since=now))
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
    now = utcnow()
    _retire_key(session, site, now, "rotated", session.get(WitnessedCheckpoint, site.id))
    session.add(SiteKey(site_id=site.id, public_key=new_public_key, since=now))
    site.public_key = new_public_key
    site.key_rotated_at = now
    session.commit()
    return site


def _retire_key(
    session: Session, site: Site, now: datetime, ended_by: str, witnessed: WitnessedCheckpoint | None
) -> None:
    """Close the history entry of the site's current key (created here for a site enrolled before history)."""
    current = session.scalar(
        select(SiteKey).where(SiteKey.site_id == site.id, SiteKey.until.is_(None)).order_by(SiteKey.id.desc())
    )
    if current is None or current.public_key != site.public_key:
        since = site.key_rotated_at or site.enrolled_at or site.created_at
        current = SiteKey(site_id=site.id, public_key=site.public_key or "", since=since)
        session.add(current)
    current.until = now
    current.ended_by = ended_by
    current.last_checkpoint = witnessed.note if witnessed is not None else None


def key_history(session: Session, site: Site) -> list[SiteKey]:
    """Every key the site has held, oldest first (the current one last, with no `until`)."""
    return list(session.scalars(select(SiteKey).where(SiteKey.site_id == site.id).order_by(SiteKey.id)))
