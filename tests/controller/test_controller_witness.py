"""The controller's witness against a live server (HTTPS on loopback, SQLite and PostgreSQL): sites'
audit checkpoints cosigned per C2SP tlog-witness, forks refused and audited, exports verifiable."""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audit import Log, verify_export
from audit.note import Signer, note_text, open_note
from sitewarden import sitejwt, witnessing
from sitewarden.keys import encode_public_key
from tests.conftest import make_entries, run_cli
from tests.controller_server import ControllerServer, sitewarden

ADD = "/api/v1/witness/add-checkpoint"


class Site:
    """An enrolled site with its identity key and a real audit log signed by that key."""

    def __init__(self, controller: ControllerServer, directory: Path) -> None:
        self.controller = controller
        name = f"wit-{uuid.uuid4().hex[:8]}"
        self.key = Ed25519PrivateKey.generate()
        with controller.client(controller.admin_token) as admin:
            admin.post("/api/v1/sites", {"name": name})
            token = admin.post(f"/api/v1/sites/{name}/join-tokens", {"ttl_seconds": 600})["token"]
        with controller.http() as http:
            enrolled = http.post("/api/v1/enroll", json={"token": token, "public_key": encode_public_key(self.key)})
        assert enrolled.status_code == 200, enrolled.text
        self.id: str = enrolled.json()["site_id"]
        self.name = name
        self.origin = f"sitewarden/{self.id}"
        self.signer = Signer.from_ed25519(self.origin, self.key)
        self.log = Log.open(directory / name, self.signer)

    def grow(self, count: int) -> str:
        self.log.append_many(make_entries(count, start=self.log.size))
        return self.log.checkpoint()

    def post(self, body: bytes | str, key: Ed25519PrivateKey | None = None) -> httpx.Response:
        jwt = sitejwt.sign(key or self.key, self.id, self.controller.url)
        with self.controller.http(jwt) as http:
            return http.post(ADD, content=body, headers={"Content-Type": "text/plain"})

    def submit(self, old_size: int) -> tuple[witnessing.Submission, httpx.Response]:
        sent = witnessing.submission(self.log, old_size)
        return sent, self.post(sent.body())


@pytest.fixture
def site(controller: ControllerServer, tmp_path: Path) -> Iterator[Site]:
    made = Site(controller, tmp_path)
    yield made
    made.log.close()


def _witness_vkey(controller: ControllerServer) -> str:
    done = sitewarden("controller", "keys", "--data", str(controller.data_dir))
    assert done.returncode == 0, done.stderr
    return next(line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("witness vkey: "))


def _problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    return response.json()


def _fork_events(controller: ControllerServer, site_id: str) -> list[dict[str, Any]]:
    with Log.open(controller.data_dir / "audit", readonly=True) as trail:
        events = [json.loads(e) for e in trail.iter_entries()]
    return [e for e in events if e.get("type") == "witness.fork_refused" and e.get("site") == site_id]


def test_checkpoints_are_cosigned_stored_and_the_export_verifies_with_the_witness(
    controller: ControllerServer, site: Site, tmp_path: Path
) -> None:
    witness_vkey = _witness_vkey(controller)
    assert witness_vkey.startswith("sitewarden/witness/main+")
    site.grow(5)
    sent, response = site.submit(0)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text.startswith("\u2014 sitewarden/witness/main ") and response.text.endswith("\n")
    site.log.add_cosignatures(witnessing.verify_cosignatures(sent.checkpoint, response.text, witness_vkey))

    # The log grows; the next submission proves consistency from the size the witness cosigned.
    site.grow(300)
    sent, response = site.submit(5)
    assert response.status_code == 200, response.text
    stored = witnessing.store_cosignatures(site.log, sent, response.text, witness_vkey)
    # The same checkpoint again is cosigned again (a fresh timestamp), nothing else changes.
    _, again = site.submit(305)
    assert again.status_code == 200, again.text

    with controller.http(controller.token("auditor")) as http:
        shown = http.get(f"/api/v1/sites/{site.name}/checkpoint")
        assert http.get(f"/api/v1/sites/{site.id}/checkpoint").json()["size"] == 305
    assert shown.status_code == 200, shown.text
    record = shown.json()
    last = site.log.last_checkpoint()
    assert last is not None
    assert (record["site_id"], record["origin"], record["size"]) == (site.id, site.origin, 305)
    assert record["root"] == last.root.hex() and record["witness_vkey"] == witness_vkey
    opened = open_note(record["note"], [site.signer.vkey, witness_vkey])
    assert opened.text == note_text(stored)
    assert [s.timestamp is not None for s in opened.signatures] == [False, True]
    assert opened.unverified == ()

    export = site.log.export(tmp_path / "export")
    report = verify_export(export, [site.signer.vkey], witnesses=[witness_vkey])
    assert report.valid, report.reason
    assert report.witnesses[0].witness == "+".join(witness_vkey.split("+")[:2])
    done = run_cli("audit", "verify", str(export), "--key", site.signer.vkey, "--witness", witness_vkey)
    assert done.returncode == 0, done.stderr


def test_a_wrong_old_size_gets_409_with_the_witnessed_size(controller: ControllerServer, site: Site) -> None:
    site.grow(7)
    assert site.submit(0)[1].status_code == 200
    site.grow(5)
    for old in (0, 3, 12):
        _, response = site.submit(old)
        assert response.status_code == 409, response.text
        assert response.headers["content-type"] == "text/x.tlog.size"
        assert response.text == "7\n" and witnessing.conflict_size(response.content) == 7
    assert site.submit(7)[1].status_code == 200


def test_concurrent_submissions_are_checked_and_stored_atomically(controller: ControllerServer, site: Site) -> None:
    site.grow(10)
    body = witnessing.submission(site.log, 0).body()
    jwts = [sitejwt.sign(site.key, site.id, controller.url) for _ in range(8)]
    results: list[tuple[int, str]] = []

    def send(jwt: str) -> None:
        with controller.http(jwt) as http:
            response = http.post(ADD, content=body)
        results.append((response.status_code, response.text))

    threads = [threading.Thread(target=send, args=(jwt,)) for jwt in jwts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(status for status, _ in results) == [200] + [409] * 7
    assert all(text == "10\n" for status, text in results if status == 409)


def test_forks_are_refused_and_recorded_in_the_controllers_audit_log(
    controller: ControllerServer, site: Site, tmp_path: Path
) -> None:
    site.grow(10)
    assert site.submit(0)[1].status_code == 200
    witnessed = site.log.last_checkpoint()
    assert witnessed is not None

    # Another history under the same key: same size, other entries.
    with Log.open(tmp_path / "fork", site.signer) as fork:
        fork.append_many([b'{"forged":%d}' % i for i in range(10)])
        forked_10 = fork.checkpoint()
        body = "old 10\n\n" + forked_10
        problem = _problem(site.post(body), 409)
        assert "another root hash" in problem["detail"] and "recorded" in problem["detail"]

        # Grown past the witnessed size: its proof from 10 cannot reach the witnessed root.
        fork.append_many([b'{"forged":%d}' % i for i in range(10, 25)])
        fork.checkpoint()
        forked = witnessing.submission(fork, 10)
        problem = _problem(site.post(forked.body()), 422)
        assert "does not verify" in problem["detail"] or "fails" in problem["detail"]
        forked_25 = forked.checkpoint

    with controller.http(controller.token("auditor")) as http:
        record = http.get(f"/api/v1/sites/{site.id}/checkpoint").json()
    assert (record["size"], record["root"]) == (10, witnessed.root.hex())

    events = _fork_events(controller, site.id)
    assert [(e["witnessed_size"], e["presented_size"]) for e in events] == [(10, 10), (10, 25)]
    for event, evidence in zip(events, (forked_10, forked_25), strict=True):
        assert event["origin"] == site.origin and event["witnessed_root"] == witnessed.root.hex()
        assert event["reason"] and event["checkpoint"] == evidence
        open_note(event["checkpoint"], [site.signer.vkey])  # the site signed the forked history
    # The audit trail names the site: its refusals as requests, the cosigned checkpoint as a change.
    with Log.open(controller.data_dir / "audit", readonly=True) as trail:
        entries = [json.loads(e) for e in trail.iter_entries()]
    mine = [e for e in entries if e.get("actor") == f"site:{site.name}" and e["action"] == f"POST {ADD}"]
    assert {e["result"] for e in mine if e["type"] == "request"} >= {409, 422}
    cosigned = [e["change"] for e in mine if e["type"] == "change"]
    assert {(c["kind"], c["size"], c["root"]) for c in cosigned} >= {("witness.cosigned", 10, witnessed.root.hex())}


def test_checkpoints_without_the_sites_signature_or_of_another_site_are_forbidden(
    controller: ControllerServer, site: Site, tmp_path: Path
) -> None:
    other = Site(controller, tmp_path)
    try:
        other.grow(3)
        body = witnessing.submission(other.log, 0).body()
        problem = _problem(site.post(body), 403)
        assert other.origin in problem["detail"] and site.origin in problem["detail"]
        assert "may submit only checkpoints" in problem["detail"]
    finally:
        other.log.close()
    # The right origin, signed by a key that is not the site's enrolled key.
    with Log.open(tmp_path / "impostor", Signer.from_ed25519(site.origin, Ed25519PrivateKey.generate())) as log:
        log.append_many(make_entries(3))
        log.checkpoint()
        problem = _problem(site.post(witnessing.submission(log, 0).body()), 403)
    assert "not signed by the enrolled key of site" in problem["detail"]
    with controller.http(controller.token("auditor")) as http:
        _problem(http.get(f"/api/v1/sites/{site.id}/checkpoint"), 404)


def test_malformed_bodies_are_refused_with_400(controller: ControllerServer, site: Site) -> None:
    signed = site.grow(4)
    root_line = base64.b64encode(bytes(32)).decode()
    cases = {
        "no blank line": "old 0\n" + signed.replace("\n\n", "\n"),
        "no old line": "\n" + signed,
        "leading zero": "old 00\n\n" + signed,
        "not a number": "old four\n\n" + signed,
        "proof from 0": f"old 0\n{root_line}\n\n" + signed,
        "short proof hash": "old 0\nAAAA\n\n" + signed,
        "not base64": "old 0\n***\n\n" + signed,
        "64 proof lines": "old 2\n" + f"{root_line}\n" * 64 + "\n" + signed,
        "old above size": "old 5\n\n" + signed,
        "not a checkpoint": "old 0\n\nhello\n\n\u2014 x AAAAAAAA\n",
        "not utf-8": b"old 0\n\n\xff\xfe",
        "empty": "",
    }
    for why, body in cases.items():
        response = site.post(body)
        assert response.status_code == 400, (why, response.text)
        assert response.headers["content-type"].startswith("application/problem+json"), why


def test_site_credentials_are_checked_before_anything_else(controller: ControllerServer, site: Site) -> None:
    site.grow(2)
    body = witnessing.submission(site.log, 0).body()
    jwt = sitejwt.sign(site.key, site.id, controller.url)
    with controller.http(jwt) as http:
        assert http.post(ADD, content=body).status_code == 200
        assert "replayed" in _problem(http.post(ADD, content=body), 401)["detail"]
    with controller.http(controller.admin_token) as http:
        _problem(http.post(ADD, content=body), 403)
    with controller.http() as http:
        _problem(http.post(ADD, content=body), 401)
    with controller.http(controller.token("operator")) as http:
        _problem(http.get(f"/api/v1/sites/{site.id}/checkpoint"), 403)
    with controller.http(controller.token("admin")) as http:
        assert http.get(f"/api/v1/sites/{site.id}/checkpoint").status_code == 200
        _problem(http.get("/api/v1/sites/no-such-site/checkpoint"), 404)


def test_openapi_documents_the_plain_text_answers(controller: ControllerServer) -> None:
    with controller.http() as http:
        spec = http.get("/openapi.json").json()
    operation = spec["paths"][ADD]["post"]
    assert operation["summary"] and "text/plain" in operation["requestBody"]["content"]
    assert "text/plain" in operation["responses"]["200"]["content"]
    assert set(operation["responses"]["409"]["content"]) == {"text/x.tlog.size", "application/problem+json"}
    assert "application/problem+json" in operation["responses"]["422"]["content"]
    getter = spec["paths"]["/api/v1/sites/{site}/checkpoint"]["get"]
    assert getter["summary"] and "404" in getter["responses"]
