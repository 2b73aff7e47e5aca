"""The controller's running state: configuration, database, blob store, TUF repository, uploads,
and the audit trail.

`Runtime.open` checks that a data dir is usable (configuration readable, keys present,
database reachable and migrated) and says why when it is not; then it moves whatever the audit
outbox holds into the audit log (left by a crash), so that the controller serves only once
every committed change is in the log. Background work (auto-promotion, TUF re-signing, the
outbox's stragglers) runs here as the actor `controller`.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from audit import AuditError
from controller import audit_trail, log_witnesses, migrate, registry, rollouts
from controller import config as config_mod
from controller.audit_trail import AuditTrail, AuditUnavailable
from controller.blobs import BlobStore
from controller.config import ConfigError, ControllerConfig
from controller.db import Rollout, Upload, make_engine, make_sessionmaker, utcnow
from controller.errors import Unprocessable
from controller.federation import FederationService
from controller.notify import DesiredNotifier
from controller.outbox import Outbox
from controller.rollouts import Publication
from controller.tuf_repo import TufRepository
from controller.uploads import Uploads, UploadState
from controller.witness import load_or_create_witness_key, witness_name

log = logging.getLogger("sitewarden.controller")


class Runtime:
    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self._lock_fd: int | None = None
        self.engine = make_engine(config.database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.blobs = BlobStore(config.blobs_dir)
        self.uploads = Uploads(config.uploads_dir)
        self.tuf = TufRepository.open(config.tuf_dir, config.keys_dir, expiries=config.expiries)
        self.publisher = self.tuf
        self.audit: AuditTrail | None = None
        self.outbox: Outbox | None = None
        self.witness_signer = load_or_create_witness_key(config.keys_dir, witness_name(config.audit_origin))
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
        try:
            runtime._start_audit_trail()
        except (ConfigError, AuditError, SQLAlchemyError) as exc:
            runtime.close()
            raise ConfigError(f"the audit trail cannot start: {exc}") from exc
        return runtime

    def _start_audit_trail(self) -> None:
        """Move what the outbox holds into the log (before serving), then keep moving it as changes commit."""
        trail = self.audit
        assert trail is not None
        self.outbox = Outbox(self.engine, trail)
        moved = self.outbox.recover()
        if moved:
            log.info("moved %d audit entries left in the outbox into the audit log", moved)
        audit_trail.bind(self.engine, self.outbox)
        # Each new checkpoint is kept for the sites that cosign it before it is shown; then they are woken.
        trail.keep = lambda signed: log_witnesses.remember(self.engine, signed)
        trail.on_published = lambda _signed: self.notifier.notify_checkpoint()
        if trail.published is not None:
            log_witnesses.remember(self.engine, trail.published)

    def maintain_audit(self) -> None:
        """Background step: recover a failed log, move stragglers from the outbox, write refusal counts."""
        trail, outbox = self.audit, self.outbox
        if trail is None or outbox is None:
            return
        if trail.failure is not None:
            try:
                trail.ensure_writable()
            except AuditUnavailable:
                return
        with audit_trail.acting("audit.outbox"):
            outbox.drain()
        trail.flush_refusals()

    def refresh_tuf(self) -> list[str]:
        """Background step: re-sign TUF roles near expiry; one audit entry per run that re-signed any."""
        with audit_trail.acting("tuf.refresh"):
            resigned = self.tuf.refresh()
            if resigned and self.audit is not None:
                versions = {role: self.tuf.version(role) for role in resigned}
                event = {"type": "tuf.resigned", **audit_trail.current().fields(), "roles": resigned}
                self.audit.record({**event, "versions": versions})
        return resigned

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
        with audit_trail.acting("rollout.reconcile"), self.session() as session:
            for rollout in rollouts.awaiting_promotion(session):
                self.reconcile(session, rollout)

    def ready(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError:
            return False
        return True

    def finish_upload(self, session: Session, upload: Upload, state: UploadState, offset_before: int) -> None:
        """Check the digest of a complete upload and move it into the blob store."""
        digest = state.hasher.hexdigest()
        if digest != upload.sha256:
            state.reset()
            registry.upload_reset(session, upload, f"the bytes hash to {digest}, not the declared {upload.sha256}")
            raise Unprocessable(
                f"upload {upload.id}: the bytes hash to {digest}, not the declared {upload.sha256}; "
                "nothing was stored, send them again from offset 0",
                offset=0,
            )
        self.blobs.adopt(state.path, upload.sha256)
        registry.record_blob(session, upload.sha256, upload.size)
        upload.completed_at = utcnow()
        registry.upload_progressed(session, upload, offset_before)
        session.commit()
        self.uploads.forget(upload.id)

    def close(self) -> None:
        audit_trail.unbind(self.engine)
        if self.outbox is not None and self.audit is not None and self.audit.failure is None:
            try:
                self.outbox.close()
            except Exception:  # the rows stay in the outbox: moved at the next start
                log.exception("the audit outbox could not be emptied at shutdown")
            self.outbox = None
        if self.audit is not None:
            self.audit.close()
            self.audit = None
        self.engine.dispose()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
