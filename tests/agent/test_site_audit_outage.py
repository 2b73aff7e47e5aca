"""The site's audit log on a disk that fills up for real (a small tmpfs): refuse, keep, recover.

While the log cannot write, requests are refused (`AuditUnavailable`), the agent's own events
and the acknowledged entries of `async` mode are kept, and `recover()` brings the log back once
a write succeeds again: reopened, its tail checked, nothing lost, nothing written twice, and one
`audit.outage` entry that says what happened. In `async` mode the queue is bounded.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import site_audit
from agent.config import AuditSettings
from agent.errors import AuditUnavailable
from agent.site_audit import SiteAudit
from audit import Log
from tests.site_audit_setup import open_site_audit
from tests.system import fill, small_filesystem


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with small_filesystem(tmp_path / "disk", "2m") as mounted:
        yield mounted


@pytest.fixture(autouse=True)
def fast_recovery(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(site_audit, "RECOVER_MIN_S", 0.0)
    monkeypatch.setattr(site_audit, "RECOVER_MAX_S", 0.0)


def open_audit(disk: Path, mode: str) -> SiteAudit:
    return open_site_audit(disk / "data", AuditSettings(mode=mode, checkpoint_entries=10_000, checkpoint_seconds=3600))


def entries(disk: Path) -> list[dict[str, Any]]:
    with Log.open(disk / "data" / "audit", readonly=True) as log:
        return [json.loads(e) for e in log.iter_entries()]


def request(n: int) -> dict[str, Any]:
    return {"type": "inference", "request_id": f"r-{n}", "pad": "x" * 400}


def test_a_full_disk_refuses_requests_keeps_events_and_recovers_without_loss_or_duplicates(disk: Path) -> None:
    audit = open_audit(disk, "durable")

    async def send(n: int) -> int | None:
        return await audit.record_async(request(n))

    acknowledged = {f"r-{n}": asyncio.run(send(n)) for n in range(5)}
    filler = fill(disk)
    refused_at = None
    for n in range(5, 2000):  # the log's zeros written ahead take a few more entries
        try:
            acknowledged[f"r-{n}"] = asyncio.run(send(n))
        except AuditUnavailable as exc:
            refused_at = n
            assert "cannot write" in str(exc) and exc.retry_after_s >= 1
            break
    assert refused_at is not None, "the full disk was never noticed"
    assert not audit.writable and audit.status()["error"]
    with pytest.raises(AuditUnavailable):
        asyncio.run(send(refused_at + 1))
    assert audit.record({"type": "sync.retry", "note": "kept while failing"}) is None
    assert not audit.recover(), "nothing can be written while the disk is full"
    assert not audit.writable

    filler.unlink()
    assert audit.recover()
    assert audit.writable and audit.status()["error"] == ""
    asyncio.run(send(9999))
    audit.close()

    stored = entries(disk)
    ids = Counter(e.get("request_id") for e in stored if e.get("type") == "inference")
    assert all(ids[rid] == 1 for rid in acknowledged), "an acknowledged entry was lost or written twice"
    assert ids["r-9999"] == 1
    assert max(ids.values()) == 1
    assert [e["note"] for e in stored if e["type"] == "sync.retry"] == ["kept while failing"]
    (outage,) = [e for e in stored if e["type"] == "audit.outage"]
    assert outage["refused_requests"] >= 2 and outage["reason"]
    # An entry that reached the disk though its write reported failure is named: its request got a 503.
    for index in outage["answered_503"]:
        assert stored[index]["request_id"] not in acknowledged


def test_async_mode_keeps_every_acknowledged_entry_through_a_writer_failure(disk: Path) -> None:
    audit = open_audit(disk, "async")

    async def send(n: int) -> None:
        await audit.record_async(request(n))

    acknowledged: list[str] = []
    filler = fill(disk)
    deadline = time.monotonic() + 60
    n = 0
    while audit.writable:  # acknowledged before they are durable: the async trade-off
        assert time.monotonic() < deadline, "the writer never failed on a full disk"
        try:
            asyncio.run(send(n))
            acknowledged.append(f"r-{n}")
        except AuditUnavailable:
            break
        n += 1
        if n % 50 == 0:
            time.sleep(0.01)
    with pytest.raises(AuditUnavailable):
        asyncio.run(send(n + 1))
    filler.unlink()
    assert audit.recover()
    audit.close()
    ids = Counter(e.get("request_id") for e in entries(disk) if e.get("type") == "inference")
    assert [rid for rid in acknowledged if ids[rid] != 1] == [], "acknowledged entries lost or duplicated"


def test_async_mode_refuses_requests_when_its_queue_is_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(site_audit, "ASYNC_QUEUE_MAX", 5)
    audit = open_audit(tmp_path, "async")
    writing, gate = threading.Event(), threading.Event()
    append_many = audit.log.append_many

    def slow_disk(batch: list[bytes]) -> list[int]:
        writing.set()
        gate.wait(30)
        return append_many(batch)

    audit.log.append_many = slow_disk  # type: ignore[method-assign]

    async def send(n: int) -> None:
        await audit.record_async(request(n))

    asyncio.run(send(0))
    assert writing.wait(10), "the writer took the first entry"
    refused = 0
    for n in range(1, 20):
        try:
            asyncio.run(send(n))
        except AuditUnavailable as exc:
            assert "queue is full" in str(exc) and exc.retry_after_s == 1
            refused += 1
    assert refused == 19 - 5, "the queue holds five; the rest are refused, not waited for"
    gate.set()
    audit.close()
    assert len(entries(tmp_path)) == 1 + 5
