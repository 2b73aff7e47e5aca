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
    result = strategy.start(
        grid=grid,
        initial_arrays=task.to_record(*task.initial_weights()),
        num_rounds=num_rounds,
        train_config=ConfigRecord({"local-epochs": int(config["local-epochs"])}),
        timeout=120,
    )
    _write_outputs(context, result.arrays, result.train_metrics_clientapp, result.evaluate_metrics_clientapp)


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
        summary = {
            "rounds": int(context.run_config["num-server-rounds"]),
            "train": {str(r): dict(m) for r, m in sorted(train_metrics.items())},
            "evaluate": {str(r): dict(m) for r, m in sorted(evaluate_metrics.items())},
        }
        _write_atomically(Path(metrics_path), json.dumps(summary, indent=2, sort_keys=True).encode())


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
