"""The controller's audit trail: every state change, every refusal and every background action, in
the controller's own `audit.Log` (origin `sitewarden/controller/<name>`, signed with its audit key),
complete by construction.

How a change gets its entry (what every state-changing service function does):

1. Change the state through a SQLAlchemy `Session`, and call `record(session, <Change>)` with the
   typed record of what changed (`controller.changes`) before `session.commit()`. For work on a bare
   `Connection` (the agent's status reports), `record_on(conn, change)` inserts at once. A record
   with a "before" reads it from `locked(session, row)`, so that concurrent changes chain.
2. Just before the commit, the entry (who, with which role, through which route or background step,
   the request id, the change) is written into the `audit_outbox` table in the same transaction: the
   change and its entry commit together or not at all, and nothing is in the database without its
   entry. A rolled-back transaction takes its entries with it: the log never records a rolled-back
   change.
3. After the commit, `controller.outbox.Outbox` moves outbox rows into the log, in order, durably,
   before the response leaves: on the route's worker thread right after the commit, and what is
   left (a commit on the event loop, a move that failed) by the `RequestRecorder` of
   `controller.app`, which holds the answer until it is done; background work (no request) waits
   in its own thread. After a crash, `Runtime.open` moves what is left before
   the controller serves.

Who acts comes from the context: the `RequestRecorder` sets it for each HTTP request (the REST API
and the dashboard alike), `acting(...)` for background work (actor `controller`). A new
state-changing route needs (a) a typed record in `controller.changes`, recorded by the service
function it calls, and (b) its line in `controller.changes.ROUTES`; the route walk test fails
without both.

Requests that change nothing (refusals 401/403/404/409/422, failures with the exception's class)
are appended directly by the recorder. Refusals of callers without valid credentials are limited per
client address (`RefusalLimiter`): past a burst, one entry counts the rest. Entries are bounded by
construction (`bounded_entry`): no client-controlled field can make one too large to write.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sqlalchemy import Column, Connection, Update, bindparam, event, insert, inspect, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapper, Session, SessionTransaction
from sqlalchemy.orm.attributes import set_committed_value
from starlette.concurrency import run_in_threadpool

from audit import Log, LogError
from audit.aio import AsyncAppender
from audit.entry import canonicalize
from controller import access
from controller.changes import Change
from controller.db import AuditOutbox
from controller.errors import Unavailable
from sitewarden.telemetry import current_trace_id

log = logging.getLogger("sitewarden.controller.audit")

CHECKPOINT_EVERY_ENTRIES = 1000
CHECKPOINT_EVERY_S = 10.0
# Entries stay well under the log's 65,535 bytes: the outbox adds `seq`, and nothing else grows them.
ENTRY_LIMIT = 48 * 1024
MAX_TEXT = 512  # characters of any one string from outside
MAX_ITEMS = 500  # items of any one list or object
MAX_DEPTH = 8
_SAFE_INTEGER = 2**53 - 1
# A log that wrote nothing for this long is probed (one synced write) before a state change is let in.
PROBE_AFTER_S = 1.0
RECOVER_EVERY_S = 1.0

_OUTBOX = AuditOutbox.__table__
_INSERT_ROWS = insert(_OUTBOX).returning(_OUTBOX.c.seq)
_Row = TypeVar("_Row")


class AuditUnavailable(Unavailable):
    """The audit log cannot be written: state changes are refused until it can."""


# -- bounded entries ---------------------------------------------------------------------------


def clip(value: Any, depth: int = 0) -> Any:
    """`value` as plain JSON with every string, list and object cut to a fixed size (cuts are marked)."""
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            value = f"{value[:MAX_TEXT]}…[{len(value) - MAX_TEXT} more characters]"
        try:
            value.encode()
        except UnicodeEncodeError:  # a lone surrogate (JSON lets a client send one): not encodable text
            value = value.encode("utf-8", "replace").decode()
        return value
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) <= _SAFE_INTEGER else str(value)  # JSON's exact integers end at 2^53
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no NaN or infinity
    if depth >= MAX_DEPTH:
        return "…[nested too deep]"
    if isinstance(value, dict):
        items = list(value.items())
        out = {clip(str(k)): clip(v, depth + 1) for k, v in items[:MAX_ITEMS]}
        if len(items) > MAX_ITEMS:
            out["…"] = f"{len(items) - MAX_ITEMS} more"
        return out
    if isinstance(value, (list, tuple)):
        out_list = [clip(v, depth + 1) for v in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            out_list.append(f"…[{len(value) - MAX_ITEMS} more]")
        return out_list
    return clip(str(value), depth)


def bounded_entry(event: dict[str, Any]) -> bytes:
    """The RFC 8785 bytes of an entry (with its time), at most `ENTRY_LIMIT` bytes whatever it holds.

    Every value is clipped (`clip`); if the entry is still too large, each top-level value over
    1 KiB (a long change record, say) is replaced by its size and SHA-256, so that what remains
    is a bounded number of bounded fields.
    """
    entry = clip({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **event})
    data = canonicalize(entry)
    if len(data) <= ENTRY_LIMIT:
        return data
    for key, value in list(entry.items()):
        part = canonicalize({"v": value})
        if len(part) > 1024:
            entry[key] = {
                "omitted": "too large for one audit entry",
                "bytes": len(part) - 6,
                "sha256": hashlib.sha256(part[5:-1]).hexdigest(),
                **({"kind": value["kind"]} if isinstance(value, dict) and isinstance(value.get("kind"), str) else {}),
            }
    data = canonicalize(entry)
    assert len(data) <= ENTRY_LIMIT, "bounded_entry: fixed-size fields exceeded the limit"
    return data


# -- request ids -------------------------------------------------------------------------------

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
GIVEN_ID_LIMIT = 128


def request_id(given: bytes | None) -> tuple[str, dict[str, Any] | None]:
    """The id a request goes by, and what the client gave when it was refused.

    A client's `X-Request-ID` is taken when it is 1-128 characters of `[A-Za-z0-9._-]`; otherwise
    the controller uses its own id and records the given value truncated and marked.
    """
    if given is None:
        return uuid.uuid4().hex, None
    text = given.decode("latin-1")
    if _REQUEST_ID.fullmatch(text):
        return text, None
    refused = {"value": text[:GIVEN_ID_LIMIT], "length": len(given), "truncated": len(text) > GIVEN_ID_LIMIT}
    return uuid.uuid4().hex, refused


# -- who acts ----------------------------------------------------------------------------------


@dataclass
class Actor:
    """Who acts and through what, for the entries of the changes made meanwhile (background work)."""

    actor: str = "controller"
    kind: str = "controller"
    role: str | None = None
    action: str = "background"

    def fields(self) -> dict[str, Any]:
        return {"actor": self.actor, "kind": self.kind, "role": self.role, "action": self.action}

    def committed(self, seqs: list[int]) -> bool:
        """Take outbox rows committed in this context; False when the caller must move them itself."""
        return False


@dataclass
class RequestActor(Actor):
    """The caller of an HTTP request, read from its ASGI scope when an entry is made.

    The principal is known only once the access dependency has run, and the route once routing
    has: both are read when a change is recorded, from the scope's state.
    """

    scope: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""
    given_id: dict[str, Any] | None = None
    seqs: list[int] = field(default_factory=list)
    unmoved: list[int] = field(default_factory=list)  # committed, not yet known to be in the log
    finished: bool = False

    def fields(self) -> dict[str, Any]:
        principal = self.scope.get("state", {}).get("principal")
        role = getattr(principal, "role", None)
        method = self.scope.get("method", "")
        route = getattr(self.scope.get("route"), "path", self.scope.get("path", ""))
        via = None
        if self.scope.get("path", "").startswith("/ui"):
            # A dashboard action is recorded as the REST call it makes (`access.UI_SAME_AS`).
            method, route = access.UI_SAME_AS.get((method, route), (method, route))
            via = "dashboard"
        client = self.scope.get("client")
        out = {
            "actor": getattr(principal, "audit_name", "anonymous"),
            "kind": getattr(principal, "kind", "anonymous"),
            "role": getattr(role, "value", role),
            "action": f"{method} {route}",
            "resource": {k: str(v) for k, v in self.scope.get("path_params", {}).items()},
            "request_id": self.request_id,
            "trace_id": current_trace_id(),
            "client": client[0] if client else None,
        }
        if self.given_id is not None:
            out["request_id_given"] = self.given_id
        if via is not None:
            out["via"] = via
        return out

    def committed(self, seqs: list[int]) -> bool:
        if self.finished:  # a task that outlived its request: moved like background work
            return False
        self.seqs.extend(seqs)
        self.unmoved.extend(seqs)
        return True

    def moved(self, seqs: list[int]) -> None:
        done = set(seqs)
        self.unmoved[:] = [seq for seq in self.unmoved if seq not in done]


_current: ContextVar[Actor | None] = ContextVar("sitewarden_audit_actor", default=None)
_BACKGROUND = Actor()


def current() -> Actor:
    return _current.get() or _BACKGROUND


@contextlib.contextmanager
def acting(action: str, actor: str = "controller", kind: str = "controller") -> Iterator[Actor]:
    """Changes recorded inside are attributed to `actor` (by default the controller itself) doing `action`."""
    who = Actor(actor=actor, kind=kind, action=action)
    token = _current.set(who)
    try:
        yield who
    finally:
        _current.reset(token)


@contextlib.contextmanager
def serving(who: RequestActor) -> Iterator[None]:
    token = _current.set(who)
    try:
        yield
    finally:
        _current.reset(token)


# -- recording changes -------------------------------------------------------------------------


class Mover(Protocol):
    def drawn(self, rows: Sequence[tuple[int, str]]) -> None: ...

    def settled(self, rows: Sequence[tuple[int, str]], committed: bool) -> None: ...

    def drain(self, seqs: Sequence[int] = ()) -> None: ...

    def move_now(self) -> bool: ...


_PENDING = "sitewarden.audit.pending"
_INSERTED = "sitewarden.audit.inserted"
CONNECTION_ROWS = "sitewarden.audit.connection_rows"
_movers: dict[Engine, Mover] = {}
_unaudited: set[Engine] = set()


def bind(engine: Engine, mover: Mover) -> None:
    """Background commits on `engine` move their entries into the log with `mover` at once."""
    _movers[engine] = mover


def unbind(engine: Engine) -> None:
    _movers.pop(engine, None)
    _unaudited.discard(engine)


def disable_for_benchmark(engine: Engine) -> None:
    """Record nothing for `engine`: for `bench/audit_trail_bench.py`'s baseline only, never in a controller."""
    _unaudited.add(engine)


def entry_for(change: Change) -> str:
    """The entry of `change` as the current actor makes it (RFC 8785 text, bounded)."""
    event = {"type": "change", **current().fields(), "outcome": "ok", "change": change.to_json()}
    return bounded_entry(event).decode()


def locked(session: Session, row: _Row) -> _Row:
    """`row` read again under its write lock, so that a change record's "before" is what the change replaces.

    A no-op UPDATE of the row takes the lock in the session's transaction (PostgreSQL locks the row,
    SQLite its database) and returns the row as it is under the lock, which replaces what the
    session held (as `Session.refresh` would, in one statement): concurrent changes of one row
    queue behind each other, and their records chain, each one's "before" the previous one's "after".
    """
    if session.get_bind() in _unaudited:
        return row
    state = inspect(row)
    lock = _row_lock(state.mapper)
    key = dict(zip(lock.keys, state.identity or (), strict=True))
    if lock.columns is None:  # loaded from more than its table: the ORM reloads it
        session.execute(lock.statement, key)
        session.refresh(row)
        return row
    current = session.connection().execute(lock.statement, key).one()._mapping
    session.expire(row)  # as a refresh does: unflushed changes dropped, relationships loaded again when read
    for name, col in lock.columns:
        set_committed_value(row, name, current[col])
    return row


@dataclass(frozen=True)
class _RowLock:
    keys: tuple[str, ...]  # bind parameter names, in primary key order
    statement: Update  # the no-op UPDATE of one row by its primary key (returning it, with `columns`)
    columns: tuple[tuple[str, Column[Any]], ...] | None  # attributes and their columns, if all from `table`


@functools.cache
def _row_lock(mapper: Mapper[Any]) -> _RowLock:
    """How `locked` takes and reads a row of `mapper`'s class (built once per class)."""
    table = mapper.local_table
    primary = list(table.primary_key.columns)
    keys = tuple(f"locked_{c.name}" for c in primary)
    where = [c == bindparam(k) for c, k in zip(primary, keys, strict=True)]
    statement = update(table).where(*where).values({primary[0].name: primary[0]})
    plain = mapper.persist_selectable is table and all(
        len(p.columns) == 1 and p.columns[0].table is table for p in mapper.column_attrs
    )
    if not plain:
        return _RowLock(keys, statement, None)
    columns = tuple((p.key, p.columns[0]) for p in mapper.column_attrs)
    return _RowLock(keys, statement.returning(*table.c), columns)


def record(session: Session, change: Change) -> None:
    """Record `change` in the session's transaction: written to the outbox just before it commits."""
    if session.get_bind() in _unaudited:
        return
    session.info.setdefault(_PENDING, []).append(entry_for(change))


def _insert(conn: Connection, entries: list[str]) -> list[tuple[int, str]]:
    """Write `entries` into the outbox in `conn`'s transaction; their rows (seq, entry), told to the mover."""
    seqs = conn.execute(_INSERT_ROWS, [{"entry": entry} for entry in entries]).scalars().all()
    rows = list(zip(seqs, entries, strict=True))
    mover = _movers.get(conn.engine)
    if mover is not None:
        mover.drawn(rows)
    return rows


def record_on(conn: Connection, change: Change) -> None:
    """Record `change` in a bare connection's transaction, now. Whoever ends it calls `committed` or `abandoned`.

    The rows are kept in `conn.info[CONNECTION_ROWS]`; `controller.api.deps.in_site_transaction`
    passes them on once its transaction has ended.
    """
    if conn.engine in _unaudited:
        return
    conn.info.setdefault(CONNECTION_ROWS, []).extend(_insert(conn, [entry_for(change)]))


def committed(engine: Engine, rows: Sequence[tuple[int, str]]) -> None:
    """Outbox rows (seq, entry) committed: the request moves them before it answers, background work now."""
    if not rows:
        return
    mover = _movers.get(engine)
    if mover is not None:
        mover.settled(rows, committed=True)
    seqs = [seq for seq, _ in rows]
    who = current()
    if who.committed(seqs):  # a request moves them before it answers
        if mover is not None and isinstance(who, RequestActor) and _may_block() and mover.move_now():
            # Moved on the route's worker thread, now (the caller may hold locks: `move_now` never
            # waits on the database). Otherwise the request's recorder moves them before it answers.
            who.moved(seqs)
        return
    if mover is None:
        return  # no controller serves this database here: moved when one starts
    try:
        mover.drain(seqs)
    except Exception:  # the rows are safe in the outbox; the next drain moves them
        log.exception("audit entries of a background change could not be moved into the log yet")


def _may_block() -> bool:
    """Whether this thread may wait for the log: not an event loop's."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return True
    return False


def abandoned(engine: Engine, rows: Sequence[tuple[int, str]]) -> None:
    """Outbox rows (seq, entry) whose transaction did not commit: rolled back with it, nothing to move."""
    mover = _movers.get(engine)
    if rows and mover is not None:
        mover.settled(rows, committed=False)


@event.listens_for(Session, "before_commit")
def _write_outbox(session: Session) -> None:
    pending = session.info.pop(_PENDING, None)
    if not pending:
        return
    # The change's own writes go first, so that its row locks are held before the entry's seq is
    # drawn: a transaction that waited on another's rows draws a larger seq (commit order).
    session.flush()
    session.info.setdefault(_INSERTED, []).extend(_insert(session.connection(), pending))


@event.listens_for(Session, "after_commit")
def _moved_after_commit(session: Session) -> None:
    rows = session.info.pop(_INSERTED, None)
    if rows:
        committed(session.get_bind(), rows)


@event.listens_for(Session, "after_transaction_end")
def _forget(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the outermost transaction ended without a commit: nothing happened
        session.info.pop(_PENDING, None)
        rows = session.info.pop(_INSERTED, None)
        if rows:
            abandoned(session.get_bind(), rows)


# -- refusals of callers without credentials ---------------------------------------------------


@dataclass
class _Bucket:
    tokens: float
    at: float
    suppressed: int = 0
    first: float = 0.0
    last: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    actions: dict[str, int] = field(default_factory=dict)


class RefusalLimiter:
    """Refusals of anonymous callers, limited per client address before they reach the log.

    Each address may have `burst` refusals recorded one by one, refilled at `per_minute`; past
    that they are counted, and `flush` writes one entry per address with the count, the statuses
    and the actions (at most one per `window_s` while the flood lasts). At most `addresses` are
    tracked; the oldest is flushed to make room.
    """

    def __init__(self, burst: int = 20, per_minute: float = 10.0, window_s: float = 60.0, addresses: int = 4096):
        self.burst = burst
        self.rate = per_minute / 60.0
        self.window_s = window_s
        self.addresses = addresses
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def allow(
        self, client: str, status: int, action: str, now: float | None = None
    ) -> tuple[bool, list[dict[str, Any]]]:
        """Whether this refusal is recorded on its own, and summary entries of evicted addresses to write."""
        now = time.monotonic() if now is None else now
        evicted: list[dict[str, Any]] = []
        with self._lock:
            bucket = self._buckets.get(client)
            if bucket is None:
                while len(self._buckets) >= self.addresses:
                    old_client, old = self._buckets.popitem(last=False)
                    if old.suppressed:
                        evicted.append(self._summary(old_client, old))
                bucket = self._buckets[client] = _Bucket(float(self.burst), now)
            else:
                self._buckets.move_to_end(client)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return True, evicted
            if not bucket.suppressed:
                bucket.first = now
            bucket.suppressed += 1
            bucket.last = now
            key = str(status)
            bucket.statuses[key] = bucket.statuses.get(key, 0) + 1
            if action in bucket.actions or len(bucket.actions) < 20:
                bucket.actions[action] = bucket.actions.get(action, 0) + 1
            return False, evicted

    def flush(self, now: float | None = None, everything: bool = False) -> list[dict[str, Any]]:
        """Summary entries of the floods that paused or have lasted `window_s` (or all of them)."""
        now = time.monotonic() if now is None else now
        out = []
        with self._lock:
            for client, bucket in list(self._buckets.items()):
                if bucket.suppressed and (
                    everything or now - bucket.last >= 5.0 or now - bucket.first >= self.window_s
                ):
                    out.append(self._summary(client, bucket))
                    bucket.suppressed, bucket.statuses, bucket.actions = 0, {}, {}
                elif not bucket.suppressed and bucket.tokens + (now - bucket.at) * self.rate >= self.burst:
                    del self._buckets[client]  # full again: forget it
        return out

    @staticmethod
    def _summary(client: str, bucket: _Bucket) -> dict[str, Any]:
        return {
            "type": "request.refusals",
            "actor": "anonymous",
            "kind": "anonymous",
            "client": client,
            "count": bucket.suppressed,
            "seconds": round(bucket.last - bucket.first, 3),
            "statuses": dict(bucket.statuses),
            "actions": dict(bucket.actions),
            "outcome": "refused",
            "note": "refusals of callers without valid credentials past the per-address limit, counted",
        }


# -- the log -----------------------------------------------------------------------------------


class AuditTrail:
    """The controller's `audit.Log`: appends, health, checkpoints.

    After a failed write the log refuses further appends (its page cache cannot be trusted);
    `ensure_writable` reopens it, which recovers what is durable, and probes it with a synced
    write. State changes are let in only while the log is known to take writes.
    """

    def __init__(self, log: Log, directory: Path | None = None, key_path: Path | None = None) -> None:
        self.log = log
        self._directory = directory
        self._key_path = key_path
        self._appender = AsyncAppender(log)
        self._lock = threading.Lock()
        self._health = threading.Lock()
        last = log.last_checkpoint()
        self._signed_size = last.size if last else 0
        self._signed_at = time.monotonic()
        self._last_ok = time.monotonic()
        self._last_recovery = 0.0
        self.failure: str | None = None
        self.limiter = RefusalLimiter()
        self.published: str | None = log.signed_checkpoint
        """The latest checkpoint shown to anyone: kept (`keep`) before it is, so that a site's
        cosignature of it always finds it."""
        self.keep: Callable[[str], None] | None = None
        self.on_published: Callable[[str], None] | None = None
        self.reopened: list[Callable[[Log], None]] = []  # readers holding the log follow a reopen

    @classmethod
    def open(cls, directory: Path, key_path: Path) -> AuditTrail:
        return cls(Log.open(directory, key_path), directory, key_path)

    # -- appending ---------------------------------------------------------------------------

    def record(self, event: dict[str, Any]) -> int:
        """Append one entry now (durable when it returns): for what is not a database change."""
        return self.append_many([bounded_entry(event)])[0]

    async def record_async(self, event: dict[str, Any]) -> int:
        """`record` for the event loop: waits for durability without holding a thread."""
        try:
            index = await self._appender.append(bounded_entry(event))
        except LogError as exc:
            self._failed(exc)
            raise
        self._last_ok = time.monotonic()
        return index

    def append_many(self, entries: Sequence[bytes]) -> list[int]:
        """Append entries in order, durably (the outbox's moves go through here)."""
        try:
            indices = self.log.append_many(entries)
        except LogError as exc:
            self._failed(exc)
            raise
        self._last_ok = time.monotonic()
        return indices

    def _failed(self, exc: Exception) -> None:
        if self.failure is None:
            log.error("the audit log failed: %s; state changes are refused until it can be written", exc)
        self.failure = str(exc)

    # -- health ------------------------------------------------------------------------------

    @property
    def fresh(self) -> bool:
        return self.failure is None and time.monotonic() - self._last_ok < PROBE_AFTER_S

    async def ready(self) -> None:
        """Raise AuditUnavailable unless the log takes writes (probed when it has been idle)."""
        if not self.fresh:
            await run_in_threadpool(self.ensure_writable)

    def ensure_writable(self) -> None:
        """Probe an idle log, reopen a failed one (at most once a second); AuditUnavailable if it cannot write."""
        with self._health:
            if self.fresh:
                return
            if self.failure is not None:
                if time.monotonic() - self._last_recovery < RECOVER_EVERY_S:
                    raise AuditUnavailable(f"the audit log cannot be written ({self.failure}); nothing was changed")
                self._last_recovery = time.monotonic()
                self._reopen()
            try:
                self.log.probe()
            except LogError as exc:
                self._failed(exc)
                raise AuditUnavailable(f"the audit log cannot be written ({exc}); nothing was changed") from exc
            self.failure = None
            self._last_ok = time.monotonic()

    def _reopen(self) -> None:
        if self._directory is None or self._key_path is None:
            return
        try:
            self.log.close()
        except Exception:  # a failed log may fail to close cleanly; its files are released either way
            log.exception("closing the failed audit log")
        try:
            reopened = Log.open(self._directory, self._key_path)
        except Exception as exc:
            self._failed(exc)
            raise AuditUnavailable(f"the audit log cannot be reopened: {exc}") from exc
        self._appender.close()
        self.log = reopened
        self._appender = AsyncAppender(reopened)
        for follow in self.reopened:
            follow(reopened)
        log.warning(
            "the audit log was reopened after a failure (%d bytes of a torn write cut)", reopened.recovered_bytes
        )

    # -- checkpoints -------------------------------------------------------------------------

    @property
    def checkpoint_size(self) -> int:
        """The size of the latest published checkpoint."""
        return self._signed_size

    def checkpoint(self) -> str:
        """Sign a checkpoint of everything recorded so far; kept, then published."""
        with self._lock:
            signed = self.log.checkpoint()
            if self.keep is not None:
                self.keep(signed)
            self.published = signed
            self._signed_size = self.log.last_checkpoint().size  # type: ignore[union-attr]
            self._signed_at = time.monotonic()
        if self.on_published is not None:
            self.on_published(signed)
        return signed

    def checkpoint_if_due(self) -> str | None:
        """Sign when enough entries or enough time have gone by since the last checkpoint."""
        unsigned = self.log.size - self._signed_size
        if unsigned >= CHECKPOINT_EVERY_ENTRIES or (
            unsigned and time.monotonic() - self._signed_at >= CHECKPOINT_EVERY_S
        ):
            return self.checkpoint()
        return None

    def flush_refusals(self, everything: bool = False) -> None:
        for summary in self.limiter.flush(everything=everything):
            self.record(summary)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.flush_refusals(everything=True)
        self._appender.close()
        self.log.close()
