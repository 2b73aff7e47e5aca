"""Heartbeat and witness-lag history of every site, sampled for the site page's chart.

Status reports overwrite a site's observed state (the agent channel's hot path stays one upsert),
so history is kept by sampling: every `SAMPLE_EVERY_S` seconds one `INSERT … SELECT` copies, for
every enrolled site, the age of its last heartbeat, the size of its audit log (as it last
reported) and the size the witness last cosigned into `site_samples`; samples older than
`KEEP` are deleted in the same step. At 5,000 sites that is 5,000 rows a minute and at most
`KEEP / SAMPLE_EVERY_S` rows per site (1,440 for a day); a site's chart reads its own rows by
the primary key (site, time), so its cost does not grow with the fleet.

`SITEWARDEN_UI_SAMPLE_SECONDS` overrides the interval (tests sample every second).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import BigInteger, cast, delete, func, insert, literal, select
from sqlalchemy.orm import Session

from controller.db import ObservedState, Site, SiteSample, WitnessedCheckpoint, utcnow

SAMPLE_EVERY_S = float(os.environ.get("SITEWARDEN_UI_SAMPLE_SECONDS", "60"))
KEEP = timedelta(hours=24)


def sample(db: Session, now: datetime | None = None) -> int:
    """Take one sample of every enrolled site and drop the samples past `KEEP`; returns rows written."""
    now = (now or utcnow()).replace(microsecond=0)
    if db.get_bind().dialect.name == "sqlite":
        age = cast(
            (func.julianday(literal(now.strftime("%Y-%m-%d %H:%M:%S"))) - func.julianday(ObservedState.heartbeat_at))
            * 86400,
            BigInteger,
        )
    else:
        age = cast(func.extract("epoch", literal(now) - ObservedState.heartbeat_at), BigInteger)
    source = (
        select(Site.id, literal(now, SiteSample.at.type), age, ObservedState.checkpoint_size, WitnessedCheckpoint.size)
        .select_from(Site)
        .join(ObservedState, ObservedState.site_id == Site.id)
        .outerjoin(WitnessedCheckpoint, WitnessedCheckpoint.site_id == Site.id)
        .where(Site.status == "active")
    )
    columns = ["site_id", "at", "heartbeat_age_s", "checkpoint_size", "witnessed_size"]
    # RETURNING counts the rows on both databases (PostgreSQL's rowcount of INSERT … SELECT is not kept).
    written = len(db.execute(insert(SiteSample).from_select(columns, source).returning(SiteSample.site_id)).all())
    db.execute(delete(SiteSample).where(SiteSample.at < now - KEEP))
    db.commit()
    return written


@dataclass(frozen=True)
class Series:
    """A site's samples as columns, oldest first: what uPlot draws."""

    at: list[int]  # Unix seconds
    heartbeat_age_s: list[int | None]
    witness_lag: list[int | None]

    def chart(self) -> dict[str, object]:
        return {
            "empty": "No samples yet: the site has not reported, or it was enrolled moments ago.",
            "x": self.at,
            "series": [
                {"label": "heartbeat age (s)", "scale": "s", "axis": "seconds", "values": self.heartbeat_age_s},
                {"label": "witness lag (entries)", "scale": "n", "axis": "entries", "values": self.witness_lag},
            ],
        }


def series(db: Session, site_id: str, since: datetime | None = None) -> Series:
    since = since or utcnow() - KEEP
    rows = db.execute(
        select(SiteSample.at, SiteSample.heartbeat_age_s, SiteSample.checkpoint_size, SiteSample.witnessed_size)
        .where(SiteSample.site_id == site_id, SiteSample.at >= since)
        .order_by(SiteSample.at)
    ).all()
    return Series(
        at=[int(r[0].timestamp()) for r in rows],
        heartbeat_age_s=[max(0, int(r[1])) if r[1] is not None else None for r in rows],
        witness_lag=[max(0, r[2] - (r[3] or 0)) if r[2] is not None else None for r in rows],
    )
