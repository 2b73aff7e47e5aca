"""Durable, private file writes: new files that must not exist yet, atomic replacement, directory syncs.

A crash at any moment leaves either the old file or the complete new one, never half of
it. Everything Sitewarden keeps at rest (keys, audit logs, state, models) is the site's or
the controller's own business: files are created 0600 and directories 0700, whatever the
process umask, and a file is never readable by others even briefly (it is created with its
final mode, then set to exactly that mode, which a umask can only have narrowed).
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from pathlib import Path

log = logging.getLogger("sitewarden")

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
PRIVATE_UMASK = 0o077


def restrict_umask() -> int:
    """Set the process umask to 0077, so that whatever the process (or a library) creates is private.

    Called first by the long-running commands (`agent run`, `agent enroll`, `controller init`,
    `controller serve`); returns the previous umask.
    """
    return os.umask(PRIVATE_UMASK)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dirs(directory: Path) -> Path:
    """Create `directory` and its missing parents with mode 0700 (exactly, whatever the umask).

    Directories that exist already are left as they are (see `tighten_dir` for a data dir).
    """
    directory = Path(directory)
    missing: list[Path] = []
    probe = directory
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for created in reversed(missing):
        try:
            os.mkdir(created, PRIVATE_DIR)
        except FileExistsError:
            continue  # made meanwhile by someone else: not ours to change
        os.chmod(created, PRIVATE_DIR)
    return directory


def tighten_dir(directory: Path) -> Path:
    """Make `directory` a private directory (0700): created if missing, narrowed if it exists.

    For data dirs, which an operator (or a volume mount) may have created with a wider mode.
    A directory this user does not own is left alone with a warning, as is a symbolic link.
    """
    directory = make_private_dirs(Path(directory))
    info = os.lstat(directory)
    if stat.S_ISLNK(info.st_mode):
        log.warning("%s is a symbolic link; its target's mode is left as it is", directory)
    elif stat.S_IMODE(info.st_mode) != PRIVATE_DIR:
        try:
            os.chmod(directory, PRIVATE_DIR)
        except PermissionError:
            log.warning("%s has mode %o and cannot be narrowed to 0700 by this user", directory, info.st_mode & 0o777)
    return directory


def open_new(path: Path, mode: int = PRIVATE_FILE, *, nofollow: bool = True) -> int:
    """Create `path` exclusively and return a writable descriptor; the file has exactly `mode`.

    O_EXCL (and O_NOFOLLOW) so that an existing file or a planted symbolic link is never written
    through; the file is created with `mode` (the umask can only narrow it) and then set to it.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_new_file(path: Path, data: bytes, mode: int = PRIVATE_FILE) -> None:
    """Create `path` with `data`, durably; FileExistsError if it exists (keys are never overwritten).

    Missing parent directories are created 0700.
    """
    make_private_dirs(path.parent)
    fd = open_new(path, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomically(path: Path, data: bytes, mode: int = PRIVATE_FILE) -> None:
    """Replace `path` with `data`: written to a temporary file, synced, renamed over it, directory synced.

    The temporary file is created 0600 (mkstemp) and set to `mode` before it takes the name.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
