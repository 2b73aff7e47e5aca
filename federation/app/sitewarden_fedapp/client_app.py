"""ClientApp: trains and evaluates the global model on the site's local data, and reports every round.

The SuperNode's node config says where the data is (`data-kind`, `data-path`, `data-query`; see
`federation.datasource`; `data-path` alone is a CSV) and where the site's report spool is
(`report-path`, a JSONL file; empty or absent: no spool).

Two wire formats reach the same train and evaluate functions:

- the message API (`flwr.serverapp.strategy`): `arrays` + `config` records in, `arrays` + `metrics` out;
- the legacy records (`fitins.*`/`fitres.*`), which the ServerApp uses only for secure aggregation,
  since Flower 1.42 implements SecAgg+ only as a legacy workflow (`SecAggPlusWorkflow`) with its
  client-side `secaggplus_mod`.

Train messages pass through these mods, outermost first:

1. `spool_mod`: runs the rest, then appends the round's line to the spool (one `os.write` of the whole
   line on an O_APPEND descriptor, then fsync) BEFORE the reply leaves the process, so no update is
   sent that the site did not record; a spool that cannot be written fails the message instead;
2. `optional_secaggplus_mod`: Flower's `secaggplus_mod` when the message is a SecAgg+ stage; it answers
   the key-agreement stages itself and masks the update in the "collect masked vectors" stage;
3. `measure_mod`: the L2 norm of the update as it leaves clipping (after DP clipping, before masking);
4. `optional_fixedclipping_mod`: Flower's client-side fixed clipping when the server sent a clipping
   norm (a DP run), in the mod of the wire format at hand.

With DP every site weighs 1 in the average (`aggregation-weight`), not its number of examples: the
noise the server adds is calibrated to the clipping norm over the number of sites, which bounds one
site's influence only when the average is uniform (`federation.privacy` accounts for that mechanism).
"""

from __future__ import annotations

import json
import os
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import fixedclipping_mod as legacy_fixedclipping_mod
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from federation.datasource import DataSource
from sitewarden_fedapp import task

# The key under which the DP strategy wrappers send the clipping norm (flwr.supercore.differential_privacy).
KEY_CLIPPING_NORM = "clipping_norm"
# The weight of a site's update in the server's average (FedAvg's `weighted_by_key`).
KEY_WEIGHT = "aggregation-weight"
KEY_EXAMPLES = "num-examples"
# Legacy record names (flwr.compat.common.recorddict_compat).
_FITINS, _EVALUATEINS = "fitins", "evaluateins"

app = ClientApp()


# --- what the server sent, in either format ----------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """A train or evaluate message's global weights and config, whatever its wire format."""

    legacy: bool
    coef: np.ndarray
    intercept: np.ndarray
    config: dict[str, Any]

    @property
    def server_round(self) -> int:
        return int(self.config["server-round"])

    @property
    def clipping_norm(self) -> float | None:
        value = self.config.get(KEY_CLIPPING_NORM)
        return None if value is None else float(value)

    @property
    def proximal_mu(self) -> float:
        # The message-API FedProx sends "proximal-mu", the legacy one "proximal_mu".
        return float(self.config.get("proximal-mu", self.config.get("proximal_mu", 0.0)))


def carries_model(msg: Message) -> bool:
    """Whether a train/evaluate message carries global weights (SecAgg+'s key-agreement stages do not)."""
    records = msg.content.array_records
    return "arrays" in records or f"{_FITINS}.parameters" in records or f"{_EVALUATEINS}.parameters" in records


def instruction(msg: Message) -> Instruction:
    content = msg.content
    for prefix in (_FITINS, _EVALUATEINS):
        if f"{prefix}.parameters" in content.array_records:
            parameters = compat.arrayrecord_to_parameters(content.array_records[f"{prefix}.parameters"], True)
            coef, intercept = (np.asarray(a, dtype=np.float64) for a in parameters_to_ndarrays(parameters))
            return Instruction(True, coef, intercept, dict(content.config_records[f"{prefix}.config"]))
    coef, intercept = task.from_record(content["arrays"])
    return Instruction(False, coef, intercept, dict(content.config_records["config"]))


def sent_weights(reply: Message, legacy: bool) -> np.ndarray:
    """The weights a train reply carries, flattened (coef then intercept)."""
    if legacy:
        parameters = compat.arrayrecord_to_parameters(reply.content.array_records["fitres.parameters"], True)
        arrays = parameters_to_ndarrays(parameters)
    else:
        arrays = list(task.from_record(reply.content["arrays"]))
    return np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])


def _local_data(ins: Instruction, context: Context) -> tuple[np.ndarray, np.ndarray]:
    """The site's features, scaled by the base release's frozen scaler when the job has one."""
    x, y = DataSource.from_node_config(context.node_config).load()
    if "scaler" in ins.config:
        scaler = json.loads(str(ins.config["scaler"]))
        offset = np.asarray(scaler["offset"], dtype=np.float64)
        scale = np.asarray(scaler["scale"], dtype=np.float64)
        return (x - offset) * scale, y
    return task.transform(x), y


# --- the round's report ------------------------------------------------------------------------


@dataclass
class RoundReport:
    """Filled in by the train/evaluate function and `measure_mod` while `spool_mod` waits for the reply."""

    examples: int | None = None
    raw_update_norm: float | None = None
    update_norm: float | None = None


_report: ContextVar[RoundReport | None] = ContextVar("sitewarden_round_report", default=None)
_fingerprints: dict[DataSource, str] = {}


def dataset_sha256(source: DataSource) -> str:
    """`DataSource.sha256()`, computed once per process (Flower runs one ClientApp process per message)."""
    if source not in _fingerprints:
        _fingerprints[source] = source.sha256()
    return _fingerprints[source]


def wire_bytes(content: RecordDict) -> int:
    """Bytes of a reply's content as Flower 1.42 serialises it for the SuperLink: the deflated form
    (header + body) of every distinct object in its tree — the RecordDict, each record, each Array and
    ArrayChunk. The Message's own metadata and the transport framing (HTTP, TLS) are not counted."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def append_line(path: str, line: dict[str, Any]) -> None:
    """One JSON line appended with a single write on an O_APPEND descriptor, then fsync: readers never
    see half a line, and concurrent writers never interleave within one."""
    data = (json.dumps(line, sort_keys=True, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"{path}: short write of the report line ({written} of {len(data)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)


def spool_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Record the round in the site's spool before the reply is released (see the module docstring)."""
    report_path = str(context.node_config.get("report-path", ""))
    if not report_path or not carries_model(msg):
        return call_next(msg, context)
    ins = instruction(msg)
    phase = "train" if msg.metadata.message_type == MessageType.TRAIN else "evaluate"
    report = RoundReport()
    token = _report.set(report)
    try:
        reply = call_next(msg, context)
    finally:
        _report.reset(token)
    if reply.has_error():
        return reply
    update_norm = report.update_norm if phase == "train" else None
    clipping_norm = ins.clipping_norm
    clipped = (
        phase == "train"
        and clipping_norm is not None
        and report.raw_update_norm is not None
        and report.raw_update_norm > clipping_norm
    )
    append_line(
        report_path,
        {
            "job": str(context.run_config.get("job-id", "")),
            "run_id": int(context.run_id),
            "round": ins.server_round,
            "phase": phase,
            "examples": int(report.examples or 0),
            "update_norm": update_norm,
            "clipped": bool(clipped),
            "bytes_sent": wire_bytes(reply.content),
            "dataset_sha256": dataset_sha256(DataSource.from_node_config(context.node_config)),
        },
    )
    return reply


def optional_secaggplus_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `secaggplus_mod` for the stages of a SecAgg+ round, a no-op for other messages."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def measure_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The norm of the update as sent (after clipping, before masking); checks SecAgg+'s bounds."""
    if not carries_model(msg):
        return call_next(msg, context)
    ins = instruction(msg)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    weights = sent_weights(reply, ins.legacy)
    update = weights - np.concatenate([ins.coef.reshape(-1), ins.intercept.reshape(-1)])
    report = _report.get()
    if report is not None:
        report.update_norm = float(np.linalg.norm(update))
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        _check_secagg_bounds(weights, reply, context)
    return reply


def _check_secagg_bounds(weights: np.ndarray, reply: Message, context: Context) -> None:
    """SecAgg+ quantises weight/max_weight * parameters clipped to [-clipping_range, clipping_range]: an
    update outside those bounds would be silently distorted, so refuse to send it instead."""
    # secaggplus_mod keeps its state (SecAggPlusState's fields) from the setup stage in the context.
    state = context.state.config_records[RECORD_KEY_STATE]
    max_weight, clipping_range = float(state["max_weight"]), float(state["clipping_range"])
    weight = int(reply.content.metric_records["fitres.num_examples"]["num_examples"])
    ratio = weight / max_weight
    if ratio > 1:
        raise ValueError(f"SecAgg+: this site's weight {weight} exceeds max_weight {max_weight} (secagg-max-weight)")
    largest = float(np.max(np.abs(weights))) * ratio
    if largest > clipping_range:
        raise ValueError(
            f"SecAgg+: a weighted parameter of magnitude {largest:.3g} exceeds the clipping range {clipping_range}"
            " (secagg-clipping-range); it would be clipped before masking"
        )


def optional_fixedclipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's fixed clipping, in the wire format at hand, when the server asked for it (a DP run)."""
    if not carries_model(msg) or instruction(msg).clipping_norm is None:
        return call_next(msg, context)
    if instruction(msg).legacy:
        return legacy_fixedclipping_mod(msg, context, call_next)
    return fixedclipping_mod(msg, context, call_next)


# --- train and evaluate ------------------------------------------------------------------------


def _note(*, examples: int, raw_update_norm: float | None = None) -> None:
    report = _report.get()
    if report is not None:
        report.examples = examples
        report.raw_update_norm = raw_update_norm


@app.train(mods=[spool_mod, optional_secaggplus_mod, measure_mod, optional_fixedclipping_mod])
def train(msg: Message, context: Context) -> Message:
    ins = instruction(msg)
    x, y = _local_data(ins, context)
    coef, intercept = task.train(
        ins.coef,
        ins.intercept,
        x,
        y,
        epochs=int(ins.config.get("local-epochs", context.run_config["local-epochs"])),
        learning_rate=float(context.run_config["learning-rate"]),
        proximal_mu=ins.proximal_mu,
    )
    update = np.concatenate([coef - ins.coef, intercept - ins.intercept])
    _note(examples=len(y), raw_update_norm=float(np.linalg.norm(update)))
    loss, accuracy = task.evaluate(coef, intercept, x, y)
    # With DP the average is uniform over sites (see the module docstring).
    weight = 1 if ins.clipping_norm is not None else len(y)
    metrics = {"train-loss": loss, "train-accuracy": accuracy, KEY_EXAMPLES: len(y)}
    if ins.legacy:
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([coef, intercept]), weight, metrics)
        return Message(content=compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
    content = RecordDict(
        {"arrays": task.to_record(coef, intercept), "metrics": MetricRecord({**metrics, KEY_WEIGHT: weight})}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate(mods=[spool_mod])
def evaluate(msg: Message, context: Context) -> Message:
    ins = instruction(msg)
    x, y = _local_data(ins, context)
    _note(examples=len(y))
    loss, accuracy = task.evaluate(ins.coef, ins.intercept, x, y)
    metrics = {"eval-loss": loss, "eval-accuracy": accuracy, KEY_EXAMPLES: len(y)}
    area = task.auc(ins.coef, ins.intercept, x, y)
    if area is not None:  # averaged over sites by examples: what the tuned model's card reports as its AUC
        metrics["eval-auc"] = area
    if ins.legacy:
        evaluateres = EvaluateRes(Status(Code.OK, ""), loss, len(y), metrics)
        return Message(content=compat.evaluateres_to_recorddict(evaluateres), reply_to=msg)
    content = RecordDict({"metrics": MetricRecord({**metrics, KEY_WEIGHT: len(y)})})
    return Message(content=content, reply_to=msg)
