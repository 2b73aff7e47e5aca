"""The controller's side of the sites witnessing its log: cosignatures accepted only for its own checkpoints, by
the site's witness key, never moving back; the public checkpoint and consistency proofs; refusals recorded."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audit import Log, merkle
from audit.checkpoint import Checkpoint
from audit.checkpoint import parse as parse_checkpoint
from audit.note import ALG_COSIGNATURE_V1, Signer, note_text, open_note, signature_lines
from sitewarden.witnessing import site_witness_name
from tests.controller_server import ControllerServer
from tests.sim_agent import SimulatedAgent


def _signed_now(controller: ControllerServer) -> str:
    """Make a change and have the controller sign a checkpoint; its latest checkpoint, as served to anyone."""
    with controller.client(controller.admin_token) as admin:
        admin.post("/api/v1/sites", {"name": f"w-{uuid.uuid4().hex[:8]}"})
    with controller.http(controller.token("auditor")) as http:
        assert http.get("/api/v1/audit/export").status_code == 200
    with controller.http() as http:
        return http.get("/api/v1/audit/checkpoint").text


def _cosign(site: SimulatedAgent, checkpoint: str, key: Ed25519PrivateKey | None = None) -> bytes:
    return _cosign_text(site, note_text(checkpoint), key)


def _cosign_text(site: SimulatedAgent, text: str, key: Ed25519PrivateKey | None = None) -> bytes:
    signer = Signer.from_ed25519(site_witness_name(site.site_id), key or site.key, ALG_COSIGNATURE_V1)
    return (text + "\n" + signature_lines(text, signer)).encode()


def _post(site: SimulatedAgent, body: bytes, rid: str) -> httpx.Response:
    with site.controller.http(site.jwt()) as http:
        return http.post("/api/v1/agent/audit-cosignatures", content=body, headers={"X-Request-ID": rid})


def _grown(text: str) -> str:
    """A checkpoint text the controller never signed: its own, claiming more entries."""
    origin, size, root, _ = text.split("\n")
    return f"{origin}\n{int(size) + 1000}\n{root}\n"


@pytest.mark.parametrize("controller", ["sqlite"], indirect=True)
def test_cosignatures_are_taken_only_for_the_controllers_checkpoints_by_the_sites_key_and_never_backwards(
    controller: ControllerServer, tmp_path: Path
) -> None:
    site = SimulatedAgent.enroll(controller, f"w-{uuid.uuid4().hex[:8]}", {}, tmp_path)
    first = _signed_now(controller)
    cases = {
        "another key": (_cosign(site, first, Ed25519PrivateKey.generate()), 403),
        "a checkpoint never signed": (_cosign_text(site, _grown(note_text(first))), 409),
        "not a note": (b"hello", 400),
        "too large": (b"x" * 20_000, 400),
    }
    rids = {}
    for case, (body, status) in cases.items():
        rids[case] = uuid.uuid4().hex
        response = _post(site, body, rids[case])
        assert response.status_code == status, (case, response.text)
    ok = uuid.uuid4().hex
    assert _post(site, _cosign(site, first), ok).status_code == 204
    with controller.http() as http:
        served = http.get("/api/v1/audit/checkpoint").text
    witness = Signer.from_ed25519(site_witness_name(site.site_id), site.key, ALG_COSIGNATURE_V1)
    assert any(s.timestamp for s in open_note(served, [witness.vkey]).signatures)

    second = _signed_now(controller)
    assert _post(site, _cosign(site, second), uuid.uuid4().hex).status_code == 204
    rids["older"] = uuid.uuid4().hex
    older = _post(site, _cosign(site, first), rids["older"])
    assert older.status_code == 409 and "older" in older.json()["detail"]

    with Log.open(controller.data_dir / "audit", readonly=True) as log:
        entries = [json.loads(e) for e in log.iter_entries()]
    by_request = {e.get("request_id"): e for e in entries}
    for case, rid in rids.items():
        entry = by_request[rid]
        assert entry["type"] == "request" and entry["outcome"] == "refused", case
        assert entry["actor"] == f"site:{site.name}" and entry["action"] == "POST /api/v1/agent/audit-cosignatures"
    assert ok not in by_request  # a cosignature is kept with the log, not recorded in it


@pytest.mark.parametrize("controller", ["sqlite"], indirect=True)
def test_anyone_can_check_consistency_between_two_checkpoints_they_hold(controller: ControllerServer) -> None:
    early = parse_checkpoint(note_text(_signed_now(controller)))
    late = parse_checkpoint(note_text(_signed_now(controller)))
    with controller.http() as http:  # no credentials: public, like a transparency log's
        text = http.get("/api/v1/audit/consistency", params={"old": early.size, "new": late.size}).text
        proof = [base64.b64decode(line) for line in text.splitlines()]
        merkle.verify_consistency(early.size, late.size, proof, early.root, late.root)
        assert http.get("/api/v1/audit/consistency", params={"old": 0, "new": late.size}).status_code == 422
        assert http.get("/api/v1/audit/consistency", params={"old": late.size, "new": early.size}).status_code == 400
        beyond = http.get("/api/v1/audit/consistency", params={"old": 1, "new": late.size + 10**6})
        assert beyond.status_code == 404
    assert isinstance(late, Checkpoint) and late.origin == "sitewarden/controller/main"
