"""Status reports on SQLite and PostgreSQL: one upsert stores the observed state and tells a change.

`changed_at` (and so the audit of a report, and how long canaries have been healthy) moves only
when the desired version or the artifacts differ from what the site last reported; the comparison
is done by the database in the upsert itself, with no read before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from controller import migrate
from controller.api.agent import record_status
from controller.db import ObservedState, Site, make_engine, make_sessionmaker, utcnow
from sitewarden.wire import ArtifactState, StatusReport
from tests.conftest import BACKENDS


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'c.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_db_url")
    made = make_engine(url)
    migrate.upgrade(made)
    yield made
    made.dispose()


@pytest.fixture
def site_id(engine: Engine) -> str:
    with make_sessionmaker(engine)() as db:
        site = Site(name="branch-1", labels={}, status="active")
        db.add(site)
        db.commit()
        return site.id


def _artifact(name: str, version: str = "1.0.0", state: str = "active", reason: str = "") -> ArtifactState:
    return ArtifactState(name=name, version=version, kind="model", state=state, reason=reason)  # type: ignore[arg-type]


def _report(*artifacts: ArtifactState, desired: int = 1, checkpoint: int = 0) -> StatusReport:
    return StatusReport(
        desired_version=desired, agent_version="1.0", checkpoint_size=checkpoint, artifacts=list(artifacts)
    )


class Reports:
    def __init__(self, engine: Engine, site_id: str) -> None:
        self.engine, self.site_id = engine, site_id
        self.now = utcnow()

    def send(self, report: StatusReport) -> bool:
        self.now += timedelta(seconds=5)
        with self.engine.begin() as conn:
            return record_status(conn, self.site_id, report, self.now)

    def stored(self) -> ObservedState:
        with make_sessionmaker(self.engine)() as db:
            observed = db.scalar(select(ObservedState).where(ObservedState.site_id == self.site_id))
            assert observed is not None
            return observed


@pytest.fixture
def reports(engine: Engine, site_id: str) -> Reports:
    return Reports(engine, site_id)


def test_the_first_report_is_a_change_and_is_stored(reports: Reports) -> None:
    assert reports.send(_report(_artifact("fraud"), checkpoint=7))
    stored = reports.stored()
    assert stored.desired_version == 1 and stored.checkpoint_size == 7 and stored.agent_version == "1.0"
    assert stored.artifacts == {"fraud@1.0.0": {"kind": "model", "state": "active", "reason": ""}}
    assert stored.changed_at == stored.heartbeat_at == reports.now


def test_a_heartbeat_moves_the_heartbeat_but_not_changed_at(reports: Reports) -> None:
    reports.send(_report(_artifact("fraud"), _artifact("churn")))
    first = reports.stored()
    assert not reports.send(_report(_artifact("fraud"), _artifact("churn"), checkpoint=42))
    second = reports.stored()
    assert second.changed_at == first.changed_at
    assert second.heartbeat_at == reports.now > first.heartbeat_at
    assert second.checkpoint_size == 42  # stored, but not a change in what the site runs


def test_the_same_artifacts_in_another_order_are_no_change(reports: Reports) -> None:
    reports.send(_report(_artifact("fraud"), _artifact("churn")))
    assert not reports.send(_report(_artifact("churn"), _artifact("fraud")))


def _changes() -> dict[str, StatusReport]:
    return {
        "desired version": _report(_artifact("fraud"), _artifact("churn"), desired=2),
        "artifact state": _report(_artifact("fraud", state="failed", reason="bad digest"), _artifact("churn")),
        "artifact version": _report(_artifact("fraud", version="1.1.0"), _artifact("churn")),
        "artifact gone": _report(_artifact("fraud")),
        "artifact added": _report(_artifact("fraud"), _artifact("churn"), _artifact("aml")),
    }


@pytest.mark.parametrize("change", list(_changes()))
def test_a_change_in_what_the_site_runs_moves_changed_at(reports: Reports, change: str) -> None:
    reports.send(_report(_artifact("fraud"), _artifact("churn")))
    before: datetime = reports.stored().changed_at
    assert reports.send(_changes()[change])
    assert reports.stored().changed_at == reports.now > before
    assert not reports.send(_changes()[change])  # and the same report again is none
