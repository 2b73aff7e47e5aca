"""Start, watch and stop a Flower 1.42 deployment (one SuperLink, several SuperNodes) on loopback.

`Federation` owns a working directory:

- ``home/``: ``FLWR_HOME`` for every process and CLI call it makes (never ``~/.flwr``); it holds the
  ``flwr`` CLI's ``config.toml`` with one SuperLink connection (address + our CA), and the FABs the
  SuperExecs unpack;
- ``superlink.db``: the SuperLink's SQLite state (registered SuperNodes, runs), which survives restarts;
- ``logs/<name>.log``: stdout and stderr of each process.

Flower 1.42 serves the Fleet, Control and Runtime (ServerAppIo) APIs of the SuperLink on ONE HTTPS port
(``--host``/``--port``); the older per-API ``--fleet-api-address``/``--control-api-address`` flags are
deprecated and only bind gRPC servers when ``FLWR_INTERNAL_GRPC_*`` is set. Each SuperNode also binds a
local Runtime HTTP API (``--host``/``--port``, default 9094) that its own SuperExec uses, so every
SuperNode needs its own free port. Both spawn a detached ``flower-superexec`` (found on ``PATH``, a new
session), which spawns ``flwr-serverapp``/``flwr-clientapp``; `ManagedProcess.stop` therefore stops the
whole tree it started, not only the direct child.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from federation.keys import SuperNodeKeys
from sitewarden.devpki import DevPKI

__all__ = ["Federation", "FederationError", "ManagedProcess", "RunHandle", "RunOutcome", "free_port"]

LOOPBACK = "127.0.0.1"
ConfigValue = str | int | float | bool


class FederationError(RuntimeError):
    """A Flower process or CLI call did not do what was asked; the message carries its log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc; empty elsewhere)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found.extend(int(c) for c in (task / "children").read_text().split())
    return found


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    stack = _children(pid)
    while stack:
        child = stack.pop()
        out.append(child)
        stack.extend(_children(child))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        # A zombie has exited; it only waits for its parent to reap it.
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _config_literal(value: ConfigValue) -> str:
    """One value in Flower's `key=value` config syntax (TOML scalars: strings are quoted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    # Flower's parser ends a quoted value at the next quote of its kind (no escapes): a value with
    # double quotes (an SQL query naming a quoted column) goes in single quotes, a TOML literal string.
    if '"' in text and "'" in text:
        raise ValueError(f"a Flower config value cannot hold both kinds of quote: {text!r}")
    if '"' in text or "\\" in text:
        return f"'{text}'"
    return json.dumps(text)


def config_args(config: Mapping[str, ConfigValue]) -> str:
    """`{"a": 1, "p": "/x"}` as `a=1 p="/x"`, the form of `--node-config` and `--run-config`."""
    return " ".join(f"{key}={_config_literal(value)}" for key, value in config.items())


def flower_env(home: Path, bin_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a Flower process or CLI call: FLWR_HOME under `home`, no telemetry, no update check."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FLWR_")}
    env.update(
        {
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            # SuperLink and SuperNode start `flower-superexec` by name; it must be this venv's.
            "PATH": os.pathsep.join([str(bin_dir), env.get("PATH", "")]),
            # Rich wraps JSON output at the terminal width; a wide "terminal" keeps it parseable.
            "COLUMNS": "400",
            "NO_COLOR": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


def supernode_argv(
    bin_dir: Path,
    *,
    superlink: str,
    root_certificates: Path,
    private_key: Path,
    node_config: Mapping[str, ConfigValue],
    runtime_port: int,
    max_retries: int,
    isolation: str = "subprocess",
) -> list[str]:
    """`flower-supernode` with TLS (`root_certificates` verifies the SuperLink) and its authentication key.

    `isolation="process"` makes the SuperNode run no ClientApp itself: a runner must take its tasks
    from the Runtime API on `runtime_port` (a site's agent uses `federation.runner`)."""
    if isolation not in ("subprocess", "process"):
        raise ValueError(f"isolation must be 'subprocess' or 'process', not {isolation!r}")
    argv = [
        str(bin_dir / "flower-supernode"),
        "--superlink",
        superlink,
        "--root-certificates",
        str(root_certificates),
        "--auth-supernode-private-key",
        str(private_key),
        "--host",
        LOOPBACK,
        "--port",
        str(runtime_port),
        "--max-retries",
        str(max_retries),
        "--isolation",
        isolation,
    ]
    if node_config:
        argv += ["--node-config", config_args(node_config)]
    return argv


@dataclass
class ManagedProcess:
    """One long-running Flower process, its log file, and everything it spawned."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    _known_descendants: set[int] = field(default_factory=set)

    @classmethod
    def start(cls, name: str, argv: list[str], env: Mapping[str, str], log_path: Path, cwd: Path) -> ManagedProcess:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            log.write(f"$ {shlex.join(argv)}\n".encode())
            log.flush()
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
            )
        return cls(name, argv, log_path, popen)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        self._remember_descendants()
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself; its exit code."""
        return self.popen.wait(timeout=timeout)

    def _remember_descendants(self) -> None:
        if self.popen.poll() is None:
            self._known_descendants.update(_descendants(self.pid))

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process (Flower shuts its SuperExec down), then SIGKILL whatever of its tree is left."""
        self._remember_descendants()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(timeout=timeout)
        # SuperExec and the apps run in their own sessions; they normally exit with their parent.
        deadline = time.monotonic() + 3.0
        leftovers = [pid for pid in self._known_descendants if _alive(pid)]
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.1)
            leftovers = [pid for pid in leftovers if _alive(pid)]
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return self.popen.returncode


@dataclass(frozen=True)
class RunOutcome:
    """What `flwr run --stream` printed, and the run as the SuperLink lists it afterwards."""

    run_id: int
    status: str
    output: str
    details: dict[str, Any]


class Federation:
    """A SuperLink with TLS and SuperNode authentication, and SuperNodes registered with it, on 127.0.0.1."""

    def __init__(
        self,
        root: Path,
        pki: DevPKI,
        *,
        connection: str = "sitewarden",
        bin_dir: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root
        self.pki = pki
        self.connection = connection
        self.bin_dir = bin_dir or Path(sys.executable).parent
        self.home = root / "home"
        self.logs = root / "logs"
        self.database = root / "superlink.db"
        self.superlink_port = free_port()
        self.superlink: ManagedProcess | None = None
        self.supernodes: dict[str, ManagedProcess] = {}
        self._extra_env = dict(extra_env or {})
        for directory in (self.root, self.home, self.logs):
            directory.mkdir(parents=True, exist_ok=True)

    # --- environment ----------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.superlink_port}"

    def env(self) -> dict[str, str]:
        """The environment of every Flower process: our FLWR_HOME, no telemetry, no update check."""
        return flower_env(self.home, self.bin_dir, self._extra_env)

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    def write_cli_config(self) -> Path:
        """`FLWR_HOME/config.toml` with our SuperLink as the default connection (address + CA)."""
        path = self.home / "config.toml"
        path.write_text(
            "[superlink]\n"
            f"default = {json.dumps(self.connection)}\n\n"
            f"[superlink.{self.connection}]\n"
            f"address = {json.dumps(self.address)}\n"
            f"root-certificates = {json.dumps(str(self.pki.ca_cert))}\n",
            encoding="utf-8",
        )
        return path

    # --- SuperLink ------------------------------------------------------------------------------

    def superlink_argv(self) -> list[str]:
        return [
            self._bin("flower-superlink"),
            "--ssl-ca-certfile",
            str(self.pki.ca_cert),
            "--ssl-certfile",
            str(self.pki.server_cert),
            "--ssl-keyfile",
            str(self.pki.server_key),
            "--enable-supernode-auth",
            "--database",
            str(self.database),
            "--disable-runtime-dependency-installation",
            "--host",
            LOOPBACK,
            "--port",
            str(self.superlink_port),
        ]

    def start_superlink(self, timeout: float = 60.0) -> ManagedProcess:
        """Start the SuperLink and wait until its HTTPS health endpoint answers (with our CA)."""
        if self.superlink is not None and self.superlink.running():
            raise FederationError("the SuperLink is already running")
        self.write_cli_config()
        self.superlink = ManagedProcess.start(
            "superlink", self.superlink_argv(), self.env(), self.logs / "superlink.log", self.root
        )
        deadline = time.monotonic() + timeout
        url = f"https://{self.address}/health"
        tls = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        while time.monotonic() < deadline:
            if not self.superlink.running():
                raise FederationError(f"the SuperLink exited:\n{self.superlink.log_tail()}")
            try:
                if httpx.get(url, verify=tls, timeout=2.0, trust_env=False).status_code == 200:
                    return self.superlink
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise FederationError(f"the SuperLink did not become ready in {timeout} s:\n{self.superlink.log_tail()}")

    def stop_superlink(self) -> None:
        if self.superlink is not None:
            self.superlink.stop()

    # --- flwr CLI -------------------------------------------------------------------------------

    def flwr(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the `flwr` CLI against our FLWR_HOME (so against our SuperLink connection)."""
        result = subprocess.run(
            [self._bin("flwr"), *args],
            env=self.env(),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise FederationError(
                f"flwr {shlex.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def flwr_json(self, *args: str, timeout: float = 60.0) -> Any:
        result = self.flwr(*args, "--format", "json", timeout=timeout)
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError as exc:
            raise FederationError(f"flwr {shlex.join(args)} printed no JSON:\n{result.stdout}") from exc

    def register_supernode(self, keys: SuperNodeKeys, *, name: str | None = None) -> int:
        """`flwr supernode register <public key>`; the node ID the SuperLink assigned."""
        args = ["supernode", "register", str(keys.public_key), self.connection]
        if name:
            args += ["--name", name]
        reply = self.flwr_json(*args)
        if not reply.get("success"):
            raise FederationError(f"registration failed: {reply}")
        return int(reply["node-id"])

    def unregister_supernode(self, node_id: int) -> None:
        """`flwr supernode unregister`: the node's key no longer lets it in."""
        reply = self.flwr_json("supernode", "unregister", str(node_id), self.connection)
        if not reply.get("success"):
            raise FederationError(f"unregistering node {node_id} failed: {reply}")

    def list_supernodes(self) -> list[dict[str, Any]]:
        return list(self.flwr_json("supernode", "list", self.connection)["nodes"])

    def wait_until_online(self, node_ids: list[int], timeout: float = 60.0) -> None:
        """Wait until the SuperLink lists every node in `node_ids` as online."""
        deadline = time.monotonic() + timeout
        wanted = {str(node_id) for node_id in node_ids}
        while True:
            statuses = {node["node-id"]: node["status"] for node in self.list_supernodes()}
            if all(statuses.get(node_id) == "online" for node_id in wanted):
                return
            for name, process in self.supernodes.items():
                if not process.running():
                    raise FederationError(f"SuperNode {name} exited:\n{process.log_tail()}")
            if time.monotonic() > deadline:
                raise FederationError(f"SuperNodes not online after {timeout} s: {statuses}")
            time.sleep(0.5)

    # --- SuperNodes -----------------------------------------------------------------------------

    def supernode_argv(
        self, keys: SuperNodeKeys, node_config: Mapping[str, ConfigValue], runtime_port: int, *, max_retries: int
    ) -> list[str]:
        return supernode_argv(
            self.bin_dir,
            superlink=self.address,
            root_certificates=self.pki.ca_cert,
            private_key=keys.private_key,
            node_config=node_config,
            runtime_port=runtime_port,
            max_retries=max_retries,
        )

    def start_supernode(
        self,
        name: str,
        keys: SuperNodeKeys,
        node_config: Mapping[str, ConfigValue] | None = None,
        *,
        max_retries: int = 5,
    ) -> ManagedProcess:
        """Start a SuperNode (it authenticates with `keys`; it must be registered to be let in)."""
        if name in self.supernodes and self.supernodes[name].running():
            raise FederationError(f"SuperNode {name} is already running")
        argv = self.supernode_argv(keys, node_config or {}, free_port(), max_retries=max_retries)
        process = ManagedProcess.start(f"supernode-{name}", argv, self.env(), self.logs / f"{name}.log", self.root)
        self.supernodes[name] = process
        return process

    # --- runs -----------------------------------------------------------------------------------

    def run_argv(self, app: Path, run_config: Mapping[str, ConfigValue] | None = None) -> list[str]:
        """`flwr run <app dir> <connection> --stream`, or for a `.fab` file the same with exactly its
        bytes (`python -m federation.run_fab`): what a job runs is the FAB its sites approved."""
        if app.is_file():
            argv = [sys.executable, "-m", "federation.run_fab", str(app), self.connection, "--stream"]
        else:
            argv = [self._bin("flwr"), "run", str(app), self.connection, "--stream"]
        if run_config:
            argv += ["--run-config", config_args(run_config)]
        return argv

    def run(
        self, app: Path, run_config: Mapping[str, ConfigValue] | None = None, *, timeout: float = 300.0
    ) -> RunOutcome:
        """Run an app (a directory or a `.fab` file) and wait until the run ends; its status and output."""
        result = subprocess.run(
            self.run_argv(app, run_config),
            env=self.env(),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        output = result.stdout + result.stderr
        if result.returncode != 0:
            raise FederationError(f"flwr run exited {result.returncode}:\n{output}")
        run_id = _run_id_from(output)
        details = self.run_details(run_id)
        return RunOutcome(run_id, str(details.get("status", "")), output, details)

    def start_run(self, app: Path, run_config: Mapping[str, ConfigValue] | None = None) -> RunHandle:
        """`run` in the background; the handle knows its run ID."""
        popen = subprocess.Popen(
            self.run_argv(app, run_config),
            env=self.env(),
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        return RunHandle(popen)

    def stop_run(self, run_id: int) -> None:
        self.flwr("stop", str(run_id), self.connection, check=False)

    def run_details(self, run_id: int) -> dict[str, Any]:
        runs = self.flwr_json("list", self.connection, "--run-id", str(run_id))["runs"]
        return dict(runs[0]) if runs else {}

    # --- lifecycle ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every SuperNode, then the SuperLink; safe to call more than once."""
        for process in self.supernodes.values():
            process.stop()
        self.stop_superlink()

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def processes(self) -> Iterator[ManagedProcess]:
        if self.superlink is not None:
            yield self.superlink
        yield from self.supernodes.values()


class RunHandle:
    """A `flwr run --stream` process: its output as it comes, and the run ID once it is printed."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen
        self.lines: list[str] = []
        self.run_id: int | None = None
        self._have_id = threading.Event()
        self._reader = threading.Thread(target=self._read, name="flwr-run-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.run_id is None and _RUN_STARTED in line:
                self.run_id = int(line.split(_RUN_STARTED, 1)[1].split()[0])
                self._have_id.set()
        self._have_id.set()

    def wait_for_id(self, timeout: float) -> int | None:
        self._have_id.wait(timeout)
        return self.run_id

    def done(self) -> bool:
        return self.popen.poll() is not None

    def wait(self, timeout: float | None = None) -> int:
        code = self.popen.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)


_RUN_STARTED = "Successfully started run "


def _run_id_from(output: str) -> int:
    marker = _RUN_STARTED
    for line in output.splitlines():
        if marker in line:
            return int(line.split(marker, 1)[1].split()[0])
    raise FederationError(f"no run ID in the output of flwr run:\n{output}")
