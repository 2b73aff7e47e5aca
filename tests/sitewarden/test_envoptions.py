"""Options from `SITEWARDEN_<OPTION>` and mounted `SITEWARDEN_<OPTION>_FILE` files, attacked.

The files are laid out as kubelet mounts a Secret (`key -> ..data/key -> ..<timestamp>/key`),
which must be accepted; a symlink out of the mount, a device, a FIFO, a directory, an oversized,
empty or non-UTF-8 file, a missing file, and a value given both ways are refused with a message
naming the variable, before the command does anything. The real commands are run too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from sitewarden.envoptions import MAX_FILE_BYTES, EnvironmentCommand
from tests.controller_server import sitewarden

app = typer.Typer()


@app.command(cls=EnvironmentCommand)
def show(
    database_url: Annotated[str | None, typer.Option("--database-url")] = None,
    port: Annotated[int, typer.Option("--port")] = 8443,
) -> None:
    typer.echo(f"url={database_url!r} port={port}")


def run(env: dict[str, str], *args: str):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SITEWARDEN_")}
    wide = {"COLUMNS": "400", "NO_COLOR": "1"}  # rich would wrap the error panel
    return CliRunner().invoke(app, list(args), env={**{k: None for k in os.environ}, **clean, **wide, **env})


def mount(directory: Path, data: dict[str, str]) -> Path:
    """A Secret volume as kubelet's atomic writer lays it out."""
    stamp = directory / "..2026_12_06_08_00_00.123"
    stamp.mkdir(parents=True)
    for key, value in data.items():
        (stamp / key).write_text(value)
        (directory / key).symlink_to(f"..data/{key}")
    (directory / "..data").symlink_to(stamp.name)
    return directory


def test_values_come_from_the_command_line_then_the_variable_then_the_mounted_file(tmp_path: Path) -> None:
    secret = mount(tmp_path / "db", {"url": "postgresql+psycopg://u:p@db/sw\n"})
    assert (
        "url='postgresql+psycopg://u:p@db/sw' port=9000"
        in run({"SITEWARDEN_DATABASE_URL_FILE": str(secret / "url"), "SITEWARDEN_PORT": "9000"}).output
    )
    assert "url='x'" in run({"SITEWARDEN_DATABASE_URL": "x"}).output
    assert "url='cli'" in run({"SITEWARDEN_DATABASE_URL": "x"}, "--database-url", "cli").output


def test_a_wrong_type_from_the_environment_names_the_variable() -> None:
    result = run({"SITEWARDEN_PORT": "eighty"})
    assert result.exit_code == 2 and "SITEWARDEN_PORT" in result.output


@pytest.mark.parametrize(
    "attack",
    ["both-set", "missing", "directory", "device", "fifo", "oversized", "empty", "not-utf8", "symlink-out", "dir-link"],
)
def test_an_untrustworthy_secret_file_is_refused_naming_the_variable(tmp_path: Path, attack: str) -> None:
    secret = mount(tmp_path / "mnt", {"url": "postgresql+psycopg://db/sw"})
    outside = tmp_path / "data-volume"
    outside.mkdir()
    (outside / "site.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    env = {"SITEWARDEN_DATABASE_URL_FILE": str(secret / "url")}
    expected = "cannot read the file"
    if attack == "both-set":
        env["SITEWARDEN_DATABASE_URL"] = "postgresql+psycopg://other/sw"
        expected = "both SITEWARDEN_DATABASE_URL and SITEWARDEN_DATABASE_URL_FILE are set"
    elif attack == "missing":
        env["SITEWARDEN_DATABASE_URL_FILE"] = str(secret / "nope")
    elif attack == "directory":
        env["SITEWARDEN_DATABASE_URL_FILE"] = str(secret)
        expected = "not a regular file"
    elif attack == "device":
        env["SITEWARDEN_DATABASE_URL_FILE"] = "/dev/zero"
        expected = "not a regular file"
    elif attack == "fifo":
        os.mkfifo(tmp_path / "fifo")
        env["SITEWARDEN_DATABASE_URL_FILE"] = str(tmp_path / "fifo")
        expected = "not a regular file"
    elif attack == "oversized":
        (tmp_path / "big").write_bytes(b"x" * (MAX_FILE_BYTES + 1))
        env["SITEWARDEN_DATABASE_URL_FILE"] = str(tmp_path / "big")
        expected = "larger than"
    elif attack == "empty":
        (tmp_path / "empty").write_text("\n")
        env["SITEWARDEN_DATABASE_URL_FILE"] = str(tmp_path / "empty")
        expected = "the file is empty"
    elif attack == "not-utf8":
        (tmp_path / "latin").write_bytes(b"caf\xe9")
        env["SITEWARDEN_DATABASE_URL_FILE"] = str(tmp_path / "latin")
        expected = "not UTF-8"
    elif attack == "symlink-out":
        # Someone who can write the mount's directory points the key at the data volume's site key.
        (secret / "url").unlink()
        (secret / "url").symlink_to(outside / "site.pem")
        expected = "a symlink must not leave its directory"
    elif attack == "dir-link":
        # ... or the whole ..data at another directory.
        (secret / "..data").unlink()
        (secret / "..data").symlink_to(outside)
        (outside / "url").write_text("postgresql+psycopg://evil/sw")
        expected = "a symlink must not leave its directory"
    result = run(env)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "SITEWARDEN_DATABASE_URL" in result.output
    assert "url=" not in result.output  # the command itself never ran
    assert "BEGIN PRIVATE KEY" not in result.output and "evil" not in result.output


def test_the_real_commands_refuse_a_secret_file_that_leaves_its_mount(tmp_path: Path) -> None:
    secret = mount(tmp_path / "db", {"database-url": "sqlite:///x.db"})
    (secret / "database-url").unlink()
    (secret / "database-url").symlink_to("/etc/passwd")
    env = {"SITEWARDEN_DATABASE_URL_FILE": str(secret / "database-url"), "COLUMNS": "400"}
    done = sitewarden("controller", "migrate", env=env)
    assert done.returncode == 2 and "must not leave its directory" in done.stderr, done.stderr
    assert "root:" not in done.stderr + done.stdout


def test_the_join_token_file_may_be_gone_once_its_secret_is_deleted(tmp_path: Path) -> None:
    """An enrolled agent restarts after the token's Secret was deleted: the empty optional mount is fine."""
    empty_mount = tmp_path / "join-token"
    empty_mount.mkdir()
    done = sitewarden(
        "agent",
        "run",
        "--data",
        str(tmp_path / "data"),
        env={"SITEWARDEN_JOIN_TOKEN_FILE": str(empty_mount / "token"), "COLUMNS": "400"},
    )
    # Not a complaint about the file: the data dir is simply not enrolled.
    assert done.returncode != 0
    assert "JOIN_TOKEN_FILE" not in done.stderr and "enroll" in done.stderr, done.stderr
    # Any other option's file must be there.
    env = {"SITEWARDEN_DATABASE_URL_FILE": str(empty_mount / "url"), "COLUMNS": "400"}
    done = sitewarden("controller", "migrate", env=env)
    assert done.returncode == 2 and "cannot read the file" in done.stderr
