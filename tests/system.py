"""Programs from Debian packages that some tests need (listed in .ci/debian-packages).

`.ci/system-deps` installs them before the suite runs when it runs as root. Elsewhere a test
whose programs are missing skips, unless SITEWARDEN_REQUIRE_SYSTEM=1 (as in CI) makes it fail.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def require(*programs: str) -> None:
    """Skip (or, under SITEWARDEN_REQUIRE_SYSTEM=1, fail) unless every program is on PATH."""
    missing = [p for p in programs if shutil.which(p) is None]
    if not missing:
        return
    message = f"needs {', '.join(missing)} (Debian packages in .ci/debian-packages; .ci/system-deps installs them)"
    if os.environ.get("SITEWARDEN_REQUIRE_SYSTEM") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _unavailable(message: str) -> None:
    if os.environ.get("SITEWARDEN_REQUIRE_SYSTEM") == "1":
        pytest.fail(message)
    pytest.skip(message)


def mount_tmpfs(path: Path, size: str) -> str:
    """Mount a tmpfs of `size` at `path`; "" when done, else why it could not be (it needs root)."""
    if shutil.which("mount") is None:
        return "needs mount (Debian package mount, in .ci/debian-packages)"
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return "" if done.returncode == 0 else f"cannot mount a tmpfs at {path} (needs root): {done.stderr.strip()}"


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def unavailable(message: str) -> None:
    """Skip with `message`, or fail under SITEWARDEN_REQUIRE_SYSTEM=1 (as in CI)."""
    _unavailable(message)


@contextmanager
def small_filesystem(path: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path`: a disk that fills up for real (needs root, as in CI)."""
    problem = mount_tmpfs(path, size)
    if problem:
        _unavailable(problem)
    try:
        yield path
    finally:
        unmount(path)


def fill(directory: Path) -> Path:
    """Write a file in `directory` until its file system is full; remove the file to free the space."""
    filler = directory / "filler"
    chunk = bytes(1 << 16)
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return filler
                chunk = chunk[: len(chunk) // 2]  # the last few blocks, to the byte
