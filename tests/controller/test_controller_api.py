"""The controller's REST API against a live server (HTTPS on loopback), on SQLite and on PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import update

from audit import Log
from controller import client as client_module
from controller.config import load
from controller.db import JoinTokenRecord, make_engine, utcnow
from sitewarden import approval, jointoken, sitejwt
from sitewarden.keys import encode_public_key
from tests.controller_server import ControllerServer


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"] and "detail" in body
    assert "Traceback" not in response.text
    return body


def _site(controller: ControllerServer, labels: dict[str, str] | None = None) -> dict[str, Any]:
    with controller.client(controller.admin_token) as admin:
        return admin.post("/api/v1/sites", {"name": _unique("site"), "labels": labels or {}})


def _join_token(controller: ControllerServer, site: str) -> str:
    with controller.client(controller.admin_token) as admin:
        return admin.post(f"/api/v1/sites/{site}/join-tokens", {"ttl_seconds": 600})["token"]


def _enroll(controller: ControllerServer, token: str, key: Ed25519PrivateKey) -> httpx.Response:
    with controller.http() as http:
        return http.post("/api/v1/enroll", json={"token": token, "public_key": encode_public_key(key)})


def _enrolled(controller: ControllerServer) -> tuple[str, Ed25519PrivateKey]:
    site = _site(controller)
    key = Ed25519PrivateKey.generate()
    response = _enroll(controller, _join_token(controller, site["name"]), key)
    assert response.status_code == 200, response.text
    return response.json()["site_id"], key


def _as_site(controller: ControllerServer, site_id: str, key: Ed25519PrivateKey, path: str = "/api/v1/agent/whoami"):
    with controller.http(sitejwt.sign(key, site_id, controller.url)) as http:
        return http.get(path)


# -- errors, limits, pagination ----------------------------------------------------------


def test_errors_are_problem_details_and_validation_names_the_field(controller: ControllerServer) -> None:
    with controller.http(controller.admin_token) as http:
        _problem(http.get("/api/v1/nothing-here"), 404)
        body = _problem(http.post("/api/v1/sites", json={"name": 5, "labels": {"a": "b"}}), 422)
        assert [e["field"] for e in body["errors"]] == ["name"]
        body = _problem(http.post("/api/v1/tokens", json={"name": "x", "role": "king"}), 400)
        assert "unknown role 'king'" in body["detail"]
        body = _problem(
            http.post("/api/v1/sites", content=b"{not json", headers={"content-type": "application/json"}), 422
        )
        assert body["errors"]


def test_oversized_bodies_are_refused_with_413(controller: ControllerServer) -> None:
    with controller.http(controller.admin_token) as http:
        huge = json.dumps({"name": "x", "labels": {f"k{i}": "v" * 60 for i in range(20000)}})
        _problem(http.post("/api/v1/sites", content=huge, headers={"content-type": "application/json"}), 413)

        def chunked():  # no Content-Length: the limit applies while streaming
            for _ in range(40):
                yield b" " * 65536

        _problem(http.post("/api/v1/sites", content=chunked(), headers={"content-type": "application/json"}), 413)


def test_list_endpoints_paginate(controller: ControllerServer) -> None:
    prefix = _unique("page")
    with controller.client(controller.admin_token) as admin:
        for i in range(5):
            admin.post("/api/v1/sites", {"name": f"{prefix}-{i}"})
        seen, after, pages = [], None, 0
        while True:
            page = admin.get("/api/v1/sites", params={"limit": 2, **({"after": after} if after else {})})
            assert len(page["items"]) <= 2
            seen += [s["name"] for s in page["items"]]
            pages += 1
            after = page["next"]
            if not after:
                break
    assert [n for n in seen if n.startswith(prefix)] == [f"{prefix}-{i}" for i in range(5)]
    assert pages >= 3
    with controller.http(controller.admin_token) as http:
        _problem(http.get("/api/v1/sites", params={"limit": 0}), 422)
        _problem(http.get("/api/v1/sites", params={"after": "%%%"}), 400)


# -- sites and enrollment ----------------------------------------------------------------


def test_site_labels_are_validated_and_names_unique(controller: ControllerServer) -> None:
    site = _site(controller, {"region": "eu-west", "tier": "prod"})
    assert site["labels"] == {"region": "eu-west", "tier": "prod"} and site["status"] == "pending"
    with controller.http(controller.admin_token) as http:
        _problem(http.post("/api/v1/sites", json={"name": site["name"]}), 409)
        _problem(http.post("/api/v1/sites", json={"name": "Not A DNS Label"}), 400)
        _problem(http.post("/api/v1/sites", json={"name": _unique("s"), "labels": {"Bad Key": "v"}}), 400)


def test_enrollment_returns_the_root_the_token_names_and_the_token_works_once(controller: ControllerServer) -> None:
    site = _site(controller)
    token = _join_token(controller, site["name"])
    parsed = jointoken.parse(token)
    assert parsed.controller_url == controller.url and parsed.site == site["name"]
    response = _enroll(controller, token, Ed25519PrivateKey.generate())
    assert response.status_code == 200, response.text
    enrolled = response.json()
    root = base64.b64decode(enrolled["root"])
    assert hashlib.sha256(root).hexdigest() == parsed.root_sha256
    assert json.loads(root)["signed"]["_type"] == "root"
    assert enrolled["site_id"] == site["id"]
    assert "already used" in _problem(_enroll(controller, token, Ed25519PrivateKey.generate()), 403)["detail"]
    with controller.client(controller.admin_token) as admin:
        assert admin.get(f"/api/v1/sites/{site['id']}")["status"] == "active"


def test_expired_foreign_and_malformed_join_tokens_are_refused(controller: ControllerServer) -> None:
    site = _site(controller)
    token = _join_token(controller, site["name"])
    parsed = jointoken.parse(token)
    engine = make_engine(load(controller.data_dir).database_url)
    with engine.begin() as conn:
        conn.execute(
            update(JoinTokenRecord)
            .where(JoinTokenRecord.id == parsed.token_id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    engine.dispose()
    key = Ed25519PrivateKey.generate()
    assert "expired" in _problem(_enroll(controller, token, key), 403)["detail"]
    foreign = jointoken.JoinToken(
        "0123456789abcdef", jointoken.new_secret(), controller.url, parsed.root_sha256, site["name"], parsed.expires_at
    ).encode()
    assert "not issued by this controller" in _problem(_enroll(controller, foreign, key), 403)["detail"]
    forged_secret = jointoken.JoinToken(
        parsed.token_id, jointoken.new_secret(), controller.url, parsed.root_sha256, site["name"], parsed.expires_at
    ).encode()
    _problem(_enroll(controller, forged_secret, key), 403)
    _problem(_enroll(controller, "swj1.garbage.garbage", key), 400)
    # An expiry no calendar holds, and one that is a boolean: refused as malformed, not a 500, and audited.
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    for expiry, said in ((10**20, "expiry"), (-(2**63), "expiry"), (253402300800, "expiry"), (True, "wrong type")):
        body = base64.urlsafe_b64encode(json.dumps({**payload, "e": expiry}).encode()).decode().rstrip("=")
        crafted, rid = f"swj1.{body}.{token.split('.')[2]}", uuid.uuid4().hex
        with controller.http() as http:
            enroll = {"token": crafted, "public_key": encode_public_key(key)}
            response = http.post("/api/v1/enroll", json=enroll, headers={"X-Request-ID": rid})
        assert said in _problem(response, 400)["detail"]
        with Log.open(controller.data_dir / "audit", readonly=True) as log:
            [entry] = [e for e in map(json.loads, log.iter_entries()) if e.get("request_id") == rid]
        assert (entry["type"], entry["result"], entry["outcome"]) == ("request", 400, "refused")
        assert entry["action"] == "POST /api/v1/enroll"
    with controller.http() as http:
        body = _problem(
            http.post(
                "/api/v1/enroll", json={"token": _join_token(controller, site["name"]), "public_key": "AAAA" * 11}
            ),
            400,
        )
    assert "32 bytes" in body["detail"]


def test_a_join_token_redeemed_concurrently_succeeds_once(controller: ControllerServer) -> None:
    token = _join_token(controller, _site(controller)["name"])
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(_enroll(controller, token, Ed25519PrivateKey.generate()).status_code)
        )
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] + [403] * 7


def test_disabled_site_cannot_enroll(controller: ControllerServer) -> None:
    site = _site(controller)
    token = _join_token(controller, site["name"])
    with controller.client(controller.admin_token) as admin:
        admin.post(f"/api/v1/sites/{site['name']}/disable")
    assert "disabled" in _problem(_enroll(controller, token, Ed25519PrivateKey.generate()), 403)["detail"]


# -- site JWTs ---------------------------------------------------------------------------


def test_site_jwt_authenticates_once_per_jti(controller: ControllerServer) -> None:
    site_id, key = _enrolled(controller)
    token = sitejwt.sign(key, site_id, controller.url)
    with controller.http(token) as http:
        first = http.get("/api/v1/agent/whoami")
        assert first.status_code == 200 and first.json()["site_id"] == site_id
        assert "replayed" in _problem(http.get("/api/v1/agent/whoami"), 401)["detail"]


def test_a_replayed_status_report_is_refused(controller: ControllerServer) -> None:
    # The status route records the jti in its own transaction (one commit): a replay must still fail.
    site_id, key = _enrolled(controller)
    token = sitejwt.sign(key, site_id, controller.url)
    report = {"desired_version": 0, "agent_version": "1.0", "checkpoint_size": 7, "artifacts": []}
    with controller.http(token) as http:
        assert http.post("/api/v1/agent/status", json=report).status_code == 204
        replay = http.post("/api/v1/agent/status", json=report | {"checkpoint_size": 99})
        assert "replayed" in _problem(replay, 401)["detail"]
        fresh = sitejwt.sign(key, site_id, controller.url)
        assert http.post("/api/v1/agent/status", json=report, headers={"Authorization": f"Bearer {fresh}"}).is_success


def test_the_status_route_authenticates_the_site_before_it_reads_the_body(controller: ControllerServer) -> None:
    # The route authenticates in its own transaction (auth.SITE_AUTH_IN_ROUTE), after FastAPI would have
    # validated a body parameter: the order of refusals must still be credentials first.
    site_id, key = _enrolled(controller)
    path, bad, good = "/api/v1/agent/status", {"desired_version": -1}, {"desired_version": 0, "agent_version": "1"}
    with controller.http() as http:
        _problem(http.post(path, json=bad), 401)
        _problem(http.post(path, json=bad, headers={"Authorization": f"Bearer {controller.admin_token}"}), 403)
        forged = sitejwt.sign(Ed25519PrivateKey.generate(), site_id, controller.url)
        _problem(http.post(path, json=bad, headers={"Authorization": f"Bearer {forged}"}), 401)
        token = {"Authorization": f"Bearer {sitejwt.sign(key, site_id, controller.url)}"}
        invalid = _problem(http.post(path, json=bad, headers=token), 422)
        assert {e["field"] for e in invalid["errors"]} == {"desired_version", "agent_version"}
        _problem(http.post(path, content=b"{not json", headers=token | {"Content-Type": "application/json"}), 422)
        _problem(http.post(path, content=json.dumps(good), headers=token | {"Content-Type": "text/plain"}), 422)
        _problem(http.post(path, headers=token), 422)
        # A refused report records nothing, its jti included (as when the jti was inserted by the dependency).
        assert http.post(path, json=good, headers=token).status_code == 204
        assert "replayed" in _problem(http.post(path, json=bad, headers=token), 401)["detail"]
        with controller.client(controller.admin_token) as admin:
            admin.post(f"/api/v1/sites/{site_id}/disable")
        fresh = {"Authorization": f"Bearer {sitejwt.sign(key, site_id, controller.url)}"}
        assert "disabled" in _problem(http.post(path, json=bad, headers=fresh), 403)["detail"]
        body = http.get("/openapi.json").json()["paths"][path]["post"]["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    assert body["required"] and set(schema["required"]) == {"desired_version", "agent_version"}
    assert schema["properties"]["artifacts"]["items"]["properties"]["state"]["enum"]  # nested models inlined


def _raw_jwt(key: Ed25519PrivateKey, claims: dict[str, Any]) -> str:
    return jwt.encode(claims, key, algorithm="EdDSA")


def test_bad_site_jwts_are_refused(controller: ControllerServer) -> None:
    site_id, key = _enrolled(controller)
    now = int(time.time())
    base = {"iss": site_id, "sub": site_id, "aud": controller.url, "iat": now, "exp": now + 60}
    cases = {
        "expired": {**base, "iat": now - 600, "exp": now - 300},
        "wrong audience": {**base, "aud": "https://elsewhere.example"},
        "lifetime over five minutes": {**base, "exp": now + 3600},
        "no jti": base,
    }
    for why, claims in cases.items():
        claims = {**claims, **({"jti": uuid.uuid4().hex} if why != "no jti" else {})}
        with controller.http(_raw_jwt(key, claims)) as http:
            assert http.get("/api/v1/agent/whoami").status_code == 401, why
    stranger = Ed25519PrivateKey.generate()
    with controller.http(sitejwt.sign(stranger, site_id, controller.url)) as http:
        assert http.get("/api/v1/agent/whoami").status_code == 401
    hs256 = jwt.encode({**base, "jti": uuid.uuid4().hex}, "secret-key-secret-key-secret-key", algorithm="HS256")
    with controller.http(hs256) as http:
        _problem(http.get("/api/v1/agent/whoami"), 401)


def test_a_disabled_site_is_refused_at_its_next_request(controller: ControllerServer) -> None:
    site_id, key = _enrolled(controller)
    assert _as_site(controller, site_id, key).status_code == 200
    with controller.client(controller.admin_token) as admin:
        admin.post(f"/api/v1/sites/{site_id}/disable")
    assert "disabled" in _problem(_as_site(controller, site_id, key), 403)["detail"]


def test_site_key_rotation_needs_the_old_key_and_proof_of_the_new(controller: ControllerServer) -> None:
    site_id, old = _enrolled(controller)
    new = Ed25519PrivateKey.generate()
    body = {"public_key": encode_public_key(new), "proof": sitejwt.sign(new, site_id, controller.url)}
    with controller.http(sitejwt.sign(old, site_id, controller.url)) as http:
        bad = {**body, "proof": sitejwt.sign(Ed25519PrivateKey.generate(), site_id, controller.url)}
        _problem(http.post("/api/v1/agent/rotate-key", json=bad), 400)
    with controller.http(sitejwt.sign(old, site_id, controller.url)) as http:
        assert http.post("/api/v1/agent/rotate-key", json=body).status_code == 200
    assert _as_site(controller, site_id, old).status_code == 401
    assert _as_site(controller, site_id, new).status_code == 200


# -- uploads and releases ----------------------------------------------------------------


def _upload(controller: ControllerServer, token: str, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    with controller.http(token) as http:
        info = http.post("/api/v1/uploads", json={"sha256": sha, "size": len(data)}).json()
        if not info["complete"]:
            done = http.patch(
                f"/api/v1/uploads/{info['id']}",
                content=data,
                headers={"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
            )
            assert done.status_code == 200 and done.json()["complete"], done.text
    return sha


def _card(**extra: Any) -> dict[str, Any]:
    return {"owner": "fraud-team", "intended_purposes": ["fraud"], "risk_tier": "medium", **extra}


def _release(
    controller: ControllerServer, token: str, files: dict[str, bytes], version: str = "1.0.0", name: str | None = None
) -> dict[str, Any]:
    entries = [{"path": p, "sha256": _upload(controller, token, d), "size": len(d)} for p, d in files.items()]
    with controller.client(token) as client:
        return client.post(
            "/api/v1/releases",
            {
                "name": name or _unique("model"),
                "version": version,
                "kind": "model",
                "runtime": "onnx",
                "files": entries,
                "metadata": _card(),
            },
        )


def test_interrupted_upload_resumes_from_its_offset(controller: ControllerServer) -> None:
    token = controller.token("operator")
    data = uuid.uuid4().bytes * 200_000  # 3.2 MB
    sha = hashlib.sha256(data).hexdigest()
    with controller.http(token) as http:
        info = http.post("/api/v1/uploads", json={"sha256": sha, "size": len(data)}).json()
        upload = f"/api/v1/uploads/{info['id']}"

        def broken():
            yield data[:1_000_000]
            raise ConnectionResetError("network went away")

        with pytest.raises(ConnectionResetError):
            http.patch(upload, content=broken(), headers={"Upload-Offset": "0", "Content-Length": str(len(data))})
        # What reached the server before the reset is kept; wait until it has settled.
        deadline, previous = time.monotonic() + 10, -1
        while (offset := http.get(upload).json()["offset"]) != previous and time.monotonic() < deadline:
            previous = offset
            time.sleep(0.2)
        assert 0 < offset <= 1_000_000
        # The same person starting the same upload again gets the unfinished one back.
        again = http.post("/api/v1/uploads", json={"sha256": sha, "size": len(data)}).json()
        assert (again["id"], again["offset"]) == (info["id"], offset)
        body = _problem(http.patch(upload, content=data[5:], headers={"Upload-Offset": "5"}), 409)
        assert body["offset"] == offset
        done = http.patch(upload, content=data[offset:], headers={"Upload-Offset": str(offset)}).json()
        assert done["complete"] and done["offset"] == len(data)
        # The blob is stored once: a second upload of the same bytes needs no bytes at all.
        assert http.post("/api/v1/uploads", json={"sha256": sha, "size": len(data)}).json()["complete"]


def test_upload_whose_bytes_do_not_match_the_declared_hash_stores_nothing(controller: ControllerServer) -> None:
    with controller.http(controller.token("operator")) as http:
        info = http.post("/api/v1/uploads", json={"sha256": "ab" * 32, "size": 4}).json()
        body = _problem(
            http.patch(f"/api/v1/uploads/{info['id']}", content=b"abcd", headers={"Upload-Offset": "0"}), 422
        )
        assert "not the declared" in body["detail"]
        assert http.get(f"/api/v1/uploads/{info['id']}").json() == {**info, "offset": 0}
        _problem(http.patch(f"/api/v1/uploads/{info['id']}", content=b"abcdef", headers={"Upload-Offset": "0"}), 400)


def test_releases_are_validated_and_immutable(controller: ControllerServer) -> None:
    token = controller.token("operator")
    release = _release(controller, token, {"model.onnx": b"weights", "tokenizer/vocab.json": b"{}"})
    assert [f["path"] for f in release["files"]] == ["model.onnx", "tokenizer/vocab.json"]
    assert release["uploaded_by"] == "test-operator" and release["approvals"] == []
    sha = _upload(controller, token, b"weights")
    good = {
        "name": release["name"],
        "version": "1.0.1",
        "kind": "model",
        "runtime": "onnx",
        "files": [{"path": "model.onnx", "sha256": sha, "size": 7}],
        "metadata": _card(),
    }
    with controller.http(token) as http:
        _problem(http.post("/api/v1/releases", json={**good, "version": release["version"]}), 409)
        _problem(http.post("/api/v1/releases", json={**good, "version": "01.0.0"}), 400)
        _problem(http.post("/api/v1/releases", json={**good, "runtime": "rego"}), 400)
        _problem(
            http.post("/api/v1/releases", json={**good, "files": [{"path": "../escape", "sha256": sha, "size": 7}]}),
            400,
        )
        _problem(
            http.post("/api/v1/releases", json={**good, "files": [{"path": "a?b", "sha256": sha, "size": 7}]}), 400
        )
        _problem(
            http.post("/api/v1/releases", json={**good, "files": [{"path": "m", "sha256": "cd" * 32, "size": 7}]}), 422
        )
        _problem(http.post("/api/v1/releases", json={**good, "files": [{"path": "m", "sha256": sha, "size": 8}]}), 422)
        body = _problem(http.post("/api/v1/releases", json={**good, "metadata": {"intended_purposes": []}}), 422)
        assert body["errors"][0]["field"] == "metadata.owner"
        shown = http.get(f"/api/v1/releases/{release['name']}/{release['version']}").json()
        assert shown["manifest_sha256"] == release["manifest_sha256"]


def test_release_files_download_for_operators_and_approvers(controller: ControllerServer) -> None:
    release = _release(controller, controller.token("operator"), {"model.onnx": b"the weights"})
    base = f"/api/v1/releases/{release['name']}/{release['version']}/files"
    for role in ("admin", "operator", "approver"):
        with controller.http(controller.token(role)) as http:
            assert http.get(f"{base}/model.onnx").content == b"the weights"
            manifest = http.get(f"{base}/release.json")
            assert hashlib.sha256(manifest.content).hexdigest() == release["manifest_sha256"]
    with controller.http(controller.token("auditor")) as http:
        _problem(http.get(f"{base}/model.onnx"), 403)
    with controller.http(controller.token("operator")) as http:
        _problem(http.get(f"{base}/missing.bin"), 404)


# -- approvals ---------------------------------------------------------------------------


def _approve(
    controller: ControllerServer, tmp_path: Path, release: dict[str, Any], key: Path, token: str
) -> httpx.Response:
    layout = tmp_path / _unique("layout")
    base = f"/api/v1/releases/{release['name']}/{release['version']}/files"
    with controller.http(controller.token("operator")) as http:
        (layout / "files").mkdir(parents=True)
        (layout / "release.json").write_bytes(http.get(f"{base}/release.json").content)
        for f in release["files"]:
            target = layout / "files" / f["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(http.get(f"{base}/{f['path']}").content)
    bundle = approval.sign_release(layout, key)
    with controller.http(token) as http:
        return http.post(
            f"/api/v1/releases/{release['name']}/{release['version']}/approvals",
            content=bundle,
            headers={"content-type": "application/json"},
        )


def _approver_key(controller: ControllerServer, tmp_path: Path, approver: str) -> Path:
    directory = tmp_path / _unique("key")
    directory.mkdir()
    approval.generate_approver_key(directory / "a.pem", directory / "a.pub.pem")
    with controller.client(controller.admin_token) as admin:
        admin.post("/api/v1/approvers", {"approver": approver, "public_key_pem": (directory / "a.pub.pem").read_text()})
    return directory / "a.pem"


def test_four_eyes_the_uploader_cannot_approve_their_own_release(controller: ControllerServer, tmp_path: Path) -> None:
    carol = _unique("carol")
    release = _release(controller, controller.token("operator", carol), {"model.onnx": b"carol's model"})
    key = _approver_key(controller, tmp_path, carol)
    body = _problem(_approve(controller, tmp_path, release, key, controller.token("approver", carol)), 403)
    assert "four eyes" in body["detail"]


def test_approvals_need_a_registered_key_of_the_caller_and_a_matching_signature(
    controller: ControllerServer, tmp_path: Path
) -> None:
    release = _release(controller, controller.token("operator"), {"model.onnx": b"model for approval"})
    dave, erin = _unique("dave"), _unique("erin")
    dave_key = _approver_key(controller, tmp_path, dave)
    # Erin has no registered key; signing with Dave's key does not make her an approver.
    body = _problem(_approve(controller, tmp_path, release, dave_key, controller.token("approver", erin)), 403)
    assert "no approver key is registered" in body["detail"]
    _approver_key(controller, tmp_path, erin)
    body = _problem(_approve(controller, tmp_path, release, dave_key, controller.token("approver", erin)), 422)
    assert "does not verify" in body["detail"]
    # An approval of another release (same files, other manifest) does not carry over.
    other = _release(
        controller,
        controller.token("operator"),
        {"model.onnx": b"model for approval"},
        name=release["name"],
        version="1.0.1",
    )
    approved = _approve(controller, tmp_path, release, dave_key, controller.token("approver", dave))
    assert approved.status_code == 201, approved.text
    assert approved.json()["approver"] == dave
    _problem(_approve(controller, tmp_path, release, dave_key, controller.token("approver", dave)), 409)
    bundle_sha = approved.json()["bundle_sha256"]
    with controller.http(controller.token("approver", dave)) as http:
        shown = http.get(f"/api/v1/releases/{release['name']}/{release['version']}").json()
        assert [a["approver"] for a in shown["approvals"]] == [dave]
        bundle = _bundle_of(controller, bundle_sha)
        reused = http.post(
            f"/api/v1/releases/{other['name']}/{other['version']}/approvals",
            content=bundle,
            headers={"content-type": "application/json"},
        )
    _problem(reused, 422)


def _bundle_of(controller: ControllerServer, sha256: str) -> bytes:
    return (controller.data_dir / "blobs" / sha256[:2] / sha256).read_bytes()


def test_client_sends_large_files_in_parts_under_the_body_limit(
    controller: ControllerServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file larger than one request may carry goes up in several PATCHes, each from the last offset."""
    monkeypatch.setattr(client_module, "PART", 1 << 20)
    data = uuid.uuid4().bytes * ((3 << 20) // 16 + 7)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    local = client_module.LocalFile("big.bin", source, hashlib.sha256(data).hexdigest(), len(data))
    seen: list[int] = []
    with controller.client(controller.token("operator")) as client:
        client.upload(local, seen.append)
        assert client.post("/api/v1/uploads", {"sha256": local.sha256, "size": local.size})["complete"]
    assert sum(seen) == len(data)
