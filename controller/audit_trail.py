"""The controller's own audit log: every state-changing request, appended durably before the
response leaves, in an `audit.Log` signed with the controller's audit key
(origin `sitewarden/controller/<name>`), exportable in the C2SP tlog-tiles layout.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from audit import Log
from audit.aio import AsyncAppender
from audit.entry import canonicalize

CHECKPOINT_EVERY_ENTRIES = 1000
CHECKPOINT_EVERY_S = 60.0


class AuditTrail:
    def __init__(self, log: Log) -> None:
        self.log = log
        self._appender = AsyncAppender(log)
        self._lock = threading.Lock()
        self._signed_size = log.last_checkpoint().size if log.last_checkpoint() else 0
        self._signed_at = time.monotonic()

    @classmethod
    def open(cls, directory: Path, key_path: Path) -> AuditTrail:
        return cls(Log.open(directory, key_path))

    def record(self, event: dict[str, Any]) -> int:
        """Append one event (RFC 8785 JSON, with the time) and return its index once it is durable."""
        return self.log.append(self._entry(event))

    async def record_async(self, event: dict[str, Any]) -> int:
        """`record` for the event loop: waits for durability without holding a thread."""
        return await self._appender.append(self._entry(event))

    @staticmethod
    def _entry(event: dict[str, Any]) -> bytes:
        return canonicalize({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **event})

    def checkpoint(self) -> str:
        """Sign a checkpoint of everything recorded so far."""
        with self._lock:
            signed = self.log.checkpoint()
            self._signed_size = self.log.size
            self._signed_at = time.monotonic()
            return signed

    def checkpoint_if_due(self) -> str | None:
        """Sign when enough entries or enough time have gone by since the last checkpoint."""
        unsigned = self.log.size - self._signed_size
        if unsigned >= CHECKPOINT_EVERY_ENTRIES or (
            unsigned and time.monotonic() - self._signed_at >= CHECKPOINT_EVERY_S
        ):
            return self.checkpoint()
        return None

    def export_tarball(self, directory: Path) -> Path:
        """Sign a fresh checkpoint and export everything up to it as a .tar.gz in `directory`."""
        self.checkpoint()
        dest = Path(tempfile.mkdtemp(dir=directory, prefix="audit-export-")) / "controller-audit.tar.gz"
        return self.log.export(dest)

    def close(self) -> None:
        self._appender.close()
        self.log.close()
