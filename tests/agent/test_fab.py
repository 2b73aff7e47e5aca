"""The site's check of a Flower App release (`agent.fab.load_app`), on release directories as the
Syncer stages them: what passes is exactly an app release whose FAB bytes are the approved ones,
signed by an approver this site trusts; everything else is refused with the reason."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import rfc8785

from agent.errors import RefusedError
from agent.fab import load_app
from federation import APP_DIR, fab
from sitewarden import approval


def app_release(
    directory: Path, fab_file: Path, key: Path, *, name: str = "fedapp", version: str = "0.1.0", **manifest: Any
) -> Path:
    """An app release directory as the registry writes it and the Syncer stages it: `release.json`, the FAB
    under `files/`, and an approval signed with `key` (its public half at `<key>.pub.pem` beside it)."""
    (directory / "files").mkdir(parents=True)
    shutil.copy(fab_file, directory / "files" / fab_file.name)
    content = fab_file.read_bytes()
    document = {
        "name": name,
        "version": version,
        "kind": "app",
        "runtime": "flower",
        "files": [{"path": fab_file.name, "sha256": hashlib.sha256(content).hexdigest(), "size": len(content)}],
        "metadata": {"owner": "fl-team"},
        "uploaded_by": "olga",
        "created_at": "2026-01-01T00:00:00Z",
        **manifest,
    }
    (directory / "release.json").write_bytes(rfc8785.dumps(document))
    bundle = approval.sign_release(directory, key)
    public = key.with_name(key.name.replace(".pem", ".pub.pem")).read_bytes()
    (directory / "approvals").mkdir()
    (directory / "approvals" / f"{approval.key_fingerprint(public)}.json").write_bytes(bundle)
    return directory


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("approvers")
    for name in ("alice", "mallory"):
        approval.generate_approver_key(directory / f"{name}.pem", directory / f"{name}.pub.pem")
    return directory


@pytest.fixture(scope="module")
def fab_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fab.write(APP_DIR, tmp_path_factory.mktemp("fab"))


def trusted(keys: Path) -> dict[str, bytes]:
    return {"alice": (keys / "alice.pub.pem").read_bytes()}


def test_an_app_release_approved_by_a_trusted_approver_is_loaded(tmp_path: Path, keys: Path, fab_file: Path) -> None:
    release = app_release(tmp_path / "r", fab_file, keys / "alice.pem")
    app = load_app(release, trusted(keys))
    assert app.fab_sha256 == hashlib.sha256(fab_file.read_bytes()).hexdigest()
    assert (app.name, app.version, app.approvers) == ("fedapp", "0.1.0", ("alice",))
    assert app.fab_id == "sitewarden/sitewarden-fedapp" and app.fab_version == "0.1.0"
    assert app.describe()["manifest_sha256"] == hashlib.sha256((release / "release.json").read_bytes()).hexdigest()


def test_an_app_only_an_untrusted_approver_signed_is_refused(tmp_path: Path, keys: Path, fab_file: Path) -> None:
    release = app_release(tmp_path / "r", fab_file, keys / "mallory.pem")
    with pytest.raises(RefusedError, match="no approval by an approver this site trusts"):
        load_app(release, trusted(keys))


def test_fab_bytes_changed_on_disk_are_refused(tmp_path: Path, keys: Path, fab_file: Path) -> None:
    """Checked each time the release is used, not only when it was downloaded."""
    release = app_release(tmp_path / "r", fab_file, keys / "alice.pem")
    staged = release / "files" / fab_file.name
    staged.write_bytes(staged.read_bytes() + b"\0")
    with pytest.raises(RefusedError, match=r"hashes to [0-9a-f]{64}, not the approved"):
        load_app(release, trusted(keys))


@pytest.mark.parametrize(
    ("manifest", "problem"),
    [
        ({"kind": "model", "runtime": "onnx"}, "is a model release for onnx, not a Flower App"),
        ({"runtime": "rego"}, "not a Flower App"),
    ],
)
def test_a_release_of_another_kind_is_refused(
    tmp_path: Path, keys: Path, fab_file: Path, manifest: dict[str, Any], problem: str
) -> None:
    release = app_release(tmp_path / "r", fab_file, keys / "alice.pem", **manifest)
    with pytest.raises(RefusedError, match=problem):
        load_app(release, trusted(keys))


def test_an_app_release_is_exactly_one_fab(tmp_path: Path, keys: Path, fab_file: Path) -> None:
    other = tmp_path / "model.onnx"
    other.write_bytes(b"not an app")
    with pytest.raises(RefusedError, match=r"exactly one \.fab file"):
        load_app(app_release(tmp_path / "r", other, keys / "alice.pem"), trusted(keys))
    fake = tmp_path / "fake.fab"
    fake.write_bytes(b"PK\x03\x04 signed, but not a zip")
    with pytest.raises(RefusedError, match="not a Flower App Bundle"):
        load_app(app_release(tmp_path / "s", fake, keys / "alice.pem"), trusted(keys))


def test_a_missing_or_garbled_manifest_is_refused(tmp_path: Path, keys: Path, fab_file: Path) -> None:
    release = app_release(tmp_path / "r", fab_file, keys / "alice.pem")
    (release / "release.json").write_text(json.dumps({"name": "fedapp"}))
    with pytest.raises(RefusedError, match="manifest cannot be read"):
        load_app(release, trusted(keys))
    (release / "release.json").unlink()
    with pytest.raises(RefusedError, match="manifest cannot be read"):
        load_app(release, trusted(keys))
