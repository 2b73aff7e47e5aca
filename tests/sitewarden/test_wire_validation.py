"""What a hostile controller can put in a desired state or a manifest, and what the site makes of it.

The desired-state and manifest models validate every name, version, path, fingerprint and id
with the registry's rules (`sitewarden.names`) and tie each target to its release; files from
outside are created only inside their directory (`sitewarden.files.create_inside`); a
revocation verifies only with the key that signed it, over exactly what it names.
"""

from __future__ import annotations

import base64
import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from sitewarden import revocation
from sitewarden.desired import DesiredState, ReleaseManifest
from sitewarden.files import UnsafePathError, check_plain_tree, create_inside, is_within

SITE = "3f1c2b8e-5d7a-4e0b-9c6f-1a2b3c4d5e6f"
JOB = "7d9e8f10-1111-4a2b-8c3d-4e5f60718293"
FP = "ab" * 32
SHA = "cd" * 32
PREFIX = "releases/fraud-scorer/1.0.0"


def good_desired() -> dict[str, Any]:
    return {
        "site_id": SITE,
        "version": 3,
        "generated_at": "2026-12-06T09:00:00Z",
        "rollout": {"id": "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", "name": "v1"},
        "releases": [
            {
                "name": "fraud-scorer",
                "version": "1.0.0",
                "kind": "model",
                "runtime": "onnx",
                "manifest": {"target": f"{PREFIX}/release.json", "sha256": SHA, "size": 10},
                "files": [{"target": f"{PREFIX}/files/model.onnx", "path": "model.onnx", "sha256": SHA, "size": 5}],
                "approvals": [
                    {
                        "target": f"{PREFIX}/approvals/{FP}.json",
                        "sha256": SHA,
                        "size": 7,
                        "approver": "alice",
                        "key_fingerprint": FP,
                    }
                ],
            }
        ],
        "policy": None,
        "jobs": [
            {
                "id": JOB,
                "name": "ft-1",
                "base": {"name": "fraud-scorer", "version": "1.0.0"},
                "model_family": "tabular-logreg",
                "dataset": "transactions",
                "rounds": 3,
                "min_sites": 2,
                "strategy": "FedAvg",
                "differential_privacy": {"enabled": False},
                "secure_aggregation": False,
            }
        ],
    }


def with_change(path: str, value: Any) -> dict[str, Any]:
    """The good document with one field (dotted path, list indexes as numbers) set to `value`."""
    document = copy.deepcopy(good_desired())
    *parents, last = path.split(".")
    node: Any = document
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[int(last) if last.isdigit() else last] = value
    return document


def test_a_well_formed_desired_state_is_accepted() -> None:
    DesiredState.model_validate(good_desired())


HOSTILE = {
    "traversal file path": ("releases.0.files.0.path", "../../keys/site.pem", "path"),
    "absolute file path": ("releases.0.files.0.path", "/etc/cron.d/pwned", "path"),
    "backslash file path": ("releases.0.files.0.path", "..\\..\\keys\\site.pem", "path"),
    "dot segment": ("releases.0.files.0.path", "a/./model.onnx", "path"),
    "NUL in a path": ("releases.0.files.0.path", "model.onnx\x00.txt", "path"),
    "fingerprint that is a path": ("releases.0.approvals.0.key_fingerprint", "../../keys/site", "fingerprint"),
    "fingerprint in upper case": ("releases.0.approvals.0.key_fingerprint", "AB" * 32, "fingerprint"),
    "job id that is a path": ("jobs.0.id", "../../../etc", "job id"),
    "job name with a slash": ("jobs.0.name", "a/b", "job"),
    "release name that is a path": ("releases.0.name", "../keys", "release name"),
    "version that is a path": ("releases.0.version", "1.0.0/../../x", "version"),
    "site id that is not a uuid": ("site_id", "../other-site", "site id"),
    "approver with a slash": ("releases.0.approvals.0.approver", "alice/../bob", "approver"),
    "unknown kind": ("releases.0.kind", "shell", "kind"),
    "digest that is not hex": ("releases.0.files.0.sha256", "z" * 64, "digest"),
    "negative size": ("releases.0.files.0.size", -1, "greater than or equal"),
    "file target of another release": (
        "releases.0.files.0.target",
        "releases/other/9.9.9/files/model.onnx",
        "is not releases/fraud-scorer/1.0.0/files/model.onnx",
    ),
    "file target that is the site's key": ("releases.0.files.0.target", "../keys/site.pem", "is not"),
    "manifest target elsewhere": ("releases.0.manifest.target", "sites/x/desired.json", "manifest target"),
    "approval target of another key": (
        "releases.0.approvals.0.target",
        f"{PREFIX}/approvals/{'e' * 64}.json",
        "approval",
    ),
    "unknown field": ("releases.0.exec", "rm -rf /", "Extra inputs"),
    "base that is not a release": (
        "jobs.0.base",
        {"name": "x", "version": "1", "path": "/"},
        "exactly name and version",
    ),
    "participant that is not a site id": ("jobs.0.participants", ["../../x"], "site id"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_desired_state_is_malformed_and_names_what_is_wrong(case: str) -> None:
    path, value, said = HOSTILE[case]
    with pytest.raises(ValidationError) as refused:
        DesiredState.model_validate(with_change(path, value))
    assert said in str(refused.value)


def test_a_file_listed_twice_or_as_file_and_directory_is_refused() -> None:
    twice = good_desired()
    twice["releases"][0]["files"].append(dict(twice["releases"][0]["files"][0]))
    with pytest.raises(ValidationError, match="listed twice"):
        DesiredState.model_validate(twice)
    both = good_desired()
    both["releases"][0]["files"].append(
        {"target": f"{PREFIX}/files/model.onnx/x", "path": "model.onnx/x", "sha256": SHA, "size": 1}
    )
    with pytest.raises(ValidationError, match="is a file and the directory"):
        DesiredState.model_validate(both)


def test_limits_bound_the_work_a_document_can_ask_for() -> None:
    many = good_desired()
    many["releases"][0]["files"] = [
        {"target": f"{PREFIX}/files/f{i}", "path": f"f{i}", "sha256": SHA, "size": 1} for i in range(10_001)
    ]
    with pytest.raises(ValidationError, match="at most 10000"):
        DesiredState.model_validate(many)


def manifest(**changes: Any) -> dict[str, Any]:
    document = {
        "name": "fraud-scorer",
        "version": "1.0.0",
        "kind": "model",
        "runtime": "onnx",
        "files": [{"path": "model.onnx", "sha256": SHA, "size": 5}],
        "metadata": {"owner": "risk"},
        "uploaded_by": "bob",
        "created_at": "2026-12-06T09:00:00Z",
    }
    return {**document, **changes}


def test_the_manifest_is_validated_with_the_same_rules() -> None:
    ReleaseManifest.model_validate(manifest())
    for bad, said in (
        (manifest(files=[{"path": "../../keys/site.pem", "sha256": SHA, "size": 1}]), "path"),
        (manifest(name="../x"), "release name"),
        (manifest(version="latest"), "version"),
        (manifest(kind="model", runtime="rego"), "runtime"),
        (manifest(files=[]), "at least 1"),
    ):
        with pytest.raises(ValidationError, match=said):
            ReleaseManifest.model_validate(bad)


# -- files created inside their directory -----------------------------------------------------


def test_create_inside_makes_directories_and_the_file_inside(tmp_path: Path) -> None:
    with create_inside(tmp_path, "files/a/b/model.onnx") as f:
        f.write(b"x")
    assert (tmp_path / "files/a/b/model.onnx").read_bytes() == b"x"
    assert (tmp_path / "files/a/b/model.onnx").stat().st_mode & 0o777 == 0o600
    assert check_plain_tree(tmp_path) == ["files/a/b/model.onnx"]


@pytest.mark.parametrize("relative", ["../escape", "/tmp/escape", "a/../../escape", "", "a//b", "./a"])
def test_create_inside_refuses_paths_that_leave_the_directory(tmp_path: Path, relative: str) -> None:
    inside = tmp_path / "staging"
    inside.mkdir()
    with pytest.raises(UnsafePathError):
        create_inside(inside, relative)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["staging"]


def test_create_inside_follows_no_symbolic_link_on_the_way_or_at_the_end(tmp_path: Path) -> None:
    outside, staging = tmp_path / "outside", tmp_path / "staging"
    outside.mkdir()
    staging.mkdir()
    (staging / "files").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="not a directory of its own"):
        create_inside(staging, "files/model.onnx")
    (staging / "release.json").symlink_to(outside / "release.json")
    with pytest.raises(UnsafePathError):
        create_inside(staging, "release.json")
    assert list(outside.iterdir()) == []
    with pytest.raises(UnsafePathError):
        create_inside(tmp_path / "staging" / "files", "x")  # the directory itself may not be a link


def test_create_inside_overwrites_nothing(tmp_path: Path) -> None:
    (tmp_path / "approvals").mkdir()
    (tmp_path / "approvals" / "k.json").write_bytes(b"trusted")
    with pytest.raises(UnsafePathError, match="exists already"):
        create_inside(tmp_path, "approvals/k.json")
    assert (tmp_path / "approvals" / "k.json").read_bytes() == b"trusted"


def test_check_plain_tree_refuses_links_and_special_files(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "model.onnx").write_bytes(b"x")
    (tmp_path / "files" / "link").symlink_to("/etc/passwd")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        check_plain_tree(tmp_path)
    (tmp_path / "files" / "link").unlink()
    os.mkfifo(tmp_path / "files" / "fifo")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        check_plain_tree(tmp_path)


def test_is_within_resolves_links(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "keys").mkdir(parents=True)
    (tmp_path / "elsewhere").symlink_to(data / "keys")
    assert is_within(tmp_path / "elsewhere" / "alice.pem", data)
    assert not is_within(tmp_path / "approvers" / "alice.pem", data)


# -- revocations --------------------------------------------------------------------------------


def _key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, pem


def test_a_revocation_verifies_with_its_key_and_names_what_it_revokes() -> None:
    key, pem = _key()
    document = revocation.sign_revocation(
        key, name="fraud-scorer", version="1.2.0", manifest_sha256=SHA, reason="drift on segment B"
    )
    found = revocation.verify_revocation(document, {"alice": pem})
    assert (found.name, found.version, found.manifest_sha256, found.approver) == ("fraud-scorer", "1.2.0", SHA, "alice")
    assert found.reason == "drift on segment B" and found.key_fingerprint == revocation.fingerprint(key.public_key())


def test_a_revocation_by_another_key_or_altered_is_refused() -> None:
    key, pem = _key()
    _, other = _key()
    document = revocation.sign_revocation(key, name="fraud-scorer", version="1.2.0", manifest_sha256=SHA, reason="x")
    with pytest.raises(revocation.RevocationError, match="not signed by a trusted approver key"):
        revocation.verify_revocation(document, {"mallory": other})
    envelope = json.loads(document)
    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload["version"] = "1.0.0"  # revoke the good release instead
    envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    with pytest.raises(revocation.RevocationError, match="not signed"):
        revocation.verify_revocation(json.dumps(envelope).encode(), {"alice": pem})


@pytest.mark.parametrize(
    "document",
    [b"", b"[]", b"{}", b'{"payload": 1, "payloadType": "x", "signatures": []}', b"x" * 20000, b'{"payload": "%%"}'],
)
def test_a_malformed_revocation_is_a_revocation_error(document: bytes) -> None:
    _, pem = _key()
    with pytest.raises(revocation.RevocationError):
        revocation.verify_revocation(document, {"alice": pem})
