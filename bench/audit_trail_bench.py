"""Benchmark figures for the controller's audit trail (`controller/audit_trail.py`, `controller/outbox.py`): what
recording every state change costs, and how soon the sites witness the controller's log.

Mutations: two controllers built by `controller.app.create_app` over data dirs made by `sitewarden controller init`
(SQLite, HTTPS on loopback, uvicorn configured as `controller serve` does), one with the audit trail (change records
in the outbox, moved into the log before each answer) and one with the recorder and the outbox turned off (the
baseline, for this bench only: `create_app(..., audited=False)`). 16 clients, one TLS connection each, in a
separate load-generator process, send a representative mix of state changes for a fixed time: a site's labels, a
new API token, a rollout's pause and resume (each client its own site and rollout, so every request changes
something). Rounds alternate between the two servers, the idle one paused (SIGSTOP).

Cosign lag: 50 sites enrolled with join tokens run the agent's own witnessing code (`agent.controller_witness`
over `agent.channel`) in a second process, each long-polling with `audit_after` as the agent does; a client keeps
changing state so that the controller (checkpoints due every second here) signs a new checkpoint each second. For
each checkpoint, the time from its signing (its `signed_at` in the controller's database) to the moment a third
site's cosignature of it (or of a later one) was accepted.

It prints a table with targets marked PASS or MISS and ends with one JSON line of the figures. Run it from the
repository root with `.venv/bin/python bench/audit_trail_bench.py [--quick]`; `--quick` uses 3 s runs, one round
and a 10 s cosign window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import signal
import sqlite3
import ssl
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import _common
import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table

from sitewarden.keys import encode_public_key

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `tests` is not installed; it holds the throwaway CA and the launcher helpers
from tests.controller_server import free_port, sitewarden  # noqa: E402
from tests.tls import TestPKI, make_pki  # noqa: E402

DEFAULT_WORKDIR = REPO / "bench" / ".tmp"
TARGET_RATIO = 0.8
TARGET_LAG_P99_S = 5.0
QUORUM = 3
CHECKPOINT_EVERY_S = 1.0
STARTUP_DEADLINE_S = 120
CARD = {"owner": "bench", "intended_purposes": ["benchmark"]}

stderr = Console(stderr=True, log_path=False)


@dataclass(frozen=True)
class Workload:
    clients: int
    run_s: float
    rounds: int
    sites: int
    lag_s: float


FULL = Workload(clients=16, run_s=8.0, rounds=3, sites=50, lag_s=40.0)
QUICK = Workload(clients=16, run_s=3.0, rounds=1, sites=50, lag_s=10.0)


def receive(conn: Connection, process: multiprocessing.process.BaseProcess, what: str) -> Any:
    """The report a child process sends, or an error if it died without one."""
    while not conn.poll(1.0):
        if not process.is_alive():
            raise RuntimeError(f"{what} exited with {process.exitcode} before reporting (its traceback is above)")
    return conn.recv()


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)] if ordered else math.nan


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the servers ---------------------------------------------------------------------------------------------------


def _serve(spec: dict[str, Any]) -> None:
    """The controller's application over a data dir, as `controller serve` runs it (child process)."""
    import uvicorn  # noqa: PLC0415

    from controller import audit_trail  # noqa: PLC0415
    from controller.app import create_app  # noqa: PLC0415
    from controller.runtime import Runtime  # noqa: PLC0415

    audit_trail.CHECKPOINT_EVERY_S = CHECKPOINT_EVERY_S
    runtime = Runtime.open(Path(spec["data"]))
    if not spec["audited"]:
        audit_trail.disable_for_benchmark(runtime.engine)
    config = uvicorn.Config(
        create_app(runtime, audited=spec["audited"]),
        host="127.0.0.1",
        port=spec["port"],
        ssl_certfile=spec["cert"],
        ssl_keyfile=spec["key"],
        log_level="warning",
        server_header=False,
        timeout_graceful_shutdown=5,
    )
    try:
        uvicorn.Server(config).run()
    finally:
        runtime.close()


@dataclass
class Server:
    name: str
    url: str
    data: Path
    token: str
    pki: TestPKI
    process: multiprocessing.process.BaseProcess

    def http(self, token: str | None = None, *, anonymous: bool = False, **kwargs: Any) -> httpx.Client:
        headers = {} if anonymous else {"Authorization": f"Bearer {token or self.token}"}
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        return httpx.Client(base_url=self.url, verify=context, headers=headers, timeout=60, **kwargs)

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)  # type: ignore[arg-type]

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.resume()
        self.process.terminate()
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


@contextlib.contextmanager
def server(run_dir: Path, pki: TestPKI, name: str, audited: bool) -> Iterator[Server]:
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    data = run_dir / name
    done = sitewarden("controller", "init", "--data", str(data), "--root-key-online", "--public-url", url)
    if done.returncode != 0:
        raise RuntimeError(f"controller init failed: {done.stderr}")
    token = done.stdout.strip().splitlines()[-1]
    ctx = multiprocessing.get_context("spawn")
    spec = {
        "data": str(data),
        "port": port,
        "cert": str(pki.server_cert),
        "key": str(pki.server_key),
        "audited": audited,
    }
    process = ctx.Process(target=_serve, args=(spec,), name=f"controller-{name}", daemon=True)
    process.start()
    running = Server(name, url, data, token, pki, process)
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    try:
        while True:
            with contextlib.suppress(httpx.HTTPError), running.http() as http:
                if http.get("/healthz").status_code == 200:
                    break
            if not process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"controller {name} did not start")
            time.sleep(0.2)
        yield running
    finally:
        running.stop()


def setup_clients(server: Server, clients: int) -> list[dict[str, str]]:
    """Per client: a site of its own and a rollout of its own (of one small release) to pause and resume."""
    payload = b"audit trail bench weights\n"
    sha256 = hashlib.sha256(payload).hexdigest()
    out = []
    with server.http() as http:
        info = http.post("/api/v1/uploads", json={"sha256": sha256, "size": len(payload)}).json()
        if not info["complete"]:
            http.patch(f"/api/v1/uploads/{info['id']}", content=payload, headers={"Upload-Offset": "0"})
        files = [{"path": "model.onnx", "sha256": sha256, "size": len(payload)}]
        body = {"name": "bench-model", "version": "1.0.0", "kind": "model", "runtime": "onnx", "files": files}
        http.post("/api/v1/releases", json={**body, "metadata": CARD}).raise_for_status()
        for i in range(clients):
            site = http.post("/api/v1/sites", json={"name": f"bench-{i}", "labels": {"client": str(i)}})
            site.raise_for_status()
            rollout = {
                "name": f"bench-rollout-{i}",
                "releases": [{"name": "bench-model", "version": "1.0.0"}],
                "selector": {"client": str(i)},
            }
            http.post("/api/v1/rollouts", json=rollout).raise_for_status()
            out.append({"site": f"bench-{i}", "rollout": f"bench-rollout-{i}"})
    return out


# -- mutations -----------------------------------------------------------------------------------------------------


async def _mutate(spec: dict[str, Any], mine: dict[str, str], number: int, stop_at: float) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=spec["ca"])
    ok, failed, latencies, n = 0, 0, [], 0
    headers = {"Authorization": f"Bearer {spec['token']}"}
    async with httpx.AsyncClient(base_url=spec["url"], verify=context, headers=headers, timeout=60) as http:
        while time.monotonic() < stop_at:
            step = n % 6
            started = time.monotonic()
            if step in (0, 3):
                body = {"labels": {"client": mine["site"].rsplit("-", 1)[1], "n": str(n)}}
                response = await http.put(f"/api/v1/sites/{mine['site']}/labels", json=body)
            elif step in (1, 4):
                response = await http.post("/api/v1/tokens", json={"name": f"b-{number}-{n}", "role": "auditor"})
            else:
                action = "pause" if step == 2 else "resume"
                response = await http.post(f"/api/v1/rollouts/{mine['rollout']}/{action}")
            n += 1
            if response.is_success:
                ok += 1
                latencies.append((time.monotonic() - started) * 1000)
            else:
                failed += 1
    return {"ok": ok, "failed": failed, "latency_ms": latencies}


def _loadgen(spec: dict[str, Any], conn: Connection) -> None:
    """16 clients sending state changes for `run_s` seconds (child process)."""

    async def run() -> list[dict[str, Any]]:
        stop_at = time.monotonic() + spec["run_s"]
        jobs = [_mutate(spec, mine, i, stop_at) for i, mine in enumerate(spec["clients"])]
        return list(await asyncio.gather(*jobs))

    started = time.monotonic()
    results = asyncio.run(run())
    conn.send({"results": results, "seconds": time.monotonic() - started})
    conn.close()


@dataclass
class Run:
    server: str
    ok: int
    failed: int
    seconds: float
    latency_ms: list[float]
    server_cpu: float

    @property
    def per_second(self) -> float:
        return self.ok / self.seconds

    @property
    def cpu_ms(self) -> float:
        """Server CPU per acknowledged change: steadier than changes per second when other work shares the disk."""
        return self.server_cpu * self.seconds / self.ok * 1000 if self.ok else math.nan


def mutate(server: Server, clients: list[dict[str, str]], run_s: float) -> Run:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    spec = {"url": server.url, "ca": str(server.pki.ca_cert), "token": server.token, "clients": clients, "run_s": run_s}
    process = ctx.Process(target=_loadgen, args=(spec, child))
    cpu = cpu_seconds(server.process.pid)  # type: ignore[arg-type]
    process.start()
    report = receive(parent, process, "the load generator")
    process.join(timeout=30)
    cpu = cpu_seconds(server.process.pid) - cpu  # type: ignore[arg-type]
    results = report["results"]
    latencies = [x for r in results for x in r["latency_ms"]]
    ok, failed = sum(r["ok"] for r in results), sum(r["failed"] for r in results)
    return Run(server.name, ok, failed, report["seconds"], latencies, cpu / report["seconds"])


# -- cosign lag ----------------------------------------------------------------------------------------------------


def enroll(server: Server, count: int) -> list[dict[str, str]]:
    out = []
    with server.http() as http, server.http(anonymous=True) as anonymous:
        for i in range(count):
            site = http.post("/api/v1/sites", json={"name": f"witness-{i}", "labels": {"witness": "yes"}}).json()
            issued = http.post(f"/api/v1/sites/{site['id']}/join-tokens", json={"ttl_seconds": 600}).json()
            key = Ed25519PrivateKey.generate()
            body = {"token": issued["token"], "public_key": encode_public_key(key)}
            enrolled = anonymous.post("/api/v1/enroll", json=body).json()
            seed = key.private_bytes_raw().hex()
            out.append(
                {"site_id": enrolled["site_id"], "name": site["name"], "seed": seed, "vkey": enrolled["audit_vkey"]}
            )
    return out


def _witnesses(spec: dict[str, Any], conn: Connection) -> None:
    """50 sites running the agent's witnessing code, plus one client changing state every 0.2 s (child process)."""
    from agent.channel import ChannelError, ControllerChannel  # noqa: PLC0415
    from agent.controller_witness import ControllerWitness  # noqa: PLC0415
    from agent.identity import Identity  # noqa: PLC0415

    url, ca, sites, workdir = spec["url"], spec["ca"], spec["sites"], spec["workdir"]
    cosigned: dict[str, list[tuple[int, float]]] = {s["site_id"]: [] for s in sites}
    errors: list[str] = []

    async def site(site_spec: dict[str, str], stop_at: float) -> None:
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(site_spec["seed"]))
        identity = Identity(site_spec["site_id"], site_spec["name"], url, "", "", "", site_spec["vkey"])
        channel = ControllerChannel(identity, key, ca)
        state = Path(workdir) / f"{site_spec['name']}.json"
        witness = ControllerWitness(state, site_spec["site_id"], key, site_spec["vkey"], lambda _: None)
        try:
            while time.monotonic() < stop_at:
                wait = max(1, min(30, int(stop_at - time.monotonic())))
                pointer = await channel.desired(after=0, wait=wait, audit_after=witness.size)
                newer = pointer.audit_size is not None and pointer.audit_size > witness.size
                try:
                    if newer and await witness.run_once(channel) == "cosigned":
                        cosigned[site_spec["site_id"]].append((witness.size, time.time()))
                except ChannelError as exc:  # as the agent does: noted, witnessed again later
                    errors.append(str(exc)[:300])
        finally:
            await channel.close()

    async def changes(stop_at: float) -> None:
        context = ssl.create_default_context(cafile=ca)
        headers = {"Authorization": f"Bearer {spec['token']}"}
        async with httpx.AsyncClient(base_url=url, verify=context, headers=headers, timeout=60) as http:
            n = 0
            while time.monotonic() < stop_at:
                await http.put("/api/v1/sites/witness-0/labels", json={"labels": {"witness": "yes", "n": str(n)}})
                n += 1
                await asyncio.sleep(0.2)

    async def run() -> None:
        stop_at = time.monotonic() + spec["lag_s"]
        await asyncio.gather(changes(stop_at), *(site(s, stop_at) for s in sites))

    started = time.time()
    asyncio.run(run())
    conn.send({"cosigned": cosigned, "started": started, "ended": time.time(), "errors": errors})
    conn.close()


def cosign_lags(server: Server, sites: list[dict[str, str]], workload: Workload) -> tuple[list[float], int, list[str]]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    workdir = server.data.parent / "witness-state"
    workdir.mkdir(exist_ok=True)
    spec = {
        "url": server.url,
        "ca": str(server.pki.ca_cert),
        "token": server.token,
        "workdir": str(workdir),
        "sites": sites,
        "lag_s": workload.lag_s,
    }
    process = ctx.Process(target=_witnesses, args=(spec, child))
    process.start()
    report = receive(parent, process, "the witnessing sites")
    process.join(timeout=60)
    with contextlib.closing(sqlite3.connect(f"file:{server.data / 'controller.db'}?mode=ro", uri=True)) as db:
        signed = db.execute("SELECT size, signed_at FROM audit_checkpoints").fetchall()
    # Checkpoints signed after the sites had settled and early enough for them to answer before the end.
    window = (report["started"] + 3.0, report["ended"] - TARGET_LAG_P99_S)
    lags = []
    for size, signed_at in signed:
        at = datetime.fromisoformat(str(signed_at)).replace(tzinfo=UTC).timestamp()  # stored as UTC
        if not window[0] <= at <= window[1]:
            continue
        firsts = sorted(
            next((t for s, t in sorted(times) if s >= size), math.inf) for times in report["cosigned"].values()
        )
        lags.append(firsts[QUORUM - 1] - at)
    if report["errors"]:
        stderr.print(f"[yellow]{len(report['errors'])} witnessing rounds failed; the first: {report['errors'][0]}[/]")
    return lags, len(signed), report["errors"]


# -- the whole run -------------------------------------------------------------------------------------------------


@dataclass
class Figures:
    workload: Workload
    audited: list[Run]
    unaudited: list[Run]
    lags: list[float]
    checkpoints: int
    witness_errors: int
    load_before: float

    @property
    def mutations_per_s(self) -> float:
        return sum(r.ok for r in self.audited) / sum(r.seconds for r in self.audited)

    @property
    def mutations_per_s_unaudited(self) -> float:
        return sum(r.ok for r in self.unaudited) / sum(r.seconds for r in self.unaudited)

    @property
    def ratio(self) -> float:
        return self.mutations_per_s / self.mutations_per_s_unaudited

    @staticmethod
    def cpu_ms(runs: list[Run]) -> float:
        ok = sum(r.ok for r in runs)
        return sum(r.server_cpu * r.seconds for r in runs) / ok * 1000 if ok else math.nan

    def summary(self) -> dict[str, Any]:
        finite = [x for x in self.lags if math.isfinite(x)]
        return {
            "mutations_per_s": round(self.mutations_per_s, 1),
            "mutations_per_s_unaudited": round(self.mutations_per_s_unaudited, 1),
            "audit_ratio": round(self.ratio, 3),
            "audit_ratio_rounds": [
                round(a.per_second / u.per_second, 3) for a, u in zip(self.audited, self.unaudited, strict=True)
            ],
            "audited_p99_ms": round(percentile([x for r in self.audited for x in r.latency_ms], 99), 1),
            "unaudited_p99_ms": round(percentile([x for r in self.unaudited for x in r.latency_ms], 99), 1),
            "audited_cpu_ms_per_change": round(self.cpu_ms(self.audited), 2),
            "unaudited_cpu_ms_per_change": round(self.cpu_ms(self.unaudited), 2),
            "audited_failed": sum(r.failed for r in self.audited),
            "unaudited_failed": sum(r.failed for r in self.unaudited),
            "cosign_lag_p99_s": round(percentile(self.lags, 99), 3) if self.lags else None,
            "cosign_lag_p50_s": round(percentile(self.lags, 50), 3) if self.lags else None,
            "cosign_lag_max_s": round(max(finite), 3) if finite else None,
            "checkpoints_measured": len(self.lags),
            "checkpoints_without_quorum": len(self.lags) - len(finite),
            "checkpoints_signed": self.checkpoints,
            "witness_errors": self.witness_errors,
            "sites": self.workload.sites,
            "quorum": QUORUM,
            "clients": self.workload.clients,
            "run_s": self.workload.run_s,
            "rounds": self.workload.rounds,
            "cores": os.cpu_count(),
            "loadavg_before": round(self.load_before, 2),
        }


def measure(run_dir: Path, workload: Workload) -> Figures:
    load_before = os.getloadavg()[0]
    pki = make_pki(run_dir / "pki")
    audited_runs, unaudited_runs = [], []
    with server(run_dir, pki, "audited", True) as audited, server(run_dir, pki, "unaudited", False) as bare:
        clients = {s.name: setup_clients(s, workload.clients) for s in (audited, bare)}
        for s in (audited, bare):  # warm up: connections, caches, the first checkpoint
            mutate(s, clients[s.name], 1.0)
        for _ in range(workload.rounds):
            for running, idle, runs in ((audited, bare, audited_runs), (bare, audited, unaudited_runs)):
                idle.pause()
                try:
                    runs.append(mutate(running, clients[running.name], workload.run_s))
                finally:
                    idle.resume()
        bare.pause()
        sites = enroll(audited, workload.sites)
        lags, checkpoints, errors = cosign_lags(audited, sites, workload)
    return Figures(workload, audited_runs, unaudited_runs, lags, checkpoints, len(errors), load_before)


def mark(ok: bool) -> str:
    return "[green]PASS[/]" if ok else "[red]MISS[/]"


def render(figures: Figures) -> Table:
    w = figures.workload
    load = f"load average {figures.load_before:.2f} at start"
    table = Table(title=f"Sitewarden controller audit trail ({os.cpu_count()} cores, {load})")
    for name, justify in (
        ("Measure", "left"),
        ("Value", "right"),
        ("Detail", "right"),
        ("Target", "right"),
        ("", "center"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for label, runs in (("with the audit trail", figures.audited), ("recorder and outbox off", figures.unaudited)):
        ok = sum(r.ok for r in runs)
        seconds = sum(r.seconds for r in runs)
        lat = [x for r in runs for x in r.latency_ms]
        table.add_row(
            f"State changes, {label} ({w.clients} clients, {w.rounds} × {w.run_s:g} s)",
            f"{ok / seconds:,.0f} /s",
            f"p50 {percentile(lat, 50):.1f} ms, p99 {percentile(lat, 99):.1f} ms",
        )
        table.add_row("  server CPU per change", f"{Figures.cpu_ms(runs):.2f} ms")
        table.add_row(
            "  server CPU (share of one core) / refused",
            f"{sum(r.server_cpu for r in runs) / len(runs):.0%}",
            f"{sum(r.failed for r in runs)} refused",
        )
    table.add_row(
        "Audited / unaudited", f"{figures.ratio:.2f}x", "", f"≥ {TARGET_RATIO:g}x", mark(figures.ratio >= TARGET_RATIO)
    )
    table.add_section()
    p99 = percentile(figures.lags, 99) if figures.lags else math.inf
    table.add_row(
        f"Checkpoint to {QUORUM} site cosignatures ({w.sites} sites, checkpoints every {CHECKPOINT_EVERY_S:g} s)",
        f"p50 {percentile(figures.lags, 50):.3f} s",
        f"p99 {p99:.3f} s over {len(figures.lags)} checkpoints",
        f"p99 ≤ {TARGET_LAG_P99_S:g} s",
        mark(p99 <= TARGET_LAG_P99_S),
    )
    table.caption = (
        "Mix per client: its site's labels, a new API token, its rollout's pause and resume; each request changes "
        "state, so each gets a change record. Rounds alternate between the servers, the idle one paused (SIGSTOP). "
        "Cosign lag: from the checkpoint's signing to the third site's accepted cosignature of it or of a later one."
    )
    return table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return _common.parse_args(
        __doc__,
        argv,
        quick="3 s runs, one round and a 10 s cosign window",
        workdir_help="directory for the controllers' data dirs",
        default=DEFAULT_WORKDIR,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workload = QUICK if args.quick else FULL
    with _common.scratch_dir(args.workdir, "audit-trail-bench-") as run_dir:
        figures = measure(run_dir, workload)
    Console().print(render(figures))
    print(json.dumps(figures.summary()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
