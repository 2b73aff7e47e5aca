"""Files at rest are private whatever the umask: every writer of keys, audit logs, state and model files.

Each runs here under umask 0, the widest a process can inherit; what it creates must still be
0600 (directories 0700), and a key must never exist, even for an instant, with a wider mode.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile
from tuf.ngclient.fetcher import FetcherInterface

from audit import Log
from audit.note import generate_key, write_key_pair
from controller.blobs import BlobStore
from sitewarden import tufclient
from sitewarden.files import make_private_dirs, tighten_dir, write_atomically, write_new_file
from sitewarden.keys import generate_key as generate_site_key


@pytest.fixture
def wide_open() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in root.rglob("*")}


def test_an_audit_log_its_index_checkpoint_and_lock_are_private(tmp_path: Path, wide_open: None) -> None:
    with Log.open(tmp_path / "site" / "audit", generate_key("sitewarden/files")[0]) as log:
        log.append_many([b'{"n":1}', b'{"n":2}'])
        log.checkpoint()
    modes = _modes(tmp_path)
    assert {"site/audit/entries", "site/audit/checkpoint", "site/audit/index.offsets", "site/audit/lock"} <= set(modes)
    for path, mode in modes.items():
        assert mode == (0o700 if (tmp_path / path).is_dir() else 0o600), (path, oct(mode))


def test_a_log_written_by_an_older_version_with_wider_modes_is_narrowed_when_opened(
    tmp_path: Path, wide_open: None
) -> None:
    key = generate_key("sitewarden/files")[0]
    with Log.open(tmp_path / "audit", key) as log:
        log.append(b'{"n":1}')
        log.checkpoint()
    for name in ("entries", "index.offsets", "index.leaves", "lock"):
        os.chmod(tmp_path / "audit" / name, 0o644)
    with Log.open(tmp_path / "audit", key):
        pass
    assert all(mode == 0o600 for path, mode in _modes(tmp_path / "audit").items()), _modes(tmp_path / "audit")


def test_state_keys_and_new_directories_are_private(tmp_path: Path, wide_open: None) -> None:
    write_atomically(tmp_path / "state.json", b"{}")
    write_new_file(tmp_path / "keys" / "deep" / "hmac.key", b"secret")
    generate_site_key(tmp_path / "keys" / "site.pem")
    write_key_pair("sitewarden/files", tmp_path / "audit-keys")
    make_private_dirs(tmp_path / "releases" / "m" / "1.0.0")
    modes = _modes(tmp_path)
    for path, mode in modes.items():
        if path.endswith(".vkey"):
            continue  # a public key
        assert mode == (0o700 if (tmp_path / path).is_dir() else 0o600), (path, oct(mode))


def test_a_key_is_never_written_through_an_existing_file_or_a_planted_link(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"not yours")
    (tmp_path / "site.pem").symlink_to(target)
    with pytest.raises(Exception, match="already exists"):
        generate_site_key(tmp_path / "site.pem")
    assert target.read_bytes() == b"not yours"


def test_a_data_dir_made_wider_by_an_operator_is_narrowed(tmp_path: Path, wide_open: None) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o777)
    tighten_dir(data)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700


class _Bytes(FetcherInterface):
    def __init__(self, data: bytes) -> None:
        self.data = data

    def _fetch(self, url: str) -> Iterator[bytes]:
        yield self.data


def test_model_files_downloaded_through_tuf_are_private_and_never_written_through_a_link(
    tmp_path: Path, wide_open: None
) -> None:
    weights = b"weights" * 1000
    info = TargetFile(len(weights), {"sha256": hashlib.sha256(weights).hexdigest()}, "releases/m/1.0.0/model.onnx")
    dest = tmp_path / "model.onnx"
    tufclient.download_verified(_Bytes(weights), "https://c/x", info, dest)
    assert dest.read_bytes() == weights and stat.S_IMODE(dest.stat().st_mode) == 0o600
    planted = tmp_path / "planted.onnx"
    victim = tmp_path / "victim"
    victim.write_bytes(b"the site's approver keys")
    planted.symlink_to(victim)
    with pytest.raises(FileExistsError):
        tufclient.download_verified(_Bytes(weights), "https://c/x", info, planted)
    assert victim.read_bytes() == b"the site's approver keys" and planted.is_symlink()


def test_blobs_at_the_controller_are_read_only_and_private(tmp_path: Path, wide_open: None) -> None:
    store = BlobStore(tmp_path / "blobs")
    digest = store.put_bytes(b"manifest")
    assert stat.S_IMODE(store.path(digest).stat().st_mode) == 0o400
    assert stat.S_IMODE(store.path(digest).parent.stat().st_mode) == 0o700
