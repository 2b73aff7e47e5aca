"""Content-addressed storage of file bytes: `blobs/<aa>/<sha256>`, each stored once, immutable.

Blobs are model weights (some fine-tuned on regulated data), manifests and approvals: they are
read-only to the controller's user and unreadable by anyone else (files 0400, directories 0700).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sitewarden.files import fsync_dir, make_private_dirs

_SHA256 = re.compile(r"[0-9a-f]{64}")
BLOB_MODE = 0o400


def is_sha256(text: str) -> bool:
    return bool(_SHA256.fullmatch(text))


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def adopt(self, file: Path, sha256: str) -> Path:
        """Move a fully written, verified file into the store (atomic; durable before returning)."""
        target = self.path(sha256)
        make_private_dirs(target.parent)
        with open(file, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(file, BLOB_MODE)
        os.replace(file, target)
        fsync_dir(target.parent)
        return target

    def put_bytes(self, data: bytes) -> str:
        """Store small bytes (manifests, signature bundles); returns their SHA-256."""
        sha256 = hashlib.sha256(data).hexdigest()
        if self.exists(sha256):
            return sha256
        make_private_dirs(self.root)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self.adopt(Path(tmp), sha256)
        return sha256

    def put_many(self, items: list[bytes]) -> list[str]:
        """Store many small blobs; returns their SHA-256s, once all are durable.

        In phases rather than blob by blob: write every new file, sync them all, rename them
        into place, then sync each directory touched once. The syncs run in parallel, so the
        file system commits them together instead of one journal commit per blob.
        """
        digests = [hashlib.sha256(data).hexdigest() for data in items]
        new = {d: data for d, data in zip(digests, items, strict=True) if not self.exists(d)}
        if not new:
            return digests
        make_private_dirs(self.root)
        staged: dict[str, Path] = {}
        try:
            for sha256, data in new.items():
                fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
                staged[sha256] = Path(tmp)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.chmod(tmp, BLOB_MODE)
            with ThreadPoolExecutor(min(16, len(staged))) as pool:
                list(pool.map(_fsync_file, staged.values()))
                for sha256, tmp in staged.items():
                    target = self.path(sha256)
                    make_private_dirs(target.parent)
                    os.replace(tmp, target)
                # The root too: it lost the temporary names and may have gained new <aa> directories.
                list(pool.map(fsync_dir, {self.root} | {self.path(sha256).parent for sha256 in staged}))
        finally:
            for tmp in staged.values():
                tmp.unlink(missing_ok=True)  # only those not moved into place: a failure midway
        return digests

    def read_bytes(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
