"""Content-addressed storage of file bytes: `blobs/<aa>/<sha256>`, each stored once, immutable."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sitewarden.files import fsync_dir

_SHA256 = re.compile(r"[0-9a-f]{64}")


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
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(file, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(file, 0o444)
        os.replace(file, target)
        fsync_dir(target.parent)
        return target

    def put_bytes(self, data: bytes) -> str:
        """Store small bytes (manifests, signature bundles); returns their SHA-256."""
        sha256 = hashlib.sha256(data).hexdigest()
        if self.exists(sha256):
            return sha256
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self.adopt(Path(tmp), sha256)
        return sha256

    def put_many(self, items: list[bytes]) -> list[str]:
        """Store many small blobs; the file syncs run in parallel, so the file system commits them together."""
        if not items:
            return []
        with ThreadPoolExecutor(min(16, len(items))) as pool:
            return list(pool.map(self.put_bytes, items))

    def read_bytes(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()
