"""The fleet at a glance: one row per site, its state computed in the database, a page at a time.

A site's state says whether it runs what it should, in the order an operator acts on it:

| state | when |
|---|---|
| `disabled` | an admin disabled the site |
| `pending` | created, not enrolled yet |
| `stale` | no status report within `rollouts.HEARTBEAT_FRESH` (or never) |
| `refusing` | it refused or failed an artifact (the reasons are shown) |
| `behind` | it reports an older desired version, or an artifact still downloading or verifying |
| `in-sync` | it reports the current desired version and every artifact active |

One query reads a page: sites joined with their observed state, their current desired state
(the newest version, by a correlated lookup on the primary key), the rollout that owns it and
the checkpoint the witness last cosigned; the state is a SQL `CASE`, so filtering by state and by
label (`labels` JSON) happens in the database and a page costs the same at 5 or 5,000 sites.
Pages are keyset-paginated by site name. The per-state counts over the whole fleet are one
grouped query, kept for `SUMMARY_TTL_S` so that 16 people polling the fleet page do not each
count 5,000 sites every two seconds.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Text, and_, bindparam, case, cast, func, literal, or_, select
from sqlalchemy.orm import Session, aliased

from controller.db import DesiredState, ObservedState, Rollout, Site, WitnessedCheckpoint, utcnow
from controller.errors import BadRequest
from controller.rollouts import HEARTBEAT_FRESH
from controller.sites import LABEL_KEY, LABEL_VALUE

STATES = ("in-sync", "behind", "refusing", "stale", "pending", "disabled")
PAGE_SIZE = 50
SUMMARY_TTL_S = 2.0
STALE_AFTER_S = 6.0  # counts older than this (nobody asked for a while) are taken again before answering
MAX_LABEL_FILTERS = 8


def _has_state(column: Any, *states: str) -> Any:
    """Whether an observed `artifacts` document holds an artifact in one of `states`.

    The column holds the JSON text SQLAlchemy wrote (`"state": "refused"`, same on SQLite and
    PostgreSQL's `json`), so a text match finds it without parsing every row's document.
    """
    text = cast(column, Text)
    return or_(*(text.like(f'%"state": "{state}"%') for state in states))


@dataclass(frozen=True)
class Filters:
    labels: dict[str, str] = field(default_factory=dict)
    state: str | None = None

    @classmethod
    def parse(cls, label: str | None, state: str | None) -> Filters:
        """Filters from the page's query: `label` as `k=v` pairs separated by commas or spaces."""
        labels: dict[str, str] = {}
        for pair in (label or "").replace(",", " ").split():
            key, sep, value = pair.partition("=")
            if not sep or not LABEL_KEY.fullmatch(key) or not LABEL_VALUE.fullmatch(value):
                raise BadRequest(f"label filter {pair[:100]!r} must be key=value, as in region=eu-west")
            labels[key] = value
        if len(labels) > MAX_LABEL_FILTERS:
            raise BadRequest(f"at most {MAX_LABEL_FILTERS} label filters")
        if state and state not in STATES:
            raise BadRequest(f"state {state[:50]!r} must be one of {', '.join(STATES)}")
        return cls(labels, state or None)

    def query(self) -> dict[str, str]:
        out = {}
        if self.labels:
            out["label"] = " ".join(f"{k}={v}" for k, v in self.labels.items())
        if self.state:
            out["state"] = self.state
        return out


@dataclass(frozen=True)
class Artifact:
    key: str
    kind: str
    state: str
    reason: str


@dataclass(frozen=True)
class FleetRow:
    id: str
    name: str
    labels: dict[str, str]
    state: str
    agent_version: str | None
    heartbeat_at: datetime | None
    runs: list[Artifact]
    observed_version: int | None
    desired_version: int | None
    rollout: str | None
    should_run: list[str]
    audit_size: int | None
    cosigned_size: int | None
    cosigned_at: datetime | None

    @property
    def refusals(self) -> list[Artifact]:
        return [a for a in self.runs if a.state in ("refused", "failed")]

    @property
    def witness_lag(self) -> int | None:
        """Entries of the site's log not yet cosigned by the witness."""
        if self.audit_size is None:
            return None
        return max(0, self.audit_size - (self.cosigned_size or 0))


@dataclass(frozen=True)
class FleetPage:
    rows: list[FleetRow]
    next_after: str | None
    prev_before: str | None
    at: datetime


@functools.cache
def _statement() -> tuple[Any, Any]:
    """The fleet's SELECT (state last) and its state expression, built once: `:stale_before` is bound per query."""
    current = (
        select(func.max(DesiredState.version)).where(DesiredState.site_id == Site.id).correlate(Site).scalar_subquery()
    )
    desired = aliased(DesiredState)
    joined = (
        Site.__table__.outerjoin(ObservedState, ObservedState.site_id == Site.id)
        .outerjoin(desired, and_(desired.site_id == Site.id, desired.version == current))
        .outerjoin(Rollout, Rollout.id == desired.rollout_id)
        .outerjoin(WitnessedCheckpoint, WitnessedCheckpoint.site_id == Site.id)
    )
    stale_before = bindparam("stale_before", type_=ObservedState.heartbeat_at.type)
    state = case(
        (Site.status == "disabled", literal("disabled")),
        (Site.status == "pending", literal("pending")),
        (or_(ObservedState.site_id.is_(None), ObservedState.heartbeat_at < stale_before), literal("stale")),
        (_has_state(ObservedState.artifacts, "refused", "failed"), literal("refusing")),
        (
            or_(
                and_(desired.version.is_not(None), ObservedState.desired_version < desired.version),
                _has_state(ObservedState.artifacts, "pending", "downloading", "verifying"),
            ),
            literal("behind"),
        ),
        else_=literal("in-sync"),
    ).label("state")
    statement = select(
        Site.id,
        Site.name,
        Site.labels,
        ObservedState.agent_version,
        ObservedState.heartbeat_at,
        ObservedState.artifacts,
        ObservedState.desired_version,
        ObservedState.checkpoint_size,
        desired.version,
        Rollout.name,
        Rollout.spec,
        WitnessedCheckpoint.size,
        WitnessedCheckpoint.cosigned_at,
        state,
    ).select_from(joined)
    return statement, state


def _where(filters: Filters, state: Any) -> list[Any]:
    clauses = [Site.labels[key].as_string() == value for key, value in filters.labels.items()]
    if filters.state:
        clauses.append(state.element == filters.state)
    return clauses


def _should_run(spec: dict[str, Any] | None) -> list[str]:
    if not spec:
        return []
    names = [f"{r['name']}@{r['version']}" for r in spec.get("releases", [])]
    if spec.get("policy"):
        names.append(f"{spec['policy']['name']}@{spec['policy']['version']}")
    return names


def _row(r: Any) -> FleetRow:
    artifacts = r[5] or {}
    runs = [
        Artifact(key, a.get("kind", ""), a.get("state", ""), a.get("reason", ""))
        for key, a in sorted(artifacts.items())
    ]
    return FleetRow(
        id=r[0],
        name=r[1],
        labels=r[2] or {},
        agent_version=r[3],
        heartbeat_at=r[4],
        runs=runs,
        observed_version=r[6],
        audit_size=r[7],
        desired_version=r[8],
        rollout=r[9],
        should_run=_should_run(r[10]),
        cosigned_size=r[11],
        cosigned_at=r[12],
        state=r[13],
    )


def page(
    db: Session,
    filters: Filters,
    *,
    after: str | None = None,
    before: str | None = None,
    limit: int = PAGE_SIZE,
    now: datetime | None = None,
) -> FleetPage:
    """One page of the fleet, by site name: the first, the one after `after`, or the one before `before`."""
    now = now or utcnow()
    statement, state = _statement()
    query = statement.where(*_where(filters, state))
    if before is not None:
        query = query.where(Site.name < before).order_by(Site.name.desc())
    else:
        if after is not None:
            query = query.where(Site.name > after)
        query = query.order_by(Site.name)
    params = {"stale_before": now - HEARTBEAT_FRESH}
    # Core execution on the session's connection: rows as tuples, without the ORM's loading machinery.
    found = [_row(r) for r in db.connection().execute(query.limit(limit + 1), params)]
    more = len(found) > limit
    found = found[:limit]
    if before is not None:
        found.reverse()
        next_after = found[-1].name if found else None
        prev_before = found[0].name if more and found else None
    else:
        next_after = found[-1].name if more and found else None
        prev_before = found[0].name if after is not None and found else None
    return FleetPage(found, next_after, prev_before, now)


def row(db: Session, site_id: str, now: datetime | None = None) -> FleetRow | None:
    """One site's row (its state as the fleet page computes it)."""
    now = now or utcnow()
    statement, _ = _statement()
    found = (
        db.connection().execute(statement.where(Site.id == site_id), {"stale_before": now - HEARTBEAT_FRESH}).first()
    )
    return _row(found) if found is not None else None


class Summary:
    """Sites per state over the whole fleet, recounted at most every `ttl_s` seconds.

    The first count is taken in the request that asks; later ones in a background thread while the
    requests that ask meanwhile get the previous count (with its time, at most `STALE_AFTER_S` old),
    so a page that polls never waits for it. After a quiet spell the count is taken again at once.
    """

    def __init__(self, sessions: Callable[[], Session] | None = None, ttl_s: float = SUMMARY_TTL_S) -> None:
        self.sessions = sessions
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._counts: dict[str, int] | None = None
        self._at = 0.0
        self._counted_at = utcnow()
        self._refreshing = False

    @staticmethod
    def _count(db: Session) -> tuple[dict[str, int], datetime]:
        now = utcnow()
        statement, state = _statement()
        # Grouped over a subquery: PostgreSQL would not see two renderings of the CASE as the same expression.
        states = select(state).select_from(statement.get_final_froms()[0]).subquery()
        counting = select(states.c.state, func.count()).group_by(states.c.state)
        rows = db.connection().execute(counting, {"stale_before": now - HEARTBEAT_FRESH})
        return {s: 0 for s in STATES} | {s: int(n) for s, n in rows}, now

    def _refresh(self) -> None:
        try:
            assert self.sessions is not None
            with self.sessions() as db:
                counts, at = self._count(db)
            with self._lock:
                self._counts, self._counted_at, self._at = counts, at, time.monotonic()
        finally:
            self._refreshing = False

    def counts(self, db: Session) -> tuple[dict[str, int], datetime]:
        with self._lock:
            age = time.monotonic() - self._at
            recent = self._counts is not None and age <= STALE_AFTER_S
            if recent and (age <= self.ttl_s or self._refreshing):
                return dict(self._counts), self._counted_at  # type: ignore[arg-type]
            if recent and self.sessions is not None:
                self._refreshing = True
                threading.Thread(target=self._refresh, name="fleet-summary", daemon=True).start()
                return dict(self._counts), self._counted_at
        counts, at = self._count(db)
        with self._lock:
            self._counts, self._counted_at, self._at = counts, at, time.monotonic()
        return dict(counts), at
