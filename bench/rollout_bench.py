"""Benchmark figures for rollouts and the agent channel of the controller in `controller/`: how soon a rollout reaches
a fleet of long-polling agents, and how many status reports the controller takes per second next to a bare FastAPI
app doing the same database write. A real controller (HTTPS on loopback, SQLite, data dir under `bench/.tmp`) gets two
small releases and 200 sites enrolled with join tokens (concurrently); 200 simulated agents in this process, each with
its own `httpx.AsyncClient` and so its own TLS connection, long-poll `GET /api/v1/agent/desired?wait=30`. When the
controller has accepted every agent's long-poll JWT (its `jti` is in `seen_jtis`, read from the database), the bench
creates a rollout selecting all sites and times, per agent, from just before `POST /api/v1/rollouts` until the agent
holds the new document: long poll answered, consistent-snapshot TUF target fetched, SHA-256 checked; twice, with the
second release. Then 32 clients, one connection each, post status reports with fresh pre-signed site JWTs spread over
the sites for a fixed time, to the controller and to the bare app (uvicorn configured alike, same TLS, the engine of
`controller.db.make_engine`, the same `observed_states` write; no auth, no middleware). The load generator is a
separate process, so that it does not share the server's interpreter; with two cores it still shares the machine, and
its CPU use is reported to show whether it is the limit. It prints a table with targets marked PASS or MISS and ends
with one JSON line of the figures. Run it from the repository root with `.venv/bin/python bench/rollout_bench.py
[--quick]`; `--quick` uses 50 agents and 3 s runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import resource
import signal
import sqlite3
import ssl
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import _common
import httpx
import jwt
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Depends, FastAPI, Header
from rich.console import Console
from rich.table import Table
from sqlalchemy.orm import Session

from controller.db import Base, ObservedState, Site, make_engine, make_sessionmaker, utcnow
from sitewarden import sitejwt
from sitewarden.keys import encode_public_key
from sitewarden.wire import StatusReport

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `tests` is not installed; it holds the throwaway CA and the controller launcher
from tests.controller_server import ControllerServer, free_port, start_controller  # noqa: E402
from tests.tls import TestPKI, make_pki  # noqa: E402

DEFAULT_WORKDIR = REPO / "bench" / ".tmp"
MODEL = "bench-model"
LABELS = {"fleet": "bench"}
CARD = {"owner": "bench", "intended_purposes": ["benchmark"], "risk_tier": "low"}
STATUS_PATH = "/api/v1/agent/status"
STATUS_ROUTE = ("POST", STATUS_PATH)

ENROLL_CONCURRENCY = 8
LONG_POLL_S = 30
PARK_DEADLINE_S = 120
CONVERGE_DEADLINE_S = 120
PARK_SETTLE_S = 0.5  # between a long poll's authentication (visible in the database) and its subscription
PRESIGN_RPS = 1000  # pre-signed JWTs per second of run; past them the load generator signs on the fly (counted)
LOADGEN_DEADLINE_S = 300
BUSY_LOAD = 0.5

TARGET_CONVERGENCE_P99_S = 2.0
TARGET_STATUS_RATIO = 0.7

stderr = Console(stderr=True, log_path=False)


@dataclass(frozen=True)
class Workload:
    agents: int
    run_s: float  # per round and server
    clients: int
    rounds: int  # of status reports, alternating controller and bare app


FULL = Workload(agents=200, run_s=10.0, clients=32, rounds=3)
QUICK = Workload(agents=50, run_s=3.0, clients=32, rounds=1)


@dataclass(frozen=True)
class EnrolledSite:
    site_id: str
    name: str
    key: Ed25519PrivateKey


@dataclass(frozen=True)
class Setup:
    controller_s: float
    releases_s: float
    enroll_s: float
    park_s: float


@dataclass(frozen=True)
class Convergence:
    """One rollout: per agent, seconds from just before the POST to the long poll's answer and to holding the file."""

    name: str
    post_s: float
    answered_s: list[float]
    held_s: list[float]
    controller_cpu: float  # share of one core, over the window from the POST to the last agent holding its document
    agents_cpu: float  # the same for this process (all agents)

    @property
    def p50(self) -> float:
        return percentile(self.held_s, 50)

    @property
    def p99(self) -> float:
        return percentile(self.held_s, 99)


@dataclass(frozen=True)
class Throughput:
    """Status reports against one server for a fixed time, from the load generator process."""

    server: str
    seconds: float
    ok: int
    per_second: list[int]
    statuses: dict[str, int]
    latency_ms: list[float]
    signed_in_run: int
    loadgen_cpu: float  # share of one core
    server_cpu: float  # share of one core
    server_mean_ms: float | None  # the controller's own latency histogram, from its middleware in

    @property
    def rps(self) -> float:
        return self.ok / self.seconds

    @property
    def cpu_ms(self) -> float:
        """Server CPU per answered report: steadier than req/s when other work shares the cores."""
        return self.server_cpu * self.seconds / self.ok * 1000 if self.ok else math.nan

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != "204")


@dataclass(frozen=True)
class Figures:
    workload: Workload
    setup: Setup
    rollouts: list[Convergence]
    status: Throughput
    bare: Throughput
    round_ratios: list[float]
    load_before: float  # 1-minute load average when the bench started: other work on the machine skews every figure

    @property
    def worst(self) -> Convergence:
        return max(self.rollouts, key=lambda r: r.p99)

    @property
    def ratio(self) -> float:
        return self.status.rps / self.bare.rps

    @property
    def cpu_ratio(self) -> float:
        return self.bare.cpu_ms / self.status.cpu_ms

    def summary(self) -> dict[str, Any]:
        worst = self.worst
        return {
            "convergence_p50_s": round(worst.p50, 3),
            "convergence_p99_s": round(worst.p99, 3),
            "convergence_max_s": round(max(worst.held_s), 3),
            "convergence_runs": [
                {
                    "p50_s": round(r.p50, 3),
                    "p99_s": round(r.p99, 3),
                    "max_s": round(max(r.held_s), 3),
                    "answered_p99_s": round(percentile(r.answered_s, 99), 3),
                    "post_s": round(r.post_s, 3),
                }
                for r in self.rollouts
            ],
            "status_rps": round(self.status.rps, 1),
            "bare_rps": round(self.bare.rps, 1),
            "status_ratio": round(self.ratio, 3),
            "status_ratio_rounds": [round(r, 3) for r in self.round_ratios],
            "status_p99_ms": round(percentile(self.status.latency_ms, 99), 1),
            "bare_p99_ms": round(percentile(self.bare.latency_ms, 99), 1),
            "status_failed": self.status.failed,
            "bare_failed": self.bare.failed,
            "status_cpu_ratio": round(self.cpu_ratio, 3),
            "status_cpu_ms_per_req": round(self.status.cpu_ms, 2),
            "bare_cpu_ms_per_req": round(self.bare.cpu_ms, 2),
            "status_server_cpu": round(self.status.server_cpu, 2),
            "bare_server_cpu": round(self.bare.server_cpu, 2),
            "status_loadgen_cpu": round(self.status.loadgen_cpu, 2),
            "bare_loadgen_cpu": round(self.bare.loadgen_cpu, 2),
            "setup_controller_s": round(self.setup.controller_s, 2),
            "setup_enroll_s": round(self.setup.enroll_s, 2),
            "setup_park_s": round(self.setup.park_s, 2),
            "agents": self.workload.agents,
            "clients": self.workload.clients,
            "run_s": self.workload.run_s,
            "rounds": self.workload.rounds,
            "cores": os.cpu_count(),
            "loadavg_before": round(self.load_before, 2),
        }


# -- helpers -----------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (of at least one value)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def jti_of(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


def tls_context(pki: TestPKI) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca_cert))


def status_body(version: int, release_version: str) -> bytes:
    """A heartbeat of a site running the release: the same bytes each time, so the controller audits only the first."""
    artifact = {"name": MODEL, "version": release_version, "kind": "model", "state": "active", "reason": ""}
    report = {"desired_version": version, "agent_version": "bench-1", "checkpoint_size": 0, "artifacts": [artifact]}
    return json.dumps(report).encode()


def controller_seconds(server: ControllerServer, route: tuple[str, str]) -> tuple[float, float]:
    """The controller's running (sum of seconds, count) of requests to `route`, from its Prometheus histogram."""
    method, template = route
    labels = f'{{method="{method}",route="{template}"}} '
    found = {"sum": 0.0, "count": 0.0}
    with server.http(server.admin_token) as http:  # metrics are for people with a role
        for line in http.get("/metrics").text.splitlines():
            for kind in found:
                if line.startswith(f"sitewarden_http_request_seconds_{kind}{labels}"):
                    found[kind] = float(line.rsplit(" ", 1)[1])
    return found["sum"], found["count"]


# -- setup -------------------------------------------------------------------------------------------------------


def register_release(server: ControllerServer, token: str, version: str) -> None:
    """Upload one small file and register it as release `MODEL` `version`."""
    payload = f"{MODEL} {version}: rollout bench weights\n".encode()
    sha256 = hashlib.sha256(payload).hexdigest()
    with server.http(token) as http:
        info = http.post("/api/v1/uploads", json={"sha256": sha256, "size": len(payload)})
        info.raise_for_status()
        if not info.json()["complete"]:
            http.patch(
                f"/api/v1/uploads/{info.json()['id']}", content=payload, headers={"Upload-Offset": "0"}
            ).raise_for_status()
        files = [{"path": "model.onnx", "sha256": sha256, "size": len(payload)}]
        body = {"name": MODEL, "version": version, "kind": "model", "runtime": "onnx", "files": files, "metadata": CARD}
        created = http.post("/api/v1/releases", json=body)
        if created.status_code != 201:
            raise RuntimeError(f"registering {MODEL} {version} failed: {created.status_code} {created.text}")


async def enroll_sites(server: ControllerServer, count: int) -> list[EnrolledSite]:
    """Create `count` sites labelled `LABELS`, issue each a join token and enroll it, ENROLL_CONCURRENCY at a time."""
    context = tls_context(server.pki)
    limits = httpx.Limits(max_connections=ENROLL_CONCURRENCY)
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    gate = asyncio.Semaphore(ENROLL_CONCURRENCY)
    async with (
        httpx.AsyncClient(base_url=server.url, verify=context, headers=headers, limits=limits, timeout=60) as admin,
        httpx.AsyncClient(base_url=server.url, verify=context, limits=limits, timeout=60) as anonymous,
    ):

        async def one(i: int) -> EnrolledSite:
            name = f"bench-site-{i:04d}"
            key = Ed25519PrivateKey.generate()
            async with gate:
                site = await admin.post("/api/v1/sites", json={"name": name, "labels": LABELS})
                site.raise_for_status()
                issued = await admin.post(f"/api/v1/sites/{site.json()['id']}/join-tokens", json={"ttl_seconds": 600})
                issued.raise_for_status()
                body = {"token": issued.json()["token"], "public_key": encode_public_key(key)}
                enrolled = await anonymous.post("/api/v1/enroll", json=body)
                enrolled.raise_for_status()
            return EnrolledSite(enrolled.json()["site_id"], name, key)

        return list(await asyncio.gather(*(one(i) for i in range(count))))


# -- convergence -------------------------------------------------------------------------------------------------


@dataclass
class Agent:
    """One site's agent: long-polls for its desired state and fetches the document when it changes."""

    site: EnrolledSite
    client: httpx.AsyncClient
    audience: str
    version: int = 0
    jti: str | None = None  # of the long poll in flight, None between polls
    answered: dict[int, float] = field(default_factory=dict)  # version -> monotonic time the long poll said so
    held: dict[int, float] = field(default_factory=dict)  # version -> monotonic time the document was verified
    releases: dict[int, list[str]] = field(default_factory=dict)

    async def run(self, progress: asyncio.Event) -> None:
        while True:
            token = sitejwt.sign(self.site.key, self.site.site_id, self.audience)
            self.jti = jti_of(token)
            response = await self.client.get(
                "/api/v1/agent/desired",
                params={"after": self.version, "wait": LONG_POLL_S},
                headers={"Authorization": f"Bearer {token}"},
            )
            answered = time.monotonic()
            self.jti = None
            if response.status_code != 200:
                raise RuntimeError(f"{self.site.name}: long poll answered {response.status_code} {response.text}")
            pointer = response.json()
            if pointer["changed"]:
                await self.fetch(pointer)
                self.answered[self.version] = answered
                progress.set()

    async def fetch(self, pointer: dict[str, Any]) -> None:
        """Download the desired-state document by its consistent-snapshot path and check it against the pointer."""
        directory, _, name = pointer["target"].rpartition("/")
        token = sitejwt.sign(self.site.key, self.site.site_id, self.audience)  # TUF is for enrolled sites only
        response = await self.client.get(
            f"/tuf/targets/{directory}/{pointer['sha256']}.{name}", headers={"Authorization": f"Bearer {token}"}
        )
        if response.status_code != 200:
            raise RuntimeError(f"{self.site.name}: {pointer['target']} answered {response.status_code}")
        data = response.content
        if hashlib.sha256(data).hexdigest() != pointer["sha256"]:
            raise RuntimeError(f"{self.site.name}: {pointer['target']} does not hash to {pointer['sha256']}")
        document = json.loads(data)
        if document["site_id"] != self.site.site_id or document["version"] != pointer["version"]:
            raise RuntimeError(f"{self.site.name}: got version {document['version']} of {document['site_id']}")
        self.version = document["version"]
        self.held[self.version] = time.monotonic()
        self.releases[self.version] = [f"{r['name']}@{r['version']}" for r in document["releases"]]


def authenticated(database: Path, jtis: list[str]) -> int:
    """How many of these site JWT ids the controller has accepted (read-only look at its SQLite database)."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)) as db:
        marks = ",".join("?" * len(jtis))
        return int(db.execute(f"SELECT count(*) FROM seen_jtis WHERE jti IN ({marks})", jtis).fetchone()[0])


async def wait_parked(agents: list[Agent], database: Path, tasks: list[asyncio.Task[None]]) -> None:
    """Until every agent has a long poll in flight that the controller has authenticated (so it is waiting)."""
    deadline = time.monotonic() + PARK_DEADLINE_S
    while True:
        for task in tasks:
            if task.done():
                task.result()  # an agent failed: raise its error
        jtis = [a.jti for a in agents if a.jti is not None]
        if len(jtis) == len(agents) and await asyncio.to_thread(authenticated, database, jtis) == len(agents):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"agents not all parked after {PARK_DEADLINE_S} s ({len(jtis)} polling)")
        await asyncio.sleep(0.05)
    await asyncio.sleep(PARK_SETTLE_S)


async def roll_out(
    server: ControllerServer,
    operator: httpx.AsyncClient,
    agents: list[Agent],
    tasks: list[asyncio.Task[None]],
    progress: asyncio.Event,
    *,
    number: int,
    release_version: str,
) -> Convergence:
    """Create rollout `number` of `release_version` to every site; time until each agent holds the new document."""
    name = f"bench-rollout-{number}"
    body = {"name": name, "releases": [{"name": MODEL, "version": release_version}], "selector": LABELS}
    server_cpu, own_cpu = cpu_seconds(server.process.pid), own_cpu_seconds()
    started = time.monotonic()
    created = await operator.post("/api/v1/rollouts", json=body)
    post_s = time.monotonic() - started
    if created.status_code != 201:
        raise RuntimeError(f"POST /api/v1/rollouts answered {created.status_code}: {created.text}")
    if len(created.json()["sites"]) != len(agents):
        raise RuntimeError(f"rollout {name} selected {len(created.json()['sites'])} sites, not {len(agents)}")
    deadline = started + CONVERGE_DEADLINE_S
    while not all(number in a.held for a in agents):
        for task in tasks:
            if task.done():
                task.result()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sum(number not in a.held for a in agents)
            raise RuntimeError(f"{missing} agents do not hold version {number} after {CONVERGE_DEADLINE_S} s")
        progress.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(progress.wait(), min(remaining, 1.0))
    window = max(a.held[number] for a in agents) - started
    controller_cpu = (cpu_seconds(server.process.pid) - server_cpu) / window
    agents_cpu = (own_cpu_seconds() - own_cpu) / window
    wrong = [a.site.name for a in agents if a.releases[number] != [f"{MODEL}@{release_version}"]]
    if wrong:
        raise RuntimeError(f"{len(wrong)} agents hold other releases than {MODEL}@{release_version}: {wrong[:3]}")
    return Convergence(
        name,
        post_s,
        answered_s=[a.answered[number] - started for a in agents],
        held_s=[a.held[number] - started for a in agents],
        controller_cpu=controller_cpu,
        agents_cpu=agents_cpu,
    )


async def measure_convergence(
    server: ControllerServer, sites: list[EnrolledSite], operator_token: str, release_versions: list[str]
) -> tuple[float, list[Convergence]]:
    """Park one agent per site in its long poll, then roll each release out in turn; (seconds to park, rollouts)."""
    context = tls_context(server.pki)
    database = server.data_dir / "controller.db"
    one_connection = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    timeout = httpx.Timeout(LONG_POLL_S + 30)
    async with contextlib.AsyncExitStack() as stack:
        agents = []
        for site in sites:
            client = httpx.AsyncClient(base_url=server.url, verify=context, limits=one_connection, timeout=timeout)
            await stack.enter_async_context(client)
            agents.append(Agent(site, client, server.url))
        operator = httpx.AsyncClient(
            base_url=server.url, verify=context, headers={"Authorization": f"Bearer {operator_token}"}, timeout=120
        )
        await stack.enter_async_context(operator)
        progress = asyncio.Event()
        started = time.monotonic()
        tasks = [asyncio.create_task(a.run(progress)) for a in agents]
        try:
            stderr.log(f"{len(agents)} agents connecting and long-polling")
            await wait_parked(agents, database, tasks)
            park_s = time.monotonic() - started
            results = []
            for number, version in enumerate(release_versions, start=1):
                stderr.log(f"rollout {number} of {MODEL} {version} to {len(agents)} parked agents")
                results.append(
                    await roll_out(server, operator, agents, tasks, progress, number=number, release_version=version)
                )
                stderr.log(f"  p50 {results[-1].p50:.3f} s, p99 {results[-1].p99:.3f} s")
                if number < len(release_versions):
                    await wait_parked(agents, database, tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return park_s, results


# -- status throughput -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadPlan:
    """What the load generator process sends: pre-signed requests, in order, and how to sign more."""

    url: str
    ca_cert: str
    clients: int
    seconds: float
    bodies: dict[str, bytes]  # site id -> status report
    tokens: list[tuple[str, str]]  # (site id, JWT), used once each unless `reuse`
    keys: dict[str, bytes]  # site id -> raw Ed25519 private key, to sign past the pre-signed ones
    reuse: bool  # the bare app ignores the JWT: cycle the pre-signed ones instead of signing more


def presign(sites: list[EnrolledSite], audience: str, count: int) -> list[tuple[str, str]]:
    """`count` site JWTs, round-robin over the sites (signing is the client's cost, kept out of the timed run)."""
    return [(site.site_id, sitejwt.sign(site.key, site.site_id, audience)) for site in _cycle(sites, count)]


def _cycle(items: list[Any], count: int) -> Iterator[Any]:
    for i in range(count):
        yield items[i % len(items)]


def raw_key(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def generate_load(plan: LoadPlan, conn: Connection) -> None:
    """The load generator process: warm up (one report per site), then post for `plan.seconds`; send the result."""
    try:
        conn.send(("done", asyncio.run(_drive(plan, conn))))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        conn.close()


async def _drive(plan: LoadPlan, conn: Connection) -> dict[str, Any]:
    keys = {site: Ed25519PrivateKey.from_private_bytes(raw) for site, raw in plan.keys.items()}
    sites = list(plan.bodies)
    tokens = iter(plan.tokens)
    signed = 0
    issued = 0

    def next_request() -> tuple[str, str]:
        nonlocal signed, issued, tokens
        issued += 1
        try:
            return next(tokens)
        except StopIteration:
            if plan.reuse:
                tokens = iter(plan.tokens)
                return next(tokens)
            signed += 1
            site = sites[issued % len(sites)]
            return site, sitejwt.sign(keys[site], site, plan.url)

    context = ssl.create_default_context(cafile=plan.ca_cert)
    one_connection = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    statuses: Counter[str] = Counter()
    buckets = [0] * math.ceil(plan.seconds)
    latencies: list[float] = []
    warm: Counter[str] = Counter()
    warmed = asyncio.Barrier(plan.clients + 1)
    timing = asyncio.Event()
    window: dict[str, float] = {}

    async def post(client: httpx.AsyncClient) -> tuple[str, float]:
        site, token = next_request()
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json", "X-Site-Id": site}
        sent = time.monotonic()
        try:
            response = await client.post(STATUS_PATH, content=plan.bodies[site], headers=headers)
        except httpx.HTTPError as exc:
            return type(exc).__name__, sent
        return str(response.status_code), sent

    async def worker(number: int) -> None:
        # One client, so one connection, per worker: a shared httpx pool costs the client more CPU per request
        # the more requests are in flight, and the load generator, not the server, becomes the limit.
        async with httpx.AsyncClient(base_url=plan.url, verify=context, limits=one_connection, timeout=60) as client:
            for _ in range(number, len(sites), plan.clients):  # warm-up: one report per site, spread over workers
                warm[(await post(client))[0]] += 1
            await warmed.wait()
            await timing.wait()
            start, end = window["start"], window["end"]
            while time.monotonic() < end:
                status, sent = await post(client)
                done = time.monotonic()
                if done >= end:
                    return
                statuses[status] += 1
                if status == "204":
                    buckets[int(done - start)] += 1
                    latencies.append((done - sent) * 1000)

    async def conduct() -> float:
        await warmed.wait()
        if set(warm) != {"204"}:
            raise RuntimeError(f"warm-up status reports answered {dict(warm)}")
        cpu = own_cpu_seconds()
        window["start"] = time.monotonic()
        window["end"] = window["start"] + plan.seconds
        conn.send(("start", window["start"]))
        timing.set()
        await asyncio.sleep(plan.seconds)
        conn.send(("stop", time.monotonic()))
        return own_cpu_seconds() - cpu

    cpu, *_ = await asyncio.gather(conduct(), *(worker(i) for i in range(plan.clients)))
    return {
        "ok": statuses["204"],
        "per_second": buckets,
        "statuses": dict(statuses),
        "latency_ms": latencies,
        "signed_in_run": signed,
        "loadgen_cpu": cpu / plan.seconds,
    }


def run_load(plan: LoadPlan, server_pid: int, label: str) -> tuple[dict[str, Any], float]:
    """Run the load generator process against one server; its result and the server's CPU share in the window."""
    spawn = multiprocessing.get_context("spawn")
    receiver, sender = spawn.Pipe(duplex=False)
    process = spawn.Process(target=generate_load, args=(plan, sender), name=f"loadgen-{label}")
    process.start()
    sender.close()
    marks: dict[str, float] = {}
    result: dict[str, Any] | None = None
    deadline = time.monotonic() + LOADGEN_DEADLINE_S
    try:
        while result is None:
            if not receiver.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"the load generator for {label} did not finish within {LOADGEN_DEADLINE_S} s")
            kind, value = receiver.recv()
            if kind in ("start", "stop"):
                marks[kind] = cpu_seconds(server_pid)
            elif kind == "error":
                raise RuntimeError(f"the load generator for {label} failed: {value}")
            else:
                result = value
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()
        receiver.close()
    return result, (marks["stop"] - marks["start"]) / plan.seconds


def throughput(
    label: str, plan: LoadPlan, server_pid: int, server_mean: Callable[[], tuple[float, float]] | None = None
) -> Throughput:
    """Status reports against one server; `server_mean` reads the server's own (seconds, count) of them."""
    before = server_mean() if server_mean else None
    stderr.log(f"status reports against {label}: {plan.clients} clients for {plan.seconds:g} s")
    result, server_cpu = run_load(plan, server_pid, label)
    mean_ms = None
    if server_mean and before:
        after = server_mean()
        count = after[1] - before[1]
        mean_ms = (after[0] - before[0]) / count * 1000 if count else None
    figures = Throughput(
        label,
        plan.seconds,
        ok=result["ok"],
        per_second=result["per_second"],
        statuses=result["statuses"],
        latency_ms=result["latency_ms"] or [math.nan],
        signed_in_run=result["signed_in_run"],
        loadgen_cpu=result["loadgen_cpu"],
        server_cpu=server_cpu,
        server_mean_ms=mean_ms,
    )
    stderr.log(
        f"  {figures.rps:,.0f} req/s, {figures.cpu_ms:.2f} ms server CPU per report, statuses {figures.statuses}"
    )
    return figures


def merge(rounds: list[Throughput]) -> Throughput:
    """Several rounds against one server as one run (CPU shares weighted by time, server mean by requests)."""
    seconds = sum(r.seconds for r in rounds)
    means = [(r.server_mean_ms, r.ok) for r in rounds if r.server_mean_ms is not None]
    statuses: Counter[str] = Counter()
    for r in rounds:
        statuses.update(r.statuses)
    return Throughput(
        rounds[0].server,
        seconds,
        ok=sum(r.ok for r in rounds),
        per_second=[n for r in rounds for n in r.per_second],
        statuses=dict(statuses),
        latency_ms=[ms for r in rounds for ms in r.latency_ms],
        signed_in_run=sum(r.signed_in_run for r in rounds),
        loadgen_cpu=sum(r.loadgen_cpu * r.seconds for r in rounds) / seconds,
        server_cpu=sum(r.server_cpu * r.seconds for r in rounds) / seconds,
        server_mean_ms=sum(m * n for m, n in means) / max(1, sum(n for _, n in means)) if means else None,
    )


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """SIGSTOP a server while the other one is measured, so that its background jobs do not compete."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def compare(
    server: ControllerServer, sites: list[EnrolledSite], bare: tuple[str, int], workload: Workload, body: bytes
) -> tuple[Throughput, Throughput, list[float]]:
    """Alternate rounds of status reports against the controller and the bare app; (controller, bare, ratios).

    Other work on a shared machine comes and goes: alternating rounds spreads it over both servers."""
    bodies = {s.site_id: body for s in sites}
    keys = {s.site_id: raw_key(s.key) for s in sites}
    url, bare_pid = bare
    controller_rounds, bare_rounds = [], []
    for number in range(1, workload.rounds + 1):
        count = len(sites) + int(PRESIGN_RPS * workload.run_s)
        stderr.log(f"round {number} of {workload.rounds}: pre-signing {count:,} site JWTs")
        plan = LoadPlan(
            server.url,
            str(server.pki.ca_cert),
            workload.clients,
            workload.run_s,
            bodies,
            presign(sites, server.url, count),
            keys,
            reuse=False,
        )
        with paused(bare_pid):
            controller_rounds.append(
                throughput("controller", plan, server.process.pid, lambda: controller_seconds(server, STATUS_ROUTE))
            )
        # The bare app ignores the JWT: the first pre-signed ones, cycled, cost the client the same.
        plan = dataclasses.replace(plan, url=url, tokens=plan.tokens[: len(sites) * 4], reuse=True)
        with paused(server.process.pid):
            bare_rounds.append(throughput("bare FastAPI app", plan, bare_pid))
    ratios = [c.rps / b.rps for c, b in zip(controller_rounds, bare_rounds, strict=True)]
    return merge(controller_rounds), merge(bare_rounds), ratios


# -- the bare baseline -------------------------------------------------------------------------------------------


def bare_app(database_url: str, site_ids: list[str]) -> FastAPI:
    """FastAPI with the controller's status write and nothing else: no auth, no middleware, no audit."""
    engine = make_engine(database_url)
    Base.metadata.create_all(engine, tables=[Site.__table__, ObservedState.__table__])
    sessions = make_sessionmaker(engine)
    with sessions() as db:
        db.add_all(Site(id=site_id, name=f"bare-{i:04d}", labels=LABELS) for i, site_id in enumerate(site_ids))
        db.commit()

    def session() -> Iterator[Session]:
        with sessions() as s:
            yield s

    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # The same observed_states row as controller/api/agent.py record_status writes (here through the ORM: a read,
    # then an insert or an update); the site comes from a header instead of a JWT.
    @app.post(STATUS_PATH, status_code=204)
    def report_status(body: StatusReport, x_site_id: str = Header(), db: Session = Depends(session)) -> None:
        artifacts = {
            f"{a.name}@{a.version}": {"kind": a.kind, "state": a.state, "reason": a.reason} for a in body.artifacts
        }
        now = utcnow()
        observed = db.get(ObservedState, x_site_id)
        if observed is None:
            observed = ObservedState(site_id=x_site_id, desired_version=body.desired_version, artifacts=artifacts)
            db.add(observed)
            changed = True
        else:
            changed = observed.artifacts != artifacts or observed.desired_version != body.desired_version
            observed.artifacts = artifacts
            observed.desired_version = body.desired_version
        observed.agent_version = body.agent_version
        observed.checkpoint_size = body.checkpoint_size
        observed.heartbeat_at = now
        if changed:
            observed.changed_at = now
        db.commit()

    return app


def serve_bare(database_url: str, site_ids: list[str], port: int, pki: TestPKI) -> None:
    """The baseline server process: uvicorn configured as `sitewarden controller serve` configures it."""
    config = uvicorn.Config(
        bare_app(database_url, site_ids),
        host="127.0.0.1",
        port=port,
        ssl_certfile=str(pki.server_cert),
        ssl_keyfile=str(pki.server_key),
        log_level="warning",
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run()


@contextlib.contextmanager
def bare_server(run_dir: Path, pki: TestPKI, site_ids: list[str]) -> Iterator[tuple[str, int]]:
    """Start the baseline in its own process; yields (URL, pid); stopped on exit."""
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    database_url = f"sqlite:///{(run_dir / 'bare.db').resolve()}"
    process = multiprocessing.get_context("spawn").Process(
        target=serve_bare, args=(database_url, site_ids, port, pki), name="bare-app"
    )
    process.start()
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=url, verify=tls_context(pki), timeout=5) as http:
            while True:
                if not process.is_alive():
                    raise RuntimeError(f"the bare app exited with {process.exitcode}")
                with contextlib.suppress(httpx.HTTPError):
                    if http.get("/healthz").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("the bare app did not answer within 60 s")
                time.sleep(0.1)
        assert process.pid is not None
        yield url, process.pid
    finally:
        process.terminate()
        process.join(timeout=20)
        if process.is_alive():
            process.kill()
            process.join()


# -- running -----------------------------------------------------------------------------------------------------


def measure(run_dir: Path, workload: Workload) -> Figures:
    load_before = os.getloadavg()[0]
    if load_before > BUSY_LOAD:
        stderr.log(f"[yellow]the machine is busy (load average {load_before:.2f}): figures will be low[/]")
    pki = make_pki(run_dir / "pki")
    stderr.log("starting a controller (TLS, SQLite)")
    started = time.monotonic()
    server = start_controller(run_dir, pki)
    controller_s = time.monotonic() - started
    try:
        operator = server.token("operator", "bench-operator")
        release_versions = ["1.0.0", "2.0.0"]
        started = time.monotonic()
        for version in release_versions:
            register_release(server, operator, version)
        releases_s = time.monotonic() - started
        stderr.log(f"creating and enrolling {workload.agents} sites, {ENROLL_CONCURRENCY} at a time")
        started = time.monotonic()
        sites = asyncio.run(enroll_sites(server, workload.agents))
        enroll_s = time.monotonic() - started
        stderr.log(f"  {enroll_s:.1f} s")
        park_s, rollouts = asyncio.run(measure_convergence(server, sites, operator, release_versions))
        with bare_server(run_dir, pki, [s.site_id for s in sites]) as bare:
            body = status_body(len(release_versions), release_versions[-1])
            status, bare_figures, ratios = compare(server, sites, bare, workload, body)
    except BaseException:
        stderr.print(f"controller log (last lines):\n{server.log()[-4000:]}", markup=False)
        raise
    finally:
        server.stop()
    if "Traceback" in server.log():
        stderr.print(f"[yellow]the controller logged errors:[/]\n{server.log()[-4000:]}", markup=False)
    setup = Setup(controller_s, releases_s, enroll_s, park_s)
    return Figures(workload, setup, rollouts, status, bare_figures, ratios, load_before)


def status_mark(ok: bool) -> str:
    return "[green]PASS[/]" if ok else "[red]MISS[/]"


def render(figures: Figures) -> Table:
    w, s = figures.workload, figures.setup
    table = Table(
        title=f"Sitewarden rollouts and agent channel ({os.cpu_count()} cores, {w.agents} sites, "
        f"load average {figures.load_before:.2f} at start)"
    )
    table.add_column("Measure")
    table.add_column("Value", justify="right")
    table.add_column("Detail", justify="right")
    table.add_column("Target", justify="right")
    table.add_column("", justify="center")

    table.add_row("Controller init + serve until /healthz", f"{s.controller_s:.2f} s")
    table.add_row("Register 2 one-file releases", f"{s.releases_s:.2f} s")
    table.add_row(
        f"Create + join token + enroll {w.agents} sites ({ENROLL_CONCURRENCY} at a time)",
        f"{s.enroll_s:.2f} s",
        f"{w.agents / s.enroll_s:,.1f} sites/s",
    )
    table.add_row(f"{w.agents} agents connect (TLS) and park in a long poll", f"{s.park_s:.2f} s")
    for r in figures.rollouts:
        table.add_section()
        table.add_row(f"{r.name}: POST /api/v1/rollouts round trip", f"{r.post_s:.3f} s")
        table.add_row(
            "  long poll answered p50 / p99",
            f"{percentile(r.answered_s, 50):.3f} s",
            f"p99 {percentile(r.answered_s, 99):.3f} s",
        )
        fetch = [held - answered for held, answered in zip(r.held_s, r.answered_s, strict=True)]
        table.add_row(
            "  then fetching the document p50 / p99",
            f"{percentile(fetch, 50):.3f} s",
            f"p99 {percentile(fetch, 99):.3f} s",
        )
        table.add_row(
            "  agent holds its document p50 / p99",
            f"{r.p50:.3f} s",
            f"p99 {r.p99:.3f} s",
            f"p99 ≤ {TARGET_CONVERGENCE_P99_S:g} s",
            status_mark(r.p99 <= TARGET_CONVERGENCE_P99_S),
        )
        table.add_row("  last agent holds its document", f"{max(r.held_s):.3f} s")
        table.add_row(
            "  CPU until the last: controller / agents", f"{r.controller_cpu:.0%}", f"agents {r.agents_cpu:.0%}"
        )
    for t in (figures.status, figures.bare):
        table.add_section()
        per_second = f"{min(t.per_second)}–{max(t.per_second)}/s each second" if t.per_second else ""
        table.add_row(
            f"POST {STATUS_PATH}, {t.server} ({w.clients} clients, {w.rounds} × {w.run_s:g} s)",
            f"{t.rps:,.0f} req/s",
            per_second,
        )
        table.add_row(
            "  latency p50 / p99",
            f"{percentile(t.latency_ms, 50):.1f} ms",
            f"p99 {percentile(t.latency_ms, 99):.1f} ms",
        )
        if t.server_mean_ms is not None:
            table.add_row("  server-side mean (its latency histogram)", f"{t.server_mean_ms:.1f} ms")
        table.add_row("  CPU: server / load generator", f"{t.server_cpu:.0%}", f"loadgen {t.loadgen_cpu:.0%}")
        table.add_row("  server CPU per answered report", f"{t.cpu_ms:.2f} ms")
        others = {k: v for k, v in t.statuses.items() if k != "204"}
        table.add_row("  answers other than 204", f"{t.failed}", ", ".join(f"{k}: {v}" for k, v in others.items()))
        if t.signed_in_run:
            table.add_row("  JWTs signed during the run (pre-signed ran out)", f"{t.signed_in_run:,}")
    table.add_row(
        "Controller / bare",
        f"{figures.ratio:.2f}x",
        "",
        f"≥ {TARGET_STATUS_RATIO:g}x",
        status_mark(figures.ratio >= TARGET_STATUS_RATIO),
    )
    table.add_row("  per round", ", ".join(f"{r:.2f}x" for r in figures.round_ratios))
    table.add_row("  the same by server CPU per report (bare / controller)", f"{figures.cpu_ratio:.2f}x")
    table.caption = (
        "Convergence: from just before POST /api/v1/rollouts to the agent holding the verified document "
        "(long poll answered, consistent-snapshot target fetched, SHA-256 checked); one TLS connection per agent, "
        "all agents in the bench process. Status: rounds alternate between the servers, the idle one paused "
        "(SIGSTOP); a load generator process per round, pre-signed JWTs, one report per site before the timed run. "
        "CPU is the share of one core; server CPU per report is steadier than req/s when other work shares the machine."
    )
    return table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return _common.parse_args(
        __doc__,
        argv,
        quick="50 agents and 3 s status runs",
        workdir_help="directory for the controller's data dir and the baseline's database",
        default=DEFAULT_WORKDIR,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workload = QUICK if args.quick else FULL
    with _common.scratch_dir(args.workdir, "rollout-bench-") as run_dir:
        figures = measure(run_dir, workload)
    Console().print(render(figures))
    print(json.dumps(figures.summary()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
