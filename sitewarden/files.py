"""Durable, confined file writes: new files that must not exist yet, atomic replacement,
directory syncs, and files created strictly inside a directory.

A crash at any moment leaves either the old file or the complete new one, never half of
it. Everything Sitewarden keeps at rest (keys, audit logs, state, models) is the site's or
the controller's own business: files are created 0600 and directories 0700, whatever the
process umask, and a file is never readable by others even briefly (it is created with its
final mode, then set to exactly that mode, which a umask can only have narrowed).
A file whose name comes from outside (a release path a controller sent) is created with
`create_inside`, which follows no symbolic link and overwrites nothing.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

from sitewarden.errors import SitewardenError

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


class UnsafePathError(SitewardenError, ValueError):
    """A destination that would leave its directory, cross a symbolic link, or overwrite a file."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _components(relative: str) -> list[str]:
    parts = relative.split("/")
    if not relative or relative.startswith("/") or any(p in {"", ".", ".."} for p in parts) or "\x00" in relative:
        raise UnsafePathError(f"{relative!r} is not a relative path inside its directory")
    return parts


def open_dir_inside(directory: Path, relative: str = "", *, create: bool = True) -> int:
    """A file descriptor (O_DIRECTORY) of `directory/relative`, opened one component at a time with
    O_NOFOLLOW (each created, mode 0700, when missing and `create`): `UnsafePathError` when a
    component is a symbolic link or not a directory. `directory` itself must not be a link."""
    parts = _components(relative) if relative else []
    try:
        fd = os.open(directory, _DIR_FLAGS)
    except OSError as exc:
        raise UnsafePathError(f"{directory} is not a directory (or is a symbolic link): {exc.strerror}") from exc
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=fd)
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise UnsafePathError(f"{relative!r}: {part!r} is not a directory of its own: {exc.strerror}") from exc
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_inside(directory: Path, relative: str, mode: int = 0o600) -> BinaryIO:
    """A new file `directory/relative`, open for writing, that is certainly inside `directory`.

    Each directory on the way is opened relative to the one before it with O_NOFOLLOW (and
    created, mode 0700, when missing), and the file itself is created with O_CREAT | O_EXCL
    | O_NOFOLLOW: a symbolic link anywhere on the way, '..', an absolute path or a file that
    exists already is an `UnsafePathError`, and nothing is created outside `directory`,
    whatever another process does to the tree meanwhile. `directory` itself must not be a link.
    """
    parts = _components(relative)
    fd = open_dir_inside(directory, "/".join(parts[:-1])) if len(parts) > 1 else open_dir_inside(directory)
    try:
        file_fd = os.open(
            parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd
        )
    except FileExistsError as exc:
        raise UnsafePathError(f"{relative!r} exists already in {directory}: refusing to overwrite it") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(f"{relative!r} is a symbolic link") from exc
        raise
    finally:
        os.close(fd)
    return os.fdopen(file_fd, "wb")


def check_plain_tree(directory: Path) -> list[str]:
    """The relative paths of every regular file under `directory`, sorted; `UnsafePathError` on a
    symbolic link, a device, a socket or a FIFO anywhere in it (a release holds files and
    directories, nothing else), or when `directory` itself is a link or not a directory."""
    if directory.is_symlink() or not directory.is_dir():
        raise UnsafePathError(f"{directory} is a symbolic link or not a directory")
    found: list[str] = []
    pending = [(directory, "")]
    while pending:
        current, prefix = pending.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                relative = f"{prefix}{entry.name}"
                if entry.is_symlink():
                    raise UnsafePathError(f"{directory}: {relative} is a symbolic link")
                if entry.is_dir(follow_symlinks=False):
                    pending.append((Path(entry.path), f"{relative}/"))
                elif entry.is_file(follow_symlinks=False):
                    found.append(relative)
                else:
                    raise UnsafePathError(f"{directory}: {relative} is not a regular file")
    return sorted(found)


def is_within(path: Path, directory: Path) -> bool:
    """Whether `path`, with every symbolic link resolved, is `directory` or lies under it."""
    resolved, base = Path(path).resolve(), Path(directory).resolve()
    return resolved == base or base in resolved.parents
