"""The dashboard's queries on real, migrated SQLite and PostgreSQL databases: a site's fleet state in every case,
label and state filters, keyset pages both ways; the audit index following a real `audit.Log`, and
searches by actor, action, resource, outcome and time, paged both ways."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from audit import Log
from audit.note import generate_key
from controller import migrate
from controller.api.schemas import JobInfo
from controller.db import DesiredState, ObservedState, Site, WitnessedCheckpoint, make_engine, make_sessionmaker, utcnow
from controller.ui import audit_index, fleet, history
from controller.ui.routes import jobs as job_routes


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Session]:
    """A migrated database of each kind the controller runs on."""
    if request.param == "postgresql":
        engine = make_engine(request.getfixturevalue("postgres_db_url"))
    else:
        engine = make_engine(f"sqlite:///{tmp_path / 'controller.db'}")
    migrate.upgrade(engine)
    with make_sessionmaker(engine)() as session:
        yield session
    engine.dispose()


def _site(db: Session, name: str, *, status: str = "active", labels: dict[str, str] | None = None) -> Site:
    site = Site(name=name, labels=labels or {"region": "eu"}, status=status)
    db.add(site)
    db.flush()
    return site


def _observe(db: Session, site: Site, version: int, states: dict[str, str], age_s: int = 5) -> None:
    artifacts = {key: {"kind": "model", "state": state, "reason": f"because {state}"} for key, state in states.items()}
    when = utcnow() - timedelta(seconds=age_s)
    db.add(
        ObservedState(
            site_id=site.id,
            desired_version=version,
            artifacts=artifacts,
            agent_version="1.0",
            checkpoint_size=40,
            heartbeat_at=when,
            changed_at=when,
        )
    )


def _desire(db: Session, site: Site, version: int) -> None:
    for v in range(1, version + 1):
        db.add(DesiredState(site_id=site.id, version=v, document={}, sha256="0" * 64))


def test_each_site_gets_the_state_an_operator_acts_on(db: Session) -> None:
    cases = {}
    cases["in-sync"] = _site(db, "a-in-sync")
    _desire(db, cases["in-sync"], 2)
    _observe(db, cases["in-sync"], 2, {"m@1.0.0": "active"})
    cases["behind"] = _site(db, "b-behind")
    _desire(db, cases["behind"], 3)
    _observe(db, cases["behind"], 2, {"m@1.0.0": "active"})
    cases["verifying"] = _site(db, "c-verifying")
    _desire(db, cases["verifying"], 1)
    _observe(db, cases["verifying"], 1, {"m@1.0.0": "verifying"})
    cases["refusing"] = _site(db, "d-refusing")
    _desire(db, cases["refusing"], 1)
    _observe(db, cases["refusing"], 1, {"m@1.0.0": "refused", "p@1.0.0": "active"})
    cases["stale"] = _site(db, "e-stale")
    _observe(db, cases["stale"], 0, {}, age_s=600)
    cases["silent"] = _site(db, "f-silent")
    cases["pending"] = _site(db, "g-pending", status="pending")
    cases["disabled"] = _site(db, "h-disabled", status="disabled")
    _observe(db, cases["disabled"], 0, {"m@1.0.0": "refused"})
    db.add(
        WitnessedCheckpoint(
            site_id=cases["in-sync"].id, origin="o", size=30, root_hash="0" * 64, note="n", cosigned_at=utcnow()
        )
    )
    db.commit()

    rows = {r.name: r for r in fleet.page(db, fleet.Filters()).rows}
    want = {
        "a-in-sync": "in-sync",
        "b-behind": "behind",
        "c-verifying": "behind",
        "d-refusing": "refusing",
        "e-stale": "stale",
        "f-silent": "stale",
        "g-pending": "pending",
        "h-disabled": "disabled",
    }
    assert {name: r.state for name, r in rows.items()} == want
    assert [a.key for a in rows["d-refusing"].refusals] == ["m@1.0.0"]
    assert rows["d-refusing"].refusals[0].reason == "because refused"
    assert rows["a-in-sync"].witness_lag == 10 and rows["a-in-sync"].cosigned_size == 30
    assert rows["b-behind"].desired_version == 3 and rows["b-behind"].observed_version == 2
    counts, _ = fleet.Summary(None, ttl_s=0).counts(db)
    assert counts == {"in-sync": 1, "behind": 2, "refusing": 1, "stale": 2, "pending": 1, "disabled": 1}
    assert [r.name for r in fleet.page(db, fleet.Filters(state="behind")).rows] == ["b-behind", "c-verifying"]


def test_filters_and_keyset_pages_both_ways(db: Session) -> None:
    for i in range(120):
        _site(db, f"site-{i:03d}", labels={"region": "eu" if i % 3 else "us", "tier": "prod"})
    db.commit()
    eu = fleet.Filters.parse("region=eu tier=prod", None)
    first = fleet.page(db, eu, limit=50)
    assert len(first.rows) == 50 and all(r.labels["region"] == "eu" for r in first.rows)
    assert first.prev_before is None and first.next_after == first.rows[-1].name
    second = fleet.page(db, eu, after=first.next_after, limit=50)
    assert second.rows[0].name > first.rows[-1].name and second.next_after is None  # 80 eu sites in all
    back = fleet.page(db, eu, before=second.prev_before, limit=50)
    assert [r.name for r in back.rows] == [r.name for r in first.rows]
    assert fleet.page(db, fleet.Filters.parse("region=mars", None)).rows == []
    for bad in ("region", "Region=eu", "region=eu;drop"):
        with pytest.raises(fleet.BadRequest):
            fleet.Filters.parse(bad, None)
    with pytest.raises(fleet.BadRequest):
        fleet.Filters.parse(None, "exploded")


def test_history_samples_heartbeat_age_and_witness_lag(db: Session) -> None:
    site = _site(db, "sampled")
    _observe(db, site, 0, {}, age_s=30)
    db.add(
        WitnessedCheckpoint(site_id=site.id, origin="o", size=25, root_hash="0" * 64, note="n", cosigned_at=utcnow())
    )
    db.commit()
    now = utcnow()
    assert history.sample(db, now - timedelta(seconds=60)) == 1
    assert history.sample(db, now) == 1
    assert history.sample(db, now - history.KEEP - timedelta(hours=1)) == 1  # older than the 24 hours a chart shows
    series = history.series(db, site.id)
    assert len(series.at) == 2 and series.witness_lag == [15, 15]
    assert 25 <= series.heartbeat_age_s[1] <= 35 and series.heartbeat_age_s[0] < series.heartbeat_age_s[1]


def _request(actor: str, action: str, resource: dict[str, str], result: int, when: datetime) -> bytes:
    event = {
        "type": "request",
        "time": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "actor": actor,
        "kind": "person",
        "role": "operator",
        "action": action,
        "resource": resource,
        "result": result,
        "outcome": "ok" if result < 400 else "refused",
    }
    return json.dumps(event, sort_keys=True).encode()


@pytest.fixture
def log(tmp_path: Path) -> Iterator[Log]:
    skey, _ = generate_key("sitewarden/controller/test")
    opened = Log.open(tmp_path / "audit", skey)
    yield opened
    opened.close()


def test_the_index_follows_the_log_and_searches_by_each_field(db: Session, log: Log) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    entries = []
    for i in range(300):
        actor = ("alice", "bob", "site:branch-1")[i % 3]
        action = "POST /api/v1/rollouts/{rollout}/promote" if i % 2 else "POST /api/v1/sites/{site}/disable"
        resource = {"rollout": f"r{i % 7}"} if i % 2 else {"site": f"s{i % 5}"}
        entries.append(_request(actor, action, resource, 403 if i % 10 == 0 else 200, start + timedelta(minutes=i)))
    entries.append(b"not json")
    entries.append(
        json.dumps(
            {"type": "job.round", "time": "2026-01-01T06:00:00Z", "job": {"id": "j1", "name": "tune"}, "round": 1}
        ).encode()
    )
    log.append_many(entries)
    index = audit_index.AuditIndex(log)
    assert index.catch_up(db) == 302
    assert index.catch_up(db) == 0  # nothing new: nothing re-indexed
    assert audit_index.AuditIndex(log).indexed(db) == 302  # a restarted controller resumes where the index stands

    def find(**query: object) -> audit_index.Results:
        return audit_index.search(db, index, audit_index.Search(**query), limit=20)  # type: ignore[arg-type]

    bob = find(actor="bob")
    assert len(bob.rows) == 20 and all(r.actor == "bob" for r in bob.rows)
    assert [r.idx for r in bob.rows] == sorted((r.idx for r in bob.rows), reverse=True)
    older = audit_index.search(db, index, audit_index.Search(actor="bob"), before=bob.older, limit=20)
    assert older.rows[0].idx < bob.rows[-1].idx
    newer = audit_index.search(db, index, audit_index.Search(actor="bob"), after=older.newer, limit=20)
    assert [r.idx for r in newer.rows] == [r.idx for r in bob.rows]
    by_resource = find(resource="r3")
    assert by_resource.rows and all("rollout=r3" in r.resource for r in by_resource.rows)
    refused = find(outcome="refused", action="POST /api/v1/sites/{site}/disable")
    assert refused.rows and all(r.status == 403 and r.idx % 10 == 0 for r in refused.rows)
    window = find(since=start + timedelta(minutes=100), until=start + timedelta(minutes=109))
    assert sorted(r.idx for r in window.rows) == list(range(100, 110))
    job = find(resource="tune")
    assert [(r.idx, r.actor, r.action) for r in job.rows] == [(301, "controller", "job.round")]
    unreadable = audit_index.describe(300, b"not json")
    assert (unreadable.action, unreadable.actor) == ("unreadable", "unknown")
    assert find(actor="nobody").rows == []


def test_job_charts_carry_every_round_metric_and_the_epsilon_spent() -> None:
    now = datetime.now(UTC)
    rounds = [
        {
            "round": r,
            "sites": ["a", "b"],
            "train": {"train-loss": 0.5 / r},
            "evaluate": {"eval-auc": (80 + r) / 100},
            "epsilon": 0.4 * r,
        }
        for r in (2, 1, 3)
    ]
    info = JobInfo(
        id="j",
        name="tune",
        state="running",
        reason="",
        spec={},
        sites=["a", "b"],
        rounds=rounds,
        epsilon_planned=1.5,
        epsilon_spent=1.2,
        participants=["a", "b"],
        declined={},
        bytes_exchanged=None,
        run_id=None,
        result=None,
        started_at=now,
        ended_at=None,
        created_by="bob",
        created_at=now,
        updated_at=now,
    )
    metrics, epsilon = job_routes._charts(info)
    assert metrics["x"] == [1, 2, 3] and metrics["time"] is False
    assert {s["label"]: s["values"] for s in metrics["series"]} == {
        "evaluate: eval-auc": [0.81, 0.82, 0.83],
        "train: train-loss": [0.5, 0.25, 0.5 / 3],
    }
    assert epsilon["series"][0]["values"] == [0.4, 0.8, 0.4 * 3] and epsilon["series"][1]["values"] == [1.5] * 3
    no_dp = info.model_copy(update={"rounds": [{**r, "epsilon": None} for r in rounds], "epsilon_planned": None})
    assert job_routes._charts(no_dp)[1]["x"] == []  # drawn as "no data" rather than as an empty line
