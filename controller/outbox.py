"""Moving the audit outbox into the controller's audit log: in order, durably, exactly once.

Entries of committed changes wait in `audit_outbox` (written in the change's own transaction, see
`controller.audit_trail`). `Outbox.drain` moves them:

1. Rows written by this process are known by seq and entry from the moment their transaction
   draws them (`drawn`, just before the commit) and are ready to move once it has committed
   (`settled`); a rolled-back transaction's are forgotten. A pass takes the ready rows from
   memory, with no query; it reads the database only for a drawn row with a lower seq than one
   it moves (committed meanwhile or not: the database says, so that a row comes after those
   committed before it), for a waiter's row it does not hold, and for everything else
   (`drain()` without seqs, recovery, the clean-up's sweep). A row is moved by one path only: a
   row read from the database is forgotten from memory, and one settled after that is ignored.
   Each pass appends its rows in seq order with one durable write; each entry gets its `seq`.
2. A caller returns once a pass that started after its call has ended: every row it committed
   before calling, and every row committed before those, is then in the log (for `drain()`
   without seqs, every row in the outbox). Concurrent callers share passes (group commit).
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

from sqlalchemy import Connection, delete, func, select
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
        self._from_memory = False  # the running pass reads nothing from the database (`move_now`)
        self._left: set[int] = set()  # passes from memory that left their rows to `drain`
        self._everything = False  # a waiter asked for every committed row, this process's or not
        self._drawn: dict[int, str] = {}  # written in a transaction not known to have ended
        self._ready: dict[int, str] = {}  # committed, not moved yet
        self._moved: list[int] = []  # moved into the log, not yet deleted
        self._moved_set: set[int] = set()
        self._cleaned_at = time.monotonic()
        self._suspect = True  # the log's tail may hold rows not known as moved: `recover` first

    # -- the public operations -----------------------------------------------------------------

    def drawn(self, rows: Sequence[tuple[int, str]]) -> None:
        """Rows (seq, entry) just written into the outbox by a transaction of this process, before its commit."""
        with self._cond:
            self._drawn.update(rows)

    def settled(self, rows: Sequence[tuple[int, str]], committed: bool) -> None:
        """The transaction that wrote `rows` ended: committed rows are ready to move, rolled-back ones forgotten.

        A row no longer drawn was read from the database by a pass meanwhile (moved, or being
        moved): it is not taken again. Entries are compared by identity, so that a seq that
        SQLite drew again after a rollback is not mistaken for the earlier one.
        """
        with self._cond:
            for seq, entry in rows:
                if self._drawn.get(seq) is entry:
                    del self._drawn[seq]
                    if committed:
                        self._ready[seq] = entry

    def drain(self, seqs: Sequence[int] = ()) -> None:
        """Return once rows `seqs`, and the rows committed before this call that precede them, are in the log.

        With `seqs`: those, every row this process had settled, and every row committed with a
        lower seq (this process's from memory, a drawn one's commit checked in the database).
        Without: every row in the outbox (read from the database). Raises AuditUnavailable when
        the pass that was to move them failed (they stay in the outbox and are moved once the
        log can be written).
        """
        with self._cond:
            self._wanted.update(seqs)
            if not seqs:
                self._everything = True
            while True:
                target = self._started + 1  # the first pass to start after this call
                while self._finished < target:
                    if not self._running:  # pass `target` has not started: run it
                        self._running = True
                        self._from_memory = False
                        self._started = target
                        break
                    self._cond.wait()
                else:
                    if target in self._left:  # a pass from memory left what it could not move: another
                        continue
                    self._raise_if_failed(target)
                    return
                break
        error: BaseException | None = None
        try:
            self._pass()
        except BaseException as exc:
            error = exc
        self._finish(target, error)
        with self._cond:
            self._raise_if_failed(target)

    def move_now(self) -> bool:
        """Move the rows this process has settled, if that needs no query; whether they are in the log.

        For a thread that may hold locks others wait for while holding database connections or
        locks (a route's, right after its commit): it waits only for passes of this kind, which
        read nothing from the database, and leaves the rows (returning False) to `drain` when a
        pass that may (a lower seq drawn and not settled, a waiter's row not in memory, a log to
        reconcile, a sweep asked for) is due or running.
        """
        with self._cond:
            target = self._started + 1
            while self._finished < target:
                if not self._running:
                    self._running = True
                    self._from_memory = True
                    self._started = target
                    break
                if not self._from_memory:
                    return False
                self._cond.wait()
            else:
                return target not in self._left and target not in self._failed_passes
        error: BaseException | None = None
        moved: int | None = None
        try:
            moved = self._pass(from_memory=True)
        except BaseException as exc:
            error = exc
        self._finish(target, error, left=moved is None)
        return moved is not None and error is None

    def _finish(self, target: int, error: BaseException | None, left: bool = False) -> None:
        with self._cond:
            self._running = False
            self._finished = target
            if error is not None:
                self._failed_passes[target] = error
            if left:
                self._left.add(target)
            for old in [p for p in self._failed_passes if p < target - 1000]:
                del self._failed_passes[old]
            self._left -= {p for p in self._left if p < target - 1000}
            self._cond.notify_all()

    def recover(self) -> int:
        """Move whatever the outbox holds (at start, before serving); the number of rows moved.

        ConfigError when the log is behind what the outbox's state says it had (a restored backup).
        """
        self._suspect = True
        try:
            return self._pass(everything=True) or 0
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

    def _pass(self, everything: bool = False, from_memory: bool = False) -> int | None:
        """Move rows; with `from_memory`, None (and nothing done) when that would need the database."""
        with self._cond:
            if from_memory and (self._suspect or self._everything):
                return None
            wanted, self._wanted = self._wanted, set()
            everything, self._everything = everything or self._everything, False
        try:
            if self._suspect:
                self._reconcile_with_log()
                everything = True
            moved = self._move(wanted, everything, from_memory)
            if moved is None:
                with self._cond:
                    self._wanted |= wanted
                return None
            if from_memory:
                return moved  # the clean-up writes to the database: left to a pass that may wait
            if len(self._moved) >= CLEANUP_ROWS or time.monotonic() - self._cleaned_at >= CLEANUP_EVERY_S or everything:
                moved += self._cleanup()
            return moved
        except BaseException:
            with self._cond:
                self._wanted |= wanted
                self._everything |= everything
            self._suspect = True  # a failed append may have left some of its records in the log
            raise

    def _take(self, wanted: set[int], everything: bool) -> tuple[dict[int, str], list[int] | None]:
        """The ready rows, and what to read from the database: seqs, or None for every row."""
        with self._cond:
            ready, self._ready = self._ready, {}
        if everything:
            return ready, None
        top = max((*ready, *wanted), default=0)
        look = {seq for seq in wanted if seq not in ready and seq not in self._moved_set}
        with self._cond:  # drawn before a row moved now: perhaps committed, the database says
            look.update(seq for seq in self._drawn if seq < top)
        return ready, sorted(look)

    def _select(self, conn: Connection, look: list[int] | None) -> dict[int, str]:
        query = select(_OUTBOX.c.seq, _OUTBOX.c.entry)
        if look is None:
            return {int(seq): entry for seq, entry in conn.execute(query)}
        found: dict[int, str] = {}
        for chunk in _chunks(look):
            found.update((int(seq), entry) for seq, entry in conn.execute(query.where(_OUTBOX.c.seq.in_(chunk))))
        return found

    def _move(self, wanted: set[int], everything: bool, from_memory: bool = False) -> int | None:
        ready, look = self._take(wanted, everything)
        if from_memory and (look is None or look):
            with self._cond:
                self._ready.update(ready)
            return None
        try:
            found: dict[int, str] = {}
            if look is None or look:
                with self.engine.connect() as conn:
                    found = self._select(conn, look)
                with self._cond:  # read from the database: moved by this pass, never again from memory
                    for seq in found:
                        self._drawn.pop(seq, None)
                        self._ready.pop(seq, None)
            rows = sorted((seq, entry) for seq, entry in {**ready, **found}.items() if seq not in self._moved_set)
            if rows:
                self.trail.append_many([final_entry(seq, entry) for seq, entry in rows])
        except BaseException:
            with self._cond:  # still to move (what the failed write left in the log, `recover` finds)
                self._ready.update(ready)
            raise
        if not rows:
            return 0
        seqs = [seq for seq, _ in rows]
        self._moved += seqs
        self._moved_set.update(seqs)
        return len(rows)

    def _cleanup(self) -> int:
        """Delete moved rows and store the log's size with it; then move whatever else the outbox holds."""
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
        # Rows this process does not hold in memory: written by another process on the same database,
        # or committed (PostgreSQL draws seqs before commit) after a higher seq was moved and read
        # from the database before their transaction settled: moved now.
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
        self._suspect = False
