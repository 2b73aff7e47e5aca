"""Durable, confined file writes: new files that must not exist yet, atomic replacement,
directory syncs, and files created strictly inside a directory.

A crash at any moment leaves either the old file or the complete new one, never half of
it; a secret file is created with its final mode, never readable by others even briefly.
A file whose name comes from outside (a release path a controller sent) is created with
`create_inside`, which follows no symbolic link and overwrites nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from sitewarden.errors import SitewardenError


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create `path` with `data`, durably; FileExistsError if it exists (keys are never overwritten)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data`: written to a temporary file, synced, renamed over it, directory synced."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
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
