"""The controller's tables (SQLAlchemy 2) and how to reach them.

The schema is owned by the Alembic migrations in `controller/migrations`; these classes
must match them (a test compares the two). Everything portable across SQLite and
PostgreSQL: string UUIDs, JSON columns, UTC timestamps.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored as UTC and always read back timezone-aware (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[str]: JSON}


class ApiToken(Base):
    """A person's (or a service's) bearer token; only a hash of the secret is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    role: Mapped[str] = mapped_column(String(20))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class Site(Base):
    __tablename__ = "sites"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    public_key: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))
    enrolled_at: Mapped[datetime | None]
    disabled_at: Mapped[datetime | None]
    key_rotated_at: Mapped[datetime | None]


class JoinTokenRecord(Base):
    __tablename__ = "join_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]


class SeenJti(Base):
    """JWT ids already accepted from sites, kept until the token would have expired anyway."""

    __tablename__ = "seen_jtis"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    site_id: Mapped[str] = mapped_column(String(36))
    expires_at: Mapped[datetime] = mapped_column(index=True)


class Blob(Base):
    """Content-addressed file bytes, stored once under `blobs/` by SHA-256."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Upload(Base):
    """A resumable upload of one blob; bytes so far live in `uploads/<id>`."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    offset: Mapped[int] = mapped_column(BigInteger, default=0)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None]


class Release(Base):
    """An immutable release: name + semantic version + kind + runtime + files + model card."""

    __tablename__ = "releases"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_release_name_version"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), index=True)
    version: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(20))
    runtime: Mapped[str] = mapped_column(String(20))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    uploaded_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    files: Mapped[list[ReleaseFile]] = relationship(
        back_populates="release", order_by="ReleaseFile.path", cascade="all, delete-orphan"
    )
    approvals: Mapped[list[Approval]] = relationship(
        back_populates="release", order_by="Approval.created_at", cascade="all, delete-orphan"
    )


class ReleaseFile(Base):
    __tablename__ = "release_files"

    release_id: Mapped[str] = mapped_column(ForeignKey("releases.id"), primary_key=True)
    path: Mapped[str] = mapped_column(String(500), primary_key=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    size: Mapped[int] = mapped_column(BigInteger)

    release: Mapped[Release] = relationship(back_populates="files")


class ApproverKey(Base):
    """A model-risk approver's public key (P-256), registered by an admin."""

    __tablename__ = "approver_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    approver: Mapped[str] = mapped_column(String(200), index=True)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    public_key_pem: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))
    revoked_at: Mapped[datetime | None]


class Approval(Base):
    __tablename__ = "approvals"
    __table_args__ = (UniqueConstraint("release_id", "approver", name="uq_approval_release_approver"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    release_id: Mapped[str] = mapped_column(ForeignKey("releases.id"), index=True)
    approver: Mapped[str] = mapped_column(String(200))
    key_fingerprint: Mapped[str] = mapped_column(String(64))
    bundle_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    release: Mapped[Release] = relationship(back_populates="approvals")


def make_engine(url: str) -> Engine:
    """An engine for SQLite (WAL, busy timeout, foreign keys) or PostgreSQL (pre-ping)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)


class WitnessedCheckpoint(Base):
    """The latest checkpoint of a site's audit log that the controller cosigned (C2SP tlog-witness)."""

    __tablename__ = "witnessed_checkpoints"

    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), primary_key=True)
    origin: Mapped[str] = mapped_column(String(200))
    size: Mapped[int] = mapped_column(BigInteger)
    root_hash: Mapped[str] = mapped_column(String(64))
    note: Mapped[str] = mapped_column(Text)
    cosigned_at: Mapped[datetime]


class Rollout(Base):
    """What a set of sites should run, released in waves; its spec never changes, its state does."""

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(20), default="progressing")
    waves_released: Mapped[int] = mapped_column(default=1)
    wave_released_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    sites: Mapped[list[RolloutSite]] = relationship(
        back_populates="rollout", order_by="RolloutSite.wave", cascade="all, delete-orphan"
    )


class RolloutSite(Base):
    """A site a rollout selected: its wave, and the desired state it had before the rollout reached it."""

    __tablename__ = "rollout_sites"

    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"), primary_key=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), primary_key=True)
    wave: Mapped[int]
    applied_version: Mapped[int | None] = mapped_column(BigInteger)
    previous_version: Mapped[int | None] = mapped_column(BigInteger)

    rollout: Mapped[Rollout] = relationship(back_populates="sites")


class DesiredState(Base):
    """Every version of every site's desired-state document (the newest is current)."""

    __tablename__ = "desired_states"

    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    document: Mapped[dict[str, Any]] = mapped_column(default=dict)
    sha256: Mapped[str] = mapped_column(String(64))
    rollout_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ObservedState(Base):
    """What a site last reported: per artifact state and reason, heartbeat, agent version, audit size."""

    __tablename__ = "observed_states"

    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), primary_key=True)
    desired_version: Mapped[int] = mapped_column(BigInteger, default=0)
    artifacts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    agent_version: Mapped[str | None] = mapped_column(String(100))
    checkpoint_size: Mapped[int | None] = mapped_column(BigInteger)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    changed_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    """A federated fine-tuning job: its spec never changes; its state and per-round progress do."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(20), default="pending")
    reason: Mapped[str] = mapped_column(String(2000), default="")
    sites: Mapped[list[str]] = mapped_column(default=list)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


def dialect_insert(session: Session) -> Callable[[Any], Any]:
    """The INSERT construct of the session's database, which has ON CONFLICT (SQLite and PostgreSQL)."""
    if session.get_bind().dialect.name == "sqlite":
        return sqlite_insert
    return postgresql_insert


# -- the dashboard (controller/ui) -----------------------------------------------------------


class UiSession(Base):
    """A dashboard sign-in: an API token exchanged for a session cookie; only a hash of the cookie is kept.

    A session lives no longer than its token: revoking or expiring the token ends it at the next request.
    """

    __tablename__ = "ui_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # SHA-256 of the cookie's secret
    token_id: Mapped[str] = mapped_column(ForeignKey("api_tokens.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    ended_at: Mapped[datetime | None]


class AuditIndexEntry(Base):
    """One entry of the controller's audit log, indexed for search (the log itself stays the record)."""

    __tablename__ = "audit_index"
    __table_args__ = (
        Index("ix_audit_index_actor", "actor", "idx"),
        Index("ix_audit_index_action", "action", "idx"),
        Index("ix_audit_index_at", "at", "idx"),
    )

    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[datetime | None]
    actor: Mapped[str] = mapped_column(String(200))
    role: Mapped[str | None] = mapped_column(String(20))
    action: Mapped[str] = mapped_column(String(300))
    resource: Mapped[str] = mapped_column(String(1000))
    outcome: Mapped[str | None] = mapped_column(String(20))
    status: Mapped[int | None]


class AuditIndexTerm(Base):
    """A resource named by an audit entry (a site, rollout, release, token...), for exact-match search."""

    __tablename__ = "audit_index_terms"

    term: Mapped[str] = mapped_column(String(200), primary_key=True)
    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)


class SiteSample(Base):
    """A site's heartbeat age and witness lag at one moment, sampled for the dashboard's history charts."""

    __tablename__ = "site_samples"

    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), primary_key=True)
    at: Mapped[datetime] = mapped_column(primary_key=True, index=True)
    heartbeat_age_s: Mapped[int | None] = mapped_column(BigInteger)
    checkpoint_size: Mapped[int | None] = mapped_column(BigInteger)
    witnessed_size: Mapped[int | None] = mapped_column(BigInteger)
