"""`controller keygen` and `controller init --keys-from`: keys made offline, taken whole or not at all.

The key set is what a bank puts into the Secret of the chart's `keys.existingSecret`. `init`
publishes its root.json byte for byte and never sees the root key; every way a set can be wrong
(incomplete, carrying the root key, a root signed by another key or naming other online keys,
keys of another controller, a tampered root) is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata

from audit.note import ALG_COSIGNATURE_V1, write_key_pair
from controller.keyset import KeysetError, load_keyset, make_keyset
from controller.tuf_repo import TufRepository, load_signer
from sitewarden import keys as sitewarden_keys
from tests.controller_server import sitewarden


@pytest.fixture(scope="module")
def keyset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    base = tmp_path_factory.mktemp("keyset")
    facts = make_keyset(base / "set", "main", base / "offline" / "root.pem")
    return base / "set", base / "offline" / "root.pem", facts


def copy(keyset_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "set"
    shutil.copytree(keyset_dir, target)
    return target


def test_init_takes_the_offline_keys_and_publishes_the_offline_root_byte_for_byte(keyset, tmp_path: Path) -> None:
    directory, root_key, facts = keyset
    data = tmp_path / "data"
    done = sitewarden("controller", "init", "--data", str(data), "--keys-from", str(directory))
    assert done.returncode == 0, done.stderr
    assert "the TUF root key stays offline" in done.stderr
    published = (data / "tuf" / "metadata" / "1.root.json").read_bytes()
    assert published == (directory / "root.json").read_bytes()
    assert hashlib.sha256(published).hexdigest() == facts["root_sha256"]
    assert not (data / "keys" / "tuf-root.pem").exists()
    assert root_key.read_bytes() not in b"".join(p.read_bytes() for p in (data / "keys").iterdir())
    assert (data / "keys" / "witness.vkey").read_text().strip() == facts["witness_vkey"]
    shown = sitewarden("controller", "keys", "--data", str(data)).stdout
    assert facts["audit_vkey"] in shown and facts["witness_vkey"] in shown
    # The repository opens with the online keys alone and the offline root key can still rotate it.
    repo = TufRepository.open(data / "tuf", data / "keys")
    assert repo.version("root") == 1
    new_root = tmp_path / "new-root.pem"
    sitewarden_keys.generate_key(new_root)
    assert repo.rotate_root(new_root, root_key) == 2


def _signed_by_another_key(directory: Path, tmp_path: Path) -> None:
    """The same root, its signature replaced by one of a key that root does not name."""
    other = tmp_path / "other-root.pem"
    sitewarden_keys.generate_key(other)
    md = Metadata.from_bytes((directory / "root.json").read_bytes())
    md.signatures.clear()
    md.sign(load_signer(other))
    (directory / "root.json").write_bytes(md.to_bytes())


def _root_naming_other_online_keys(directory: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    make_keyset(other, "main", tmp_path / "other-root.pem")
    shutil.copy(other / "root.json", directory / "root.json")


def _tamper_root(directory: Path, tmp_path: Path) -> None:
    root = json.loads((directory / "root.json").read_text())
    root["signed"]["expires"] = "2099-01-01T00:00:00Z"
    (directory / "root.json").write_text(json.dumps(root))


def _foreign_audit_key(directory: Path, tmp_path: Path) -> None:
    (directory / "audit.key").unlink()
    (directory / "audit.vkey").unlink()
    write_key_pair("sitewarden/controller/other", directory, stem="audit")


def _witness_not_a_cosigner(directory: Path, tmp_path: Path) -> None:
    (directory / "witness.key").unlink()
    (directory / "witness.vkey").unlink()
    write_key_pair("sitewarden/witness/main", directory, stem="witness")


def _witness_vkey_of_another_key(directory: Path, tmp_path: Path) -> None:
    write_key_pair("sitewarden/witness/main", tmp_path, stem="w", key_type=ALG_COSIGNATURE_V1)
    shutil.copy(tmp_path / "w.vkey", directory / "witness.vkey")


def _with_root_key(directory: Path, tmp_path: Path) -> None:
    sitewarden_keys.generate_key(directory / "tuf-root.pem")


def _version_2(directory: Path, tmp_path: Path) -> None:
    md = Metadata.from_bytes((directory / "root.json").read_bytes())
    md.signed.version = 2
    (directory / "root.json").write_bytes(md.to_bytes())


@pytest.mark.parametrize(
    ("attack", "message"),
    [
        (lambda d, t: (d / "witness.key").unlink(), "lacks witness.key"),
        (_with_root_key, "holds the TUF root key"),
        (_signed_by_another_key, "not signed as required"),
        (_root_naming_other_online_keys, "does not name the"),
        (_tamper_root, "not signed as required"),
        (_version_2, "version 2"),
        (_foreign_audit_key, "sitewarden/controller/other"),
        (_witness_not_a_cosigner, "type 0x01"),
        (_witness_vkey_of_another_key, "is not the vkey of witness.key"),
    ],
)
def test_a_wrong_key_set_is_refused_naming_what_is_wrong(keyset, tmp_path: Path, attack, message: str) -> None:
    directory = copy(keyset[0], tmp_path)
    attack(directory, tmp_path)
    with pytest.raises(KeysetError) as refused:
        load_keyset(directory, "main")
    assert message in str(refused.value)


def test_init_writes_nothing_from_a_refused_key_set(keyset, tmp_path: Path) -> None:
    directory = copy(keyset[0], tmp_path)
    _tamper_root(directory, tmp_path)
    data = tmp_path / "data"
    done = sitewarden("controller", "init", "--data", str(data), "--keys-from", str(directory), env={"COLUMNS": "400"})
    assert done.returncode == 2 and "--keys-from" in done.stderr and "not signed as required" in done.stderr
    assert not data.exists(), "init wrote a data dir from a refused key set"


def test_keys_from_and_root_key_out_exclude_each_other(keyset, tmp_path: Path) -> None:
    done = sitewarden(
        "controller", "init", "--data", str(tmp_path / "d"), "--keys-from", str(keyset[0]),
        "--root-key-out", str(tmp_path / "r.pem"), env={"COLUMNS": "400"},
    )  # fmt: skip
    assert done.returncode == 2 and "exclude each other" in done.stderr


def test_keygen_refuses_to_put_the_root_key_into_the_set(tmp_path: Path) -> None:
    with pytest.raises(KeysetError, match="must not go into the Secret"):
        make_keyset(tmp_path / "set", "main", tmp_path / "set" / "root.pem")
