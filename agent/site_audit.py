"""The site's audit log: every request, decision, refusal and activation, before the response leaves.

Entries are RFC 8785 JSON in an `audit.Log` whose checkpoints the site key signs under the
origin `sitewarden/<site-id>`. Digests of regulated content are HMAC-SHA256 with the
site's secret, so that low-entropy inputs cannot be guessed back from the log; raw
content is not logged. Checkpoints are signed every N entries or T seconds and sent to
the controller to be witnessed; while the controller is away the log keeps growing and
the lag (entries and seconds since the last cosigned checkpoint) is visible.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import queue
import threading
import time
from pathlib import Path
from typing import Any

from agent.config import AuditSettings
from agent.identity import DataDir, Identity
from audit import Log
from audit.aio import AsyncAppender
from audit.entry import canonicalize
from audit.note import Signer
from sitewarden import witnessing
from sitewarden.files import write_atomically

_STOP = object()


class SiteAudit:
    def __init__(self, data: DataDir, identity: Identity, settings: AuditSettings) -> None:
        self.data = data
        self.identity = identity
        self.settings = settings
        signer = Signer.from_ed25519(identity.origin, data.site_key())
        self.vkey = signer.vkey
        self.log = Log.open(data.audit_dir, signer)
        self.write_failures = 0  # entries that could not be written (metrics and alerts)
        self._appender = AsyncAppender(self.log)
        self._secret = data.hmac_secret()
        witnessed = json.loads(data.witness_file.read_text()) if data.witness_file.exists() else {}
        self.witnessed_size: int = witnessed.get("size", 0)
        self.witnessed_at: float | None = witnessed.get("at")
        self.witness_error: str = ""
        last = self.log.last_checkpoint()
        self._signed_size = last.size if last else 0
        self._signed_at = time.monotonic()
        self._checkpoint_lock = threading.Lock()
        self._queue: queue.Queue[Any] | None = None
        self._writer: threading.Thread | None = None
        if settings.mode == "async":
            self._queue = queue.Queue()
            self._writer = threading.Thread(target=self._write_queued, name="audit-writer", daemon=True)
            self._writer.start()

    # -- recording ---------------------------------------------------------------------------

    def digest(self, data: bytes) -> str:
        """HMAC-SHA256 of regulated content with the site secret (hex)."""
        return hmac.digest(self._secret, data, hashlib.sha256).hex()

    def entry(self, event: dict[str, Any]) -> bytes:
        return canonicalize({"time": _now(), "site": self.identity.site_id, **event})

    def record(self, event: dict[str, Any]) -> int | None:
        """Append an event; returns its index once it is durable (None in async mode)."""
        data = self.entry(event)
        if self._queue is not None:
            self._queue.put(data)
            return None
        try:
            return self.log.append(data)
        except Exception:
            self.write_failures += 1
            raise

    async def record_async(self, event: dict[str, Any]) -> int | None:
        """`record` for the event loop: waits for durability without holding a thread."""
        data = self.entry(event)
        if self._queue is not None:
            self._queue.put(data)
            return None
        try:
            return await self._appender.append(data)
        except Exception:
            self.write_failures += 1
            raise

    def _write_queued(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            batch = [item]
            while not self._queue.empty() and len(batch) < 4096:
                batch.append(self._queue.get_nowait())
            stop = _STOP in batch
            entries = [b for b in batch if b is not _STOP]
            if entries:
                try:
                    self.log.append_many(entries)
                except Exception:
                    self.write_failures += len(entries)
                    raise
            if stop:
                return

    # -- checkpoints and witnessing ----------------------------------------------------------

    def checkpoint_due(self) -> bool:
        unsigned = self.log.size - self._signed_size
        elapsed = time.monotonic() - self._signed_at
        return unsigned >= self.settings.checkpoint_entries or (
            unsigned > 0 and elapsed >= self.settings.checkpoint_seconds
        )

    def checkpoint(self) -> str:
        with self._checkpoint_lock:
            signed = self.log.checkpoint()
            self._signed_size = self.log.size
            self._signed_at = time.monotonic()
            return signed

    def submission(self) -> witnessing.Submission | None:
        """The add-checkpoint request to send, or None when the witness has the latest checkpoint."""
        last = self.log.last_checkpoint()
        if last is None or last.size <= self.witnessed_size:
            return None
        return witnessing.submission(self.log, self.witnessed_size)

    def cosigned(self, sent: witnessing.Submission, lines: bytes, witness_vkey: str) -> None:
        """Store the controller's cosignature and remember the witnessed size durably."""
        witnessing.store_cosignatures(self.log, sent, lines, witness_vkey)
        self.witnessed_size, self.witnessed_at, self.witness_error = sent.size, time.time(), ""
        write_atomically(self.data.witness_file, json.dumps({"size": sent.size, "at": self.witnessed_at}).encode())

    def witness_conflict(self, size: int) -> None:
        """The controller says it last cosigned `size`: start again from there."""
        self.witnessed_size = size

    def status(self) -> dict[str, Any]:
        last = self.log.last_checkpoint()
        return {
            "size": self.log.size,
            "checkpoint_size": last.size if last else 0,
            "witnessed_size": self.witnessed_size,
            "witness_lag_entries": self.log.size - self.witnessed_size,
            "witness_lag_seconds": round(time.time() - self.witnessed_at, 1) if self.witnessed_at else None,
            "witness_error": self.witness_error,
        }

    def export(self, dest: Path, witness_vkey: str | None = None) -> Path:
        extra = [witness_vkey] if witness_vkey else []
        return self.log.export(dest, extra_keys=extra)

    def close(self) -> None:
        if self._queue is not None and self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join(timeout=30)
        self._appender.close()
        self.log.close()


@functools.lru_cache(maxsize=4)
def _second_text(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _now() -> str:
    """UTC now as RFC 3339 with milliseconds, e.g. 2026-11-29T04:05:06.789Z (formatted once a second)."""
    now = time.time()
    second = int(now)
    return f"{_second_text(second)}.{int((now - second) * 1000):03d}Z"
