"""ServerApp: FedAvg over the connected SuperNodes, then the global weights and per-round metrics to files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from federation.model_family import TabularLogReg, from_onnx, to_onnx
from federation.privacy import epsilon_per_round
from sitewarden_fedapp import task

WEIGHTING_KEY = "num-examples"


def _aggregate_with_total(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """The default example-weighted average, plus how many examples and sites contributed."""
    aggregated = aggregate_metricrecords(records, weighting_key)
    total = 0
    for record in records:
        total += int(next(iter(record.metric_records.values()))[weighting_key])
    aggregated[weighting_key] = total
    aggregated["num-sites"] = len(records)
    return aggregated


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    num_rounds = int(config["num-server-rounds"])
    fedavg = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=2,
        min_evaluate_nodes=2,
        min_available_nodes=2,
        weighted_by_key=WEIGHTING_KEY,
        train_metrics_aggr_fn=_aggregate_with_total,
        evaluate_metrics_aggr_fn=_aggregate_with_total,
    )
    strategy: Strategy = fedavg
    noise_multiplier = float(config.get("dp-noise-multiplier", 0.0))
    if noise_multiplier > 0:
        strategy = DifferentialPrivacyClientSideFixedClipping(
            fedavg,
            noise_multiplier=noise_multiplier,
            clipping_norm=float(config["dp-clipping-norm"]),
            num_sampled_clients=2,
        )
    # With a base release, training starts from its weights, and every site applies its frozen scaler;
    # without one, from zeros on the app's fixed transform.
    base = _base(config)
    if base is not None:
        initial = task.to_record(base.coef, np.array([base.intercept]))
        scaler = {"offset": [float(v) for v in base.offset], "scale": [float(v) for v in base.scale]}
    else:
        initial, scaler = task.to_record(*task.initial_weights()), {}
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=num_rounds,
        train_config=ConfigRecord({"local-epochs": int(config["local-epochs"]), **scaler}),
        evaluate_config=ConfigRecord(scaler),
        timeout=120,
    )
    _write_outputs(context, result.arrays, result.train_metrics_clientapp, result.evaluate_metrics_clientapp)
    result_path = str(config.get("result-path", ""))
    if base is not None and result_path and len(result.arrays) > 0:
        coef, intercept = task.from_record(result.arrays)
        tuned = base.with_weights(coef, float(intercept[0]))
        _write_atomically(Path(result_path), to_onnx(tuned, doc=f"federated fine-tuning of {config['base-path']}"))


def _base(config: dict) -> TabularLogReg | None:
    base_path = str(config.get("base-path", ""))
    return from_onnx(Path(base_path).read_bytes()) if base_path else None


def _write_outputs(
    context: Context,
    arrays: ArrayRecord,
    train_metrics: dict[int, MetricRecord],
    evaluate_metrics: dict[int, MetricRecord],
) -> None:
    weights_path = str(context.run_config.get("weights-path", ""))
    if weights_path and len(arrays) > 0:
        coef, intercept = task.from_record(arrays)
        buffer = io.BytesIO()
        np.savez(buffer, coef=coef, intercept=intercept)
        _write_atomically(Path(weights_path), buffer.getvalue())
    metrics_path = str(context.run_config.get("metrics-path", ""))
    if metrics_path:
        rounds = int(context.run_config["num-server-rounds"])
        summary = {
            "rounds": rounds,
            "train": {str(r): dict(m) for r, m in sorted(train_metrics.items())},
            "evaluate": {str(r): dict(m) for r, m in sorted(evaluate_metrics.items())},
        }
        noise = float(context.run_config.get("dp-noise-multiplier", 0.0))
        if noise > 0:
            delta = float(context.run_config.get("dp-delta", 1e-5))
            spent = epsilon_per_round(noise, len(train_metrics) or rounds, delta)
            summary["privacy"] = {
                "noise_multiplier": noise,
                "clipping_norm": float(context.run_config["dp-clipping-norm"]),
                "delta": delta,
                "epsilon_per_round": {str(r): e for r, e in spent.items()},
            }
        _write_atomically(Path(metrics_path), json.dumps(summary, indent=2, sort_keys=True).encode())


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
