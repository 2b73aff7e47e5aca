"""Bytes of resumable uploads on their way to the blob store.

Each upload writes `uploads/<id>` (mode 0600) and hashes as it goes, so the digest is known
the moment the last byte arrives. After a controller restart the partial file is hashed
again once; the client continues from its size (`Upload-Offset`). One request at a time
may write an upload, and only the person who started it (`check_owner`): an upload id in a
log line or a proxy's access log does not let anyone else append bytes to it. Uploads left
unfinished longer than the data dir's `upload_ttl_s` (no byte received for that long) are
removed with their bytes (`Uploads.expire`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from controller import audit_trail
from controller.changes import UploadExpired
from controller.db import Upload, utcnow
from controller.errors import Conflict, NotFound
from sitewarden.files import PRIVATE_FILE, make_private_dirs

log = logging.getLogger("sitewarden.controller")

_READ = 8 << 20


def check_owner(upload: Upload, caller: str) -> Upload:
    """The upload if `caller` started it; otherwise NotFound, as for an id that does not exist.

    Continuing someone else's upload would let a second person choose part of the bytes of a
    blob the first registers as theirs; and an id is not a secret (logs, proxies, screens).
    """
    if upload.created_by != caller:
        raise NotFound(f"no upload {upload.id!r} of yours")
    return upload


def _create_private(path: Path) -> None:
    """An empty partial file, 0600 exactly; an existing one is kept (its bytes are resumed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)


class UploadState:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.hasher = hashlib.sha256()
        self.offset = 0

    @classmethod
    def resume(cls, path: Path) -> UploadState:
        """State of a partial file: its size and the hash of what it holds."""
        state = cls(path)
        _create_private(path)
        with open(path, "rb") as f:
            while chunk := f.read(_READ):
                state.hasher.update(chunk)
                state.offset += len(chunk)
        return state

    def write(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(data)
        self.hasher.update(data)
        self.offset += len(data)

    def reset(self) -> None:
        with open(self.path, "wb"):
            pass
        self.hasher = hashlib.sha256()
        self.offset = 0


@dataclass(frozen=True)
class Expired:
    """An abandoned upload that `Uploads.expire` removed."""

    id: str
    sha256: str
    created_by: str
    received: int
    idle_since: datetime


class Uploads:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._states: dict[str, UploadState] = {}
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()  # `writing` runs on the event loop, `expire` on a worker thread

    def path(self, upload_id: str) -> Path:
        return self.directory / upload_id

    def create(self, upload_id: str) -> None:
        make_private_dirs(self.directory)
        _create_private(self.path(upload_id))
        self._states[upload_id] = UploadState(self.path(upload_id))

    def offset(self, upload_id: str) -> int:
        state = self._states.get(upload_id)
        if state is not None:
            return state.offset
        path = self.path(upload_id)
        return path.stat().st_size if path.exists() else 0

    def forget(self, upload_id: str) -> None:
        self._states.pop(upload_id, None)
        self.path(upload_id).unlink(missing_ok=True)

    def last_activity(self, upload: Upload) -> datetime:
        """When the upload last received bytes (its file's modification time), or was started."""
        try:
            mtime = datetime.fromtimestamp(self.path(upload.id).stat().st_mtime, upload.created_at.tzinfo)
        except FileNotFoundError:
            return upload.created_at
        return max(upload.created_at, mtime)

    def expire(self, session: Session, ttl: timedelta, now: datetime | None = None) -> list[Expired]:
        """Remove unfinished uploads idle for longer than `ttl`: their bytes and their record, each removal
        recorded in the audit trail (`upload.expired`) in its own transaction. Commits.

        An upload a request is writing right now is left alone, however old.
        """
        now = now or utcnow()
        removed: list[Expired] = []
        stale = session.scalars(
            select(Upload).where(Upload.completed_at.is_(None), Upload.created_at < now - ttl).order_by(Upload.id)
        ).all()
        for upload in stale:
            idle_since = self.last_activity(upload)
            if now - idle_since < ttl:
                continue
            with self._busy_lock:
                if upload.id in self._busy:
                    continue
                self._busy.add(upload.id)  # a request arriving meanwhile gets a 409, then a 404
            try:
                path = self.path(upload.id)
                received = path.stat().st_size if path.exists() else 0
                self.forget(upload.id)
                session.delete(upload)
                audit_trail.record(
                    session, UploadExpired(upload.id, upload.sha256, upload.created_by, received, idle_since)
                )
                session.commit()
            finally:
                with self._busy_lock:
                    self._busy.discard(upload.id)
            removed.append(Expired(upload.id, upload.sha256, upload.created_by, received, idle_since))
        session.commit()
        for gone in removed:
            log.info("removed upload %s of %s: no byte received since %s", gone.id, gone.created_by, gone.idle_since)
        return removed

    @asynccontextmanager
    async def writing(self, upload_id: str) -> AsyncIterator[UploadState]:
        """Exclusive access to an upload's bytes for one request (409 if another request writes)."""
        with self._busy_lock:
            if upload_id in self._busy:
                raise Conflict("another request is writing this upload", offset=self.offset(upload_id))
            self._busy.add(upload_id)
        try:
            state = self._states.get(upload_id)
            if state is None:
                state = await run_in_threadpool(UploadState.resume, self.path(upload_id))
                self._states[upload_id] = state
            yield state
        finally:
            with self._busy_lock:
                self._busy.discard(upload_id)
