"""ServerApp: federated averaging over the connected SuperNodes, with progress, weights, metrics and the
tuned ONNX written to the paths in the run config.

A run:

1. reads the run config (`JobConfig`): rounds, strategy (FedAvg or FedProx), the minimum number of
   sites, central DP with client-side fixed clipping (`dp-noise-multiplier` > 0), secure aggregation;
2. starts from the base release's weights and frozen scaler (`base-path`), or from zeros;
3. runs the rounds, either with the message-API strategies (`flwr.serverapp.strategy`) or, with
   `secure-aggregation`, with the legacy `DefaultWorkflow` + `SecAggPlusWorkflow` and the legacy
   strategies (Flower 1.42 has SecAgg+ only there); the ClientApp serves both formats;
4. after each round's train aggregation and again after its evaluate aggregation rewrites the
   progress file (`progress-path`), then marks it finished;
5. writes the final weights (`weights-path`, .npz), the per-round metrics (`metrics-path`) and, from a
   base release, the tuned model as ONNX of the same family (`result-path`).

With DP the average is uniform over sites (each reports `aggregation-weight` 1, checked here): the
server's noise (noise multiplier x clipping norm / sites) then bounds every site's influence, as
`federation.privacy` assumes. Without DP, sites weigh by their number of examples.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import ERROR
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ClientManager, ServerConfig
from flwr.server import strategy as legacy
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat import LegacyContext
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedProx,
    Strategy,
)
from flwr.supercore import log

from federation.model_family import TabularLogReg, from_onnx, to_onnx
from federation.privacy import epsilon, epsilon_per_round
from sitewarden_fedapp import task

KEY_WEIGHT = "aggregation-weight"  # what a site's update weighs in the average (see the module docstring)
KEY_EXAMPLES = "num-examples"
STRATEGIES = ("FedAvg", "FedProx")
ROUND_TIMEOUT = 120.0  # seconds to wait for the sites' replies in one step of a round

app = ServerApp()


@dataclass(frozen=True)
class JobConfig:
    """The run config, typed (defaults in federation/app/pyproject.toml)."""

    job_id: str
    num_rounds: int
    local_epochs: int
    min_nodes: int
    strategy: str
    proximal_mu: float
    secure_aggregation: bool
    noise_multiplier: float
    clipping_norm: float
    delta: float
    secagg_num_shares: int | float
    secagg_reconstruction_threshold: int | float
    secagg_max_weight: float
    secagg_clipping_range: float
    base_path: str
    result_path: str
    weights_path: str
    metrics_path: str
    progress_path: str

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> JobConfig:
        job = cls(
            job_id=str(config.get("job-id", "")),
            num_rounds=int(config["num-server-rounds"]),
            local_epochs=int(config["local-epochs"]),
            min_nodes=int(config.get("min-nodes", 2)),
            strategy=str(config.get("strategy", "FedAvg")),
            proximal_mu=float(config.get("proximal-mu", 0.1)),
            secure_aggregation=bool(config.get("secure-aggregation", False)),
            noise_multiplier=float(config.get("dp-noise-multiplier", 0.0)),
            clipping_norm=float(config.get("dp-clipping-norm", 1.0)),
            delta=float(config.get("dp-delta", 1e-5)),
            secagg_num_shares=config.get("secagg-num-shares", 1.0),
            secagg_reconstruction_threshold=config.get("secagg-reconstruction-threshold", 0.67),
            secagg_max_weight=float(config.get("secagg-max-weight", 100_000.0)),
            secagg_clipping_range=float(config.get("secagg-clipping-range", 8.0)),
            base_path=str(config.get("base-path", "")),
            result_path=str(config.get("result-path", "")),
            weights_path=str(config.get("weights-path", "")),
            metrics_path=str(config.get("metrics-path", "")),
            progress_path=str(config.get("progress-path", "")),
        )
        if job.strategy not in STRATEGIES:
            raise ValueError(f"run config strategy={job.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if job.min_nodes < 1:
            raise ValueError(f"run config min-nodes={job.min_nodes}: at least one site is needed")
        if job.secure_aggregation and job.min_nodes < 2:
            raise ValueError("secure aggregation needs min-nodes >= 2: the sum of one site's update is that update")
        return job

    @property
    def dp(self) -> bool:
        return self.noise_multiplier > 0

    def epsilon_after(self, server_round: int) -> float | None:
        """Cumulative epsilon after `server_round` rounds at `delta`; None without DP."""
        return epsilon(self.noise_multiplier, server_round, self.delta) if self.dp else None


Weights = tuple[np.ndarray, np.ndarray]  # coef [8], intercept [1]


@dataclass(frozen=True)
class Plan:
    """Where training starts, and what every site is told in each round."""

    initial: Weights
    train_config: dict[str, Any]
    evaluate_config: dict[str, Any]

    @classmethod
    def for_job(cls, job: JobConfig, base: TabularLogReg | None) -> Plan:
        """From the base release's weights with its frozen scaler at every site (sent as JSON text: the
        legacy records used with SecAgg+ carry no lists), or from zeros on the app's fixed transform."""
        if base is None:
            return cls(task.initial_weights(), {"local-epochs": job.local_epochs}, {})
        scaler = {"offset": [float(v) for v in base.offset], "scale": [float(v) for v in base.scale]}
        shared = {"scaler": json.dumps(scaler)}
        initial = (np.asarray(base.coef, dtype=np.float64), np.array([base.intercept], dtype=np.float64))
        return cls(initial, {"local-epochs": job.local_epochs, **shared}, shared)


# --- progress ----------------------------------------------------------------------------------


class Progress:
    """The run's rounds as they complete: the nodes whose updates were aggregated, the aggregated
    metrics, the privacy spent; rewritten atomically at `path` on every change (when a path is set)."""

    def __init__(self, path: str, rounds_planned: int, epsilon_after: Callable[[int], float | None]) -> None:
        self.path = path
        self.rounds_planned = rounds_planned
        self.finished = False
        self._epsilon_after = epsilon_after
        self._rounds: dict[int, dict[str, Any]] = {}

    def _round(self, server_round: int) -> dict[str, Any]:
        if server_round not in self._rounds:
            self._rounds[server_round] = {
                "round": server_round,
                "nodes": [],
                "train": {},
                "evaluate": {},
                "epsilon": self._epsilon_after(server_round),
            }
        return self._rounds[server_round]

    def trained(self, server_round: int, nodes: Iterable[int], metrics: Mapping[str, Any]) -> None:
        entry = self._round(server_round)
        entry["nodes"] = sorted(int(n) for n in nodes)
        entry["train"] = _plain(metrics)
        self.write()

    def evaluated(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        self._round(server_round)["evaluate"] = _plain(metrics)
        self.write()

    def finish(self) -> None:
        self.finished = True
        self.write()

    def aggregated_rounds(self) -> int:
        return sum(1 for entry in self._rounds.values() if entry["nodes"])

    def metrics(self, phase: str) -> dict[int, dict[str, Any]]:
        return {r: dict(e[phase]) for r, e in sorted(self._rounds.items()) if e[phase]}

    def document(self) -> dict[str, Any]:
        return {
            "rounds_planned": self.rounds_planned,
            "finished": self.finished,
            "rounds": [self._rounds[r] for r in sorted(self._rounds)],
        }

    def write(self) -> None:
        if self.path:
            _write_atomically(Path(self.path), json.dumps(self.document(), indent=2, sort_keys=True).encode())


def _plain(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as JSON values (MetricRecord values are ints, floats or lists of them)."""
    return {str(k): (list(v) if isinstance(v, list | tuple) else v) for k, v in metrics.items()}


def average_metrics(replies: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Each metric averaged over sites weighted by their examples, plus how many examples and sites
    contributed. The aggregation weight (1 per site under DP) is not a metric and is left out."""
    total = sum(int(m[KEY_EXAMPLES]) for m in replies)
    out: dict[str, Any] = {}
    for key in replies[0] if replies else ():
        if key in (KEY_EXAMPLES, KEY_WEIGHT) or not all(isinstance(m.get(key), int | float) for m in replies):
            continue
        out[key] = sum(float(m[key]) * int(m[KEY_EXAMPLES]) for m in replies) / total if total else math.nan
    out[KEY_EXAMPLES] = total
    out["num-sites"] = len(replies)
    return out


def _aggregate_metricrecords(records: list[RecordDict], _weighting_key: str) -> MetricRecord:
    return MetricRecord(average_metrics([next(iter(r.metric_records.values())) for r in records]))


# --- the message-API path ----------------------------------------------------------------------


class ProgressReporting(Strategy):
    """Wraps the run's strategy: records every aggregation in the progress, and under DP refuses a
    round whose sites did not all weigh 1."""

    def __init__(self, strategy: Strategy, progress: Progress, *, uniform: bool) -> None:
        self.strategy = strategy
        self.progress = progress
        self.uniform = uniform

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        answered = [r for r in replies if not r.has_error()]
        if self.uniform:
            weights = [next(iter(r.content.metric_records.values())).get(KEY_WEIGHT) for r in answered]
            if any(w != 1 for w in weights):
                log(ERROR, "round %s: DP needs every site to weigh 1, got %s; not aggregated", server_round, weights)
                return None, None
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self.progress.trained(server_round, [r.metadata.src_node_id for r in answered], metrics or {})
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.progress.evaluated(server_round, metrics)
        return metrics


def run_with_messages(grid: Grid, job: JobConfig, plan: Plan, progress: Progress) -> Weights | None:
    """The rounds with the message-API strategies; the final weights, or None if no round aggregated."""
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": job.min_nodes,
        "min_evaluate_nodes": job.min_nodes,
        "min_available_nodes": job.min_nodes,
        "weighted_by_key": KEY_WEIGHT,
        "train_metrics_aggr_fn": _aggregate_metricrecords,
        "evaluate_metrics_aggr_fn": _aggregate_metricrecords,
    }
    strategy: Strategy = (
        FedProx(proximal_mu=job.proximal_mu, **common) if job.strategy == "FedProx" else FedAvg(**common)
    )
    if job.dp:
        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy,
            noise_multiplier=job.noise_multiplier,
            clipping_norm=job.clipping_norm,
            num_sampled_clients=job.min_nodes,
        )
    result = ProgressReporting(strategy, progress, uniform=job.dp).start(
        grid=grid,
        initial_arrays=task.to_record(*plan.initial),
        num_rounds=job.num_rounds,
        train_config=ConfigRecord(plan.train_config),
        evaluate_config=ConfigRecord(plan.evaluate_config),
        timeout=ROUND_TIMEOUT,
    )
    return task.from_record(result.arrays) if len(result.arrays) > 0 else None


# --- the SecAgg+ path (legacy API) -------------------------------------------------------------


class ProgressReportingLegacy(legacy.Strategy):
    """`ProgressReporting` for the legacy strategies that the SecAgg+ workflow drives."""

    def __init__(self, strategy: legacy.Strategy, progress: Progress, *, uniform: bool) -> None:
        super().__init__()
        self.strategy = strategy
        self.progress = progress
        self.uniform = uniform

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        # SecAgg+ masks the weighted update but not the weight: num_examples arrives in the clear.
        weights = [res.num_examples for _, res in results]
        if self.uniform and any(w != 1 for w in weights):
            log(ERROR, "round %s: DP needs every site to weigh 1, got %s; not aggregated", server_round, weights)
            return None, {}
        parameters, metrics = self.strategy.aggregate_fit(server_round, results, failures)
        if parameters is not None:
            self.progress.trained(server_round, [proxy.node_id for proxy, _ in results], metrics)
        return parameters, metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        loss, metrics = self.strategy.aggregate_evaluate(server_round, results, failures)
        if loss is not None:
            self.progress.evaluated(server_round, metrics)
        return loss, metrics

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return self.strategy.evaluate(server_round, parameters)


def run_with_secure_aggregation(
    grid: Grid, context: Context, job: JobConfig, plan: Plan, progress: Progress
) -> Weights | None:
    """The rounds with SecAgg+: the server only ever sees the sum of the sites' masked, quantised
    updates (weighted by their `num_examples`, 1 under DP); the final weights, or None if no round
    aggregated."""

    def metrics_of(results: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        return average_metrics([m for _, m in results])

    common: dict[str, Any] = {
        "fraction_fit": 1.0,
        "fraction_evaluate": 1.0,
        "min_fit_clients": job.min_nodes,
        "min_evaluate_clients": job.min_nodes,
        "min_available_clients": job.min_nodes,
        "initial_parameters": ndarrays_to_parameters(list(plan.initial)),
        "on_fit_config_fn": lambda r: {**plan.train_config, "server-round": r},
        "on_evaluate_config_fn": lambda r: {**plan.evaluate_config, "server-round": r},
        "fit_metrics_aggregation_fn": metrics_of,
        "evaluate_metrics_aggregation_fn": metrics_of,
    }
    strategy = (
        legacy.FedProx(proximal_mu=job.proximal_mu, **common) if job.strategy == "FedProx" else legacy.FedAvg(**common)
    )
    if job.dp:
        strategy = legacy.DifferentialPrivacyClientSideFixedClipping(
            strategy, job.noise_multiplier, job.clipping_norm, job.min_nodes
        )
    legacy_context = LegacyContext(
        context,
        config=ServerConfig(num_rounds=job.num_rounds),
        strategy=ProgressReportingLegacy(strategy, progress, uniform=job.dp),
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=job.secagg_num_shares,
            reconstruction_threshold=job.secagg_reconstruction_threshold,
            # Under DP every site weighs 1; the tightest max_weight keeps the most quantisation precision.
            max_weight=1.0 if job.dp else job.secagg_max_weight,
            clipping_range=job.secagg_clipping_range,
            timeout=ROUND_TIMEOUT,
        )
    )
    workflow(grid, legacy_context)
    if progress.aggregated_rounds() == 0:
        return None
    parameters = compat.arrayrecord_to_parameters(legacy_context.state.array_records[MAIN_PARAMS_RECORD], True)
    coef, intercept = (np.asarray(a, dtype=np.float64) for a in parameters_to_ndarrays(parameters))
    return coef, intercept


# --- the job's participants ----------------------------------------------------------------------


class ParticipantGrid(Grid):
    """The run's grid, limited to the job's participants (`node-ids` in the run config).

    SuperNode registrations outlive a job (Flower never frees a registered key), so another
    registered site's SuperNode may be online during this run: it is never sampled, and no
    message is sent to it.
    """

    def __init__(self, grid: Grid, allowed: frozenset[int]) -> None:
        self._grid = grid
        self._allowed = allowed

    @property
    def run(self) -> Any:
        return self._grid.run

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> list[int]:
        return [node for node in self._grid.get_node_ids() if node in self._allowed]

    def _check(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for message in messages:
            if message.metadata.dst_node_id not in self._allowed:
                raise ValueError(f"node {message.metadata.dst_node_id} is not a participant of this job")
        return messages

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(self._check(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(self._check(messages), timeout=timeout)


def participants(grid: Grid, node_ids: str) -> Grid:
    """`grid` limited to the comma-separated `node_ids`; all of it when the run config names none."""
    allowed = frozenset(int(n) for n in node_ids.split(",") if n.strip())
    return ParticipantGrid(grid, allowed) if allowed else grid


# --- main --------------------------------------------------------------------------------------


@app.main()
def main(grid: Grid, context: Context) -> None:
    job = JobConfig.from_run_config(context.run_config)
    grid = participants(grid, str(context.run_config.get("node-ids", "")))
    base = _base(job)
    plan = Plan.for_job(job, base)
    progress = Progress(job.progress_path, job.num_rounds, job.epsilon_after)
    progress.write()
    if job.secure_aggregation:
        final = run_with_secure_aggregation(grid, context, job, plan, progress)
    else:
        final = run_with_messages(grid, job, plan, progress)
    progress.finish()
    _write_outputs(job, final, progress)
    if base is not None and job.result_path and final is not None:
        coef, intercept = final
        tuned = base.with_weights(coef, float(intercept[0]))
        _write_atomically(Path(job.result_path), to_onnx(tuned, doc=f"federated fine-tuning of {job.base_path}"))


def _base(job: JobConfig) -> TabularLogReg | None:
    return from_onnx(Path(job.base_path).read_bytes()) if job.base_path else None


def _write_outputs(job: JobConfig, final: Weights | None, progress: Progress) -> None:
    if job.weights_path and final is not None:
        coef, intercept = final
        buffer = io.BytesIO()
        np.savez(buffer, coef=coef, intercept=intercept)
        _write_atomically(Path(job.weights_path), buffer.getvalue())
    if job.metrics_path:
        train, evaluate = progress.metrics("train"), progress.metrics("evaluate")
        summary: dict[str, Any] = {
            "rounds": job.num_rounds,
            "train": {str(r): m for r, m in train.items()},
            "evaluate": {str(r): m for r, m in evaluate.items()},
        }
        if job.dp:
            spent = epsilon_per_round(job.noise_multiplier, len(train) or job.num_rounds, job.delta)
            summary["privacy"] = {
                "noise_multiplier": job.noise_multiplier,
                "clipping_norm": job.clipping_norm,
                "delta": job.delta,
                "epsilon_per_round": {str(r): e for r, e in spent.items()},
            }
        _write_atomically(Path(job.metrics_path), json.dumps(summary, indent=2, sort_keys=True).encode())


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
