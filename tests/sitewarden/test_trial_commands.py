"""What a newcomer runs before anything else: `dev pki`, a shipped policy pack named with `--pack`, and the
pack's files all in the wheel's package data (so that `pip install sitewarden` carries them)."""

from __future__ import annotations

import fnmatch
import os
import ssl
import stat
import subprocess
import tomllib
from pathlib import Path

from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[2]


def test_dev_pki_writes_a_ca_and_a_loopback_server_certificate_and_never_overwrites(tmp_path: Path) -> None:
    done = run_cli("dev", "pki", "--out", str(tmp_path / "pki"))
    assert done.returncode == 0, done.stderr
    assert b"for trials only" in done.stderr
    ca, cert, key = (tmp_path / "pki" / n for n in ("ca.pem", "server.pem", "server.key"))
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)  # the key matches the certificate
    ssl.create_default_context(cafile=str(ca))  # a CA file a client can load
    before = cert.read_bytes()
    again = run_cli("dev", "pki", "--out", str(tmp_path / "pki"))
    assert again.returncode == 2 and b"refusing to overwrite" in again.stderr
    assert cert.read_bytes() == before


def test_a_pack_is_named_by_pack_and_an_unknown_one_or_a_path_as_well_is_refused(tmp_path: Path) -> None:
    """(The README walk-through pushes `--pack bank`; here the refusals, which need no Rego run.)"""
    unknown = run_cli("policy", "test", "--pack", "nope")
    assert unknown.returncode == 2 and b"the shipped packs are bank" in unknown.stderr
    both = run_cli("policy", "push", str(tmp_path), "--pack", "bank", "--name", "p", "--version", "1.0.0")
    assert both.returncode == 2 and b"one of them" in both.stderr
    neither = run_cli("policy", "test")
    assert neither.returncode == 2 and b"give a bundle PATH or --pack NAME" in neither.stderr


def test_every_file_of_the_shipped_packs_is_in_the_package_data() -> None:
    """`pip install sitewarden` carries what `policy push --pack` needs: every tracked file under
    policies/packs/ matches a package-data pattern of the `policies` package."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["policies"]
    tracked = subprocess.run(
        ["git", "ls-files", "policies/packs"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert tracked, "no pack files tracked"
    for path in tracked:
        relative = path.removeprefix("policies/")
        # setuptools globs: `*` does not cross `/`, as fnmatch on each part checks.
        assert any(
            len(p.split("/")) == len(relative.split("/"))
            and all(fnmatch.fnmatchcase(a, b) for a, b in zip(relative.split("/"), p.split("/"), strict=True))
            for p in patterns
        ), f"{path} is not in the package data of `policies`"
