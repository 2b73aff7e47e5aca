"""Moving the audit outbox into the controller's audit log: in order, durably, exactly once.

Entries of committed changes wait in `audit_outbox` (written in the change's own transaction, see
`controller.audit_trail`). `Outbox.drain` moves them:

1. One pass at a time reads the rows not moved yet (the newest by seq, plus any a waiter names)
   and appends them, in seq order, with one durable write; each entry gets its `seq`.
2. A caller returns once a pass that started after its call has ended: every row it committed
   before calling is then in the log. Concurrent callers share passes (group commit).
3. Moved rows are deleted lazily (at most a second or 1000 rows later), in one transaction that
   also stores the log's size then (`audit_outbox_state.log_size`). Rows moved since are in the
   log at or after that size, each with its seq.
4. `recover` (at start, before the controller serves, and after the log failed) reads the entries
   from that size on, deletes the rows whose seq it finds there (they were moved before a crash),
   and moves the rest. So a row is in the log exactly once.

The order of the log is the order of the seqs, which each transaction draws just before it commits
(after its own writes): a change that waited on another's rows, or read its result, comes after it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence

from sqlalchemy import Connection, delete, func, or_, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine

from audit.entry import canonicalize
from controller.audit_trail import AuditTrail, AuditUnavailable
from controller.config import ConfigError
from controller.db import AuditOutbox, AuditOutboxState

log = logging.getLogger("sitewarden.controller.audit")

_OUTBOX = AuditOutbox.__table__
_STATE = AuditOutboxState.__table__
CLEANUP_EVERY_S = 1.0
CLEANUP_ROWS = 1000
_CHUNK = 500


def _chunks(items: Sequence[int]) -> Iterable[Sequence[int]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def final_entry(seq: int, entry: str) -> bytes:
    """The log entry of outbox row `seq`: its entry with the seq in it (how recovery recognises it)."""
    return canonicalize({**json.loads(entry), "seq": seq})


class Outbox:
    def __init__(self, engine: Engine, trail: AuditTrail) -> None:
        self.engine = engine
        self.trail = trail
        self._cond = threading.Condition()
        self._started = 0
        self._finished = 0
        self._running = False
        self._failed_passes: dict[int, BaseException] = {}
        self._wanted: set[int] = set()
        self._moved: list[int] = []  # moved into the log, not yet deleted
        self._moved_set: set[int] = set()
        self._high = 0  # the highest seq moved
        self._cleaned_at = time.monotonic()
        self._suspect = True  # the log's tail may hold rows not known as moved: `recover` first

    # -- the public operations -----------------------------------------------------------------

    def drain(self, seqs: Sequence[int] = ()) -> None:
        """Return once every row committed before this call, and rows `seqs`, are in the log.

        Raises AuditUnavailable when the pass that was to move them failed (they stay in the
        outbox and are moved once the log can be written).
        """
        with self._cond:
            self._wanted.update(seqs)
            target = self._started + 1  # the first pass to start after this call
            while self._finished < target:
                if not self._running:  # pass `target` has not started: run it
                    self._running = True
                    self._started = target
                    break
                self._cond.wait()
            else:
                self._raise_if_failed(target)
                return
        error: BaseException | None = None
        try:
            self._pass()
        except BaseException as exc:
            error = exc
        with self._cond:
            self._running = False
            self._finished = target
            if error is not None:
                self._failed_passes[target] = error
            for old in [p for p in self._failed_passes if p < target - 1000]:
                del self._failed_passes[old]
            self._cond.notify_all()
            self._raise_if_failed(target)

    def recover(self) -> int:
        """Move whatever the outbox holds (at start, before serving); the number of rows moved.

        ConfigError when the log is behind what the outbox's state says it had (a restored backup).
        """
        self._suspect = True
        try:
            return self._pass(everything=True)
        except AuditUnavailable as exc:
            raise ConfigError(str(exc)) from exc

    def close(self) -> None:
        """Move what is left and delete what was moved (a clean stop leaves recovery nothing to find)."""
        with self._cond:
            while self._running:
                self._cond.wait()
            self._running = True
        try:
            self._pass(everything=True)
        finally:
            with self._cond:
                self._running = False
                self._cond.notify_all()

    def pending(self) -> int:
        """Rows in the outbox not moved yet."""
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(_OUTBOX)).scalar_one()
        return int(total) - len(self._moved_set)

    # -- passes --------------------------------------------------------------------------------

    def _raise_if_failed(self, target: int) -> None:
        error = self._failed_passes.get(target)
        if error is not None:
            raise AuditUnavailable(
                f"the audit log cannot be written ({error}); the change waits in the outbox"
            ) from error

    def _pass(self, everything: bool = False) -> int:
        with self._cond:
            wanted, self._wanted = self._wanted, set()
        try:
            if self._suspect:
                self._reconcile_with_log()
                everything = True
            moved = self._move(wanted, everything)
            if len(self._moved) >= CLEANUP_ROWS or time.monotonic() - self._cleaned_at >= CLEANUP_EVERY_S or everything:
                moved += self._cleanup()
            return moved
        except BaseException:
            with self._cond:
                self._wanted |= wanted
            self._suspect = True  # a failed append may have left some of its records in the log
            raise

    def _select(self, conn: Connection, wanted: set[int], everything: bool) -> list[tuple[int, str]]:
        query = select(_OUTBOX.c.seq, _OUTBOX.c.entry).order_by(_OUTBOX.c.seq)
        if not everything:
            query = query.where(or_(_OUTBOX.c.seq > self._high, _OUTBOX.c.seq.in_(sorted(wanted))))
        return [(int(seq), entry) for seq, entry in conn.execute(query) if seq not in self._moved_set]

    def _move(self, wanted: set[int], everything: bool) -> int:
        with self.engine.connect() as conn:
            rows = self._select(conn, wanted, everything)
        if not rows:
            return 0
        self.trail.append_many([final_entry(seq, entry) for seq, entry in rows])
        seqs = [seq for seq, _ in rows]
        self._moved += seqs
        self._moved_set.update(seqs)
        self._high = max(self._high, seqs[-1])
        return len(rows)

    def _cleanup(self) -> int:
        """Delete moved rows and store the log's size with it; then move stragglers below the high mark."""
        size = self.trail.log.size
        moved = sorted(self._moved)
        with self.engine.begin() as conn:
            for chunk in _chunks(moved):
                conn.execute(delete(_OUTBOX).where(_OUTBOX.c.seq.in_(chunk)))
            insert = postgresql_insert if conn.dialect.name == "postgresql" else sqlite_insert
            conn.execute(
                insert(_STATE)
                .values(id=1, log_size=size)
                .on_conflict_do_update(index_elements=[_STATE.c.id], set_={"log_size": size})
            )
        self._moved, self._moved_set = [], set()
        self._cleaned_at = time.monotonic()
        # Rows committed after a higher seq was moved, that no waiter named (PostgreSQL draws seqs
        # before commit, so commits can finish out of seq order): moved now.
        return self._move(set(), everything=True)

    def _reconcile_with_log(self) -> None:
        """Count rows already in the log (after a crash or a failed write) as moved."""
        with self.engine.connect() as conn:
            recorded = conn.execute(select(_STATE.c.log_size).where(_STATE.c.id == 1)).scalar()
            present = {int(s) for s in conn.execute(select(_OUTBOX.c.seq)).scalars()}
        start = int(recorded or 0)
        log_ = self.trail.log
        if start > log_.size:
            raise AuditUnavailable(
                f"the audit log holds {log_.size} entries, but {start} were in it when the outbox was last "
                "cleaned up: it was restored from an old backup or truncated; refusing to continue"
            )
        found = []
        for raw in log_.iter_entries(start, log_.size):
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            seq = entry.get("seq") if isinstance(entry, dict) and entry.get("type") == "change" else None
            if isinstance(seq, int) and seq in present and seq not in self._moved_set:
                found.append(seq)
        if found:
            log.warning("%d audit entries were in the log already (written before a crash or a failure)", len(found))
            self._moved += found
            self._moved_set.update(found)
            self._high = max(self._high, *found)
        self._suspect = False
