"""Shared fixtures: keys, logs, and running the `sitewarden` command as a real process."""
# ruff: noqa: E402 - torch is loaded first, see below

from __future__ import annotations

# torch before anything loads rego-cpp, or torch's import aborts the process (agent.lm.runtime.preload).
from agent.lm.runtime import preload

preload()

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from audit import Log
from audit.note import Signer, generate_key
from tests.controller_server import ControllerServer, start_controller
from tests.tls import TestPKI, make_pki

VECTORS = Path(__file__).parent / "vectors"

pytest_plugins = ["tests.pg"]
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """A test CA and a server certificate for 127.0.0.1."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session", params=BACKENDS)
def controller(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: TestPKI
) -> Iterator[ControllerServer]:
    """A controller process on loopback with TLS, once on SQLite and once on a real PostgreSQL server."""
    database_url = None
    if request.param == "postgresql":
        server = request.getfixturevalue("postgres_server")
        database_url = server.url_for(server.create_database())
    started = start_controller(tmp_path_factory.mktemp(f"controller-{request.param}"), pki, database_url)
    yield started
    started.stop()


@pytest.fixture
def keypair() -> tuple[str, str]:
    """A fresh (private key, vkey) pair for the origin sitewarden/test-site."""
    return generate_key("sitewarden/test-site")


@pytest.fixture
def signer(keypair: tuple[str, str]) -> Signer:
    return Signer(keypair[0])


@pytest.fixture
def log(tmp_path: Path, keypair: tuple[str, str]) -> Iterator[Log]:
    opened = Log.open(tmp_path / "log", keypair[0])
    yield opened
    opened.close()


def make_entries(count: int, start: int = 0, size: int = 60) -> list[bytes]:
    """Distinct, deterministic entries of varied length around `size` bytes."""
    return [(f'{{"i":{i},"pad":"' + "x" * (size + i % 37) + '"}').encode() for i in range(start, start + count)]


def run_cli(*args: str, stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m sitewarden ARGS` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "sitewarden", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
