"""The site's audit log: every request, decision, refusal and activation, before the response leaves.

Entries are RFC 8785 JSON in an `audit.Log` whose checkpoints the site key signs under the
origin `sitewarden/<site-id>`. Digests of regulated content are HMAC-SHA256 with the
site's secret, so that low-entropy inputs cannot be guessed back from the log; raw
content is not logged. Checkpoints are signed every N entries or T seconds and sent to
the controller to be witnessed; while the controller is away the log keeps growing and
the lag (entries and seconds since the last cosigned checkpoint) is visible.

When the log cannot write (a full disk, an I/O error), the site does not answer without
audit. The failure is one state, entered once and left once, each logged once:

- requests are refused (`AuditUnavailable`, which the server answers 503 with the reason
  and `Retry-After`), readiness says not ready, status and metrics show the reason;
- the agent's own events (sync, training, witnessing) are kept in memory, in order, and the
  entries of acknowledged requests in `async` mode too: nothing is lost;
- `recover()` (called every second by the daemon), once the file system has some room again
  (`RECOVERY_HEADROOM_BYTES`), closes the failed log, opens it again
  (which cuts a torn last record), checks its tail for entries of the failed writes that did
  reach the disk (they are not written twice), and appends what was kept plus one
  `audit.outage` entry that says when, why, how many requests were refused, and which
  stored entries belong to requests that were answered 503. The first append that succeeds
  ends the failure, without a restart.

In `async` mode entries go through a bounded queue: a full queue refuses the request.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from agent.config import AuditSettings
from agent.errors import AuditUnavailable
from agent.identity import DataDir, Identity
from audit import Log, LogError
from audit.aio import AsyncAppender
from audit.checkpoint import parse as parse_checkpoint
from audit.entry import canonicalize
from audit.note import Signer, note_text
from sitewarden import witnessing
from sitewarden.files import write_atomically

log = logging.getLogger("sitewarden.agent")

_STOP = object()
ASYNC_QUEUE_MAX = 10_000  # entries waiting for the writer in async mode; a full queue refuses requests
PENDING_MAX = 100_000  # entries kept in memory while the log cannot write
RECOVER_MIN_S, RECOVER_MAX_S = 1.0, 10.0
# Free space the log's file system must have before the log is tried again: a disk that had
# just a torn record's worth freed would fail again at once, and the state would flap.
RECOVERY_HEADROOM_BYTES = 1 << 20


class SiteAudit:
    def __init__(self, data: DataDir, identity: Identity, settings: AuditSettings) -> None:
        self.data = data
        self.identity = identity
        self.settings = settings
        self._signer = Signer.from_ed25519(identity.origin, data.site_key())
        self.vkey = self._signer.vkey
        self.log = Log.open(data.audit_dir, self._signer)
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
        # The failure state: guarded by `_state`; `failure` is read without it on the hot path.
        self._state = threading.Lock()
        self._recovering = threading.Lock()
        self.failure: str | None = None
        self._cause = ""  # the error that started the failure (what the reason names)
        self.failing_since: float | None = None
        self._durable_before = 0  # the log's size when it failed: entries after it are the tail to check
        self._pending: list[bytes] = []  # entries to write once the log can write again, in order
        self._attempts: list[bytes] = []  # outage entries of recovery attempts that failed (may be in the tail)
        self.refused_requests = 0  # requests refused during the current failure
        self.dropped = 0  # kept entries beyond PENDING_MAX (reported in the outage entry)
        self.write_failures = 0  # entries whose write failed since start (kept or refused; metrics and alerts)
        self.refused_total = 0
        self._next_attempt = 0.0
        self._attempt_delay = RECOVER_MIN_S
        self._queue: queue.Queue[Any] | None = None
        self._writer: threading.Thread | None = None
        if settings.mode == "async":
            self._queue = queue.Queue(maxsize=ASYNC_QUEUE_MAX)
            self._writer = threading.Thread(target=self._write_queued, name="audit-writer", daemon=True)
            self._writer.start()

    # -- recording ---------------------------------------------------------------------------

    def digest(self, data: bytes) -> str:
        """HMAC-SHA256 of regulated content with the site secret (hex)."""
        return hmac.digest(self._secret, data, hashlib.sha256).hex()

    def entry(self, event: dict[str, Any]) -> bytes:
        return canonicalize({"time": _now(), "site": self.identity.site_id, **event})

    @property
    def writable(self) -> bool:
        return self.failure is None

    def check_writable(self) -> None:
        """Raise `AuditUnavailable` while the log cannot write: a request is refused before it runs."""
        failure = self.failure
        if failure is not None:
            self._refused()
            raise AuditUnavailable(f"the site's audit log cannot write: {failure}", self.retry_after_s())

    def record(self, event: dict[str, Any]) -> int | None:
        """Append one of the agent's own events; its index once durable (None in async mode, or while
        the log cannot write: the event is kept and written when it can). Never raises for a failed write."""
        data = self.entry(event)
        if self._queue is not None:
            self._queue.put(data)  # the writer drains the queue even while failing (into what is kept)
            return None
        if self._kept_if_failing([data]):
            return None
        try:
            return self.log.append(data)
        except (LogError, OSError) as exc:
            self.write_failures += 1
            self._failed(exc, [data])
            return None

    async def record_async(self, event: dict[str, Any]) -> int | None:
        """Append a request's entry: its index once durable (None in async mode), or `AuditUnavailable`."""
        self.check_writable()
        data = self.entry(event)
        if self._queue is not None:
            try:
                self._queue.put_nowait(data)
            except queue.Full:
                self._refused()
                raise AuditUnavailable(
                    f"the audit queue is full ({ASYNC_QUEUE_MAX} entries waiting for the disk)", 1
                ) from None
            return None
        appender = self._appender
        try:
            return await appender.append(data)
        except (LogError, OSError) as exc:
            self.write_failures += 1
            self._failed(exc, [])  # the request is refused: its entry is not kept
            self._refused()
            raise AuditUnavailable(f"the site's audit log cannot write: {self.failure}", self.retry_after_s()) from exc

    def _write_queued(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            batch = [item]
            while not self._queue.empty() and len(batch) < 4096:
                batch.append(self._queue.get_nowait())
            stop = _STOP in batch
            entries = [b for b in batch if b is not _STOP]
            if entries and not self._kept_if_failing(entries):
                try:
                    self.log.append_many(entries)
                except (LogError, OSError) as exc:
                    self.write_failures += len(entries)
                    self._failed(exc, entries)  # acknowledged already: kept, written after recovery
            if stop:
                return

    # -- failure and recovery ----------------------------------------------------------------

    def _kept_if_failing(self, entries: list[bytes]) -> bool:
        """Keep `entries` for after recovery if the log is failing; whether they were kept. Decided
        under the state lock, so that a recovery either sees them or has already ended."""
        with self._state:
            if self.failure is None:
                return False
            room = PENDING_MAX - len(self._pending)
            self._pending += entries[:room]
            self.dropped += max(0, len(entries) - room)
            return True

    def _refused(self) -> None:
        with self._state:
            self.refused_requests += 1
            self.refused_total += 1

    def _failed(self, exc: BaseException, entries: list[bytes]) -> None:
        with self._state:
            room = PENDING_MAX - len(self._pending)
            self._pending += entries[:room]
            self.dropped += max(0, len(entries) - room)
            if self.failure is not None:
                return
            self.failure = self._cause = f"{exc.__class__.__name__}: {exc}"
            self.failing_since = time.time()
            self._durable_before = self.log.size
            self._attempt_delay = RECOVER_MIN_S
            self._next_attempt = time.monotonic() + RECOVER_MIN_S
        log.error("the audit log cannot write; refusing requests until it can: %s", self.failure)

    def retry_after_s(self) -> int:
        return max(1, round(self._next_attempt - time.monotonic()))

    def recover(self) -> bool:
        """When failing and due, reopen the log and write what was kept; True when the log writes again."""
        if self.failure is None:
            return True
        if time.monotonic() < self._next_attempt or not self._recovering.acquire(blocking=False):
            return False
        try:
            return self._recover()
        finally:
            self._recovering.release()

    def _recover(self) -> bool:
        try:
            stats = os.statvfs(self.data.audit_dir)
        except OSError as exc:
            return self._still_failing(exc)
        free = stats.f_bavail * stats.f_frsize
        if free < RECOVERY_HEADROOM_BYTES:
            return self._still_failing(None, f"{free} bytes free, waiting for {RECOVERY_HEADROOM_BYTES}")
        old, old_appender = self.log, self._appender
        with contextlib.suppress(LogError, OSError):  # `Log.close` releases its files whatever happens
            old.close()
        try:
            reopened = Log.open(self.data.audit_dir, self._signer)
        except (LogError, OSError) as exc:
            return self._still_failing(exc)
        with self._state:
            # Entries of the failed writes that reached the disk after all: the log's tail.
            tail = reopened.entries(self._durable_before, reopened.size) if reopened.size > self._durable_before else []
            stored = collections.Counter(tail)
            pending = []
            for data in self._pending:
                if stored[data]:
                    stored[data] -= 1
                else:
                    pending.append(data)
            kept_set = collections.Counter([*self._pending, *self._attempts])
            answered_503 = [self._durable_before + i for i, data in enumerate(tail) if not _take(kept_set, data)]
            outage = {
                "type": "audit.outage",
                "reason": self._cause,
                "since": _rfc3339(self.failing_since or time.time()),
                "refused_requests": self.refused_requests,
                "kept_entries": len(self._pending),
                "stored_before_failure_reported": len(tail),
                "answered_503": answered_503[:1000],
                "dropped_entries": self.dropped,
                "recovered_bytes": reopened.recovered_bytes,
            }
            outage_entry = self.entry(outage)
            self._attempts.append(outage_entry)
            try:
                reopened.append_many([*pending, outage_entry])
            except (LogError, OSError) as exc:
                with contextlib.suppress(LogError, OSError):
                    reopened.close()
                self.log = reopened  # closed: appends keep failing until the next attempt
                return self._still_failing(exc, locked=True)
            self.log = reopened
            self._appender = AsyncAppender(reopened)
            since = self.failing_since
            self.failure, self.failing_since = None, None
            self._pending, self._attempts, self.refused_requests, self.dropped = [], [], 0, 0
        old_appender.close()
        log.warning(
            "the audit log writes again after %.0f s; %d kept entries written, outage recorded",
            time.time() - (since or time.time()),
            len(pending),
        )
        return True

    def _still_failing(self, exc: BaseException | None, note: str = "", *, locked: bool = False) -> bool:
        def update() -> None:
            cause = f"{exc.__class__.__name__}: {exc}" if exc is not None else self._cause
            self._cause = cause
            self.failure = f"{cause} ({note})" if note else cause
            self._attempt_delay = min(self._attempt_delay * 2, RECOVER_MAX_S)
            self._next_attempt = time.monotonic() + self._attempt_delay

        if locked:
            update()
        else:
            with self._state:
                update()
        return False

    # -- checkpoints and witnessing ----------------------------------------------------------

    def checkpoint_due(self) -> bool:
        if self.failure is not None:
            return False
        unsigned = self.log.size - self._signed_size
        elapsed = time.monotonic() - self._signed_at
        return unsigned >= self.settings.checkpoint_entries or (
            unsigned > 0 and elapsed >= self.settings.checkpoint_seconds
        )

    def checkpoint(self) -> str:
        with self._checkpoint_lock:
            signed = self.log.checkpoint()
            # The size the checkpoint covers, not the log's size now: entries appended while it was
            # signed are not in it, and counting them as signed would leave them out of every later
            # checkpoint until the next request comes.
            self._signed_size = parse_checkpoint(note_text(signed)).size
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
        size = self.log.size
        return {
            "writable": self.failure is None,
            "error": self.failure or "",
            "failing_since": _rfc3339(self.failing_since) if self.failing_since else None,
            "refused_requests": self.refused_requests,
            "kept_entries": len(self._pending),
            "queued": self._queue.qsize() if self._queue is not None else 0,
            "size": size,
            "checkpoint_size": last.size if last else 0,
            "witnessed_size": self.witnessed_size,
            "witness_lag_entries": size - self.witnessed_size,
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
        try:
            self.log.close()
        except (LogError, OSError) as exc:
            log.error("closing the audit log failed: %s", exc)


def _take(counter: collections.Counter[bytes], data: bytes) -> bool:
    if counter[data]:
        counter[data] -= 1
        return True
    return False


def _rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@functools.lru_cache(maxsize=4)
def _second_text(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _now() -> str:
    """UTC now as RFC 3339 with milliseconds, e.g. 2026-11-29T04:05:06.789Z (formatted once a second)."""
    now = time.time()
    second = int(now)
    return f"{_second_text(second)}.{int((now - second) * 1000):03d}Z"
