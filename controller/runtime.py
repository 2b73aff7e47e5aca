"""The controller's running state: configuration, database, blob store, TUF repository, uploads.

`Runtime.open` checks that a data dir is usable (configuration readable, keys present,
database reachable and migrated) and says why when it is not.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from audit import AuditError
from controller import config as config_mod
from controller import migrate, registry, rollouts
from controller.audit_trail import AuditTrail
from controller.blobs import BlobStore
from controller.config import ConfigError, ControllerConfig
from controller.db import Rollout, Upload, make_engine, make_sessionmaker, utcnow
from controller.errors import Unprocessable
from controller.federation import FederationService
from controller.notify import DesiredNotifier
from controller.rollouts import Publication
from controller.tuf_access import TufAccess
from controller.tuf_repo import TufRepository
from controller.uploads import Uploads, UploadState
from controller.witness import load_witness_key, witness_name


class Runtime:
    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        # First: without its witness key the controller does not start (see `load_witness_key`).
        self.witness_signer = load_witness_key(config.keys_dir, witness_name(config.audit_origin))
        self._lock_fd: int | None = None
        self.engine = make_engine(config.database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.blobs = BlobStore(config.blobs_dir)
        self.uploads = Uploads(config.uploads_dir)
        self.tuf = TufRepository.open(config.tuf_dir, config.keys_dir, expiries=config.expiries)
        self.publisher = self.tuf
        self.tuf_access = TufAccess()
        self.audit: AuditTrail | None = None
        self.notifier = DesiredNotifier()
        self._reconciling = threading.Lock()
        # Set by `controller serve --fleet-port`: the supervised SuperLink and the jobs it runs.
        self.federation: FederationService | None = None

    @classmethod
    def open(cls, data_dir: Path, env: Mapping[str, str] | None = None) -> Runtime:
        """A runtime over a data dir, or ConfigError saying why the data dir cannot be used."""
        config = config_mod.load(data_dir, dict(env) if env is not None else None)
        for needed in (config.keys_dir, config.tuf_dir, config.blobs_dir):
            if not needed.is_dir():
                raise ConfigError(f"{needed} is missing: {data_dir} is not a complete controller data dir")
            if not os.access(needed, os.R_OK | os.W_OK | os.X_OK):
                raise ConfigError(f"{needed} is not readable and writable by this user")
        runtime = cls(config)
        try:
            runtime._lock_data_dir()
            runtime.audit = AuditTrail.open(config.audit_dir, config.keys_dir / "audit.key")
        except (ConfigError, AuditError) as exc:
            runtime.close()
            raise ConfigError(str(exc)) from exc
        try:
            with runtime.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            current = migrate.current_revision(runtime.engine)
        except SQLAlchemyError as exc:
            runtime.close()
            raise ConfigError(f"cannot reach the database {runtime.engine.url!r}: {exc.__class__.__name__}") from exc
        if current != migrate.head_revision():
            runtime.close()
            raise ConfigError(
                f"database schema is at {current or 'nothing'}, this controller needs {migrate.head_revision()}: "
                "run `sitewarden controller migrate`"
            )
        return runtime

    def _lock_data_dir(self) -> None:
        """One controller process per data dir: the TUF repository's versions are numbered in memory."""
        self._lock_fd = os.open(self.config.data_dir / "controller.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise ConfigError(f"another controller process is using {self.config.data_dir}") from exc

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as s:
            yield s

    def root_by_sha256(self, sha256: str) -> bytes | None:
        """The published TUF root version whose bytes hash to `sha256` (a join token may predate a rotation)."""
        for version in range(self.tuf.version("root"), 0, -1):
            path = self.tuf.metadata_file(f"{version}.root.json")
            if path is not None:
                data = path.read_bytes()
                if hashlib.sha256(data).hexdigest() == sha256:
                    return data
        return None

    def publish_desired(self, publication: Publication) -> None:
        """Publish desired-state documents as TUF targets (one repository update for all of them)."""
        if publication.targets:
            self.tuf.add_targets(publication.targets)

    def reconcile(self, session: Session, rollout: Rollout) -> list[str]:
        """One reconcile step of a rollout; wakes the agents whose desired state changed.

        Steps are serialised: two at once could both pick the next desired-state version.
        """
        with self._reconciling:
            session.flush()  # the caller's changes (a new rollout, a promotion) go in first
            session.refresh(rollout)  # then read what another step may have committed meanwhile
            changed = rollouts.reconcile(session, rollout, self.blobs, self.publish_desired)
        self.notifier.notify(changed)
        return changed

    def republish(self, session: Session, site_ids: list[str]) -> list[str]:
        """Publish the sites' desired state again (their jobs changed); wakes their agents."""
        with self._reconciling:
            changed = rollouts.republish(session, site_ids, self.blobs, self.publish_desired)
        self.notifier.notify(changed)
        return changed

    def rollback(self, session: Session, rollout: Rollout) -> list[str]:
        with self._reconciling:
            session.flush()
            session.refresh(rollout)
            changed = rollouts.rollback(session, rollout, self.blobs, self.publish_desired)
        self.notifier.notify(changed)
        return changed

    def reconcile_release(self, session: Session, name: str, version: str) -> None:
        """Bring the rollouts that carry a release up to date with it (a new approval, say)."""
        for rollout in rollouts.using_release(session, name, version):
            self.reconcile(session, rollout)

    def reconcile_all(self) -> None:
        """Background step: rollouts that promote themselves once their canaries are healthy."""
        with self.session() as session:
            for rollout in rollouts.awaiting_promotion(session):
                self.reconcile(session, rollout)

    def ready(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError:
            return False
        return True

    def finish_upload(self, session: Session, upload: Upload, state: UploadState) -> None:
        """Check the digest of a complete upload and move it into the blob store."""
        digest = state.hasher.hexdigest()
        if digest != upload.sha256:
            state.reset()
            upload.offset = 0
            session.commit()
            raise Unprocessable(
                f"upload {upload.id}: the bytes hash to {digest}, not the declared {upload.sha256}; "
                "nothing was stored, send them again from offset 0",
                offset=0,
            )
        self.blobs.adopt(state.path, upload.sha256)
        registry.record_blob(session, upload.sha256, upload.size)
        upload.completed_at = utcnow()
        session.commit()
        self.uploads.forget(upload.id)

    def expire_uploads(self) -> int:
        """Background step: remove uploads idle longer than `upload_ttl_s`, recorded in the audit log."""
        with self.session() as session:
            removed = self.uploads.expire(session, timedelta(seconds=self.config.upload_ttl_s))
        for gone in removed:
            if self.audit is not None:
                self.audit.record(
                    {
                        "type": "upload.expired",
                        "actor": "controller",
                        "upload": gone.id,
                        "sha256": gone.sha256,
                        "started_by": gone.created_by,
                        "bytes_received": gone.received,
                        "idle_since": gone.idle_since.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    }
                )
        return len(removed)

    def close(self) -> None:
        if self.audit is not None:
            self.audit.close()
            self.audit = None
        self.engine.dispose()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
