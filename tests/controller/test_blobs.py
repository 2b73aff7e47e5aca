"""controller.blobs.BlobStore: content-addressed, immutable, durable; many small blobs at once."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from controller import blobs as blobs_module
from controller.blobs import BlobStore


def test_put_many_stores_each_blob_once_under_its_digest(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    items = [f'{{"site":{i}}}'.encode() for i in range(300)] + [b"same", b"same"]
    digests = store.put_many(items)
    assert digests == [hashlib.sha256(item).hexdigest() for item in items]
    for digest, item in zip(digests, items, strict=True):
        assert store.read_bytes(digest) == item
        assert store.path(digest).stat().st_mode & 0o777 == 0o400  # immutable, and private
    assert not list(store.root.glob(".incoming-*"))
    assert store.put_many(items[:5]) == digests[:5]  # already there: nothing rewritten


def test_put_many_leaves_no_temporary_files_when_it_fails_midway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BlobStore(tmp_path / "blobs")

    def failing_fsync(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(blobs_module, "_fsync_file", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        store.put_many([b"a", b"b", b"c"])
    assert not list(store.root.glob(".incoming-*"))
    assert not store.exists(hashlib.sha256(b"a").hexdigest())
