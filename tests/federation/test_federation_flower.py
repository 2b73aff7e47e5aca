"""A real Flower 1.42 federation on loopback: a TLS SuperLink with SuperNode authentication, two
registered SuperNodes with their own keys and local data (one site reads a SQLite query, the other a
Parquet file, each with a free-text column the model never sees, and each keeps a report spool), and
the Sitewarden Flower App run through `flwr run --stream`. Every process is started by
`federation.Federation` and stopped in `finally`.

Flower's HTTP transport polls every 3 s on both sides (SuperNode and ServerApp), so a run mostly
waits: the module starts all its runs when the federation is up, three at a time, and each test checks
the run it names. The runs are short (one to three rounds); a SecAgg+ round is four train steps.

With its sites' data in hand, this process also computes FedAvg and FedProx itself (`_reference`):
the plain runs must match it to float rounding, the SecAgg+ run to its quantisation step."""

from __future__ import annotations

import json
import math
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agent.onnx_model import OnnxModel
from federation import APP_DIR
from federation.datasource import DataSource
from federation.keys import generate_supernode_keys, public_key_pem
from federation.model_family import from_onnx
from federation.privacy import epsilon
from federation.superlink import Federation, RunOutcome
from federation.terms import Terms
from sitewarden.devpki import make_pki
from sitewarden.fraud_model import FEATURES, build_release, generate

sys.path.insert(0, str(APP_DIR))
try:
    from sitewarden_fedapp import client_app, server_app, task
finally:
    sys.path.remove(str(APP_DIR))

pytestmark = pytest.mark.timeout(300)

# name: (partition-id, rows used for training, seed). bank-a's table holds more rows than its query selects.
SITES = {"bank-a": (0, 2_000, 101), "bank-b": (1, 3_000, 202)}
SQLITE_EXTRA_ROWS = 250
LN2 = math.log(2.0)  # the log loss of the all-zero initial model
# What each site accepted, in the node config as a site's agent puts it: these tests run plain Flower
# (subprocess isolation, `flwr run <dir>`) with plain FedAvg, DP and SecAgg+ runs side by side, so no
# SecAgg+ requirement and no clipping norm of the site's own; enough rounds for every run.
TERMS = Terms("flower-tests", rounds=100, min_sites=2, secure_aggregation=False, clipping_norm=None)
# `foreign` is an SQL keyword, so the query quotes names; with brackets, as Flower's --node-config parser
# takes no double quote inside a quoted value.
QUOTED = ", ".join(f"[{name}]" for name in (*FEATURES, "label"))


@dataclass
class RunningFederation:
    federation: Federation
    node_ids: dict[str, int]
    data_dir: Path
    sources: dict[str, DataSource]
    spools: dict[str, Path]

    def spool(self, name: str, run_id: int) -> list[dict[str, Any]]:
        """The site's report lines of one run."""
        lines = [json.loads(line) for line in self.spools[name].read_text().splitlines()]
        return [line for line in lines if line["run_id"] == run_id]


def _site_rows(rows: int, seed: int) -> list[dict[str, Any]]:
    x, y = generate(rows, seed)
    notes = ['called, "disputed"', "ok", "line one\nline two"]
    return [
        {"memo": notes[i % len(notes)], **{f: float(x[i, j]) for j, f in enumerate(FEATURES)}, "label": int(y[i])}
        for i in range(rows)
    ]


def _write_sqlite(path: Path, rows: list[dict[str, Any]]) -> DataSource:
    columns = ", ".join(f'"{name}"' for name in rows[0])
    with sqlite3.connect(path) as db:
        db.execute(f"CREATE TABLE transactions (id INTEGER PRIMARY KEY, {columns})")
        db.executemany(
            f"INSERT INTO transactions ({columns}) VALUES ({', '.join('?' * len(rows[0]))})",
            [tuple(r.values()) for r in rows],
        )
    return DataSource(
        "sqlite",
        str(path),
        f"SELECT id, memo, {QUOTED} FROM transactions WHERE id <= {len(rows) - SQLITE_EXTRA_ROWS} ORDER BY id",
    )


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> DataSource:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return DataSource("parquet", str(path))


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningFederation]:
    root = tmp_path_factory.mktemp("federation")
    federation = Federation(
        root / "flower",
        make_pki(root / "pki"),
        # SuperExecs poll for tasks every second by default; a shorter poll keeps the rounds quick.
        extra_env={"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"},
    )
    try:
        federation.start_superlink()
        node_ids: dict[str, int] = {}
        sources = {
            "bank-a": _write_sqlite(root / "bank-a.db", _site_rows(SITES["bank-a"][1] + SQLITE_EXTRA_ROWS, 101)),
            "bank-b": _write_parquet(root / "bank-b.parquet", _site_rows(SITES["bank-b"][1], 202)),
        }
        spools = {name: root / f"{name}.spool.jsonl" for name in SITES}
        for name, (partition, _, _) in SITES.items():
            keys = generate_supernode_keys(root / "keys", name)
            node_ids[name] = federation.register_supernode(keys, name=name)
            node_config = {
                "partition-id": partition,
                **sources[name].to_node_config(),
                "report-path": str(spools[name]),
                **TERMS.to_node_config(),
            }
            federation.start_supernode(name, keys, node_config)
        federation.wait_until_online(list(node_ids.values()))
        yield RunningFederation(federation, node_ids, root, sources, spools)
    finally:
        federation.stop()


def _reference(
    running: RunningFederation, rounds: int, *, epochs: int = 20, learning_rate: float = 0.5, mu: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """FedAvg (FedProx with `mu`) in this process, on the sites' data, weighted by their examples."""
    data = [running.sources[name].load() for name in SITES]
    coef, intercept = task.initial_weights()
    for _ in range(rounds):
        updates = [
            (
                task.train(
                    coef, intercept, task.transform(x), y, epochs=epochs, learning_rate=learning_rate, proximal_mu=mu
                ),
                len(y),
            )
            for x, y in data
        ]
        total = sum(n for _, n in updates)
        coef = sum(c * n for (c, _), n in updates) / total
        intercept = sum(i * n for (_, i), n in updates) / total
    return coef, intercept


def _weights(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as saved:
        return saved["coef"], saved["intercept"]


def _check_spools(running: RunningFederation, outcome: RunOutcome, rounds: int, job: str) -> dict[str, list[dict]]:
    """One train and one evaluate line per round per site, with the site's examples and data fingerprint."""
    out = {}
    for name, (_, rows, _) in SITES.items():
        lines = running.spool(name, outcome.run_id)
        assert sorted((line["round"], line["phase"]) for line in lines) == sorted(
            (r, phase) for r in range(1, rounds + 1) for phase in ("train", "evaluate")
        ), lines
        digest = running.sources[name].sha256()
        for line in lines:
            assert line["job"] == job
            assert line["examples"] == rows
            assert line["dataset_sha256"] == digest
            assert line["bytes_sent"] > 0
            if line["phase"] == "evaluate":
                assert line["update_norm"] is None and line["clipped"] is False
            else:
                assert line["update_norm"] > 0.0
        out[name] = lines
    return out


def _check_progress(running: RunningFederation, path: Path, rounds: int, eps: list[float] | None) -> dict:
    progress = json.loads(path.read_text())
    assert progress["rounds_planned"] == rounds and progress["finished"] is True
    assert [entry["round"] for entry in progress["rounds"]] == list(range(1, rounds + 1))
    total = sum(rows for _, rows, _ in SITES.values())
    for i, entry in enumerate(progress["rounds"]):
        assert entry["nodes"] == sorted(running.node_ids.values())
        assert entry["train"]["num-examples"] == entry["evaluate"]["num-examples"] == total
        assert entry["train"]["num-sites"] == entry["evaluate"]["num-sites"] == len(SITES)
        assert "aggregation-weight" not in entry["train"]
        if eps is None:
            assert entry["epsilon"] is None
        else:
            assert entry["epsilon"] == pytest.approx(eps[i])
    return progress


# --- the runs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedRun:
    """A run of the app: its run config, given its output directory and the base release's directory."""

    name: str
    config: Callable[[Path, Path], dict[str, Any]]


@dataclass(frozen=True)
class FinishedRun:
    outcome: RunOutcome
    out: Path
    seconds: float


PLANNED: list[PlannedRun] = []


def planned(name: str, config: Callable[[Path, Path], dict[str, Any]]) -> PlannedRun:
    run = PlannedRun(name, config)
    PLANNED.append(run)
    return run


class Runs:
    def __init__(self, futures: dict[str, Future[FinishedRun]], base: Path, card: dict[str, Any]) -> None:
        self._futures = futures
        self.base = base  # the base release's directory (model.onnx)
        self.card = card  # and its model card

    def wait(self, run: PlannedRun) -> FinishedRun:
        finished = self._futures[run.name].result(timeout=280)
        print(f"{run.name}: {finished.seconds:.1f} s (three runs share the federation at a time)")
        return finished


@pytest.fixture(scope="module")
def runs(running: RunningFederation) -> Iterator[Runs]:
    base = running.data_dir / "base"
    card = json.loads(build_release(base, seed=7, n_samples=2_000).read_text())

    def start(run: PlannedRun) -> FinishedRun:
        out = running.data_dir / f"out-{run.name}"
        started = time.monotonic()
        outcome = running.federation.run(APP_DIR, run.config(out, base))
        return FinishedRun(outcome, out, time.monotonic() - started)

    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="flwr-run") as pool:
        yield Runs({run.name: pool.submit(start, run) for run in PLANNED}, base, card)


FEDAVG = planned(
    "fedavg",
    lambda out, _: {
        "job-id": "job-fedavg",
        "weights-path": str(out / "global.npz"),
        "metrics-path": str(out / "metrics.json"),
        "progress-path": str(out / "progress.json"),
    },
)
FINE_TUNING = planned(
    "fine-tuning",
    lambda out, base: {
        "base-path": str(base / "model.onnx"),
        "result-path": str(out / "model.onnx"),
        "metrics-path": str(out / "metrics.json"),
        "num-server-rounds": 2,
        "local-epochs": 5,
        "learning-rate": 0.05,
    },
)
DP = planned(
    "dp",
    lambda out, _: {
        "job-id": "job-dp",
        "num-server-rounds": 1,
        "dp-noise-multiplier": 0.1,
        "dp-clipping-norm": 0.5,
        "weights-path": str(out / "global.npz"),
        "metrics-path": str(out / "metrics.json"),
        "progress-path": str(out / "progress.json"),
    },
)
FEDPROX = planned(
    "fedprox",
    lambda out, _: {
        "job-id": "job-prox",
        "strategy": "FedProx",
        "proximal-mu": 2.0,
        "num-server-rounds": 1,
        "weights-path": str(out / "global.npz"),
    },
)
SECAGG = planned(
    "secagg",
    lambda out, _: {
        "job-id": "job-secagg",
        "secure-aggregation": True,
        "secagg-max-weight": 5000.0,
        "num-server-rounds": 1,
        "weights-path": str(out / "global.npz"),
        "progress-path": str(out / "progress.json"),
    },
)
SECAGG_DP = planned(
    "secagg-dp",
    lambda out, base: {
        "job-id": "job-secagg-dp",
        "secure-aggregation": True,
        "num-server-rounds": 1,
        "local-epochs": 5,
        "learning-rate": 0.05,
        "dp-noise-multiplier": 0.2,
        "dp-clipping-norm": 0.002,  # below the sites' update norms (about 0.003): every update is clipped
        "base-path": str(base / "model.onnx"),
        "result-path": str(out / "model.onnx"),
        "progress-path": str(out / "progress.json"),
    },
)


def test_fedavg_three_rounds(running: RunningFederation, runs: Runs) -> None:
    run = runs.wait(FEDAVG)
    outcome = run.outcome
    assert outcome.status == "finished:completed", outcome.output
    assert "[ROUND 3/3]" in outcome.output  # streamed ServerApp logs

    summary = json.loads((run.out / "metrics.json").read_text())
    total = sum(rows for _, rows, _ in SITES.values())
    assert sorted(summary["train"]) == sorted(summary["evaluate"]) == ["1", "2", "3"]
    for phase, loss_key, accuracy_key in (
        ("train", "train-loss", "train-accuracy"),
        ("evaluate", "eval-loss", "eval-accuracy"),
    ):
        for round_metrics in summary[phase].values():
            assert round_metrics["num-examples"] == total
            assert round_metrics["num-sites"] == len(SITES)
            assert 0.0 < round_metrics[loss_key] < LN2
            assert 0.5 < round_metrics[accuracy_key] <= 1.0
    assert summary["evaluate"]["3"]["eval-loss"] < summary["evaluate"]["1"]["eval-loss"]

    coef, intercept = _weights(run.out / "global.npz")
    assert coef.shape == (len(FEATURES),) and intercept.shape == (1,)
    assert np.all(np.isfinite(coef)) and np.any(coef != 0.0)
    # The federation computed exactly FedAvg over the sites' query and file (up to float summation order).
    expected_coef, expected_intercept = _reference(running, 3)
    np.testing.assert_allclose(coef, expected_coef, rtol=0, atol=1e-12)
    np.testing.assert_allclose(intercept, expected_intercept, rtol=0, atol=1e-12)

    # The global model generalises to transactions neither site holds.
    x, y = generate(4_000, seed=999)
    loss, _ = task.evaluate(coef, intercept, task.transform(x), y.astype(np.float64))
    assert loss < LN2

    progress = _check_progress(running, run.out / "progress.json", 3, eps=None)
    assert progress["rounds"][2]["evaluate"] == summary["evaluate"]["3"]
    lines = _check_spools(running, outcome, 3, job="job-fedavg")
    for name in SITES:
        sent = {(line["round"], line["phase"]): line["bytes_sent"] for line in lines[name]}
        for r in (1, 2, 3):
            assert sent[r, "train"] > sent[r, "evaluate"]  # the weights on top of the metrics
        assert not any(line["clipped"] for line in lines[name])


def test_fine_tuning_starts_from_the_base_release_and_writes_a_servable_onnx(runs: Runs) -> None:
    """With `base-path`, training starts from the base release's weights and every site uses its frozen
    scaler; the result is the same ONNX family, served by the agent against the base's card."""
    run = runs.wait(FINE_TUNING)
    assert run.outcome.status == "finished:completed", run.outcome.output
    result = run.out / "model.onnx"
    base, tuned = from_onnx((runs.base / "model.onnx").read_bytes()), from_onnx(result.read_bytes())
    assert not np.allclose(base.coef, tuned.coef), "the weights moved"
    np.testing.assert_array_equal(base.offset, tuned.offset)  # the scaler is frozen
    first = json.loads((run.out / "metrics.json").read_text())["train"]["1"]["train-loss"]
    assert first < 0.3, "round 1 already starts from the base model, far below ln 2"
    OnnxModel(result).check_declared(runs.card["inputs"], runs.card["outputs"])
    x, y = generate(4_000, seed=998)
    p = np.clip(tuned.predict_proba(x), 1e-12, 1 - 1e-12)
    assert -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)) < 0.3


def test_central_dp_with_client_side_fixed_clipping(running: RunningFederation, runs: Runs) -> None:
    """One round with `DifferentialPrivacyClientSideFixedClipping` on the server and the ClientApp's own
    clipping on the clients (to the server's norm here: the sites accepted no norm of their own)."""
    run = runs.wait(DP)
    outcome = run.outcome
    assert outcome.status == "finished:completed", outcome.output
    assert "Noise multiplier: 0.1" in outcome.output
    assert "Clipping norm: 0.5" in outcome.output
    with np.load(run.out / "global.npz") as saved:
        assert np.all(np.isfinite(saved["coef"]))
    privacy = json.loads((run.out / "metrics.json").read_text())["privacy"]
    assert privacy["epsilon_per_round"] == {"1": pytest.approx(epsilon(0.1, 1, 1e-5))}
    assert privacy["delta"] == 1e-5 and privacy["clipping_norm"] == 0.5
    _check_progress(running, run.out / "progress.json", 1, eps=[epsilon(0.1, 1, 1e-5)])
    _check_sent_updates_are_clipped(_check_spools(running, outcome, 1, job="job-dp"), 0.5)


def _check_sent_updates_are_clipped(lines: dict[str, list[dict]], clipping_norm: float) -> None:
    """Every update sent is within the clipping norm; a clipped one is on it."""
    for site_lines in lines.values():
        for line in site_lines:
            if line["phase"] == "train":
                assert line["update_norm"] <= clipping_norm * (1 + 1e-9), line
                if line["clipped"]:
                    assert line["update_norm"] == pytest.approx(clipping_norm, rel=1e-9)


def test_fedprox_adds_the_proximal_term_at_every_site(running: RunningFederation, runs: Runs) -> None:
    """FedProx sends `proximal-mu`; the sites' local objective gains mu/2 ||w - w_global||^2, so the result
    is exactly FedProx's and differs from FedAvg's on the same data."""
    run = runs.wait(FEDPROX)
    assert run.outcome.status == "finished:completed", run.outcome.output
    assert "Proximal mu: 2.0" in run.outcome.output
    coef, intercept = _weights(run.out / "global.npz")
    prox_coef, prox_intercept = _reference(running, 1, mu=2.0)
    np.testing.assert_allclose(coef, prox_coef, rtol=0, atol=1e-12)
    np.testing.assert_allclose(intercept, prox_intercept, rtol=0, atol=1e-12)
    fedavg_coef, _ = _reference(running, 1)
    assert np.linalg.norm(coef) < 0.9 * np.linalg.norm(fedavg_coef), "the proximal term held the update back"
    _check_spools(running, run.outcome, 1, job="job-prox")


def test_secure_aggregation_matches_fedavg_up_to_quantisation(running: RunningFederation, runs: Runs) -> None:
    """SecAgg+ (Flower's legacy workflow): the server only sums masked, quantised updates. Each site
    sends n/max_weight * w, stochastically rounded to one of 2**22 levels over [-8, 8] (a step of
    3.8e-6). With max_weight 5000 the sites' factors (0.4 and 0.6) add up to 1, so an averaged weight
    is off by less than two steps (7.6e-6) plus the rounding of the factors themselves (about 1e-7)."""
    run = runs.wait(SECAGG)
    outcome = run.outcome
    assert outcome.status == "finished:completed", outcome.output
    assert "Secure aggregation completed." in outcome.output, outcome.output
    coef, intercept = _weights(run.out / "global.npz")
    expected_coef, expected_intercept = _reference(running, 1)
    difference = np.max(np.abs(np.concatenate([coef - expected_coef, intercept - expected_intercept])))
    print(f"SecAgg+ vs FedAvg: largest difference {difference:.2e}")
    assert 0.0 < difference < 1e-5  # not 0: the quantisation leaves a trace, this was not the plain path
    _check_progress(running, run.out / "progress.json", 1, eps=None)
    lines = _check_spools(running, outcome, 1, job="job-secagg")
    for name in SITES:
        sent = {(line["round"], line["phase"]): line["bytes_sent"] for line in lines[name]}
        assert sent[1, "train"] > sent[1, "evaluate"]  # the masked vector, on top of the metrics


def test_secure_aggregation_with_central_dp_from_a_base_release(running: RunningFederation, runs: Runs) -> None:
    """SecAgg+ with DP: each site clips its update (fixedclipping_mod) before SecAgg+ masks it, every
    site weighs 1, the server adds the noise to the unmasked sum; fine-tuning a base release writes ONNX."""
    run = runs.wait(SECAGG_DP)
    outcome = run.outcome
    assert outcome.status == "finished:completed", outcome.output
    assert "Secure aggregation completed." in outcome.output
    assert "central DP noise with" in outcome.output
    base, tuned = from_onnx((runs.base / "model.onnx").read_bytes()), from_onnx((run.out / "model.onnx").read_bytes())
    np.testing.assert_array_equal(base.offset, tuned.offset)
    assert not np.allclose(base.coef, tuned.coef)
    _check_progress(running, run.out / "progress.json", 1, eps=[epsilon(0.2, 1, 1e-5)])
    lines = _check_spools(running, outcome, 1, job="job-secagg-dp")
    _check_sent_updates_are_clipped(lines, 0.002)
    assert all(line["clipped"] for site_lines in lines.values() for line in site_lines if line["phase"] == "train")


def test_unregistered_supernode_is_refused(running: RunningFederation) -> None:
    federation = running.federation
    rogue = generate_supernode_keys(running.data_dir / "keys", "rogue")
    process = federation.start_supernode("rogue", rogue, {"partition-id": 9}, max_retries=0)
    try:
        exit_code = process.wait(timeout=60)
    finally:
        process.stop()

    assert exit_code != 0
    assert "Failed to activate SuperNode" in process.log(), process.log_tail()
    # The SuperLink refused exactly this key (it logs the PEM it did not find) ...
    superlink_log = federation.superlink.log() if federation.superlink else ""
    rogue_pem = public_key_pem(rogue.public_key).decode().replace("\n", "\\n")
    assert "No SuperNode found with the given public key" in superlink_log
    assert rogue_pem in superlink_log
    # ... and the registered nodes are still the only ones, and still online.
    nodes = {node["node-id"]: node["status"] for node in federation.list_supernodes()}
    assert nodes == {str(node_id): "online" for node_id in running.node_ids.values()}


def test_registrations_survive_a_superlink_restart(tmp_path: Path) -> None:
    """A second, separate SuperLink: its SQLite database keeps registered SuperNodes across a restart."""
    federation = Federation(tmp_path / "flower", make_pki(tmp_path / "pki"))
    try:
        federation.start_superlink()
        node_id = federation.register_supernode(generate_supernode_keys(tmp_path / "keys", "site"))
        federation.stop_superlink()
        federation.start_superlink()
        assert [(n["node-id"], n["status"]) for n in federation.list_supernodes()] == [(str(node_id), "registered")]
    finally:
        federation.stop()


def test_progress_shows_a_round_trained_before_it_is_evaluated(tmp_path: Path) -> None:
    """The progress file as the controller sees it between aggregations (written atomically each time)."""
    path = tmp_path / "progress.json"
    progress = server_app.Progress(str(path), 2, lambda r: epsilon(1.0, r, 1e-5))
    progress.write()
    assert json.loads(path.read_text()) == {"rounds_planned": 2, "finished": False, "rounds": []}
    progress.trained(1, [9, 3], {"train-loss": 0.5, "num-examples": 10, "num-sites": 2})
    entry = json.loads(path.read_text())["rounds"][0]
    assert entry == {
        "round": 1,
        "nodes": [3, 9],
        "train": {"train-loss": 0.5, "num-examples": 10, "num-sites": 2},
        "evaluate": {},
        "epsilon": pytest.approx(epsilon(1.0, 1, 1e-5)),
    }
    progress.evaluated(1, {"eval-loss": 0.4, "num-examples": 10, "num-sites": 2})
    assert json.loads(path.read_text())["rounds"][0]["evaluate"]["eval-loss"] == 0.4
    progress.finish()
    assert json.loads(path.read_text())["finished"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]  # no temporary file left behind


def test_metrics_are_averaged_by_examples_and_the_aggregation_weight_is_not_a_metric() -> None:
    replies = [
        {"train-loss": 1.0, "num-examples": 1, "aggregation-weight": 1},
        {"train-loss": 4.0, "num-examples": 3, "aggregation-weight": 1},
    ]
    assert server_app.average_metrics(replies) == {"train-loss": 3.25, "num-examples": 4, "num-sites": 2}


def test_spool_lines_are_appended_whole(tmp_path: Path) -> None:
    spool = tmp_path / "site.jsonl"
    client_app.append_line(str(spool), {"round": 1, "phase": "train"})
    client_app.append_line(str(spool), {"round": 1, "phase": "evaluate"})
    assert [json.loads(line) for line in spool.read_text().splitlines()] == [
        {"phase": "train", "round": 1},
        {"phase": "evaluate", "round": 1},
    ]
    assert spool.stat().st_mode & 0o777 == 0o600


def test_the_sites_auc_is_the_mann_whitney_statistic_with_ties_counted_half() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 8))
    x[:40] = x[0]  # a block of tied scores
    y = (rng.random(400) < 0.3).astype(np.float64)
    coef, intercept = rng.normal(size=8), np.array([0.1])
    scores = x @ coef + intercept[0]
    pos, neg = scores[y == 1], scores[y == 0]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert task.auc(coef, intercept, x, y) == pytest.approx(pairs / (len(pos) * len(neg)), abs=1e-12)
    assert task.auc(coef, intercept, x, np.zeros(400)) is None  # one class: undefined, not reported


def test_config_values_reach_flower_as_written_whatever_their_quotes() -> None:
    from flwr.common.config import parse_config_args  # noqa: PLC0415

    from federation.superlink import config_args  # noqa: PLC0415

    values = {"data-query": 'SELECT "foreign", label FROM tx', "path": "/srv/a b.csv", "rounds": 3, "dp": False}
    values["windows"] = "C:\\data\\tx.csv"
    assert parse_config_args([config_args(values)]) == values
    with pytest.raises(ValueError, match="both kinds of quote"):
        config_args({"q": "SELECT \"a\" FROM t WHERE b = 'c'"})


def test_a_run_samples_and_messages_only_the_jobs_participants() -> None:
    class Everyone:
        sent: ClassVar[list] = []

        def get_node_ids(self) -> list[int]:
            return [1, 2, 3]

        def push_messages(self, messages: list) -> list[str]:
            self.sent.extend(messages)
            return ["id"] * len(messages)

    grid = server_app.participants(Everyone(), "3,1")  # type: ignore[arg-type]
    assert list(grid.get_node_ids()) == [1, 3]
    assert server_app.participants(Everyone(), "").__class__ is Everyone  # no list: no limit

    class Outsider:
        class metadata:
            dst_node_id = 2

    with pytest.raises(ValueError, match="node 2 is not a participant"):
        grid.push_messages([Outsider()])  # type: ignore[list-item]
    assert Everyone.sent == []
