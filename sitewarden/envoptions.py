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
file that cannot be read: a pod that is configured two ways, or half-configured, must not
start on a guess. The rule applies to every option of such a command, including options
added later, so that nothing in a chart needs an option-by-option list.
"""

from __future__ import annotations

import os
from typing import Any

import click
from typer.core import TyperCommand, TyperOption

PREFIX = "SITEWARDEN_"
FILE_SUFFIX = "_FILE"


def variable_for(option: click.Option) -> str:
    """The environment variable of an option: `--fleet-port` -> `SITEWARDEN_FLEET_PORT`."""
    longs = [o for o in option.opts if o.startswith("--")]
    name = longs[0][2:] if longs else (option.name or "")
    return PREFIX + name.upper().replace("-", "_")


def read_secret_file(variable: str, path: str) -> str:
    """The value a `*_FILE` variable points at; a clear error when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise click.UsageError(f"{variable}={path}: cannot read the file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise click.UsageError(f"{variable}={path}: the file is not UTF-8 text") from exc
    # Secrets written with `echo` or a text editor end with a newline that is not part of the value.
    if text.endswith("\r\n"):
        return text[:-2]
    return text.removesuffix("\n")


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
                return read_secret_file(name + FILE_SUFFIX, file_path)
        return None


class EnvironmentCommand(TyperCommand):
    """A command whose every option can come from `SITEWARDEN_<OPTION>` or `SITEWARDEN_<OPTION>_FILE`."""

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
        note = (
            "Every option can also be set as the environment variable shown, or read from the file "
            f"that the same variable with {FILE_SUFFIX} appended names (for secrets mounted from a Kubernetes Secret)."
        )
        self.help = f"{self.help}\n\n{note}" if self.help else note
