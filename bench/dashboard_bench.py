"""Benchmark figures for the admin dashboard in `controller/ui/`: the server time of the fleet page's first page
and of the audit log search's first page, with 5,000 sites and 200,000 entries of the controller's own audit log
in the database, under 16 concurrent clients, next to the baseline measured in the same run: the REST list of the
same page of sites (`GET /api/v1/sites?limit=50`), the call a script would make instead of opening the page.

The controller is the real application (`controller.app.create_app` over a data dir made by `sitewarden controller
init`, SQLite) served by uvicorn on loopback in a process of its own; the bench wraps it in an outermost ASGI
middleware that records each request's server time (from the request's arrival in the application to the last byte
of its response), so client-side queueing in the bench's own process does not count. The fleet is written straight
into the database (sites with labels, observed and desired states, rollouts, witnessed checkpoints, in the mix of
states a real fleet has); the audit entries are appended to the controller's `audit.Log` and indexed by the
dashboard's own indexer (`controller.ui.audit_index`), whose time is reported too. Each scenario runs 16 clients
(asyncio, one connection each) that send their requests back to back after a warm-up; searches cycle through a
mix (by actor, action, resource, outcome, a time window, and no filter). It prints a table with the targets marked
PASS or MISS and ends with one JSON line. Run it from the repository root with
`.venv/bin/python bench/dashboard_bench.py [--quick]`; `--quick` uses 1,000 sites and 40,000 entries.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import _common
import httpx
import rfc8785
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = REPO / "bench" / ".tmp"
SEED = 20261206
CLIENTS = 16
REQUESTS_PER_CLIENT = 25
WARMUP_PER_CLIENT = 3
TARGET_PAGE_MS = 300.0
TARGET_RATIO = 2.0
STARTUP_DEADLINE_S = 120
REGIONS = ["eu-west", "eu-central", "us-east", "ap-south", "uk"]

stderr = Console(stderr=True, log_path=False)


@dataclass(frozen=True)
class Workload:
    sites: int
    entries: int


FULL = Workload(sites=5000, entries=200_000)
QUICK = Workload(sites=1000, entries=40_000)


# -- the server process ----------------------------------------------------------------------------


class Timing:
    """Outermost ASGI middleware: server time per request, kept until `/__bench/timings` takes them."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.times: dict[str, list[float]] = defaultdict(list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/__bench/timings":
            body = json.dumps(self.times).encode()
            self.times = defaultdict(list)
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": body})
            return
        started = time.perf_counter()
        key = scope["path"]

        async def timed_send(message: Any) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.times[key].append((time.perf_counter() - started) * 1000)

        await self.app(scope, receive, timed_send)


def serve(data_dir: Path, port: int) -> None:
    import uvicorn  # noqa: PLC0415

    from controller.app import create_app  # noqa: PLC0415
    from controller.runtime import Runtime  # noqa: PLC0415

    runtime = Runtime.open(data_dir)
    uvicorn.run(Timing(create_app(runtime)), host="127.0.0.1", port=port, log_level="warning")


# -- the data ----------------------------------------------------------------------------------------


def _document(site_id: str, version: int, rollout: dict[str, str]) -> dict[str, Any]:
    prefix = "releases/fraud-scorer/1.0.0"
    return {
        "site_id": site_id,
        "version": version,
        "generated_at": "2026-12-06T00:00:00Z",
        "rollout": rollout,
        "releases": [
            {
                "name": "fraud-scorer",
                "version": "1.0.0",
                "kind": "model",
                "runtime": "onnx",
                "manifest": {"target": f"{prefix}/release.json", "sha256": "a" * 64, "size": 900},
                "files": [
                    {"target": f"{prefix}/files/model.onnx", "path": "model.onnx", "sha256": "b" * 64, "size": 4096}
                ],
                "approvals": [{"target": f"{prefix}/approvals/{'c' * 64}.json", "sha256": "d" * 64, "size": 3000}],
            }
        ],
        "policy": None,
    }


def populate_fleet(data_dir: Path, count: int) -> dict[str, int]:
    """Sites in the mix of states a fleet has, written straight into the controller's database."""
    from sqlalchemy import insert  # noqa: PLC0415

    from controller.config import load  # noqa: PLC0415
    from controller.db import (  # noqa: PLC0415
        DesiredState,
        ObservedState,
        Rollout,
        Site,
        WitnessedCheckpoint,
        make_engine,
        new_id,
    )

    rng = random.Random(SEED)
    now = datetime.now(UTC)
    engine = make_engine(load(data_dir).database_url)
    rollouts = [
        {
            "id": new_id(),
            "name": f"wave-{n}",
            "spec": {
                "releases": [{"name": "fraud-scorer", "version": "1.0.0"}],
                "policy": None,
                "selector": {"region": REGIONS[n]},
                "canary": [],
                "canary_percent": 10,
                "auto_promote_after_s": None,
            },
            "state": "progressing",
            "waves_released": 2,
            "wave_released_at": now,
            "created_by": "bench",
            "created_at": now,
            "updated_at": now,
        }
        for n in range(3)
    ]
    sites, observed, desired, witnessed = [], [], [], []
    states: dict[str, int] = defaultdict(int)
    for i in range(count):
        site_id = new_id()
        status = "disabled" if i % 250 == 0 else "pending" if i % 300 == 1 else "active"
        labels = {"region": REGIONS[i % 5], "tier": "test" if i % 4 == 0 else "prod", "zone": f"z{i % 20}"}
        sites.append(
            {
                "id": site_id,
                "name": f"site-{i:05d}",
                "labels": labels,
                "status": status,
                "public_key": None,
                "created_at": now,
                "created_by": "bench",
            }
        )
        if status != "active":
            states[status] += 1
            continue
        rollout = rollouts[i % 3]
        versions = 1 + i % 3
        for v in range(1, versions + 1):
            document = _document(site_id, v, {"id": rollout["id"], "name": rollout["name"]})
            desired.append(
                {
                    "site_id": site_id,
                    "version": v,
                    "document": document,
                    "sha256": "e" * 64,
                    "rollout_id": rollout["id"],
                    "created_at": now,
                }
            )
        if i % 97 == 0:
            states["stale (never reported)"] += 1
            continue
        refused = i % 120 == 0
        behind = i % 50 == 0
        state = "refused" if refused else "active"
        reason = "approval: no approver this site trusts signed fraud-scorer 1.0.0" if refused else ""
        size = rng.randrange(1000, 1_000_000)
        heartbeat = now - timedelta(seconds=600 if i % 70 == 0 else rng.randrange(1, 30))
        observed.append(
            {
                "site_id": site_id,
                "desired_version": versions - 1 if behind else versions,
                "artifacts": {"fraud-scorer@1.0.0": {"kind": "model", "state": state, "reason": reason}},
                "agent_version": "0.1.0",
                "checkpoint_size": size,
                "heartbeat_at": heartbeat,
                "changed_at": heartbeat,
            }
        )
        witnessed.append(
            {
                "site_id": site_id,
                "origin": f"sitewarden/{site_id}",
                "size": size - i % 10,
                "root_hash": "f" * 64,
                "note": "bench\n",
                "cosigned_at": heartbeat,
            }
        )
        states["refusing" if refused else "behind" if behind else "reporting"] += 1
    with engine.begin() as conn:
        conn.execute(insert(Rollout), rollouts)
        for table, rows in (
            (Site, sites),
            (DesiredState, desired),
            (ObservedState, observed),
            (WitnessedCheckpoint, witnessed),
        ):
            for start in range(0, len(rows), 2000):
                conn.execute(insert(table), rows[start : start + 2000])
    engine.dispose()
    return dict(states)


ACTORS = ["alice", "bob", "carol", "dave", "erin", "controller"] + [f"site:site-{i:05d}" for i in range(0, 5000, 37)]
ACTIONS = [
    "POST /api/v1/rollouts",
    "POST /api/v1/rollouts/{rollout}/promote",
    "POST /api/v1/rollouts/{rollout}/pause",
    "POST /api/v1/sites/{site}/disable",
    "POST /api/v1/tokens",
    "POST /api/v1/releases",
    "POST /api/v1/agent/status",
    "POST /api/v1/releases/{name}/{version}/approvals",
]


def populate_audit_log(data_dir: Path, count: int) -> float:
    """`count` entries appended to the controller's audit log, then indexed as the dashboard does; returns the
    indexing time in seconds."""
    from audit import Log  # noqa: PLC0415
    from controller.config import load  # noqa: PLC0415
    from controller.db import make_engine, make_sessionmaker  # noqa: PLC0415
    from controller.ui.audit_index import AuditIndex  # noqa: PLC0415

    config = load(data_dir)
    rng = random.Random(SEED)
    start = datetime.now(UTC) - timedelta(seconds=count * 2)
    with Log.open(config.audit_dir, config.keys_dir / "audit.key") as log:
        batch = []
        for i in range(count):
            action = ACTIONS[rng.randrange(len(ACTIONS))]
            resource = {"rollout": f"wave-{i % 40}"} if "{rollout}" in action else {"site": f"site-{i % 5000:05d}"}
            result = 403 if i % 25 == 0 else 200
            batch.append(
                rfc8785.dumps(
                    {
                        "type": "request",
                        "time": (start + timedelta(seconds=2 * i)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "actor": ACTORS[rng.randrange(len(ACTORS))],
                        "kind": "person",
                        "role": "operator",
                        "action": action,
                        "resource": resource,
                        "result": result,
                        "outcome": "ok" if result < 400 else "refused",
                        "request_id": f"{i:032x}",
                        "trace_id": None,
                    }
                )
            )
            if len(batch) == 5000:
                log.append_many(batch)
                batch = []
        if batch:
            log.append_many(batch)
        log.checkpoint()
        engine = make_engine(config.database_url)
        started = time.perf_counter()
        with make_sessionmaker(engine)() as db:
            AuditIndex(log).catch_up(db)
        took = time.perf_counter() - started
        engine.dispose()
    return took


# -- the clients -------------------------------------------------------------------------------------


def _start_server(data_dir: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__)), "--serve", str(data_dir), str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the controller exited: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the controller did not start")


def _session_cookie(base: str, token: str) -> str:
    """Sign in through the dashboard's form, as a browser does; the session cookie's `name=value`."""
    with httpx.Client(base_url=base) as http:
        form = http.get("/ui/login", headers={"Accept": "text/html"})
        login_token = re.search(r'name="login_token" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
        login_cookie = form.headers["set-cookie"].split(";")[0]
        done = http.post(
            "/ui/login",
            data={"token": token, "login_token": login_token, "next": "/ui/fleet"},
            headers={"Cookie": login_cookie},
        )
        assert done.status_code == 303, done.text
        return next(c.split(";")[0] for c in done.headers.get_list("set-cookie") if "sitewarden-session=" in c)


async def _load(base: str, paths: list[str], headers: dict[str, str], requests: int) -> list[float]:
    """16 clients sending `requests` each of `paths` (cycled) back to back; the client-side latencies in ms."""
    latencies: list[float] = []

    async def client(n: int) -> None:
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120) as http:
            for i in range(requests):
                path = paths[(n * 7 + i) % len(paths)]
                started = time.perf_counter()
                response = await http.get(path)
                latencies.append((time.perf_counter() - started) * 1000)
                if response.status_code != 200:
                    raise RuntimeError(f"{path}: HTTP {response.status_code}: {response.text[:300]}")

    await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    return latencies


def _server_times(base: str) -> list[float]:
    """Server times of the requests since the last call."""
    times = httpx.get(f"{base}/__bench/timings", timeout=30).json()
    return [t for key, values in times.items() if key != "/__bench/timings" for t in values]


@dataclass(frozen=True)
class Scenario:
    name: str
    server_ms: list[float]
    client_ms: list[float]

    def p(self, q: float, values: list[float] | None = None) -> float:
        data = sorted(values if values is not None else self.server_ms)
        return data[min(len(data) - 1, int(q * len(data)))]


def run(base: str, name: str, paths: list[str], headers: dict[str, str]) -> Scenario:
    """A warm-up round (not counted), then the measured round of the same 16 clients."""
    asyncio.run(_load(base, paths, headers, WARMUP_PER_CLIENT))
    _server_times(base)  # drop the warm-up
    client_ms = asyncio.run(_load(base, paths, headers, REQUESTS_PER_CLIENT))
    return Scenario(name, _server_times(base), client_ms)


def main(argv: list[str] | None = None) -> None:
    args = _common.parse_args(
        __doc__,
        argv,
        quick="1,000 sites and 40,000 audit entries instead of 5,000 and 200,000",
        workdir_help="where the controller's data dir goes",
        default=DEFAULT_WORKDIR,
    )
    workload = QUICK if args.quick else FULL
    sys.path.insert(0, str(REPO))
    from tests.controller_server import free_port, sitewarden  # noqa: PLC0415

    with _common.scratch_dir(args.workdir, "dashboard-") as run_dir:
        data_dir = run_dir / "controller"
        port = free_port()
        done = sitewarden("controller", "init", "--data", str(data_dir), "--public-url", f"http://127.0.0.1:{port}")
        if done.returncode != 0:
            raise SystemExit(done.stderr)
        token = done.stdout.strip().splitlines()[-1]
        stderr.log(f"writing {workload.sites} sites into the database")
        mix = populate_fleet(data_dir, workload.sites)
        stderr.log(f"appending and indexing {workload.entries} audit entries")
        index_s = populate_audit_log(data_dir, workload.entries)
        process = _start_server(data_dir, port, run_dir / "controller.log")
        base = f"http://127.0.0.1:{port}"
        try:
            cookie = _session_cookie(base, token)
            page = {"Cookie": cookie, "Accept": "text/html"}
            searches = [
                "/ui/audit",
                "/ui/audit?actor=bob",
                "/ui/audit?action=POST+%2Fapi%2Fv1%2Frollouts%2F%7Brollout%7D%2Fpromote",
                "/ui/audit?resource=site-01234",
                "/ui/audit?outcome=refused&actor=carol",
                "/ui/audit?resource=wave-7&actor=alice",
            ]
            midway = (datetime.now(UTC) - timedelta(seconds=workload.entries)).strftime("%Y-%m-%dT%H:%M")
            searches.append(f"/ui/audit?since={midway}")
            stderr.log("REST list of sites (baseline)")
            api = run(
                base,
                "REST GET /api/v1/sites?limit=50 (baseline)",
                ["/api/v1/sites?limit=50"],
                {"Authorization": f"Bearer {token}"},
            )
            stderr.log("fleet page")
            fleet = run(base, "fleet page, first page (50 sites)", ["/ui/fleet"], page)
            stderr.log("fleet page, filtered")
            filtered = run(
                base,
                "fleet page filtered (state or label)",
                ["/ui/fleet?state=refusing", "/ui/fleet?label=region%3Deu-west+tier%3Dprod"],
                page,
            )
            stderr.log("audit search")
            audit = run(base, "audit search, first page (50 entries)", searches, page)
        finally:
            process.terminate()
            process.wait(timeout=30)

    table = Table(
        title=f"Dashboard: {workload.sites} sites, {workload.entries} audit entries, {CLIENTS} concurrent clients"
    )
    for column in ("scenario", "requests", "server p50 ms", "server p95 ms", "client p95 ms", "target"):
        table.add_column(column, justify="left" if column == "scenario" else "right")
    fleet_ratio = fleet.p(0.95) / api.p(0.95)
    for scenario, target in (
        (api, "baseline"),
        (fleet, f"<= {TARGET_PAGE_MS:.0f} ms: {'PASS' if fleet.p(0.95) <= TARGET_PAGE_MS else 'MISS'}"),
        (filtered, "–"),
        (audit, f"<= {TARGET_PAGE_MS:.0f} ms: {'PASS' if audit.p(0.95) <= TARGET_PAGE_MS else 'MISS'}"),
    ):
        table.add_row(
            scenario.name,
            str(len(scenario.server_ms)),
            f"{scenario.p(0.5):.1f}",
            f"{scenario.p(0.95):.1f}",
            f"{scenario.p(0.95, scenario.client_ms):.1f}",
            target,
        )
    table.add_row(
        "fleet page p95 / REST p95",
        "",
        "",
        f"{fleet_ratio:.2f}",
        "",
        f"<= {TARGET_RATIO:.0f}: {'PASS' if fleet_ratio <= TARGET_RATIO else 'MISS'}",
    )
    table.add_row("audit index fill (one pass)", str(workload.entries), "", f"{index_s:.1f} s", "", "–")
    console = Console(width=150)
    console.print(table)
    console.print("fleet mix: " + ", ".join(f"{n} {state}" for state, n in sorted(mix.items())))
    print(
        json.dumps(
            {
                "sites": workload.sites,
                "audit_entries": workload.entries,
                "clients": CLIENTS,
                "fleet_page_p95_ms": round(fleet.p(0.95), 1),
                "fleet_page_p50_ms": round(fleet.p(0.5), 1),
                "fleet_filtered_p95_ms": round(filtered.p(0.95), 1),
                "audit_search_p95_ms": round(audit.p(0.95), 1),
                "audit_search_p50_ms": round(audit.p(0.5), 1),
                "api_sites_p95_ms": round(api.p(0.95), 1),
                "api_sites_p50_ms": round(api.p(0.5), 1),
                "fleet_ratio": round(fleet_ratio, 2),
                "audit_index_fill_s": round(index_s, 1),
                "audit_index_entries_per_s": round(workload.entries / index_s),
                "median_client_fleet_ms": round(statistics.median(fleet.client_ms), 1),
            }
        )
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        sys.path.insert(0, str(REPO))
        os.environ.setdefault("SITEWARDEN_UI_SAMPLE_SECONDS", "60")
        serve(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
