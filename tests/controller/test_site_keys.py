"""A site's key history: after a rotation or a re-enrollment the witness keeps working for the site's new
log, every key the site held stays published as its log's vkey, and exports signed before verify."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audit import Log, verify_export
from audit.note import Signer, note_text
from sitewarden import sitejwt, witnessing
from sitewarden.keys import encode_public_key
from tests.conftest import make_entries
from tests.controller.test_controller_witness import ADD, _witness_vkey
from tests.controller_server import ControllerServer


class KeyedSite:
    """An enrolled site whose key (and so, whose log) can change."""

    def __init__(self, controller: ControllerServer, directory: Path) -> None:
        self.controller = controller
        self.directory = directory
        self.name = f"keys-{uuid.uuid4().hex[:8]}"
        with controller.client(controller.admin_token) as admin:
            admin.post("/api/v1/sites", {"name": self.name})
        self.id = self.enroll(Ed25519PrivateKey.generate())

    def enroll(self, key: Ed25519PrivateKey) -> str:
        with self.controller.client(self.controller.admin_token) as admin:
            token = admin.post(f"/api/v1/sites/{self.name}/join-tokens", {"ttl_seconds": 600})["token"]
        with self.controller.http() as http:
            enrolled = http.post("/api/v1/enroll", json={"token": token, "public_key": encode_public_key(key)})
        assert enrolled.status_code == 200, enrolled.text
        self.key = key
        return str(enrolled.json()["site_id"])

    def new_log(self, label: str) -> Log:
        return Log.open(self.directory / f"{self.name}-{label}", Signer.from_ed25519(f"sitewarden/{self.id}", self.key))

    def witnessed(self, log: Log, grow: int, witness_vkey: str) -> None:
        """Grow the log, sign, submit from the size the witness holds, store the cosignature."""
        last = log.last_checkpoint()
        old = last.size if last is not None else 0
        log.append_many(make_entries(grow, start=log.size))
        log.checkpoint()
        sent = witnessing.submission(log, old)
        with self.controller.http(sitejwt.sign(self.key, self.id, self.controller.url)) as http:
            response = http.post(ADD, content=sent.body(), headers={"Content-Type": "text/plain"})
        assert response.status_code == 200, response.text
        witnessing.store_cosignatures(log, sent, response.text, witness_vkey)

    def info(self) -> dict[str, Any]:
        with self.controller.http(self.controller.token("auditor")) as http:
            return http.get(f"/api/v1/sites/{self.id}").json()


@pytest.fixture
def site(controller: ControllerServer, tmp_path: Path) -> KeyedSite:
    return KeyedSite(controller, tmp_path)


def test_after_a_key_rotation_old_exports_verify_and_the_new_log_is_witnessed(
    controller: ControllerServer, site: KeyedSite, tmp_path: Path
) -> None:
    witness = _witness_vkey(controller)
    first = site.new_log("first")
    site.witnessed(first, 5, witness)
    old_export = first.export(tmp_path / "before-rotation")
    first.close()
    old_key = site.key

    new_key = Ed25519PrivateKey.generate()
    proof = sitejwt.sign(new_key, site.id, controller.url)
    with controller.http(sitejwt.sign(old_key, site.id, controller.url)) as http:
        rotated = http.post("/api/v1/agent/rotate-key", json={"public_key": encode_public_key(new_key), "proof": proof})
    assert rotated.status_code == 200, rotated.text
    site.key = new_key

    # The new key starts a new log (an audit log never changes its signing key): witnessed from 0.
    second = site.new_log("second")
    site.witnessed(second, 3, witness)
    site.witnessed(second, 4, witness)  # and onwards, consistency-checked
    new_export = second.export(tmp_path / "after-rotation")
    second.close()

    info = site.info()
    history = info["audit_vkeys"]
    assert [h["ended_by"] for h in history] == ["rotated", None]
    assert history[1]["vkey"] == info["audit_vkey"] and history[0]["vkey"] != info["audit_vkey"]
    assert history[0]["until"] is not None and history[1]["until"] is None
    # The last checkpoint witnessed under the old key is kept with it: the old log's end, cosigned.
    assert history[0]["last_checkpoint"].startswith(note_text(first_checkpoint(old_export)))
    # Exports made before the rotation verify with the old vkey as the controller publishes it.
    before = verify_export(old_export, [history[0]["vkey"]], witnesses=[witness])
    assert before.valid and before.size == 5 and before.witnesses, before.reason
    after = verify_export(new_export, [history[1]["vkey"]], witnesses=[witness])
    assert after.valid and after.size == 7, after.reason
    assert not verify_export(old_export, [history[1]["vkey"]], witnesses=[witness]).valid


def first_checkpoint(export: Path) -> str:
    return (export / "checkpoint").read_text()


def test_a_re_enrolled_site_starts_a_new_log_that_the_witness_cosigns(
    controller: ControllerServer, site: KeyedSite, tmp_path: Path
) -> None:
    witness = _witness_vkey(controller)
    log = site.new_log("before")
    site.witnessed(log, 40, witness)
    log.close()
    first_vkey = site.info()["audit_vkey"]

    assert site.enroll(Ed25519PrivateKey.generate()) == site.id  # a new agent, a new key, the same site
    fresh = site.new_log("after")
    site.witnessed(fresh, 2, witness)  # from 0: before, the witness held size 40 and would have answered 409
    fresh.close()
    with controller.http(controller.token("auditor")) as http:
        assert http.get(f"/api/v1/sites/{site.id}/checkpoint").json()["size"] == 2
    history = site.info()["audit_vkeys"]
    assert history[0]["vkey"] == first_vkey
    assert [h["ended_by"] for h in history] == ["re-enrolled", None]
    assert "\n40\n" in history[0]["last_checkpoint"]  # where the old log ended, as witnessed


def test_a_checkpoint_signed_with_the_retired_key_is_refused(controller: ControllerServer, site: KeyedSite) -> None:
    witness = _witness_vkey(controller)
    log = site.new_log("old")
    site.witnessed(log, 3, witness)
    old_key = site.key
    site.enroll(Ed25519PrivateKey.generate())
    log.append_many(make_entries(2, start=log.size))
    log.checkpoint()
    sent = witnessing.submission(log, 0)
    # Even with a JWT of the current key: the checkpoint is signed by the retired one.
    with controller.http(sitejwt.sign(site.key, site.id, controller.url)) as http:
        response = http.post(ADD, content=sent.body(), headers={"Content-Type": "text/plain"})
    assert response.status_code == 403, response.text
    with controller.http(sitejwt.sign(old_key, site.id, controller.url)) as http:
        assert http.post(ADD, content=sent.body(), headers={"Content-Type": "text/plain"}).status_code == 401
    log.close()
