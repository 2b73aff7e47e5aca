"""kill -9 of the controller at random points under a load of state-changing requests from several clients.

After every round the controller restarts on the same data dir (moving what the outbox holds before it
serves); at the end every change in the database has exactly one entry in the audit log, every acknowledged
change is in both, and the log holds no change the database does not: on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from audit import Log
from controller.config import load
from controller.db import ApiToken, AuditOutbox, Rollout, Site, make_engine, make_sessionmaker
from tests.controller.test_controller_api import _release
from tests.controller_server import ControllerServer, free_port, serve, sitewarden
from tests.tls import TestPKI

ROUNDS = 10
CLIENTS = 4
PREFIX = "crash-"


@dataclass
class Acked:
    """What the controller acknowledged (2xx), by request id."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    changes: dict[str, tuple[str, Any]] = field(default_factory=dict)

    def add(self, request_id: str, kind: str, what: Any) -> None:
        with self.lock:
            self.changes[request_id] = (kind, what)


def _client(server: ControllerServer, token: str, number: int, seed: int, *, rollout: str, acked: Acked) -> None:
    """Send state changes until the server dies: tokens, sites with labels, label changes, revocations, pause/resume."""
    rng = random.Random(seed)
    tokens: list[str] = []
    sites: list[str] = []
    with server.http(token) as http:
        for n in range(10_000):
            rid = f"{PREFIX}{seed}-{number}-{n}"
            op = rng.choice(["token", "site", "labels", "revoke", "pause", "resume"])
            name = f"{PREFIX}{seed}-{number}-{n}"
            try:
                if op == "token" or (op == "revoke" and not tokens):
                    r = http.post(
                        "/api/v1/tokens", json={"name": name, "role": "auditor"}, headers={"X-Request-ID": rid}
                    )
                    if r.is_success:
                        tokens.append(r.json()["id"])
                        acked.add(rid, "token.created", r.json()["id"])
                elif op == "revoke":
                    token_id = tokens.pop(rng.randrange(len(tokens)))
                    r = http.post(f"/api/v1/tokens/{token_id}/revoke", headers={"X-Request-ID": rid})
                    if r.is_success:
                        acked.add(rid, "token.revoked", token_id)
                elif op == "site" or not sites:
                    labels = {"round": str(seed), "n": str(n)}
                    r = http.post("/api/v1/sites", json={"name": name, "labels": labels}, headers={"X-Request-ID": rid})
                    if r.is_success:
                        sites.append(r.json()["id"])
                        acked.add(rid, "site.created", r.json()["id"])
                elif op == "labels":
                    site = rng.choice(sites)
                    labels = {"n": str(n), "by": str(number)}
                    r = http.put(f"/api/v1/sites/{site}/labels", json={"labels": labels}, headers={"X-Request-ID": rid})
                    if r.is_success:
                        acked.add(rid, "site.labels_changed", (site, labels))
                else:
                    r = http.post(f"/api/v1/rollouts/{rollout}/{op}", headers={"X-Request-ID": rid})
                    if r.is_success:
                        acked.add(rid, "rollout.state_changed", r.json()["state"])
            except httpx.HTTPError:
                return  # killed


def _database(data: Path) -> tuple[dict[str, ApiToken], dict[str, Site], str, int]:
    engine = make_engine(load(data).database_url)
    try:
        with make_sessionmaker(engine)() as s:
            tokens = {t.id: t for t in s.scalars(select(ApiToken).where(ApiToken.name.startswith(PREFIX)))}
            sites = {x.id: x for x in s.scalars(select(Site).where(Site.name.startswith(PREFIX)))}
            state = s.scalar(select(Rollout.state).where(Rollout.name == f"{PREFIX}rollout"))
            outbox = len(s.scalars(select(AuditOutbox.seq)).all())
    finally:
        engine.dispose()
    return tokens, sites, state or "", outbox


def _committed_not_moved(data: Path) -> int:
    """Outbox rows whose entries are not in the log (the controller is dead: read both as they are)."""
    engine = make_engine(load(data).database_url)
    try:
        with make_sessionmaker(engine)() as s:
            seqs = set(s.scalars(select(AuditOutbox.seq)))
    finally:
        engine.dispose()
    with Log.open(data / "audit", readonly=True) as log:
        moved = {json.loads(e).get("seq") for e in log.iter_entries(max(0, log.size - 5000))}
    return len(seqs - moved)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill_9_under_load_loses_no_audit_entry_and_repeats_none(
    backend: str, tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("postgres_db_url") if backend == "postgresql" else None
    data = tmp_path / "controller"
    done = sitewarden(
        "controller", "init", "--data", str(data), "--root-key-online", *(["--database-url", url] if url else [])
    )
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip().splitlines()[-1]
    port = free_port()
    server = serve(data, pki, port, token, backend)
    release = _release(server, token, {"model.onnx": uuid.uuid4().bytes})
    with server.client(token) as admin:
        admin.post("/api/v1/sites", {"name": f"{PREFIX}target", "labels": {"crash": "yes"}})
        rollout = {"name": f"{PREFIX}rollout", "releases": [{"name": release["name"], "version": "1.0.0"}]}
        admin.post("/api/v1/rollouts", {**rollout, "selector": {"crash": "yes"}})
    rng = random.Random(f"kill-9-{backend}")
    acked = Acked()
    caught = 0  # changes committed but not yet in the log when the kill came: what recovery is for
    for round_ in range(ROUNDS):
        if round_:
            server = serve(data, pki, port, token, backend)  # moves what the outbox held before it answers
        clients = [
            threading.Thread(
                target=_client,
                args=(server, token, i, round_),
                kwargs={"rollout": f"{PREFIX}rollout", "acked": acked},
                daemon=True,
            )
            for i in range(CLIENTS)
        ]
        for client in clients:
            client.start()
        time.sleep(rng.uniform(0.2, 0.9))  # a random point of the load: the kill is the event under test
        server.process.kill()
        server.process.wait(timeout=30)
        for client in clients:
            client.join(timeout=30)
        caught += _committed_not_moved(data)
    server = serve(data, pki, port, token, backend)
    server.stop()
    print(f"{backend}: {len(acked.changes)} changes acknowledged, {caught} caught between commit and log")

    tokens, sites, state, outbox = _database(data)
    assert outbox == 0, "the outbox was not emptied into the log"
    with Log.open(data / "audit", readonly=True) as log:
        entries = [json.loads(e) for e in log.iter_entries()]
    changes = [e for e in entries if e["type"] == "change"]
    seqs = Counter(e["seq"] for e in changes)
    assert [s for s, n in seqs.items() if n > 1] == [], "an outbox row was moved into the log twice"

    kinds: dict[str, list[dict[str, Any]]] = {}
    for entry in changes:
        kinds.setdefault(entry["change"]["kind"], []).append(entry)
    created = Counter(
        e["change"]["token_id"] for e in kinds.get("token.created", []) if e["change"]["name"].startswith(PREFIX)
    )
    revoked = Counter(e["change"]["token_id"] for e in kinds.get("token.revoked", []))
    assert set(created) == set(tokens), "token rows and token.created entries differ (a lost or a rolled-back record)"
    assert all(created[t] == 1 for t in tokens)
    assert {t for t, row in tokens.items() if row.revoked_at} == set(revoked) and all(n == 1 for n in revoked.values())
    site_created = Counter(
        e["change"]["site_id"] for e in kinds.get("site.created", []) if e["change"]["name"].startswith(PREFIX)
    )
    assert set(site_created) == set(sites) and all(n == 1 for n in site_created.values())
    labels: dict[str, dict[str, str]] = {
        e["change"]["site_id"]: e["change"]["labels"] for e in kinds["site.created"] if e["change"]["site_id"] in sites
    }
    for entry in kinds.get("site.labels_changed", []):  # in log order, each the next step of its site
        change = entry["change"]
        assert labels[change["site_id"]] == change["before"], "a label change recorded out of order or twice"
        labels[change["site_id"]] = change["after"]
    assert labels == {site_id: row.labels for site_id, row in sites.items()}
    rollout_states = [e["change"] for e in kinds.get("rollout.state_changed", [])]
    for previous, following in itertools.pairwise(rollout_states):
        assert previous["after"] == following["before"], "a pause or resume recorded out of order or twice"
    assert (rollout_states[-1]["after"] if rollout_states else "progressing") == state

    by_request = {e.get("request_id"): e for e in entries}
    assert acked.changes, "no request was acknowledged: the load never ran"
    for rid, (kind, what) in acked.changes.items():
        entry = by_request.get(rid)
        assert entry is not None, f"acknowledged {kind} {rid} is not in the log"
        if entry["type"] == "request":  # a pause of a paused rollout, say: acknowledged, nothing changed
            assert kind == "rollout.state_changed" and entry["result"] == 200
            continue
        assert entry["change"]["kind"] == kind
        if kind in ("token.created", "token.revoked"):
            assert what in tokens and entry["change"]["token_id"] == what
        elif kind == "site.created":
            assert what in sites
        elif kind == "site.labels_changed":
            assert entry["change"]["site_id"] == what[0] and entry["change"]["after"] == what[1]
