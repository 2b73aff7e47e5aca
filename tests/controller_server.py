"""A real controller for tests: `sitewarden controller init` and `serve` as processes, HTTPS on loopback."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from controller.client import Client
from tests.tls import TestPKI

STARTUP_DEADLINE_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sitewarden(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sitewarden", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


@dataclass
class ControllerServer:
    url: str
    data_dir: Path
    pki: TestPKI
    admin_token: str
    database: str
    process: subprocess.Popen[bytes]
    log_path: Path
    fleet_port: int = 0
    _tokens: dict[tuple[str, str], str] = field(default_factory=dict)

    def client(self, token: str | None = None) -> Client:
        return Client(self.url, token, str(self.pki.ca_cert))

    def http(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        return httpx.Client(base_url=self.url, verify=verify, headers=headers, timeout=60)

    def token(self, role: str, name: str | None = None) -> str:
        """An API token for `role` (created once per name)."""
        name = name or f"test-{role}"
        if (role, name) not in self._tokens:
            with self.client(self.admin_token) as admin:
                self._tokens[(role, name)] = admin.post("/api/v1/tokens", {"name": name, "role": role})["token"]
        return self._tokens[(role, name)]

    def cli_env(self, token: str | None = None) -> dict[str, str]:
        return {
            "SITEWARDEN_URL": self.url,
            "SITEWARDEN_CA_CERT": str(self.pki.ca_cert),
            "SITEWARDEN_TOKEN": token or self.admin_token,
        }

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_controller(
    base: Path,
    pki: TestPKI,
    database_url: str | None = None,
    public_url: str | None = None,
    *,
    fleet_port: int | None = None,
    fleet_address: str | None = None,
    consent_timeout: float | None = None,
) -> ControllerServer:
    """Init and serve a controller; `public_url` is where agents reach it (a proxy, in some tests), and
    `fleet_address` where their SuperNodes reach its Fleet gateway (on `fleet_port`)."""
    port = free_port()
    url = public_url or f"https://127.0.0.1:{port}"
    data_dir = base / "controller"
    # The TUF root key outside the data dir, as an operator keeps it (offline).
    root_key = base / "tuf-root-key.pem"
    args = ["controller", "init", "--data", str(data_dir), "--public-url", url, "--root-key-out", str(root_key)]
    if database_url:
        args += ["--database-url", database_url]
    done = sitewarden(*args)
    if done.returncode != 0:
        raise RuntimeError(f"controller init failed: {done.stderr}")
    admin_token = done.stdout.strip().splitlines()[-1]
    extra = ["--fleet-port", str(fleet_port or free_port())]
    if fleet_address:
        extra += ["--fleet-address", fleet_address]
    if consent_timeout:
        extra += ["--consent-timeout", str(consent_timeout)]
    server = serve(data_dir, pki, port, admin_token, database_url or "sqlite", extra)
    server.fleet_port = int(extra[1])
    return server


def serve(  # noqa: PLR0917 - the older callers pass the first five by position
    data_dir: Path, pki: TestPKI, port: int, admin_token: str, database: str, extra: list[str] | None = None
) -> ControllerServer:
    log_path = data_dir.parent / f"controller-{port}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - the child process writes it until it stops
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sitewarden",
            "controller",
            "serve",
            "--data",
            str(data_dir),
            "--port",
            str(port),
            "--tls-cert",
            str(pki.server_cert),
            "--tls-key",
            str(pki.server_key),
            "--log-level",
            os.environ.get("SITEWARDEN_TEST_CONTROLLER_LOG_LEVEL", "warning"),
            *(extra or []),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    server = ControllerServer(f"https://127.0.0.1:{port}", data_dir, pki, admin_token, database, process, log_path)
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"controller exited with {process.returncode}:\n{server.log()}")
        try:
            with server.http() as http:
                if http.get("/healthz").status_code == 200:
                    return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"controller did not answer within {STARTUP_DEADLINE_S} s:\n{server.log()}")
