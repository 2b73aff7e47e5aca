"""Command options from the environment, the way Kubernetes hands configuration to a container.

A command declared with `cls=EnvironmentCommand` takes every option from, in this order:

1. the command line;
2. the variable `SITEWARDEN_<OPTION>` (`--tls-cert` reads `SITEWARDEN_TLS_CERT`), unless the
   option names its own variable;
3. the file named by `SITEWARDEN_<OPTION>_FILE`, its content with one trailing newline removed:
   how a mounted Secret passes a database URL or a join token without putting it in the
   pod's environment or on its command line;
4. the option's default.

Setting both `SITEWARDEN_X` and `SITEWARDEN_X_FILE` is an error that names both, and so is a
file that cannot be read or trusted (see `read_secret_file`): a pod that is configured two ways,
or half-configured, must not start on a guess. The rule applies to every option of such a command, including options
added later, so that nothing in a chart needs an option-by-option list.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import click
from typer.core import TyperCommand, TyperOption

PREFIX = "SITEWARDEN_"
FILE_SUFFIX = "_FILE"
# Secret values are URLs, tokens and paths: anything larger is not one (and must not fill memory).
MAX_FILE_BYTES = 64 * 1024


def variable_for(option: click.Option) -> str:
    """The environment variable of an option: `--fleet-port` -> `SITEWARDEN_FLEET_PORT`."""
    longs = [o for o in option.opts if o.startswith("--")]
    name = longs[0][2:] if longs else (option.name or "")
    return PREFIX + name.upper().replace("-", "_")


def read_secret_file(variable: str, path: str) -> str:
    """The value a `*_FILE` variable points at; a clear error when it cannot be trusted or read.

    The file must be a regular file of at most `MAX_FILE_BYTES` that, symlinks followed, lies in
    the directory it is named in: Kubernetes mounts a Secret as `key -> ..data/key -> ..<ts>/key`
    inside the mount, so a symlink that leaves the directory (into the data volume, to another
    Secret's mount, to /proc) is someone else's file, refused. A device or FIFO (that would block
    or never end), a directory, an empty file and text that is not UTF-8 are refused too.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise click.UsageError(f"{variable}={path}: cannot read the file: {exc.strerror or exc}") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise click.UsageError(f"{variable}={path}: not a regular file")
    with os.fdopen(fd, "rb") as handle:
        if info.st_size > MAX_FILE_BYTES:
            raise click.UsageError(f"{variable}={path}: larger than {MAX_FILE_BYTES} bytes; not a secret value")
        opened = _opened_path(fd, path)
        home = os.path.realpath(os.path.dirname(os.path.abspath(path)))
        if os.path.commonpath([opened, home]) != home:
            raise click.UsageError(
                f"{variable}={path}: the file is {opened}, outside {home}: a symlink must not leave its directory"
            )
        raw = handle.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise click.UsageError(f"{variable}={path}: larger than {MAX_FILE_BYTES} bytes; not a secret value")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise click.UsageError(f"{variable}={path}: the file is not UTF-8 text") from exc
    # Secrets written with `echo` or a text editor end with a newline that is not part of the value.
    value = text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
    if not value:
        raise click.UsageError(f"{variable}={path}: the file is empty")
    return value


def _opened_path(fd: int, fallback: str) -> str:
    """The path of the file `fd` refers to (Linux: /proc/self/fd), symlinks resolved."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(fallback)


class EnvironmentOption(TyperOption):
    """A typer option that also reads `<VARIABLE>_FILE`."""

    def resolve_envvar_value(self, ctx: click.Context) -> str | None:
        names = [self.envvar] if isinstance(self.envvar, str) else list(self.envvar or [])
        for name in names:
            value = os.environ.get(name)
            file_path = os.environ.get(name + FILE_SUFFIX)
            if value and file_path:
                raise click.UsageError(f"both {name} and {name}{FILE_SUFFIX} are set: set one of them")
            if value:
                return value
            if file_path:
                if getattr(self, "file_may_be_missing", False) and not os.path.lexists(file_path):
                    return None
                return read_secret_file(name + FILE_SUFFIX, file_path)
        return None


class EnvironmentCommand(TyperCommand):
    """A command whose every option can come from `SITEWARDEN_<OPTION>` or `SITEWARDEN_<OPTION>_FILE`."""

    # Options whose `*_FILE` may name a file that is gone (the option is then unset): a value needed
    # once, like the join token, whose Secret is deleted after the first start. Subclasses name them.
    files_may_be_missing: frozenset[str] = frozenset()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if not isinstance(param, click.Option) or param.hidden or param.name == "help":
                continue
            if not param.envvar:
                param.envvar = variable_for(param)
            param.show_envvar = True
            if type(param) is TyperOption:
                param.__class__ = EnvironmentOption
                param.file_may_be_missing = param.name in self.files_may_be_missing  # type: ignore[attr-defined]
        note = (
            "Every option can also be set as the environment variable shown, or read from the file "
            f"that the same variable with {FILE_SUFFIX} appended names (for secrets mounted from a Kubernetes Secret)."
        )
        self.help = f"{self.help}\n\n{note}" if self.help else note
