"""The controller's running state: configuration, database, blob store, TUF repository, uploads,
and the audit trail.

`Runtime.open` checks that a data dir is usable (configuration readable, keys present,
database reachable and migrated) and says why when it is not; then it moves whatever the audit
outbox holds into the audit log (left by a crash), so that the controller serves only once
every committed change is in the log. Background work (auto-promotion, TUF re-signing, the
outbox's stragglers, upload expiry) runs here as the actor `controller`.

Changes are committed to the database first and published to TUF after. A publication that
fails after its commit (a full disk, say) is kept by `TufPublisher` and tried again by the
background reconcile step; `ensure_published` (at start) publishes whatever the database
holds and TUF lacks, for a controller that stopped between a commit and its publication.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from audit import AuditError
from controller import audit_trail, log_witnesses, migrate, registry, rollouts
from controller import config as config_mod
from controller.audit_trail import AuditTrail, AuditUnavailable
from controller.blobs import BlobStore
from controller.config import ConfigError, ControllerConfig
from controller.db import Release, Rollout, Site, Upload, make_engine, make_sessionmaker, utcnow
from controller.errors import Unprocessable
from controller.federation import FederationService
from controller.notify import DesiredNotifier
from controller.outbox import Outbox
from controller.rollouts import Publication
from controller.tuf_access import TufAccess
from controller.tuf_repo import MetadataLimitError, TargetSpec, TufError, TufRepository
from controller.uploads import Uploads, UploadState
from controller.witness import load_witness_key, witness_name
from sitewarden.desired import approval_target, revocation_target, target_path

log = logging.getLogger("sitewarden.controller")


class TufPublisher:
    """Publishes committed changes to the TUF repository; keeps what fails to publish and tries again.

    The database change is committed already when `add_targets` is called: a failure to write
    metadata must not lose it, nor make the request that committed it fail. A metadata limit is
    a refusal (the caller undoes its change), not a failure to retry.
    """

    def __init__(self, tuf: TufRepository) -> None:
        self.tuf = tuf
        self._lock = threading.Lock()
        self.pending: dict[str, Any] = {}

    def check_targets(self, targets: Mapping[str, Any]) -> None:
        self.tuf.check_targets(targets)

    def add_targets(self, targets: Mapping[str, Any]) -> list[str]:
        try:
            return self.tuf.add_targets(targets)
        except MetadataLimitError:
            raise
        except (TufError, OSError) as exc:
            with self._lock:
                self.pending.update(targets)
            log.error("publishing %d TUF targets failed, will retry: %s", len(targets), exc)
            return []

    def retry(self) -> bool:
        """Publish what failed before; True when nothing is left."""
        with self._lock:
            pending, self.pending = dict(self.pending), {}
        if not pending:
            return True
        try:
            self.tuf.add_targets(pending)
        except (TufError, OSError) as exc:
            with self._lock:
                self.pending = {**pending, **self.pending}
            log.error("publishing %d TUF targets failed again: %s", len(pending), exc)
            return False
        log.warning("published %d TUF targets that had failed before", len(pending))
        return True


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
        self.publisher = TufPublisher(self.tuf)
        self.tuf_access = TufAccess()
        self.audit: AuditTrail | None = None
        self.outbox: Outbox | None = None
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
        try:  # a controller stopped between a commit and its publication: publish now
            runtime.ensure_published()
        except (TufError, OSError, SQLAlchemyError) as exc:
            log.error("could not publish what the database holds and TUF lacks: %s", exc)
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
        """Publish committed desired-state documents as TUF targets (one repository update for all of them)."""
        if publication.targets:
            self.publisher.add_targets(publication.targets)

    def ensure_published(self) -> int:
        """Publish what the database holds and TUF lacks: release files, manifests, approvals, revocations
        and each site's current desired state. Returns how many targets it published (0 normally)."""
        wanted: dict[str, TargetSpec] = {}
        with self.session() as session:
            for release in session.scalars(select(Release)):
                manifest_size = self.blobs.path(release.manifest_sha256).stat().st_size
                wanted.update(
                    {p: TargetSpec(*spec) for p, spec in registry.release_targets(release, manifest_size).items()}
                )
                for a in release.approvals:
                    size = self.blobs.path(a.bundle_sha256).stat().st_size
                    wanted[approval_target(release.name, release.version, a.key_fingerprint)] = TargetSpec(
                        size, a.bundle_sha256
                    )
                for r in release.revocations:
                    size = self.blobs.path(r.bundle_sha256).stat().st_size
                    wanted[revocation_target(release.name, release.version, r.key_fingerprint)] = TargetSpec(
                        size, r.bundle_sha256
                    )
            site_ids = list(session.scalars(select(Site.id)))
            for site_id, held in rollouts.current_desired_many(session, site_ids).items():
                size = self.blobs.path(held.sha256).stat().st_size
                wanted[target_path(site_id)] = TargetSpec(size, held.sha256)
        missing = {}
        for path, spec in wanted.items():
            published = self.tuf.get_target(path)
            if published is None or (published.length, published.sha256) != (spec.length, spec.sha256):
                missing[path] = spec
        if missing:
            log.warning("publishing %d TUF targets the database holds and TUF lacks", len(missing))
            self.tuf.add_targets(missing)
        return len(missing)

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
        """Background step: publications that failed before, and rollouts that promote themselves once
        their canaries are healthy."""
        self.publisher.retry()
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

    def expire_uploads(self) -> int:
        """Background step: remove uploads idle longer than `upload_ttl_s`, recorded in the audit log."""
        with audit_trail.acting("upload.expiry"), self.session() as session:
            return len(self.uploads.expire(session, timedelta(seconds=self.config.upload_ttl_s)))

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
