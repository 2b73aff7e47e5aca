"""End-to-end harness: a real controller, real agents as processes, and the network between them.

The agents reach the controller through `Network`, a TLS proxy on loopback that the tests
control: it passes traffic through, or replays stale TUF metadata, or changes target
bytes in flight, like an attacker on the path would. Everything else is the product as a
platform engineer runs it: `sitewarden controller serve`, `sitewarden agent run`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from audit.note import Signer
from sitewarden.keys import load_private_key
from tests.controller_server import ControllerServer, free_port, sitewarden
from tests.tls import TestPKI

DEADLINE_S = 120
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


def wait_for(condition: Callable[[], Any], timeout: float = DEADLINE_S, what: str = "condition") -> Any:
    """Poll `condition` until it is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


class Network:
    """The path between agents and the controller, with an attacker's controls."""

    def __init__(self, pki: TestPKI) -> None:
        self.pki = pki
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.upstream = ""
        self.replay: dict[str, bytes] = {}
        self.tamper: Callable[[str, bytes], bytes] | None = None
        # An attacker's own answer to a request (None: pass it on), and seconds to hold a request first.
        self.answer: Callable[[Request], Any] | None = None
        self.stall: Callable[[str], float] | None = None
        self.seen: list[str] = []
        self.sent: list[bytes] = []  # every request body that passed, as the client sent it (TLS ends here)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cut: asyncio.Event | None = None

    async def _forward(self, request: Request) -> Response:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        self.seen.append(f"{request.method} {request.url.path}")
        body = await request.body()
        self.sent.append(path.encode() + b"\n" + b"\n".join(f"{k}: {v}".encode() for k, v in request.headers.items()))
        self.sent.append(body)
        if request.url.path in self.replay:
            return Response(self.replay[request.url.path], media_type="application/octet-stream")
        if self.answer is not None and (answered := self.answer(request)) is not None:
            return answered
        stall = self.stall(request.url.path) if self.stall is not None else 0.0
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        verify = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        if self._cut is None or self._cut.is_set():
            self._cut = asyncio.Event()
        cut = asyncio.ensure_future(self._cut.wait())
        try:
            async with httpx.AsyncClient(base_url=self.upstream, verify=verify, timeout=60) as client:

                async def forward() -> httpx.Response:
                    await asyncio.sleep(stall)  # a stalled path: nothing passes until then (or a cut)
                    return await client.request(request.method, path, content=body, headers=headers)

                forwarded = asyncio.ensure_future(forward())
                await asyncio.wait({forwarded, cut}, return_when=asyncio.FIRST_COMPLETED)
                if not forwarded.done():  # `cut()`: the path is broken under the request
                    forwarded.cancel()
                    return Response(b"connection cut", status_code=502)
                upstream = forwarded.result()
        except httpx.HTTPError:
            return Response(b"controller unreachable", status_code=502)
        finally:
            cut.cancel()
        body = upstream.content
        if self.tamper is not None and request.url.path.startswith("/tuf/targets/"):
            body = self.tamper(request.url.path, body)
        keep = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS | {"content-encoding"}}
        return Response(body, status_code=upstream.status_code, headers=keep)

    def cut(self) -> None:
        """End every request in flight with a 502, as a broken connection would (long polls included)."""
        if self._loop is not None and self._cut is not None:
            self._loop.call_soon_threadsafe(self._cut.set)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        assert self._server is not None
        await self._server.serve()

    def start(self, upstream: str) -> None:
        self.upstream = upstream
        app = Starlette(
            routes=[Route("/{path:path}", self._forward, methods=["GET", "POST", "PATCH", "PUT", "DELETE"])]
        )
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            ssl_certfile=str(self.pki.server_cert),
            ssl_keyfile=str(self.pki.server_key),
            log_level="warning",
            timeout_graceful_shutdown=2,  # a long poll in flight does not hold up the end of a test
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self._thread.start()
        wait_for(lambda: self._server is not None and self._server.started, 20, "the network proxy to start")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


@dataclass
class AgentProcess:
    """`sitewarden agent run` for one site, with its data dir, configuration and an app key."""

    name: str
    site_id: str
    data: Path
    config: Path
    port: int
    app_key: str
    process: subprocess.Popen[bytes] | None = None
    acknowledged: list[tuple[str, int]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    umask: int | None = None  # the umask the agent process inherits (None: this process's)
    run_args: list[str] = field(default_factory=lambda: ["--log-level", "warning"])
    ca_cert: Path | None = None  # set: the agent serves HTTPS with a certificate of this CA

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_cert else 'http'}://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        """An HTTP client for this agent (trusting its CA when it serves HTTPS)."""
        verify = ssl.create_default_context(cafile=str(self.ca_cert)) if self.ca_cert else True
        return httpx.Client(verify=verify, **kwargs)

    def start(self) -> None:
        log = open(self.data.parent / f"{self.name}.log", "ab")  # noqa: SIM115 - the child writes it until it stops
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sitewarden",
                "agent",
                "run",
                "--data",
                str(self.data),
                "--config",
                str(self.config),
                *self.run_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            preexec_fn=None if self.umask is None else lambda: os.umask(self.umask),
        )
        log.close()

        def live() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"agent {self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                with self.client(timeout=2) as http:
                    return http.get(f"{self.url}/v2/health/live").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(live, what=f"agent {self.name} to start")

    def log(self) -> str:
        path = self.data.parent / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def status(self) -> dict[str, Any]:
        with self.client(timeout=10) as http:
            return http.get(f"{self.url}/sitewarden/status", headers=self._auth()).json()

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.app_key}"}

    def infer(
        self,
        model: str,
        rows: list[list[float]],
        *,
        purpose: str | None = "fraud",
        data_class: str | None = "confidential",
        request_id: str | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        params = {k: v for k, v in (("purpose", purpose), ("data_class", data_class)) if v is not None}
        if body is None:
            request = {
                "inputs": [
                    {
                        "name": "features",
                        "shape": [len(rows), 8],
                        "datatype": "FP32",
                        "data": [x for row in rows for x in row],
                    }
                ],
                "parameters": params,
            }
            if request_id is not None:
                request["id"] = request_id
            body = json.dumps(request).encode()
        with self.client(timeout=30) as http:
            response = http.post(
                f"{self.url}/v2/models/{model}/infer",
                content=body,
                headers={**self._auth(), "Content-Type": "application/json", **(headers or {})},
            )
        if response.status_code == 200 and request_id is not None:
            self.acknowledged.append((request_id, response.json()["parameters"]["audit_index"]))
        return response

    def active(self) -> tuple[str, str] | None:
        active = self.status()["active"]
        return (active["name"], active["version"]) if active else None

    def policy(self) -> tuple[str, str] | None:
        """The active central policy bundle release, name and version."""
        central = self.status()["policy"]["central"]
        return (central["name"], central["version"]) if central else None

    def audit_vkey(self) -> str:
        identity = json.loads((self.data / "identity.json").read_text())
        return Signer.from_ed25519(
            f"sitewarden/{identity['site_id']}", load_private_key(self.data / "keys" / "site.pem")
        ).vkey


# The apps the tests use, bound to every purpose and data class they state (the policy then decides),
# "other" and "secret" included for the tests of unknown purposes and classes.
TEST_APPS = ("fraud-app", "batch-app", "load-app")
BOUND_PURPOSES = ("fraud", "aml", "kyc", "credit", "marketing", "service", "other")
BOUND_DATA_CLASSES = ("public", "internal", "confidential", "restricted", "secret")


def app_bindings(
    apps: tuple[str, ...],
    purposes: tuple[str, ...] = BOUND_PURPOSES,
    data_classes: tuple[str, ...] = BOUND_DATA_CLASSES,
) -> str:
    """`[apps.<name>]` tables of a site configuration binding each app to these purposes and data classes."""
    return "".join(
        f"[apps.{app}]\npurposes = {json.dumps(list(purposes))}\ndata_classes = {json.dumps(list(data_classes))}\n\n"
        for app in apps
    )


def enroll_agent(
    controller: ControllerServer,
    workdir: Path,
    name: str,
    labels: dict[str, str],
    approvers: dict[str, Path],
    *,
    extra_config: str = "",
    apps: str | None = None,
    tls: TestPKI | None = None,
) -> AgentProcess:
    """Create the site at the controller, enroll a fresh data dir, write its configuration and an app key.

    `apps` replaces the `[apps.<name>]` bindings (default: `TEST_APPS`, bound to everything the tests state).
    With `tls`, the agent serves HTTPS with that PKI's server certificate.
    """
    with controller.client(controller.admin_token) as admin:
        admin.post("/api/v1/sites", {"name": name, "labels": labels})
    join = sitewarden("site", "token", name, env=controller.cli_env()).stdout.strip()
    data = workdir / name / "data"
    done = sitewarden("agent", "enroll", "--token", join, "--data", str(data), "--ca-cert", str(controller.pki.ca_cert))
    assert done.returncode == 0, done.stderr
    key = sitewarden("agent", "app-key", "create", "fraud-app", "--data", str(data)).stdout.strip()
    port = free_port()
    config = workdir / name / "site.toml"
    trusted = "\n".join(f'{who} = "{path}"' for who, path in approvers.items())
    server = f'tls_cert = "{tls.server_cert}"\ntls_key = "{tls.server_key}"\n' if tls else ""
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\n{server}\n[controller]\nca_cert = "{controller.pki.ca_cert}"\n\n'
        f"[approvers]\n{trusted}\n\n[audit]\ncheckpoint_entries = 200\ncheckpoint_seconds = 1\n\n"
        f"{app_bindings(TEST_APPS) if apps is None else apps}\n{extra_config}"
    )
    return AgentProcess(name, done.stdout.strip(), data, config, port, key, ca_cert=tls.ca_cert if tls else None)


def kill_all(agents: Iterator[AgentProcess] | list[AgentProcess]) -> None:
    for agent in agents:
        agent.stop()


BANK_PACK = Path(__file__).resolve().parent.parent / "policies" / "packs" / "bank"
POLICY = "bank-policy"


def push_policy(
    controller: ControllerServer,
    bundle: Path,
    version: str,
    *,
    operator: str,
    approver: str,
    approver_key: Path,
    name: str = POLICY,
) -> None:
    """`sitewarden policy push` a bundle as the operator, then approve it as the approver."""
    done = sitewarden(
        "policy", "push", str(bundle), "--name", name, "--version", version, env=controller.cli_env(operator)
    )
    assert done.returncode == 0, done.stderr
    approve = ["release", "approve", name, version, "--key", str(approver_key)]
    done = sitewarden(*approve, env=controller.cli_env(approver))
    assert done.returncode == 0, done.stderr


FED_APP = "fedapp"


def push_app(
    controller: ControllerServer,
    directory: Path,
    version: str,
    *,
    operator: str,
    approver: str,
    approver_key: Path,
    name: str = FED_APP,
) -> Path:
    """The Flower App (`federation/app`) built into a FAB in `directory`, pushed as a release of kind app
    by the operator and approved by the approver; the FAB's path."""
    from federation import APP_DIR, fab  # noqa: PLC0415 - Flower's builder loads slowly; only some tests need it

    fab_file = fab.write(APP_DIR, directory)
    push = ["release", "push", str(directory), "--name", name, "--version", version, "--kind", "app"]
    done = sitewarden(*push, "--runtime", "flower", env=controller.cli_env(operator))
    assert done.returncode == 0, done.stderr
    done = sitewarden("release", "approve", name, version, "--key", str(approver_key), env=controller.cli_env(approver))
    assert done.returncode == 0, done.stderr
    return fab_file
