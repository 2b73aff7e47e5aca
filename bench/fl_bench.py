"""Benchmark of a federated fine-tuning job: the same 3-round job through Sitewarden and through plain Flower.

The job is the one the bank policy pack lets a site join: the demo fraud scorer (`sitewarden.fraud_model`,
tabular logistic regression) fine-tuned for 3 rounds by 2 sites, FedAvg, central differential privacy with
client-side clipping (noise 1.5, clipping 0.1, delta 1e-5) and SecAgg+; each site trains on its own CSV of
2,000 synthetic transactions. Both sides run the same Flower App (`federation/app`) with the same run
configuration, the same data files and the same security settings (TLS, SuperNode authentication), as real
processes on this machine.

- **Sitewarden** (timed from just before `POST /api/v1/jobs` until the job reads `finished`): a controller
  (`sitewarden controller serve --fleet-port`) whose SuperLink is already up (a warm-up job ran first), and
  two agents (`sitewarden agent run`) already serving the base model under the bank pack; the Flower App is
  a release of kind app that alice approved. Inside the window: the job is published in both desired
  states, each agent fetches and verifies the app release (TUF, approval), computes epsilon, asks its
  federation policy, records the terms it accepts and answers with its SuperNode key and dataset digest,
  the controller registers the keys, the agents start their SuperNodes (process isolation) and the site's
  runner, which checks the FAB's SHA-256 before each task, through the Fleet gateway, the run of the
  approved FAB, the rounds audited on both sides, the result registered as a candidate release with lineage.
- **Plain Flower** (timed around `flwr run <app> --stream`): a standing deployment of `flower-superlink`
  and two registered `flower-supernode`s (Flower's own SuperExec), already online, started by
  `federation.Federation` with the same flags; the same terms reach the ClientApp in their node config.

The target: Sitewarden's wall time at most 1.15 times Flower's. Runs alternate (Flower, Sitewarden, ...);
the medians are compared. It prints a table and ends with one JSON line (`sitewarden_s`, `flower_s`,
`ratio`). Run from the repository root: `.venv/bin/python bench/fl_bench.py [--quick]`.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import _common
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `tests` is not installed; it holds the controller and agent launchers

from controller.federation import FederationSettings  # noqa: E402
from federation import APP_DIR  # noqa: E402
from federation.keys import generate_supernode_keys  # noqa: E402
from federation.superlink import Federation  # noqa: E402
from federation.terms import Terms  # noqa: E402
from sitewarden import approval  # noqa: E402
from sitewarden.fraud_model import FEATURES, build_release, generate  # noqa: E402
from tests.agent_harness import (  # noqa: E402
    BANK_PACK,
    FED_APP,
    AgentProcess,
    enroll_agent,
    push_app,
    push_policy,
    wait_for,
)
from tests.controller_server import ControllerServer, sitewarden, start_controller  # noqa: E402
from tests.tls import make_pki  # noqa: E402

DEFAULT_WORKDIR = REPO / "bench" / ".tmp"
MODEL = "fraud"
ROUNDS = 3
ROWS = 2_000
DP = {"noise_multiplier": 1.5, "clipping_norm": 0.1, "delta": 1e-5}
TARGET = 1.15
FLWR_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}  # what the controller and the agents use too
# What the Sitewarden sites accept for the job, given to the plain SuperNodes the same way (node config); the
# Flower side runs many jobs on one standing deployment, so its round budget is large.
TERMS = Terms("bench", rounds=1000, min_sites=2, secure_aggregation=True, clipping_norm=DP["clipping_norm"])


@dataclass
class Figures:
    sitewarden_s: list[float] = field(default_factory=list)
    flower_s: list[float] = field(default_factory=list)
    consent_s: list[float] = field(default_factory=list)  # job created -> keys registered, job running
    run_s: list[float] = field(default_factory=list)  # job running -> ended, as the controller recorded it
    fleet_bytes: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        sw, fl = statistics.median(self.sitewarden_s), statistics.median(self.flower_s)
        return {
            "sitewarden_s": round(sw, 2),
            "flower_s": round(fl, 2),
            "ratio": round(sw / fl, 3),
            "sitewarden_runs_s": [round(v, 2) for v in self.sitewarden_s],
            "flower_runs_s": [round(v, 2) for v in self.flower_s],
            "consent_s": round(statistics.median(self.consent_s), 2),
            "controller_run_s": round(statistics.median(self.run_s), 2),
            "fleet_bytes": int(statistics.median(self.fleet_bytes)),
        }


def _write_csv(path: Path, seed: int) -> None:
    x, y = generate(ROWS, seed)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*FEATURES, "label"])
        writer.writerows([*(repr(float(v)) for v in row), int(label)] for row, label in zip(x, y, strict=True))


class SitewardenSide:
    def __init__(self, base: Path, pki: Any, data: dict[str, Path]) -> None:
        self.base = base
        self.controller: ControllerServer = start_controller(base, pki)
        self.agents: list[AgentProcess] = []
        keys = base / "approvers"
        approval.generate_approver_key(keys / "alice.pem", keys / "alice.pub.pem")
        add = ["approver", "add", "alice", "--public-key", str(keys / "alice.pub.pem")]
        assert sitewarden(*add, env=self.controller.cli_env()).returncode == 0
        operator, alice = self.controller.token("operator", "olga"), self.controller.token("approver", "alice")
        self.operator = operator
        card = build_release(base / "fraud-1.0.0", seed=7, n_samples=3_000)
        push = ["release", "push", str(base / "fraud-1.0.0"), "--name", MODEL, "--version", "1.0.0"]
        assert sitewarden(*push, "--metadata", str(card), env=self.controller.cli_env(operator)).returncode == 0
        approve = ["release", "approve", MODEL, "1.0.0", "--key", str(keys / "alice.pem")]
        assert sitewarden(*approve, env=self.controller.cli_env(alice)).returncode == 0
        push_policy(
            self.controller, BANK_PACK, "1.0.0", operator=operator, approver=alice, approver_key=keys / "alice.pem"
        )
        push_app(
            self.controller,
            base / "fedapp",
            "0.1.0",
            operator=operator,
            approver=alice,
            approver_key=keys / "alice.pem",
        )
        for name, path in data.items():
            mapping = f'[datasets.transactions]\nkind = "csv"\npath = "{path}"\n'
            agent = enroll_agent(
                self.controller, base, name, {"fl": "yes"}, {"alice": keys / "alice.pub.pem"}, extra_config=mapping
            )
            self.agents.append(agent)
            agent.start()
        rollout = ["rollout", "create", "base", "--release", f"{MODEL}@1.0.0", "--policy", "bank-policy@1.0.0"]
        assert sitewarden(*rollout, "--selector", "fl=yes", env=self.controller.cli_env(operator)).returncode == 0
        for agent in self.agents:
            wait_for(lambda a=agent: a.active() == (MODEL, "1.0.0"), 180, f"{agent.name} to serve the base")

    def job(self) -> tuple[float, dict[str, Any]]:
        body = {
            "name": f"bench-{uuid.uuid4().hex[:8]}",
            "base": {"name": MODEL, "version": "1.0.0"},
            "app": {"name": FED_APP, "version": "0.1.0"},
            "dataset": "transactions",
            "selector": {"fl": "yes"},
            "rounds": ROUNDS,
            "min_sites": 2,
            "differential_privacy": DP,
            "secure_aggregation": True,
        }
        with self.controller.http(self.operator) as http:
            t0 = time.perf_counter()
            created = http.post("/api/v1/jobs", json=body)
            assert created.status_code == 201, created.text
            job_id = created.json()["id"]
            while True:
                job = http.get(f"/api/v1/jobs/{job_id}").json()
                if job["state"] in ("finished", "failed", "cancelled"):
                    elapsed = time.perf_counter() - t0
                    break
                time.sleep(0.1)
        if job["state"] != "finished":
            raise RuntimeError(f"the Sitewarden job ended {job['state']}: {job['reason']}")
        return elapsed, job

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        self.controller.stop()


class FlowerSide:
    def __init__(self, base: Path, data: dict[str, Path], base_model: Path) -> None:
        self.base = base
        self.base_model = base_model
        self.federation = Federation(base / "flower", make_pki(base / "flower-pki"), extra_env=FLWR_ENV)
        self.federation.start_superlink()
        node_ids = []
        for name, path in data.items():
            keys = generate_supernode_keys(base / "flower-keys", name)
            node_ids.append(self.federation.register_supernode(keys, name=name))
            node_config = {"data-kind": "csv", "data-path": str(path), "report-path": str(base / f"{name}.jsonl")}
            node_config.update(TERMS.to_node_config())
            self.federation.start_supernode(name, keys, node_config, max_retries=30)
        self.federation.wait_until_online(node_ids, timeout=120)

    def job(self) -> float:
        out = self.base / f"flower-{uuid.uuid4().hex[:8]}"
        settings = FederationSettings("127.0.0.1", 1, "", Path(), Path())  # only its training defaults are used
        config = {
            "num-server-rounds": ROUNDS,
            "job-id": out.name,
            "min-nodes": 2,
            "strategy": "FedAvg",
            "secure-aggregation": True,
            "local-epochs": settings.local_epochs,
            "learning-rate": settings.learning_rate,
            "base-path": str(self.base_model),
            "result-path": str(out / "result.onnx"),
            "progress-path": str(out / "progress.json"),
            "dp-noise-multiplier": DP["noise_multiplier"],
            "dp-clipping-norm": DP["clipping_norm"],
            "dp-delta": DP["delta"],
        }
        t0 = time.perf_counter()
        outcome = self.federation.run(APP_DIR, config, timeout=1800)
        elapsed = time.perf_counter() - t0
        if outcome.status != "finished:completed" or not (out / "result.onnx").is_file():
            raise RuntimeError(f"the Flower run ended {outcome.status}:\n{outcome.output[-2000:]}")
        return elapsed

    def stop(self) -> None:
        self.federation.stop()


def measure(run_dir: Path, repeats: int) -> Figures:
    pki = make_pki(run_dir / "pki")
    data = {}
    for seed, name in enumerate(("bank-a", "bank-b"), start=31):
        data[name] = run_dir / f"{name}.csv"
        _write_csv(data[name], seed)
    sitewarden_side = SitewardenSide(run_dir / "sitewarden", pki, data)
    flower_side = None
    figures = Figures()
    try:
        sitewarden_side.job()  # warm-up: the controller starts its SuperLink for the first job
        flower_side = FlowerSide(run_dir / "plain", data, run_dir / "sitewarden" / "fraud-1.0.0" / "model.onnx")
        for _ in range(repeats):
            figures.flower_s.append(flower_side.job())
            elapsed, job = sitewarden_side.job()
            figures.sitewarden_s.append(elapsed)
            consent, run = _seconds(job)
            figures.consent_s.append(consent)
            figures.run_s.append(run)
            figures.fleet_bytes.append(job["bytes_exchanged"]["from_sites"] + job["bytes_exchanged"]["to_sites"])
    finally:
        if flower_side is not None:
            flower_side.stop()
        sitewarden_side.stop()
    return figures


def _seconds(job: dict[str, Any]) -> tuple[float, float]:
    """(created -> running, running -> ended) from the job's own timestamps."""
    created, started, ended = (datetime.fromisoformat(job[k]) for k in ("created_at", "started_at", "ended_at"))
    if created.tzinfo is None:
        created = created.replace(tzinfo=started.tzinfo)
    return (started - created).total_seconds(), (ended - started).total_seconds()


def render(figures: Figures) -> Table:
    s = figures.summary()
    table = Table(
        title=f"A {ROUNDS}-round federated fine-tuning job, 2 sites, DP + SecAgg+ (medians of {len(figures.flower_s)})"
    )
    table.add_column("")
    table.add_column("wall time", justify="right")
    table.add_column("runs", justify="right")
    table.add_column("target", justify="right")
    table.add_column("")
    table.add_row(
        "plain Flower: flwr run --stream",
        f"{s['flower_s']:.1f} s",
        ", ".join(f"{v:.1f}" for v in s["flower_runs_s"]),
        "",
        "",
    )
    table.add_row(
        "Sitewarden: POST /jobs -> finished",
        f"{s['sitewarden_s']:.1f} s",
        ", ".join(f"{v:.1f}" for v in s["sitewarden_runs_s"]),
        "",
        "",
    )
    table.add_row("  consent, key registration", f"{s['consent_s']:.1f} s", "", "", "")
    table.add_row("  SuperNodes up, run, release", f"{s['controller_run_s']:.1f} s", "", "", "")
    table.add_row(
        "ratio Sitewarden / Flower",
        f"{s['ratio']:.3f}x",
        "",
        f"<= {TARGET}x",
        "PASS" if s["ratio"] <= TARGET else "MISS",
    )
    table.add_row("Fleet API bytes per job (both ways)", f"{s['fleet_bytes']:,}", "", "", "")
    table.caption = (
        "Same Flower App, run config, data files, TLS and SuperNode authentication on both sides; runs alternate. "
        "Flower: a standing SuperLink with two registered, online SuperNodes. Sitewarden: controller and agents "
        "running, SuperLink up (warm-up job first); its window includes the policy decisions, registration, "
        "SuperNode start, the audited rounds and the lineage release."
    )
    return table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return _common.parse_args(
        __doc__,
        argv,
        quick="one run per side instead of three",
        workdir_help="directory for the controller's, the agents' and Flower's data",
        default=DEFAULT_WORKDIR,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with _common.scratch_dir(args.workdir, "fl-bench-") as run_dir:
        figures = measure(run_dir, 1 if args.quick else 3)
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    console.print(render(figures))
    print(json.dumps(figures.summary()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
