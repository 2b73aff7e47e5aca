"""Bytes of resumable uploads on their way to the blob store.

Each upload writes `uploads/<id>` and hashes as it goes, so the digest is known the
moment the last byte arrives. After a controller restart the partial file is hashed
again once; the client continues from its size (`Upload-Offset`). One request at a time
may write an upload.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from controller.errors import Conflict

_READ = 8 << 20


class UploadState:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.hasher = hashlib.sha256()
        self.offset = 0

    @classmethod
    def resume(cls, path: Path) -> UploadState:
        """State of a partial file: its size and the hash of what it holds."""
        state = cls(path)
        path.touch(exist_ok=True)
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
        self.path.write_bytes(b"")
        self.hasher = hashlib.sha256()
        self.offset = 0


class Uploads:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._states: dict[str, UploadState] = {}
        self._busy: set[str] = set()

    def path(self, upload_id: str) -> Path:
        return self.directory / upload_id

    def create(self, upload_id: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path(upload_id).write_bytes(b"")
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

    @asynccontextmanager
    async def writing(self, upload_id: str) -> AsyncIterator[UploadState]:
        """Exclusive access to an upload's bytes for one request (409 if another request writes)."""
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
            self._busy.discard(upload_id)
