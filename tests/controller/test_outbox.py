"""The outbox's move from memory (`controller.outbox`): the rows a transaction of this process drew are moved
without a query once it commits, yet in seq order, exactly once, and never when it rolled back, whatever order
the committing threads and the passes reading the database run in. Each test plays one interleaving by hand,
on the real runtime (SQLite) and its real log; `test_audit_crash.py` plays them all under kill -9."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import event, insert, select
from sqlalchemy.exc import IntegrityError

from controller import audit_trail
from controller.changes import SiteCreated
from controller.db import AuditOutbox, Site
from controller.outbox import Outbox
from controller.runtime import Runtime

_OUTBOX = AuditOutbox.__table__


def _outbox(runtime: Runtime) -> Outbox:
    assert runtime.outbox is not None
    return runtime.outbox


def _entry(name: str) -> str:
    return audit_trail.bounded_entry({"type": "change", "actor": "test", "change": {"name": name}}).decode()


def _commit_rows(runtime: Runtime, entries: list[str]) -> list[tuple[int, str]]:
    """Rows committed in the outbox as a transaction of this process writes them, told to the mover as drawn
    only: the committing thread has not settled them yet (it was preempted between its commit and its hook)."""
    with runtime.engine.begin() as conn:
        seqs = conn.execute(insert(_OUTBOX).returning(_OUTBOX.c.seq), [{"entry": e} for e in entries]).scalars()
        rows = list(zip(seqs, entries, strict=True))
        _outbox(runtime).drawn(rows)
    return rows


def _logged(runtime: Runtime, names: set[str]) -> list[tuple[int, str]]:
    assert runtime.audit is not None
    out = []
    for raw in runtime.audit.log.iter_entries():
        entry: dict[str, Any] = json.loads(raw)
        if entry.get("change", {}).get("name") in names:
            out.append((entry["seq"], entry["change"]["name"]))
    return out


def _clean_up_now(outbox: Outbox) -> None:
    outbox._cleaned_at = time.monotonic() - 60  # the next pass deletes moved rows and sweeps the outbox


def test_a_row_read_from_the_database_before_its_transaction_settled_is_never_moved_again(
    runtime: Runtime,
) -> None:
    outbox = _outbox(runtime)
    name = f"swept-{uuid.uuid4().hex[:8]}"
    rows = _commit_rows(runtime, [_entry(name)])
    outbox.drain()  # a sweep reads it from the database and moves it
    _clean_up_now(outbox)
    outbox.drain()  # ... and deletes it: only memory could still move it
    outbox.settled(rows, committed=True)  # the committing thread's hook runs at last
    outbox.drain([seq for seq, _ in rows])
    assert _logged(runtime, {name}) == [(rows[0][0], name)]
    with runtime.engine.connect() as conn:
        assert conn.execute(select(_OUTBOX.c.seq).where(_OUTBOX.c.seq == rows[0][0])).first() is None


def test_a_lower_seq_committed_but_not_settled_is_moved_before_the_higher_one_that_waits(
    runtime: Runtime,
) -> None:
    outbox = _outbox(runtime)
    first, second = f"first-{uuid.uuid4().hex[:8]}", f"second-{uuid.uuid4().hex[:8]}"
    early = _commit_rows(runtime, [_entry(first)])  # committed, its thread not yet settled
    late = _commit_rows(runtime, [_entry(second)])
    outbox.settled(late, committed=True)
    outbox.drain([seq for seq, _ in late])  # the later change's request answers: the earlier one is logged first
    assert _logged(runtime, {first, second}) == [(early[0][0], first), (late[0][0], second)]
    outbox.settled(early, committed=True)  # read from the database already: not taken again
    outbox.drain([seq for seq, _ in early])
    _clean_up_now(outbox)
    outbox.drain()
    assert _logged(runtime, {first, second}) == [(early[0][0], first), (late[0][0], second)]


def test_a_rolled_back_row_whose_seq_is_drawn_again_is_not_confused_with_the_committed_one(
    runtime: Runtime,
) -> None:
    outbox = _outbox(runtime)
    gone, kept = f"gone-{uuid.uuid4().hex[:8]}", f"kept-{uuid.uuid4().hex[:8]}"
    rows = _commit_rows(runtime, [_entry(kept)])
    seq = rows[0][0]
    rolled_back = [(seq, _entry(gone))]  # SQLite draws a rolled-back seq again: the same seq, another entry
    outbox.drawn(rolled_back)
    outbox.drawn(rows)  # the committed transaction drew it after the rollback
    outbox.settled(rolled_back, committed=False)  # the rolled-back thread's hook runs late
    outbox.settled(rows, committed=True)
    assert outbox._ready == {seq: rows[0][1]}  # the committed entry, ready to move from memory
    outbox.drain([seq])
    assert _logged(runtime, {gone, kept}) == [(seq, kept)]


def test_rows_of_a_rolled_back_session_are_forgotten_and_a_committed_one_moves_without_a_query(
    runtime: Runtime,
) -> None:
    outbox = _outbox(runtime)
    gone, kept = f"gone-{uuid.uuid4().hex[:8]}", f"kept-{uuid.uuid4().hex[:8]}"
    with runtime.session() as s:  # written into the outbox, then the commit fails: the entry goes with it
        audit_trail.record(s, SiteCreated("x", gone, {}))
        s.add(Site(name=gone, labels={}))
        s.add(Site(name=gone, labels={}))
        with pytest.raises(IntegrityError):
            s.commit()
    assert outbox._drawn == {} and outbox._ready == {}

    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    who = audit_trail.RequestActor(request_id="test")  # a request's route, on a worker thread
    outbox._cleaned_at = time.monotonic()  # no clean-up in this pass
    event.listen(runtime.engine, "before_cursor_execute", count)
    try:
        with audit_trail.serving(who), runtime.session() as s:
            s.add(Site(name=kept, labels={}))
            audit_trail.record(s, SiteCreated("y", kept, {}))
            s.commit()
    finally:
        event.remove(runtime.engine, "before_cursor_execute", count)
    assert len(who.seqs) == 1 and who.unmoved == []  # moved right after the commit: the answer need not wait
    assert _logged(runtime, {gone, kept}) == [(who.seqs[0], kept)]
    assert [q.split()[0] for q in statements if "audit_outbox" in q] == ["INSERT"]  # and never read back
    assert outbox._drawn == {} and outbox._ready == {}


def test_a_route_thread_never_waits_on_a_pass_that_waits_on_the_database(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A route moves its records right after its commit, perhaps holding locks that threads holding database
    locks wait for (`Runtime.reconcile`'s): while a pass that reads or writes the database runs, it leaves its
    records to its recorder rather than wait for that pass."""
    outbox = _outbox(runtime)
    reading, release = threading.Event(), threading.Event()
    select_rows = outbox._select

    def blocked_select(*args: Any) -> dict[int, str]:
        reading.set()
        assert release.wait(30)
        return select_rows(*args)

    monkeypatch.setattr(outbox, "_select", blocked_select)
    sweep = threading.Thread(target=outbox.drain)  # the maintenance step's sweep: reads the whole outbox
    sweep.start()
    try:
        assert reading.wait(30)
        name = f"route-{uuid.uuid4().hex[:8]}"
        who = audit_trail.RequestActor(request_id="test")
        started = time.monotonic()
        with audit_trail.serving(who), runtime.session() as s:
            s.add(Site(name=name, labels={}))
            audit_trail.record(s, SiteCreated("z", name, {}))
            s.commit()
        assert time.monotonic() - started < 10, "the route waited for the pass"
        assert who.unmoved == who.seqs and len(who.seqs) == 1  # left to the recorder
    finally:
        release.set()
        sweep.join(30)
    outbox.drain(who.unmoved)  # what the recorder does before it answers
    assert _logged(runtime, {name}) == [(who.seqs[0], name)]
