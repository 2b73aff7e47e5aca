"""Benchmark figures for the agent's sync (`agent/sync.py`): how long a large model takes from rollout to active at a
site, next to the plain transfer of the same bytes from the same server and a checksum of them.

A real controller (`sitewarden controller serve`, TLS, SQLite, data dir under `bench/.tmp`) gets two releases of
the demo fraud scorer, pushed and approved with the CLI: 1.0.0 (`model.onnx` alone) and 2.0.0 (`model.onnx` plus
`calibration.bin`, 1 GiB of incompressible, seeded bytes: an AES-CTR keystream). A real agent (`sitewarden agent
run`) is enrolled and runs 1.0.0. Then, timed: the bench creates a rollout of 2.0.0 through the API and watches the
agent's data dir until `state.json` names 2.0.0 active. The agent does what it always does: long poll answered,
TUF metadata refreshed, the desired-state document, the manifest and the approvals fetched and the approvals
verified against the site's trusted keys before anything is written, then every file of the release streamed into
staging as a TUF target (length and SHA-256 checked on the way against the signed metadata), the model loaded and
checked, the acceptance decision, the staging directory renamed into place and `state.json` switched. A poller
(every 5 ms) timestamps what it can see of that from outside (the staging directory, the approvals written, the big
file appearing and reaching its size), and the agent's audit log gives the times of the acceptance decision and the
activation: the breakdown.

The reference is `curl` downloading the same blob from the same controller (the TUF target URL
`/tuf/targets/releases/<name>/<version>/files/<sha256>.calibration.bin`, TLS with the same test CA) to a file on
the same disk, plus `sha256sum` of it (the issue's target: at most 1.5 times that), and, fairer, plus
`openssl dgst -sha256` (Debian's coreutils sha256sum does not use the CPU's SHA extensions; OpenSSL and hashlib do).
The reference runs once before and once after the agent's sync; their mean is the baseline.

It prints a table with the target marked PASS or MISS and ends with one JSON line of the figures. Run it from the
repository root with `.venv/bin/python bench/sync_bench.py [--quick]`; `--quick` uses a 64 MiB file.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import _common
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `tests` is not installed; it holds the controller and agent launchers
from audit import Log  # noqa: E402
from sitewarden import approval  # noqa: E402
from sitewarden.fraud_model import build_release  # noqa: E402
from tests.agent_harness import BANK_PACK, POLICY, AgentProcess, enroll_agent, push_policy, wait_for  # noqa: E402
from tests.controller_server import ControllerServer, sitewarden, start_controller  # noqa: E402
from tests.tls import make_pki  # noqa: E402

DEFAULT_WORKDIR = REPO / "bench" / ".tmp"
MODEL = "fraud-scorer"
OLD, NEW = "1.0.0", "2.0.0"
BIG_FILE = "calibration.bin"
LABELS = {"fleet": "sync-bench"}
SEED = 20250601
CHUNK = 16 << 20
POLL_S = 0.005
SYNC_DEADLINE_S = 900
COMMAND_TIMEOUT_S = 900
BUSY_LOAD = 0.5

TARGET_RATIO = 1.5

stderr = Console(stderr=True, log_path=False)


@dataclass(frozen=True)
class Workload:
    size: int


FULL = Workload(size=1 << 30)
QUICK = Workload(size=64 << 20)


@dataclass(frozen=True)
class Reference:
    """`curl` of the blob to a file, then each checksum tool over that file (seconds)."""

    curl_s: float
    sha256sum_s: float
    openssl_s: float
    controller_cpu_s: float
    others_cpu_s: float  # CPU seconds every other process used meanwhile (noise)

    @property
    def with_sha256sum(self) -> float:
        return self.curl_s + self.sha256sum_s

    @property
    def with_openssl(self) -> float:
        return self.curl_s + self.openssl_s


@dataclass
class Timeline:
    """Monotonic seconds since just before the rollout's POST at which the poller first saw each thing."""

    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, what: str, at: float) -> None:
        self.marks.setdefault(what, at)


@dataclass(frozen=True)
class Sync:
    seconds: float  # from just before the POST to `state.json` naming the new release active
    post_s: float
    timeline: dict[str, float]
    audit: dict[str, float]  # audit entry type -> seconds since the POST (from the entries' wall-clock times)
    agent_cpu_s: float
    controller_cpu_s: float
    agent_io: dict[str, int]  # /proc/<agent>/io deltas
    others_cpu_s: float  # CPU seconds of every other process on the machine in the window (noise)


@dataclass(frozen=True)
class Figures:
    workload: Workload
    generate_s: float
    push_s: float
    approve_s: float
    references: list[Reference]
    sync: Sync
    load_before: float
    load_after: float

    @property
    def curl_s(self) -> float:
        return mean([r.curl_s for r in self.references])

    @property
    def curl_sha256_s(self) -> float:
        return mean([r.with_sha256sum for r in self.references])

    @property
    def curl_openssl_s(self) -> float:
        return mean([r.with_openssl for r in self.references])

    @property
    def ratio(self) -> float:
        return self.sync.seconds / self.curl_sha256_s

    @property
    def ratio_openssl(self) -> float:
        return self.sync.seconds / self.curl_openssl_s

    def breakdown(self) -> dict[str, float]:
        """Phases of the sync, in seconds, from the poller's and the audit log's times (absent ones are left out)."""
        t = {**self.sync.timeline, **self.sync.audit}
        phases = [
            ("rollout, long poll, TUF refresh, desired state", "start", "staging dir"),
            ("manifest and approvals fetched and verified, written", "staging dir", "approvals"),
            ("files streamed into staging, hashed on the way", "approvals", "download complete"),
            ("fsync, approvals again, model load, decision", "download complete", "decision"),
            ("rename, state.json", "decision", "active"),
        ]
        t["start"] = 0.0
        t["active"] = self.sync.seconds
        return {name: t[b] - t[a] for name, a, b in phases if a in t and b in t}

    def summary(self) -> dict[str, Any]:
        return {
            "agent_sync_s": round(self.sync.seconds, 3),
            "curl_sha256_s": round(self.curl_sha256_s, 3),
            "sync_ratio": round(self.ratio, 3),
            "curl_openssl_s": round(self.curl_openssl_s, 3),
            "sync_ratio_openssl": round(self.ratio_openssl, 3),
            "curl_s": round(self.curl_s, 3),
            "sha256sum_s": round(mean([r.sha256sum_s for r in self.references]), 3),
            "openssl_dgst_s": round(mean([r.openssl_s for r in self.references]), 3),
            "references": [
                {
                    "curl_s": round(r.curl_s, 3),
                    "sha256sum_s": round(r.sha256sum_s, 3),
                    "openssl_s": round(r.openssl_s, 3),
                    "controller_cpu_s": round(r.controller_cpu_s, 2),
                    "others_cpu_s": round(r.others_cpu_s, 2),
                }
                for r in self.references
            ],
            "breakdown_s": {k: round(v, 3) for k, v in self.breakdown().items()},
            "timeline_s": {k: round(v, 3) for k, v in {**self.sync.timeline, **self.sync.audit}.items()},
            "rollout_post_s": round(self.sync.post_s, 3),
            "agent_cpu_s": round(self.sync.agent_cpu_s, 2),
            "controller_cpu_s": round(self.sync.controller_cpu_s, 2),
            "others_cpu_s": round(self.sync.others_cpu_s, 2),
            "agent_io": self.sync.agent_io,
            "size_bytes": self.workload.size,
            "generate_s": round(self.generate_s, 2),
            "push_s": round(self.push_s, 2),
            "approve_s": round(self.approve_s, 2),
            "cores": os.cpu_count(),
            "loadavg_before": round(self.load_before, 2),
            "loadavg_after": round(self.load_after, 2),
        }


# -- helpers -----------------------------------------------------------------------------------------------------


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process (all its threads) so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_busy_seconds() -> float:
    """CPU seconds all processes have used so far (all cores), from /proc/stat: everything but idle and iowait."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_seconds() -> float:
    """CPU seconds of this process's finished children (curl, sha256sum, openssl)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def io_counters(pid: int) -> dict[str, int]:
    """/proc/<pid>/io: bytes read and written through system calls (rchar, wchar) and to storage."""
    counters = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        name, _, value = line.partition(":")
        counters[name] = int(value)
    return counters


def write_incompressible(path: Path, size: int, seed: int) -> str:
    """`size` bytes of AES-256-CTR keystream keyed by `seed` (incompressible, reproducible); returns their SHA-256."""
    key = hashlib.sha256(f"sitewarden sync bench {seed}".encode()).digest()
    encryptor = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor()
    zeros = bytes(CHUNK)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = encryptor.update(zeros[: min(CHUNK, left)])
            digest.update(block)
            f.write(block)
            left -= len(block)
    return digest.hexdigest()


def run(args: list[str]) -> float:
    """Run a command to completion; its wall-clock seconds. Fails loudly on a non-zero exit."""
    started = time.monotonic()
    done = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:6])} failed ({done.returncode}): {done.stderr or done.stdout}")
    return seconds


def sitewarden_cli(*args: str, env: dict[str, str]) -> float:
    started = time.monotonic()
    done = sitewarden(*args, env=env, timeout=COMMAND_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"sitewarden {' '.join(args[:3])} failed: {done.stderr or done.stdout}")
    return time.monotonic() - started


# -- the world ---------------------------------------------------------------------------------------------------


@dataclass
class World:
    controller: ControllerServer
    agent: AgentProcess
    operator: str
    blob_sha256: str
    size: int
    generate_s: float
    push_s: float
    approve_s: float


@contextlib.contextmanager
def world(run_dir: Path, workload: Workload) -> Iterator[World]:
    """A controller with both releases pushed and approved, and an agent running the old one; stopped on exit."""
    pki = make_pki(run_dir / "pki")
    stderr.log("starting a controller (TLS, SQLite)")
    controller = start_controller(run_dir, pki)
    agent: AgentProcess | None = None
    try:
        keys = run_dir / "approvers"
        approval.generate_approver_key(keys / "alice.pem", keys / "alice.pub.pem")
        sitewarden_cli(
            "approver", "add", "alice", "--public-key", str(keys / "alice.pub.pem"), env=controller.cli_env()
        )
        operator = controller.token("operator", "bench-operator")
        approver = controller.token("approver", "alice")
        timings: dict[str, float] = {}
        sha256 = ""
        for version, seed in ((OLD, 7), (NEW, 8)):
            directory = run_dir / f"release-{version}"
            card = build_release(directory, seed=seed, version_note=version)
            if version == NEW:
                stderr.log(f"writing {workload.size / (1 << 20):,.0f} MiB of seeded AES-CTR keystream")
                started = time.monotonic()
                sha256 = write_incompressible(directory / BIG_FILE, workload.size, SEED)
                timings["generate"] = time.monotonic() - started
            stderr.log(f"pushing and approving {MODEL} {version}")
            push = ["release", "push", str(directory), "--name", MODEL, "--version", version, "--metadata", str(card)]
            timings[f"push {version}"] = sitewarden_cli(*push, env=controller.cli_env(operator))
            approve = ["release", "approve", MODEL, version, "--key", str(keys / "alice.pem")]
            timings[f"approve {version}"] = sitewarden_cli(*approve, env=controller.cli_env(approver))
            if version == NEW:
                (directory / BIG_FILE).unlink()  # the controller holds its own copy; keep the disk for the runs
        stderr.log(f"pushing and approving the bank policy pack {POLICY} 1.0.0")
        push_policy(
            controller, BANK_PACK, "1.0.0", operator=operator, approver=approver, approver_key=keys / "alice.pem"
        )
        stderr.log(f"enrolling and starting an agent; rolling out {MODEL} {OLD}")
        agent = enroll_agent(controller, run_dir, "bench-site", LABELS, {"alice": keys / "alice.pub.pem"})
        agent.start()
        roll_out(controller, operator, "old", OLD)
        running = agent
        wait_for(lambda: running.active() == (MODEL, OLD), what=f"the agent to run {MODEL} {OLD}")
        yield World(
            controller,
            agent,
            operator,
            sha256,
            workload.size,
            timings["generate"],
            timings[f"push {NEW}"],
            timings[f"approve {NEW}"],
        )
        if "Traceback" in agent.log():
            stderr.print(f"[yellow]the agent logged errors:[/]\n{agent.log()[-4000:]}", markup=False)
    except BaseException:
        if agent is not None:
            stderr.print(f"agent log (last lines):\n{agent.log()[-4000:]}", markup=False)
        stderr.print(f"controller log (last lines):\n{controller.log()[-3000:]}", markup=False)
        raise
    finally:
        if agent is not None:
            agent.stop()
        controller.stop()


def roll_out(controller: ControllerServer, operator: str, name: str, version: str) -> None:
    body = {
        "name": name,
        "releases": [{"name": MODEL, "version": version}],
        "policy": {"name": POLICY, "version": "1.0.0"},
        "selector": LABELS,
    }
    with controller.client(operator) as client:
        client.post("/api/v1/rollouts", body)


# -- the reference -------------------------------------------------------------------------------------------------


def reference(w: World, out: Path) -> Reference:
    """curl the blob from the controller's TUF target URL to `out`, then sha256sum and openssl dgst of it."""
    url = f"{w.controller.url}/tuf/targets/releases/{MODEL}/{NEW}/files/{w.blob_sha256}.{BIG_FILE}"
    # With an approver's token: the TUF repository serves release files to people whose role may read them.
    auth = f"Authorization: Bearer {w.controller.token('approver', 'alice')}"
    os.sync()  # the previous step's dirty pages are not this step's work
    controller_pid = w.controller.process.pid
    busy, children, controller = system_busy_seconds(), children_cpu_seconds(), cpu_seconds(controller_pid)
    own = own_cpu_seconds()
    curl_s = run(
        [
            "curl", "--silent", "--show-error", "--fail", "--cacert", str(w.controller.pki.ca_cert),
            "-H", auth, "-o", str(out), url,
        ]
    )  # fmt: skip
    checks = {}
    for tool, args in (("sha256sum", ["sha256sum", str(out)]), ("openssl", ["openssl", "dgst", "-sha256", str(out)])):
        started = time.monotonic()
        done = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=True)
        checks[tool] = time.monotonic() - started
        if w.blob_sha256 not in done.stdout:
            raise RuntimeError(f"{tool} of the downloaded blob is not {w.blob_sha256}: {done.stdout}")
    controller = cpu_seconds(controller_pid) - controller
    others = system_busy_seconds() - busy - (children_cpu_seconds() - children) - controller - own_cpu_seconds() + own
    out.unlink()
    os.sync()
    return Reference(curl_s, checks["sha256sum"], checks["openssl"], controller, max(0.0, others))


# -- the agent's sync ----------------------------------------------------------------------------------------------


def _active_version(state_file: Path) -> str | None:
    try:
        active = json.loads(state_file.read_text()).get("active") or {}
    except (OSError, ValueError):
        return None
    return active.get("version")


def _poll(agent: AgentProcess, size: int, started: float, timeline: Timeline, stop: threading.Event) -> None:
    """Timestamp what can be seen of the sync from outside the agent, every POLL_S, until `stop`."""
    assert agent.process is not None
    releases = agent.data / "releases"
    while not stop.is_set():
        now = time.monotonic() - started
        staging = next((p for p in releases.glob(".staging-*")), None)
        if staging is not None:
            timeline.mark("staging dir", now)
            big = staging / "files" / BIG_FILE
            if (staging / "approvals").exists():
                timeline.mark("approvals", now)
            with contextlib.suppress(OSError):
                if big.stat().st_size >= size:
                    timeline.mark("download complete", now)
        if (releases / MODEL / NEW).is_dir():
            timeline.mark("renamed into place", now)
        stop.wait(POLL_S)


def audit_times(agent: AgentProcess, wall_start: float) -> dict[str, float]:
    """Seconds since the POST of the new release's decision and activation entries in the agent's audit log."""
    found: dict[str, float] = {}
    with Log.open(agent.data / "audit", readonly=True) as log:
        for raw in log.iter_entries():
            entry = json.loads(raw)
            release = entry.get("release")
            concerns = (isinstance(release, str) and release == f"{MODEL}@{NEW}") or (
                isinstance(release, dict) and release.get("version") == NEW
            )
            if concerns and entry.get("type") in ("decision", "activation"):
                at = datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()
                found[entry["type"]] = at - wall_start
    return found


def agent_sync(w: World) -> Sync:
    """Roll the new release out; time until the agent's `state.json` names it active."""
    agent = w.agent
    assert agent.process is not None
    pid, controller_pid = agent.process.pid, w.controller.process.pid
    timeline = Timeline()
    stop = threading.Event()
    os.sync()
    agent_cpu, controller_cpu, io = cpu_seconds(pid), cpu_seconds(controller_pid), io_counters(pid)
    busy, own = system_busy_seconds(), own_cpu_seconds()
    wall_start = time.time()
    started = time.monotonic()
    poller = threading.Thread(target=_poll, args=(agent, w.size, started, timeline, stop), daemon=True)
    poller.start()
    try:
        roll_out(w.controller, w.operator, "big", NEW)
        post_s = time.monotonic() - started
        deadline = started + SYNC_DEADLINE_S
        while _active_version(agent.data / "state.json") != NEW:
            if agent.process.poll() is not None:
                raise RuntimeError(f"the agent exited with {agent.process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{MODEL} {NEW} not active after {SYNC_DEADLINE_S} s: {agent.status()['artifacts']}")
            time.sleep(POLL_S)
        seconds = time.monotonic() - started
    finally:
        stop.set()
        poller.join(timeout=10)
    agent_cpu, controller_cpu = cpu_seconds(pid) - agent_cpu, cpu_seconds(controller_pid) - controller_cpu
    others = system_busy_seconds() - busy - agent_cpu - controller_cpu - (own_cpu_seconds() - own)
    after = io_counters(pid)
    if agent.active() != (MODEL, NEW):
        raise RuntimeError(f"state.json names {NEW} but the agent serves {agent.active()}")
    deltas = {k: after[k] - io[k] for k in ("rchar", "wchar", "read_bytes", "write_bytes", "cancelled_write_bytes")}
    return Sync(
        seconds,
        post_s,
        timeline.marks,
        audit_times(agent, wall_start),
        agent_cpu,
        controller_cpu,
        deltas,
        max(0.0, others),
    )


# -- running -----------------------------------------------------------------------------------------------------


def measure(run_dir: Path, workload: Workload) -> Figures:
    if shutil.which("curl") is None or shutil.which("openssl") is None:
        raise RuntimeError("curl and openssl are needed for the reference")
    load_before = os.getloadavg()[0]
    if load_before > BUSY_LOAD:
        stderr.log(f"[yellow]the machine is busy (load average {load_before:.2f}): figures will be noisy[/]")
    with world(run_dir, workload) as w:
        out = run_dir / "curl.out"
        stderr.log("reference: curl + sha256sum + openssl dgst")
        references = [reference(w, out)]
        stderr.log(f"  curl {references[0].curl_s:.2f} s, sha256sum {references[0].sha256sum_s:.2f} s")
        stderr.log(f"rollout of {MODEL} {NEW} until the agent runs it")
        sync = agent_sync(w)
        stderr.log(f"  {sync.seconds:.2f} s")
        stderr.log("reference again")
        references.append(reference(w, out))
        stderr.log(f"  curl {references[1].curl_s:.2f} s, sha256sum {references[1].sha256sum_s:.2f} s")
        load_after = os.getloadavg()[0]
        return Figures(workload, w.generate_s, w.push_s, w.approve_s, references, sync, load_before, load_after)


def status_mark(ok: bool) -> str:
    return "[green]PASS[/]" if ok else "[red]MISS[/]"


def render(figures: Figures) -> Table:
    size = figures.workload.size
    mib = size / (1 << 20)
    table = Table(
        title=f"Sitewarden sync of a {mib:,.0f} MiB release vs curl + checksum ({os.cpu_count()} cores, "
        f"load average {figures.load_before:.2f} at start, {figures.load_after:.2f} at end)"
    )
    table.add_column("Measure")
    table.add_column("Seconds", justify="right")
    table.add_column("Detail", justify="right")
    table.add_column("Target", justify="right")
    table.add_column("", justify="center")
    table.add_row(f"write {mib:,.0f} MiB of AES-CTR keystream (setup)", f"{figures.generate_s:.2f}")
    table.add_row(f"sitewarden release push {NEW} (setup)", f"{figures.push_s:.2f}")
    table.add_row(f"sitewarden release approve {NEW} (setup)", f"{figures.approve_s:.2f}")
    table.add_section()
    for i, r in enumerate(figures.references, 1):
        table.add_row(
            f"reference {i}: curl (TLS, test CA) to a file", f"{r.curl_s:.2f}", f"{mib / r.curl_s:,.0f} MiB/s"
        )
        table.add_row("  sha256sum of it", f"{r.sha256sum_s:.2f}", f"{mib / r.sha256sum_s:,.0f} MiB/s")
        table.add_row("  openssl dgst -sha256 of it", f"{r.openssl_s:.2f}", f"{mib / r.openssl_s:,.0f} MiB/s")
        table.add_row(
            "  CPU s: controller / other processes meanwhile",
            f"{r.controller_cpu_s:.1f}",
            f"others {r.others_cpu_s:.1f}",
        )
    table.add_row("curl + sha256sum (mean)", f"{figures.curl_sha256_s:.2f}")
    table.add_row("curl + openssl dgst (mean)", f"{figures.curl_openssl_s:.2f}")
    table.add_section()
    s = figures.sync
    table.add_row(
        f"agent: rollout of {NEW} until state.json names it active",
        f"{s.seconds:.2f}",
        f"{mib / s.seconds:,.0f} MiB/s end to end",
    )
    for name, seconds in figures.breakdown().items():
        table.add_row(f"  {name}", f"{seconds:.2f}")
    table.add_row(
        "  CPU s: agent / controller / other processes",
        f"{s.agent_cpu_s:.1f}",
        f"controller {s.controller_cpu_s:.1f}, others {s.others_cpu_s:.1f}",
    )
    gib = 1 << 30
    table.add_row(
        "  agent I/O: written / read through system calls",
        "",
        f"{s.agent_io['wchar'] / gib:.2f} / {s.agent_io['rchar'] / gib:.2f} GiB",
    )
    table.add_section()
    table.add_row(
        "agent / (curl + sha256sum)",
        f"{figures.ratio:.2f}x",
        "",
        f"≤ {TARGET_RATIO:g}x",
        status_mark(figures.ratio <= TARGET_RATIO),
    )
    table.add_row("agent / (curl + openssl dgst)", f"{figures.ratio_openssl:.2f}x", "", "(reference only)")
    table.caption = (
        "Timed from just before POST /api/v1/rollouts; phases from a 5 ms poller of the agent's data dir and open "
        "files, and the audit log's decision and activation times (millisecond wall clock). Curl writes to the page "
        "cache; the agent fsyncs each file. References before and after the agent's sync; their mean is the baseline."
    )
    return table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return _common.parse_args(
        __doc__,
        argv,
        quick="a 64 MiB file instead of 1 GiB",
        workdir_help="directory for the controller's and the agent's data dirs",
        default=DEFAULT_WORKDIR,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workload = QUICK if args.quick else FULL
    with _common.scratch_dir(args.workdir, "sync-bench-") as run_dir:
        figures = measure(run_dir, workload)
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # rich assumes 80 columns when piped; the table needs more
    console.print(render(figures))
    print(json.dumps(figures.summary()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
