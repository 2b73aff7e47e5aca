"""python-tuf's own client (`ngclient.Updater`) against the live controller: what agents will do."""

from __future__ import annotations

import base64
import hashlib
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tuf.api import exceptions

from sitewarden import tufclient
from sitewarden.keys import encode_public_key
from tests.controller_server import ControllerServer


def _release(controller: ControllerServer, files: dict[str, bytes]) -> tuple[str, str]:
    name = f"tuf-{uuid.uuid4().hex[:8]}"
    token = controller.token("operator")
    entries = []
    with controller.http(token) as http:
        for path, data in files.items():
            sha = hashlib.sha256(data).hexdigest()
            info = http.post("/api/v1/uploads", json={"sha256": sha, "size": len(data)}).json()
            if not info["complete"]:
                http.patch(f"/api/v1/uploads/{info['id']}", content=data, headers={"Upload-Offset": "0"})
            entries.append({"path": path, "sha256": sha, "size": len(data)})
        created = http.post(
            "/api/v1/releases",
            json={
                "name": name,
                "version": "1.0.0",
                "kind": "model",
                "runtime": "onnx",
                "files": entries,
                "metadata": {"owner": "tuf-test"},
            },
        )
        assert created.status_code == 201, created.text
    return name, "1.0.0"


def _enrolled_root(controller: ControllerServer) -> bytes:
    with controller.client(controller.admin_token) as admin:
        site = admin.post("/api/v1/sites", {"name": f"tuf-{uuid.uuid4().hex[:8]}"})
        token = admin.post(f"/api/v1/sites/{site['id']}/join-tokens", {"ttl_seconds": 600})["token"]
    with controller.http() as http:
        enrolled = http.post(
            "/api/v1/enroll", json={"token": token, "public_key": encode_public_key(Ed25519PrivateKey.generate())}
        ).json()
    return base64.b64decode(enrolled["root"])


def _updater(controller: ControllerServer, tmp_path: Path, root: bytes | None = None):
    """python-tuf's client with an operator's token (a site reads only what its desired state names)."""
    return tufclient.updater(
        tmp_path / "metadata",
        controller.url,
        root=root,
        target_dir=tmp_path / "targets",
        ca_cert=str(controller.pki.ca_cert),
        credential=tufclient.bearer(controller.token("operator")),
    )


def _blob(controller: ControllerServer, data: bytes) -> Path:
    sha = hashlib.sha256(data).hexdigest()
    return controller.data_dir / "blobs" / sha[:2] / sha


def test_agent_verifies_and_downloads_a_release_through_tuf(controller: ControllerServer, tmp_path: Path) -> None:
    weights = uuid.uuid4().bytes * 5000
    name, version = _release(controller, {"model.onnx": weights, "config/labels.json": b'["fraud","ok"]'})
    updater = _updater(controller, tmp_path, _enrolled_root(controller))
    updater.refresh()
    info = updater.get_targetinfo(f"releases/{name}/{version}/files/model.onnx")
    assert info is not None and info.length == len(weights)
    path = updater.download_target(info, str(tmp_path / "model.onnx"))
    assert Path(path).read_bytes() == weights
    manifest = updater.get_targetinfo(f"releases/{name}/{version}/release.json")
    assert manifest is not None
    assert b'"name":"' + name.encode() in Path(updater.download_target(manifest, str(tmp_path / "r.json"))).read_bytes()
    assert updater.get_targetinfo(f"releases/{name}/{version}/files/missing.bin") is None


def test_agent_refuses_target_bytes_changed_on_the_controller_disk(
    controller: ControllerServer, tmp_path: Path
) -> None:
    weights = b"original weights " * 1000
    name, version = _release(controller, {"model.onnx": weights})
    blob = _blob(controller, weights)
    blob.chmod(0o644)
    blob.write_bytes(b"tampered weights " * 1000)  # same length, other bytes
    updater = _updater(controller, tmp_path, _enrolled_root(controller))
    updater.refresh()
    info = updater.get_targetinfo(f"releases/{name}/{version}/files/model.onnx")
    assert info is not None
    with pytest.raises(exceptions.LengthOrHashMismatchError):
        updater.download_target(info, str(tmp_path / "model.onnx"))
    assert not (tmp_path / "model.onnx").exists()


def test_agent_refuses_a_target_longer_than_its_signed_length(controller: ControllerServer, tmp_path: Path) -> None:
    weights = b"short weights " * 100
    name, version = _release(controller, {"model.onnx": weights})
    blob = _blob(controller, weights)
    blob.chmod(0o644)
    blob.write_bytes(weights + b"and an endless tail " * 1000)
    updater = _updater(controller, tmp_path, _enrolled_root(controller))
    updater.refresh()
    info = updater.get_targetinfo(f"releases/{name}/{version}/files/model.onnx")
    with pytest.raises(exceptions.DownloadLengthMismatchError):
        updater.download_target(info, str(tmp_path / "model.onnx"))


def test_agent_refuses_an_older_timestamp_after_seeing_a_newer_one(
    controller: ControllerServer, tmp_path: Path
) -> None:
    root = _enrolled_root(controller)
    timestamp = controller.data_dir / "tuf" / "metadata" / "timestamp.json"
    old = timestamp.read_bytes()
    _release(controller, {"model.onnx": uuid.uuid4().bytes})
    updater = _updater(controller, tmp_path, root)
    updater.refresh()  # the client now trusts the newer timestamp
    current = timestamp.read_bytes()
    try:
        timestamp.write_bytes(old)  # a mirror or attacker replays an older one
        with pytest.raises(exceptions.BadVersionNumberError):
            _updater(controller, tmp_path).refresh()
    finally:
        timestamp.write_bytes(current)
