"""The controller's audit trail, complete by construction: request ids, failures from any layer, a log that
cannot write, rolled-back changes, floods of refusals, bounded entries. The application runs in this process
(its real runtime, SQLite), so that disks can fail and routes can raise where a test says."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from audit import Log
from controller import audit_trail, auth, sites
from controller.app import create_app
from controller.audit_trail import ENTRY_LIMIT, bounded_entry
from controller.changes import SiteCreated
from controller.db import AuditOutbox, Site
from controller.runtime import Runtime
from tests.controller_server import ControllerServer, sitewarden


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    data = tmp_path_factory.mktemp("audit-trail") / "controller"
    done = sitewarden("controller", "init", "--data", str(data), "--root-key-online")
    assert done.returncode == 0, done.stderr
    return data, done.stdout.strip().splitlines()[-1]


@pytest.fixture
def runtime(data_dir: tuple[Path, str]) -> Iterator[Runtime]:
    opened = Runtime.open(data_dir[0])
    yield opened
    opened.close()


def _call(
    app: Any, method: str, path: str, token: str | None = None, client: str = "127.0.0.1", **kwargs: Any
) -> httpx.Response:
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **kwargs.pop("headers", {})}

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, client=(client, 4321))
        async with httpx.AsyncClient(transport=transport, base_url="http://controller") as http:
            return await http.request(method, path, headers=headers, **kwargs)

    return asyncio.run(call())


def _entries(runtime: Runtime) -> list[dict[str, Any]]:
    assert runtime.audit is not None
    return [json.loads(e) for e in runtime.audit.log.iter_entries()]


def _by_request(runtime: Runtime, request_id: str) -> list[dict[str, Any]]:
    return [e for e in _entries(runtime) if e.get("request_id") == request_id]


def _sites_named(runtime: Runtime, name: str) -> int:
    with runtime.session() as s:
        return s.scalar(select(func.count()).select_from(Site).where(Site.name == name)) or 0


def _outbox(runtime: Runtime) -> list[dict[str, Any]]:
    with runtime.session() as s:
        return [json.loads(row.entry) for row in s.scalars(select(AuditOutbox))]


def _name() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


# -- request ids ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("order-42_retry.1", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("y" * 70_000, False),  # over 64 KiB: once enough to make the entry unwritable
        ("two words", False),
        ("new\tline", False),
        ("é-accent", False),
    ],
)
def test_a_request_id_is_taken_only_when_well_formed_else_recorded_truncated_and_marked(
    runtime: Runtime, data_dir: tuple[Path, str], given: str, kept: bool
) -> None:
    name = _name()
    response = _call(
        create_app(runtime),
        "POST",
        "/api/v1/sites",
        data_dir[1],
        json={"name": name},
        headers={"X-Request-ID": given.encode()},
    )
    assert response.status_code == 201, response.text
    returned = response.headers["x-request-id"]
    assert (returned == given) is kept
    assert len(returned) <= 128
    [entry] = _by_request(runtime, returned)
    assert entry["change"]["kind"] == "site.created" and entry["change"]["name"] == name
    if kept:
        assert "request_id_given" not in entry
    else:
        marked = entry["request_id_given"]
        assert marked["length"] == len(given.encode())
        assert marked["value"] == given.encode().decode("latin-1")[:128]
        assert marked["truncated"] is (len(given.encode()) > 128)


@pytest.mark.parametrize("controller", ["sqlite"], indirect=True)
def test_an_oversized_request_id_on_the_real_server_still_gets_the_change_recorded(
    controller: ControllerServer,
) -> None:
    """uvicorn (httptools) takes a 70 KiB header: the change is made and recorded under the controller's own id."""
    name = _name()
    with controller.http(controller.admin_token) as http:
        response = http.post("/api/v1/sites", json={"name": name}, headers={"X-Request-ID": "z" * 70_000})
    assert response.status_code == 201, response.text
    own = response.headers["x-request-id"]
    assert len(own) == 32
    [entry] = [e for e in _live_entries(controller) if e.get("request_id") == own]
    assert entry["change"]["name"] == name and entry["request_id_given"]["length"] == 70_000


def _live_entries(controller: ControllerServer) -> list[dict[str, Any]]:
    """The entries of a live controller's log, read next to it."""
    with Log.open(controller.data_dir / "audit", readonly=True) as log:
        return [json.loads(e) for e in log.iter_entries()]


# -- failures of any layer -----------------------------------------------------------------


def test_an_exception_after_the_commit_is_recorded_by_class_next_to_the_change_it_made(
    runtime: Runtime, data_dir: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sites.create

    def create_then_fail(*args: Any, **kwargs: Any) -> Site:
        real(*args, **kwargs)  # committed
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(sites, "create", create_then_fail)
    name = _name()
    response = _call(
        create_app(runtime), "POST", "/api/v1/sites", data_dir[1], json={"name": name}, headers={"X-Request-ID": name}
    )
    assert response.status_code == 500
    assert "secret" not in response.text and "Traceback" not in response.text
    entries = _by_request(runtime, name)
    change = [e for e in entries if e["type"] == "change"]
    failure = [e for e in entries if e["type"] == "request"]
    assert [c["change"]["name"] for c in change] == [name]  # it happened: recorded once
    assert len(failure) == 1 and failure[0]["result"] == 500 and failure[0]["outcome"] == "failed"
    assert failure[0]["error"] == "builtins.RuntimeError" and failure[0]["changes"] == 1
    assert "secret" not in json.dumps(failure[0])
    assert _sites_named(runtime, name) == 1


def test_an_exception_in_the_access_layer_is_recorded_too(
    runtime: Runtime, data_dir: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> None:
        raise KeyError("nope")

    monkeypatch.setattr(auth, "authorize", broken)
    name = _name()
    response = _call(
        create_app(runtime), "POST", "/api/v1/sites", data_dir[1], json={"name": name}, headers={"X-Request-ID": name}
    )
    assert response.status_code == 500
    [entry] = _by_request(runtime, name)
    assert entry["error"] == "builtins.KeyError" and entry["action"] == "POST /api/v1/sites"
    assert _sites_named(runtime, name) == 0


def test_refusals_of_state_changing_requests_name_the_caller_and_the_error(
    runtime: Runtime, data_dir: tuple[Path, str]
) -> None:
    app = create_app(runtime)
    name = _name()
    assert _call(app, "POST", "/api/v1/sites", data_dir[1], json={"name": name}).status_code == 201
    cases = [
        ("POST", "/api/v1/sites", {"name": name}, 409, "controller.errors.Conflict"),
        ("POST", "/api/v1/sites/nowhere/disable", None, 404, "controller.errors.NotFound"),
        ("POST", "/api/v1/sites", {"name": 5}, 422, "fastapi.exceptions.RequestValidationError"),
        ("POST", "/api/v1/tokens", {"name": "x", "role": "wizard"}, 400, "controller.errors.BadRequest"),
    ]
    for method, path, body, status, error in cases:
        rid = uuid.uuid4().hex
        response = _call(app, method, path, data_dir[1], json=body, headers={"X-Request-ID": rid})
        assert response.status_code == status, response.text
        [entry] = _by_request(runtime, rid)
        assert (entry["type"], entry["result"], entry["outcome"]) == ("request", status, "refused")
        assert entry["error"] == error
        assert entry["actor"] == "bootstrap-admin" and entry["role"] == "admin"


# -- a log that cannot write ---------------------------------------------------------------


class FailingDisk:
    """Makes writes to the audit log's entries file fail with ENOSPC, as a full disk does."""

    def __init__(self, runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
        self.inode = (runtime.config.audit_dir / "entries").stat().st_ino
        self.failing = False
        real = os.pwrite

        def pwrite(fd: int, data: Any, offset: int) -> int:
            if self.failing and os.fstat(fd).st_ino == self.inode:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)


def test_a_log_that_cannot_write_refuses_state_changes_before_anything_commits(
    runtime: Runtime, data_dir: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = FailingDisk(runtime, monkeypatch)
    trail = runtime.audit
    assert trail is not None
    app = create_app(runtime)
    trail._last_ok = time.monotonic() - 60  # idle: the next state change probes the log first
    disk.failing = True
    refused = []
    for _ in range(2):
        name = _name()
        response = _call(app, "POST", "/api/v1/sites", data_dir[1], json={"name": name})
        assert response.status_code == 503, response.text
        assert "nothing was changed" in response.json()["detail"]
        refused.append(name)
    assert all(_sites_named(runtime, name) == 0 for name in refused)  # nothing committed
    assert _outbox(runtime) == []
    # Reads go on while the log is down.
    assert _call(app, "GET", "/api/v1/sites", data_dir[1]).status_code == 200

    disk.failing = False
    name = _name()
    deadline = time.monotonic() + 10
    while (response := _call(app, "POST", "/api/v1/sites", data_dir[1], json={"name": name})).status_code == 503:
        assert time.monotonic() < deadline, "the log was not reopened after the disk recovered"
        time.sleep(0.2)
    assert response.status_code == 201
    [entry] = _by_request(runtime, response.headers["x-request-id"])
    assert entry["change"]["name"] == name
    assert not [e for e in _entries(runtime) if e.get("change", {}).get("name") in refused]


def test_a_disk_that_fails_between_commit_and_append_keeps_the_record_in_the_outbox_and_loses_nothing(
    runtime: Runtime, data_dir: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one window the probe cannot close: the change is not acknowledged, and its record is moved later."""
    disk = FailingDisk(runtime, monkeypatch)
    trail = runtime.audit
    assert trail is not None
    app = create_app(runtime)
    name = _name()
    trail._last_ok = time.monotonic()  # just written: no probe; the disk fails right after the commit
    disk.failing = True
    response = _call(app, "POST", "/api/v1/sites", data_dir[1], json={"name": name}, headers={"X-Request-ID": name})
    assert response.status_code == 503, response.text
    assert "not acknowledged" in response.json()["detail"]
    assert _sites_named(runtime, name) == 1
    assert [e["change"]["name"] for e in _outbox(runtime) if e["request_id"] == name] == [name]
    assert not _by_request(runtime, name)

    disk.failing = False
    deadline = time.monotonic() + 10
    while True:  # the background step reopens the log and moves the outbox
        runtime.maintain_audit()
        if _by_request(runtime, name) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    time.sleep(1.1)  # past the outbox's clean-up interval: moved rows are deleted, nothing moves twice
    runtime.maintain_audit()
    changes = [e for e in _by_request(runtime, name) if e["type"] == "change"]
    assert [c["change"]["name"] for c in changes] == [name]
    assert not [e for e in _outbox(runtime) if e["request_id"] == name]


# -- records that carry a "before" ---------------------------------------------------------


def test_a_row_locked_for_a_change_is_read_as_the_last_commit_left_it(runtime: Runtime) -> None:
    """A change's "before" is what it replaces, even when another change committed after the row was read."""
    with runtime.session() as s:
        site = sites.create(s, _name(), {"step": "0"}, "test")
    with runtime.session() as mine:
        row = mine.get(Site, site.id)
        assert row is not None and row.labels == {"step": "0"}
        with runtime.session() as theirs:
            sites.set_labels(theirs, site.id, {"step": "1"})
        row.status = "not flushed"  # dropped, as a refresh drops it
        assert audit_trail.locked(mine, row) is row
        assert row.labels == {"step": "1"} and row.status == "pending"
        assert not mine.dirty and row.created_at.tzinfo is not None  # loaded through the column types
        sites.set_labels(mine, site.id, {"step": "2"})
    changes = [e["change"] for e in _entries(runtime) if e.get("change", {}).get("site_id") == site.id]
    assert [(c["before"], c["after"]) for c in changes[1:]] == [
        ({"step": "0"}, {"step": "1"}),
        ({"step": "1"}, {"step": "2"}),
    ]


# -- rolled-back changes -------------------------------------------------------------------


def test_a_rolled_back_change_leaves_no_record_anywhere(runtime: Runtime) -> None:
    name = _name()
    before = len(_entries(runtime))
    with runtime.session() as s:
        audit_trail.record(s, SiteCreated("x", name, {}))
        s.add(Site(name=name, labels={}))
        s.rollback()
        s.commit()
    with runtime.session() as s:  # a commit that fails (the same name twice) takes its records with it
        s.add(Site(name=name, labels={}))
        s.add(Site(name=name, labels={}))
        audit_trail.record(s, SiteCreated("y", name, {}))
        with pytest.raises(IntegrityError):
            s.commit()
    assert runtime.outbox is not None
    runtime.outbox.drain()
    assert _outbox(runtime) == [] or all(e["change"]["name"] != name for e in _outbox(runtime))
    assert [e for e in _entries(runtime)[before:] if e.get("change", {}).get("name") == name] == []


# -- floods --------------------------------------------------------------------------------


def test_a_flood_without_credentials_is_counted_in_one_entry_per_address(
    runtime: Runtime, data_dir: tuple[Path, str]
) -> None:
    trail = runtime.audit
    assert trail is not None
    app = create_app(runtime)
    flooder, other = "198.51.100.7", "198.51.100.8"
    before = len(_entries(runtime))
    for _ in range(60):
        assert _call(app, "POST", "/api/v1/sites", "swt_bogus_token", client=flooder, json={}).status_code == 401
    assert _call(app, "POST", "/api/v1/sites", None, client=other, json={}).status_code == 401
    trail.flush_refusals(everything=True)
    new = _entries(runtime)[before:]
    alone = [e for e in new if e["type"] == "request" and e["client"] == flooder]
    counted = [e for e in new if e["type"] == "request.refusals" and e["client"] == flooder]
    assert 20 <= len(alone) <= 22  # the burst, then (at most) what refilled meanwhile
    assert len(counted) == 1 and len(alone) + counted[0]["count"] == 60
    assert counted[0]["statuses"] == {"401": counted[0]["count"]}
    assert counted[0]["actions"] == {"POST /api/v1/sites": counted[0]["count"]}
    assert [e["client"] for e in new if e["type"] == "request" and e["client"] == other] == [other]


def test_refusals_of_a_known_caller_are_never_merged(runtime: Runtime, data_dir: tuple[Path, str]) -> None:
    app = create_app(runtime)
    auditor = _call(
        app, "POST", "/api/v1/tokens", data_dir[1], json={"name": f"aud-{uuid.uuid4().hex[:6]}", "role": "auditor"}
    ).json()["token"]
    before = len(_entries(runtime))
    for _ in range(30):
        response = _call(app, "POST", "/api/v1/sites", auditor, client="198.51.100.9", json={"name": "x"})
        assert response.status_code == 403
    runtime.audit.flush_refusals(everything=True)  # type: ignore[union-attr]
    new = _entries(runtime)[before:]
    assert len([e for e in new if e["type"] == "request" and e["result"] == 403]) == 30
    assert not [e for e in new if e["type"] == "request.refusals"]


# -- bounded entries -----------------------------------------------------------------------

_text = st.text(st.characters(codec=None), max_size=3000)  # lone surrogates included: JSON can carry them
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | _text,
    lambda children: st.lists(children, max_size=600) | st.dictionaries(_text, children, max_size=50),
    max_leaves=1500,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(change=_json, resource=st.dictionaries(st.text(max_size=70_000), st.text(max_size=70_000), max_size=3))
def test_an_entry_is_bounded_whatever_goes_into_it(change: Any, resource: dict[str, str]) -> None:
    data = bounded_entry({"type": "change", "resource": resource, "change": {"kind": "x", "v": change}})
    assert len(data) <= ENTRY_LIMIT
    parsed = json.loads(data)
    assert parsed["type"] == "change"


def test_a_huge_path_parameter_is_recorded_clipped(runtime: Runtime, data_dir: tuple[Path, str]) -> None:
    rid = uuid.uuid4().hex
    long = "n" * 60_000
    response = _call(
        create_app(runtime), "POST", f"/api/v1/sites/{long}/disable", data_dir[1], headers={"X-Request-ID": rid}
    )
    assert response.status_code == 404
    [entry] = _by_request(runtime, rid)
    assert entry["resource"]["site"].startswith("n" * 512) and "more characters" in entry["resource"]["site"]
