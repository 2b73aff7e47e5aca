"""The controller's keys and files at rest: where the TUF root key goes, the witness key never made
behind anyone's back, files private whatever the umask, and uploads only their starter continues."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from audit import Log
from controller import registry
from controller.db import Upload, utcnow
from controller.runtime import Runtime
from tests.controller_server import ControllerServer, free_port, serve, sitewarden
from tests.tls import TestPKI


def _init(data: Path, *extra: str, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    def preexec() -> None:
        if umask is not None:
            os.umask(umask)

    return subprocess.run(
        [sys.executable, "-m", "sitewarden", "controller", "init", "--data", str(data), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        preexec_fn=preexec,
    )


def _not_private(root: Path) -> list[str]:
    """Every file under `root` readable or writable by group or others, every directory not 0700."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_dir() and not path.is_symlink():
            if mode != 0o700:
                wrong.append(f"{path.relative_to(root.parent)}: {mode:o}")
        elif mode & 0o077:
            wrong.append(f"{path.relative_to(root.parent)}: {mode:o}")
    return wrong


def test_init_asks_where_the_root_key_goes_and_keeps_it_out_of_the_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "ctl"
    undecided = _init(data)
    assert undecided.returncode == 2
    assert "--root-key-out PATH" in undecided.stderr and "--root-key-online" in undecided.stderr
    assert not data.exists()
    inside = _init(data, "--root-key-out", str(data / "keys" / "root.pem"))
    assert inside.returncode == 2 and "inside the data dir" in inside.stderr
    both = _init(data, "--root-key-out", str(tmp_path / "r.pem"), "--root-key-online")
    assert both.returncode == 2 and "exclude each other" in both.stderr

    offline = tmp_path / "offline" / "root.pem"
    done = _init(data, "--root-key-out", str(offline), umask=0)
    assert done.returncode == 0, done.stderr
    assert offline.is_file() and stat.S_IMODE(offline.stat().st_mode) == 0o600
    assert not (data / "keys" / "tuf-root.pem").exists()
    assert "witness vkey: sitewarden/witness/main+" in done.stderr
    assert (data / "keys" / "witness.key").is_file()
    # Created under umask 0: every file 0600, every directory 0700 all the same.
    assert _not_private(data) == []

    online = _init(tmp_path / "trial", "--root-key-online")
    assert online.returncode == 0, online.stderr
    assert (tmp_path / "trial" / "keys" / "tuf-root.pem").is_file() and "kept online" in online.stderr


def test_init_narrows_a_data_dir_that_existed_with_a_wider_mode(tmp_path: Path) -> None:
    data = tmp_path / "made-by-an-operator"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    done = _init(data, "--root-key-online", umask=0o002)
    assert done.returncode == 0, done.stderr
    assert _not_private(data) == []


@pytest.fixture
def made(tmp_path: Path) -> tuple[Path, str]:
    data = tmp_path / "ctl"
    done = _init(data, "--root-key-out", str(tmp_path / "root.pem"))
    assert done.returncode == 0, done.stderr
    return data, done.stdout.strip().splitlines()[-1]


def test_a_missing_witness_key_stops_the_controller_and_says_how_to_restore_it(
    made: tuple[Path, str], tmp_path: Path
) -> None:
    data, _ = made
    keys = data / "keys"
    vkey = (keys / "witness.vkey").read_text().strip()
    backup = tmp_path / "backup-witness.key"
    shutil.copy2(keys / "witness.key", backup)
    (keys / "witness.key").unlink()

    refused = sitewarden("controller", "serve", "--data", str(data), "--port", str(free_port()))
    assert refused.returncode == 1
    assert "witness key" in refused.stderr and "is missing" in refused.stderr and vkey in refused.stderr
    assert "Restore it from your backup" in refused.stderr and "witness-keygen" in refused.stderr
    assert not (keys / "witness.key").exists(), "a new key was made behind everyone's back"
    assert sitewarden("controller", "keys", "--data", str(data)).returncode == 1

    # A key restored from the wrong backup is refused too: it is not the published vkey's.
    other = tmp_path / "other"
    assert _init(other, "--root-key-online", "--name", "main").returncode == 0
    shutil.copy2(other / "keys" / "witness.key", keys / "witness.key")
    wrong = sitewarden("controller", "keys", "--data", str(data))
    assert wrong.returncode == 1 and "wrong backup" in wrong.stderr

    shutil.copy2(backup, keys / "witness.key")
    restored = sitewarden("controller", "keys", "--data", str(data))
    assert restored.returncode == 0 and f"witness vkey: {vkey}" in restored.stdout


def test_witness_keygen_makes_a_new_key_only_when_there_is_none(made: tuple[Path, str]) -> None:
    data, _ = made
    refused = sitewarden("controller", "witness-keygen", "--data", str(data))
    assert refused.returncode == 1 and "refusing to replace the witness key" in refused.stderr
    old = (data / "keys" / "witness.vkey").read_text().strip()
    (data / "keys" / "witness.key").unlink()
    done = sitewarden("controller", "witness-keygen", "--data", str(data))
    assert done.returncode == 0, done.stderr
    new = done.stdout.strip()
    assert new != old and new.startswith("sitewarden/witness/main+")
    assert (data / "keys" / "witness.vkey").read_text().strip() == new
    assert stat.S_IMODE((data / "keys" / "witness.key").stat().st_mode) == 0o600


def test_a_serving_controller_writes_only_private_files_whatever_the_umask(
    made: tuple[Path, str], pki: TestPKI
) -> None:
    data, token = made
    previous = os.umask(0)  # inherited by the controller process
    try:
        server = serve(data, pki, free_port(), token, "sqlite")
    finally:
        os.umask(previous)
    try:
        payload = b"weights at rest " * 1000
        sha = hashlib.sha256(payload).hexdigest()
        with server.http(token) as http:
            upload = http.post("/api/v1/uploads", json={"sha256": sha, "size": len(payload)}).json()
            half = len(payload) // 2
            http.patch(f"/api/v1/uploads/{upload['id']}", content=payload[:half], headers={"Upload-Offset": "0"})
            # Half an upload in uploads/, then the whole blob, a release, TUF metadata, audit entries.
            assert _not_private(data) == []
            http.patch(f"/api/v1/uploads/{upload['id']}", content=payload[half:], headers={"Upload-Offset": str(half)})
            created = http.post(
                "/api/v1/releases",
                json={
                    "name": "at-rest",
                    "version": "1.0.0",
                    "kind": "model",
                    "runtime": "onnx",
                    "files": [{"path": "model.onnx", "sha256": sha, "size": len(payload)}],
                    "metadata": {"owner": "test"},
                },
            )
            assert created.status_code == 201, created.text
            assert http.post("/api/v1/sites", json={"name": "at-rest-site"}).status_code == 201
    finally:
        server.stop()
    assert _not_private(data) == []
    blob = data / "blobs" / sha[:2] / sha
    assert stat.S_IMODE(blob.stat().st_mode) == 0o400


# -- uploads ---------------------------------------------------------------------------------


def test_only_whoever_started_an_upload_can_continue_it(controller: ControllerServer) -> None:
    bob, carol = controller.token("operator", "bob"), controller.token("operator", "carol")
    payload = os.urandom(4096)
    sha = hashlib.sha256(payload).hexdigest()
    with controller.http(bob) as http:
        upload = http.post("/api/v1/uploads", json={"sha256": sha, "size": len(payload)}).json()
        assert (
            http.patch(
                f"/api/v1/uploads/{upload['id']}", content=payload[:1000], headers={"Upload-Offset": "0"}
            ).status_code
            == 200
        )
    with controller.http(carol) as http:
        planted = http.patch(f"/api/v1/uploads/{upload['id']}", content=b"x" * 3096, headers={"Upload-Offset": "1000"})
        assert planted.status_code == 404, planted.text
        assert http.get(f"/api/v1/uploads/{upload['id']}").status_code == 404
        # Starting the same bytes herself gives carol an upload of her own, not bob's.
        own = http.post("/api/v1/uploads", json={"sha256": sha, "size": len(payload)}).json()
        assert own["id"] != upload["id"] and own["offset"] == 0
    with controller.http(bob) as http:
        done = http.patch(f"/api/v1/uploads/{upload['id']}", content=payload[1000:], headers={"Upload-Offset": "1000"})
        assert done.status_code == 200 and done.json()["complete"] is True


@pytest.fixture
def runtime(made: tuple[Path, str]) -> Iterator[Runtime]:
    opened = Runtime.open(made[0])
    yield opened
    opened.close()


def test_abandoned_uploads_are_removed_with_their_bytes_and_audited(runtime: Runtime) -> None:
    long_ago = utcnow() - timedelta(seconds=runtime.config.upload_ttl_s + 3600)
    with runtime.session() as session:
        abandoned = registry.start_upload(session, runtime.blobs, "a" * 64, 100, "bob")
        active = registry.start_upload(session, runtime.blobs, "b" * 64, 100, "bob")
        fresh = registry.start_upload(session, runtime.blobs, "c" * 64, 100, "carol")
        assert abandoned is not None and active is not None and fresh is not None
        for upload in (abandoned, active, fresh):
            runtime.uploads.create(upload.id)
            runtime.uploads.path(upload.id).write_bytes(b"partial")
        abandoned.created_at = active.created_at = long_ago
        session.commit()
        ids = abandoned.id, active.id, fresh.id
    old = long_ago.timestamp()
    os.utime(runtime.uploads.path(ids[0]), (old, old))  # no byte since long ago
    # `active` was started long ago but received bytes just now (its file's mtime): kept.

    assert runtime.expire_uploads() == 1
    with runtime.session() as session:
        left = set(session.scalars(select(Upload.id)))
    assert ids[0] not in left and {ids[1], ids[2]} <= left
    assert not runtime.uploads.path(ids[0]).exists() and runtime.uploads.path(ids[1]).exists()
    assert runtime.audit is not None
    with Log.open(runtime.config.audit_dir, readonly=True) as trail:
        events = [json.loads(e) for e in trail.iter_entries()]
    expired = [e for e in events if e.get("type") == "change" and e["change"]["kind"] == "upload.expired"]
    assert len(expired) == 1 and expired[0]["change"]["upload_id"] == ids[0] and expired[0]["actor"] == "controller"
    assert expired[0]["action"] == "upload.expiry"
    assert expired[0]["change"]["started_by"] == "bob" and expired[0]["change"]["bytes_received"] == len(b"partial")


def test_the_metrics_need_a_credential_or_their_own_listener(made: tuple[Path, str], pki: TestPKI) -> None:
    data, token = made
    port = free_port()
    server = serve(data, pki, free_port(), token, "sqlite", ["--metrics-port", str(port)])
    try:
        with server.http() as anonymous:
            assert anonymous.get("/metrics").status_code == 401
            assert anonymous.get("/readyz").json() == {"status": "ready"}  # nothing about what it holds
        with server.http(token) as http:
            assert "sitewarden_http_requests_total" in http.get("/metrics").text
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert scraped.status_code == 200 and "sitewarden_http_requests_total" in scraped.text
    finally:
        server.stop()
