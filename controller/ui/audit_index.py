"""A search index of the controller's audit log, kept in the database beside the log it follows.

The log (`audit.Log`) stays the record: append-only, signed, provable. The index is derived from
it and can always be rebuilt: `catch_up` reads the entries past the last one indexed (one disk
read per batch), parses them and inserts one row each (`audit_index`: time, actor, role, action,
outcome, a readable resource) plus the names of the resources they touch (`audit_index_terms`),
in batches of `BATCH` entries per transaction. The index never runs ahead of the log and never
slows an append: it is caught up by a background task every `CATCH_UP_S` seconds and before each
search, so a search sees every entry durable when it started (a search indexes at most
`SEARCH_CATCH_UP` entries itself: after an upgrade, the background fills the index of an old log
while the page says how far it has come).

Searches filter by actor, action, outcome and resource name (exact matches, each served by an
index ordered by entry number) and by time, newest first, keyset-paginated by entry number.
Time bounds become entry-number bounds first: entries are appended in time order, give or take
the moments between stamping and appending, so any entry stamped `TIME_SKEW` before the lower
bound (after the upper bound) limits the range of entry numbers to scan, and the exact time
filter does the rest. A page therefore reads about one page of rows whatever the log's size.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from audit import Log
from controller.db import AuditIndexEntry, AuditIndexTerm, dialect_insert

BATCH = 5000
CATCH_UP_S = 2.0
SEARCH_CATCH_UP = 5000  # a search indexes at most this many new entries itself; the background does the rest
PAGE_SIZE = 50
TIME_SKEW = timedelta(hours=1)
MAX_TERMS = 24
TERM_KEYS = frozenset(
    {"name", "id", "site", "site_id", "site_name", "rollout", "job", "job_id", "token_id", "key_id", "approver"}
)
_TERM_MAX = 200
_ENTRIES = AuditIndexEntry.__table__
_TERMS = AuditIndexTerm.__table__


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _terms(event: dict[str, Any]) -> Iterator[str]:
    """Names of the resources an entry touches: its `resource` values, strings under well-known keys and the
    `name`, `id` and `name@version` of the records it carries, two levels down."""
    resource = event.get("resource")
    if isinstance(resource, dict):
        yield from (v for v in resource.values() if isinstance(v, str))
    for key, value in event.items():
        if key == "resource":
            continue
        if isinstance(value, str):
            if key in TERM_KEYS:
                yield value
        elif isinstance(value, dict):
            yield from _record_terms(value)
            for inner in value.values():
                if isinstance(inner, dict):
                    yield from _record_terms(inner)
                elif isinstance(inner, list):
                    for item in inner[:50]:
                        if isinstance(item, dict):
                            yield from _record_terms(item)


def _record_terms(record: dict[str, Any]) -> Iterator[str]:
    name, version = record.get("name"), record.get("version")
    if isinstance(name, str) and isinstance(version, str):
        yield f"{name}@{version}"
    for key in TERM_KEYS:
        value = record.get(key)
        if isinstance(value, str):
            yield value


@dataclass(frozen=True)
class Indexed:
    """What the index keeps of an entry (and what a result row shows)."""

    idx: int
    at: datetime | None
    actor: str
    role: str | None
    action: str
    resource: str
    outcome: str | None
    status: int | None
    terms: tuple[str, ...]


def describe(idx: int, entry: bytes) -> Indexed:
    """The index row of one entry; an entry that is not a JSON object is indexed as `unreadable`."""
    try:
        event = json.loads(entry)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        return Indexed(idx, None, "unknown", None, "unreadable", "", None, None, ())
    kind = event.get("type")
    action = event.get("action") if kind == "request" else kind
    resource_node = event.get("resource")
    if isinstance(resource_node, dict):
        resource = ", ".join(f"{k}={v}" for k, v in resource_node.items())
    else:
        parts = []
        for key, value in event.items():
            if key in {"type", "time", "actor", "kind", "role"}:
                continue
            if isinstance(value, dict) and isinstance(value.get("name"), str):
                parts.append(f"{key}={value['name']}")
            elif isinstance(value, str) and key in TERM_KEYS:
                parts.append(f"{key}={value}")
        resource = ", ".join(parts)
    terms = tuple(dict.fromkeys(t[:_TERM_MAX] for t in _terms(event) if t))[:MAX_TERMS]
    result = event.get("result")
    return Indexed(
        idx=idx,
        at=_time(event.get("time")),
        actor=str(event.get("actor") or "controller")[:200],
        role=event.get("role") if isinstance(event.get("role"), str) else None,
        action=str(action or "unknown")[:300],
        resource=resource[:1000],
        outcome=event.get("outcome") if isinstance(event.get("outcome"), str) else None,
        status=result if isinstance(result, int) else None,
        terms=terms,
    )


class AuditIndex:
    """Follows one `audit.Log` into the database's `audit_index` tables."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self._lock = threading.Lock()
        self._next: int | None = None

    def indexed(self, db: Session) -> int:
        """How many entries are indexed (entries 0 to n-1)."""
        if self._next is None:
            last = db.scalar(select(func.max(AuditIndexEntry.idx)))
            self._next = 0 if last is None else int(last) + 1
        return self._next

    def catch_up(self, db: Session, limit: int | None = None) -> int:
        """Index every durable entry not indexed yet (at most `limit`); returns how many it indexed."""
        with self._lock:
            start = self.indexed(db)
            end = self.log.size if limit is None else min(self.log.size, start + limit)
            insert = dialect_insert(db)
            entries = insert(_ENTRIES).on_conflict_do_nothing(index_elements=["idx"])
            terms = insert(_TERMS).on_conflict_do_nothing(index_elements=["term", "idx"])
            for lo in range(start, end, BATCH):
                hi = min(lo + BATCH, end)
                described = [describe(lo + i, entry) for i, entry in enumerate(self.log.entries(lo, hi))]
                conn = db.connection()  # each batch is its own transaction (a commit gives the connection back)
                conn.execute(
                    entries,
                    [
                        {
                            "idx": d.idx,
                            "at": d.at,
                            "actor": d.actor,
                            "role": d.role,
                            "action": d.action,
                            "resource": d.resource,
                            "outcome": d.outcome,
                            "status": d.status,
                        }
                        for d in described
                    ],
                )
                named = [{"term": t, "idx": d.idx} for d in described for t in d.terms]
                if named:
                    conn.execute(terms, named)
                db.commit()
                self._next = hi
            return end - start


@dataclass(frozen=True)
class Search:
    """A search of the controller's log; every field is optional."""

    actor: str | None = None
    action: str | None = None
    resource: str | None = None
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def query(self) -> dict[str, str]:
        out = {k: v for k, v in (("actor", self.actor), ("action", self.action), ("resource", self.resource)) if v}
        if self.outcome:
            out["outcome"] = self.outcome
        if self.since:
            out["since"] = self.since.strftime("%Y-%m-%dT%H:%M")
        if self.until:
            out["until"] = self.until.strftime("%Y-%m-%dT%H:%M")
        return out


@dataclass(frozen=True)
class Results:
    rows: list[AuditIndexEntry]
    older: int | None  # pass as `before` for the next (older) page
    newer: int | None  # pass as `after` for the previous (newer) page
    indexed: int


def _bounds(db: Session, search: Search) -> list[Any]:
    """Entry-number bounds from the time bounds (see the module doc), then the exact time filters."""
    clauses: list[Any] = []
    if search.since is not None:
        below = db.scalar(
            select(AuditIndexEntry.idx)
            .where(AuditIndexEntry.at < search.since - TIME_SKEW)
            .order_by(AuditIndexEntry.at.desc(), AuditIndexEntry.idx.desc())
            .limit(1)
        )
        if below is not None:
            clauses.append(AuditIndexEntry.idx > below)
        clauses.append(AuditIndexEntry.at >= search.since)
    if search.until is not None:
        above = db.scalar(
            select(AuditIndexEntry.idx)
            .where(AuditIndexEntry.at > search.until + TIME_SKEW)
            .order_by(AuditIndexEntry.at, AuditIndexEntry.idx)
            .limit(1)
        )
        if above is not None:
            clauses.append(AuditIndexEntry.idx < above)
        clauses.append(AuditIndexEntry.at <= search.until)
    return clauses


def search(
    db: Session,
    index: AuditIndex,
    q: Search,
    *,
    before: int | None = None,
    after: int | None = None,
    limit: int = PAGE_SIZE,
) -> Results:
    """A page of matching entries, newest first: the newest, those older than `before`, or newer than `after`."""
    index.catch_up(db, limit=SEARCH_CATCH_UP)
    query = select(AuditIndexEntry)
    key = AuditIndexEntry.idx
    if q.resource:
        query = query.join(AuditIndexTerm, AuditIndexTerm.idx == AuditIndexEntry.idx).where(
            AuditIndexTerm.term == q.resource
        )
        key = AuditIndexTerm.idx  # ordered by the terms' primary key (term, idx)
    for column, value in ((AuditIndexEntry.actor, q.actor), (AuditIndexEntry.action, q.action)):
        if value:
            query = query.where(column == value)
    if q.outcome:
        query = query.where(AuditIndexEntry.outcome == q.outcome)
    query = query.where(*_bounds(db, q))
    if after is not None:
        rows = list(db.scalars(query.where(key > after).order_by(key).limit(limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit][::-1]
        newer = rows[0].idx if more and rows else None
        older = rows[-1].idx if rows else None
    else:
        if before is not None:
            query = query.where(key < before)
        rows = list(db.scalars(query.order_by(key.desc()).limit(limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit]
        older = rows[-1].idx if more and rows else None
        newer = rows[0].idx if before is not None and rows else None
    return Results(rows, older, newer, index.indexed(db))


def terms_of(db: Session, idx: int) -> list[str]:
    return list(db.scalars(select(AuditIndexTerm.term).where(AuditIndexTerm.idx == idx).order_by(AuditIndexTerm.term)))
