"""A real Flower 1.42 federation on loopback: a TLS SuperLink with SuperNode authentication, two
registered SuperNodes with their own keys and local CSVs, and the Sitewarden Flower App run through
`flwr run --stream`. Every process is started by `federation.Federation` and stopped in `finally`."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.onnx_model import OnnxModel
from federation import APP_DIR
from federation.keys import generate_supernode_keys, public_key_pem
from federation.model_family import from_onnx
from federation.privacy import epsilon
from federation.superlink import Federation
from sitewarden.devpki import make_pki
from sitewarden.fraud_model import FEATURES, build_release, generate

pytestmark = pytest.mark.timeout(300)

SITES = {"bank-a": (0, 2_000, 101), "bank-b": (1, 3_000, 202)}  # name: (partition-id, rows, seed)
LN2 = math.log(2.0)  # the log loss of the all-zero initial model


@dataclass
class RunningFederation:
    federation: Federation
    node_ids: dict[str, int]
    data_dir: Path


def _write_site_csv(path: Path, rows: int, seed: int) -> None:
    x, y = generate(rows, seed)
    header = ",".join([*FEATURES, "label"])
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", header=header, comments="", fmt="%.9g")


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
        for name, (partition, rows, seed) in SITES.items():
            csv = root / f"{name}.csv"
            _write_site_csv(csv, rows, seed)
            keys = generate_supernode_keys(root / "keys", name)
            node_ids[name] = federation.register_supernode(keys, name=name)
            federation.start_supernode(name, keys, {"partition-id": partition, "data-path": str(csv)})
        federation.wait_until_online(list(node_ids.values()))
        yield RunningFederation(federation, node_ids, root)
    finally:
        federation.stop()


def test_fedavg_three_rounds(running: RunningFederation) -> None:
    out = running.data_dir / "out"
    weights, metrics = out / "global.npz", out / "metrics.json"
    started = time.monotonic()
    outcome = running.federation.run(APP_DIR, {"weights-path": str(weights), "metrics-path": str(metrics)})
    print(f"3-round FedAvg run took {time.monotonic() - started:.1f} s")

    assert outcome.status == "finished:completed", outcome.output
    assert "[ROUND 3/3]" in outcome.output  # streamed ServerApp logs

    summary = json.loads(metrics.read_text())
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

    with np.load(weights) as saved:
        coef, intercept = saved["coef"], saved["intercept"]
    assert coef.shape == (len(FEATURES),) and intercept.shape == (1,)
    assert np.all(np.isfinite(coef)) and np.any(coef != 0.0)

    # The global model generalises to transactions neither site holds.
    import sys  # noqa: PLC0415

    sys.path.insert(0, str(APP_DIR))
    try:
        from sitewarden_fedapp import task  # noqa: PLC0415
    finally:
        sys.path.remove(str(APP_DIR))
    x, y = generate(4_000, seed=999)
    loss, _ = task.evaluate(coef, intercept, task.transform(x), y.astype(np.float64))
    assert loss < LN2


def test_fine_tuning_starts_from_the_base_release_and_writes_a_servable_onnx(running: RunningFederation) -> None:
    """With `base-path`, training starts from the base release's weights and every site uses its frozen
    scaler; the result is the same ONNX family, served by the agent against the base's card."""
    base_dir = running.data_dir / "base"
    card = json.loads(build_release(base_dir, seed=7, n_samples=2_000).read_text())
    result = running.data_dir / "out-ft" / "model.onnx"
    metrics = running.data_dir / "out-ft" / "metrics.json"
    config = {
        "base-path": str(base_dir / "model.onnx"),
        "result-path": str(result),
        "metrics-path": str(metrics),
        "num-server-rounds": 2,
        "local-epochs": 5,
        "learning-rate": 0.05,
    }
    outcome = running.federation.run(APP_DIR, config)
    assert outcome.status == "finished:completed", outcome.output
    base, tuned = from_onnx((base_dir / "model.onnx").read_bytes()), from_onnx(result.read_bytes())
    assert not np.allclose(base.coef, tuned.coef), "the weights moved"
    np.testing.assert_array_equal(base.offset, tuned.offset)  # the scaler is frozen
    first = json.loads(metrics.read_text())["train"]["1"]["train-loss"]
    assert first < 0.3, "round 1 already starts from the base model, far below ln 2"
    OnnxModel(result).check_declared(card["inputs"], card["outputs"])
    x, y = generate(4_000, seed=998)
    p = np.clip(tuned.predict_proba(x), 1e-12, 1 - 1e-12)
    assert -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)) < 0.3


def test_central_dp_with_client_side_fixed_clipping(running: RunningFederation) -> None:
    """One round with `DifferentialPrivacyClientSideFixedClipping` on the server and `fixedclipping_mod`
    on the clients (the app turns both on when the run config asks for a noise multiplier)."""
    weights = running.data_dir / "out-dp" / "global.npz"
    metrics = running.data_dir / "out-dp" / "metrics.json"
    config = {
        "num-server-rounds": 1,
        "dp-noise-multiplier": 0.1,
        "dp-clipping-norm": 0.5,
        "weights-path": str(weights),
        "metrics-path": str(metrics),
    }
    outcome = running.federation.run(APP_DIR, config)
    assert outcome.status == "finished:completed", outcome.output
    assert "Noise multiplier: 0.1" in outcome.output
    assert "Clipping norm: 0.5" in outcome.output
    for name in SITES:
        assert "fixedclipping_mod: parameters are clipped" in running.federation.supernodes[name].log()
    with np.load(weights) as saved:
        assert np.all(np.isfinite(saved["coef"]))
    privacy = json.loads(metrics.read_text())["privacy"]
    assert privacy["epsilon_per_round"] == {"1": pytest.approx(epsilon(0.1, 1, 1e-5))}
    assert privacy["delta"] == 1e-5 and privacy["clipping_norm"] == 0.5


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
