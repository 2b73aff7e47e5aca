"""Shared fixtures: keys, logs, and running the `sitewarden` command as a real process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from audit import Log
from audit.note import Signer, generate_key

VECTORS = Path(__file__).parent / "vectors"


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
