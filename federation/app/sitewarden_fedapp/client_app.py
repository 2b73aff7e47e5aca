"""ClientApp: trains and evaluates the global model on the site's local data, and reports every round.

The SuperNode's node config says where the data is (`data-kind`, `data-path`, `data-query`; see
`federation.datasource`; `data-path` alone is a CSV) and where the site's report spool is
(`report-path`, a JSONL file; empty or absent: no spool).

Two wire formats reach the same train and evaluate functions:

- the message API (`flwr.serverapp.strategy`): `arrays` + `config` records in, `arrays` + `metrics` out;
- the legacy records (`fitins.*`/`fitres.*`), which the ServerApp uses only for secure aggregation,
  since Flower 1.42 implements SecAgg+ only as a legacy workflow (`SecAggPlusWorkflow`) with its
  client-side `secaggplus_mod`.

The node config also carries the terms the site accepted for the job (`federation.terms`: rounds,
minimum sites, secure aggregation, clipping norm), put there by the site's agent. They never come
from the server's messages: the server is not trusted to keep them.

Train messages pass through these mods, outermost first:

1. `spool_mod`: runs the rest, then appends the round's line to the spool (one `os.write` of the whole
   line on an O_APPEND descriptor, then fsync) BEFORE the reply leaves the process, so no update is
   sent that the site did not record; a spool that cannot be written fails the message instead;
2. `terms_mod`: refuses, before anything else runs, a message the accepted terms do not cover (no
   terms at all; not a train or evaluate message; a plain training message when SecAgg+ was
   accepted; a SecAgg+ round among fewer sites than accepted; a round beyond the accepted count,
   counted from the spool; an evaluation beyond the rounds the site trained in), recording the
   refusal in the spool; the reply is an error, no update;
3. `optional_secaggplus_mod`: Flower's `secaggplus_mod` when the message is a SecAgg+ stage; it answers
   the key-agreement stages itself and masks the update in the "collect masked vectors" stage;
4. `measure_mod`: the L2 norm of the update as it leaves clipping (after clipping, before masking);
5. `clipping_mod`: clips the update to the accepted clipping norm (or the server's, when it asks for
   a smaller one), in the wire format at hand, whatever the server asked.

Evaluate messages pass through `spool_mod` and `terms_mod` only.

With DP every site weighs 1 in the average (`aggregation-weight`), not its number of examples: the
noise the server adds is calibrated to the clipping norm over the number of sites, which bounds one
site's influence only when the average is uniform (`federation.privacy` accounts for that mechanism).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from federation.datasource import DataSource
from federation.terms import Terms, TermsError, rounds_taken
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
    clipping_norm: float | None = None  # what the update was clipped to (None: not clipped)


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
    clipping_norm = report.clipping_norm
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


class Refused(RuntimeError):
    """A message the site's accepted terms do not cover; its reply is this error, never an update."""


def accepted_terms(context: Context) -> Terms:
    return Terms.from_node_config(context.node_config)


def terms_problem(msg: Message, terms: Terms, taken: Mapping[str, int]) -> str | None:
    """Why the accepted `terms` do not cover `msg`, given the replies the site already sent (`taken`)."""
    kind = msg.metadata.message_type
    if kind == MessageType.EVALUATE:
        # One evaluation per round the site trained in: the server cannot have the site's data score
        # models of its choosing (each score tells something about the data) beyond the accepted rounds.
        trained = min(taken.get("train", 0), terms.rounds)
        if taken.get("evaluate", 0) >= trained:
            return f"an evaluation beyond the {trained} round(s) this site trained for job {terms.job_id}"
        return None
    if kind != MessageType.TRAIN:
        return f"a {kind} message is not part of job {terms.job_id} (train and evaluate only)"
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if terms.secure_aggregation and configs is None:
        return (
            f"job {terms.job_id} was accepted with SecAgg+; this training message is not part of SecAgg+ "
            "(its update would leave the site in the clear)"
        )
    stage = str(configs.get(Key.STAGE, "")) if configs is not None else ""
    if (configs is None or stage in (Stage.SETUP, Stage.COLLECT_MASKED_VECTORS)) and taken.get(
        "train", 0
    ) >= terms.rounds:
        return f"a training round beyond the {terms.rounds} accepted for job {terms.job_id}"
    if configs is not None and stage == Stage.SETUP:
        sites = int(configs.get(Key.SAMPLE_NUMBER, 0))
        if sites < terms.min_sites:
            return f"SecAgg+ among {sites} site(s), fewer than the {terms.min_sites} accepted for job {terms.job_id}"
    return None


def terms_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Refuse, before the message reaches anything else, what the site's accepted terms do not cover."""
    report_path = str(context.node_config.get("report-path", ""))
    try:
        terms = accepted_terms(context)
        if not report_path:
            raise TermsError("the node config names no report-path, where rounds are counted")
    except TermsError as exc:
        problem, job = f"no accepted terms: {exc}", ""
    else:
        problem, job = terms_problem(msg, terms, rounds_taken(report_path)), terms.job_id
    if problem is None:
        return call_next(msg, context)
    if report_path:
        append_line(
            report_path,
            {
                "event": "refused",
                "job": job,
                "run_id": int(msg.metadata.run_id),
                "message_type": str(msg.metadata.message_type),
                "group": str(msg.metadata.group_id),
                "reason": problem,
            },
        )
    raise Refused(problem)


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


def clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the update (the reply's weights minus the global ones) to the accepted clipping norm, or
    to the server's when it asks for a smaller one; the terms come from the node config, not the server."""
    if not carries_model(msg):
        return call_next(msg, context)
    ins = instruction(msg)
    norm = accepted_terms(context).effective_clipping_norm(ins.clipping_norm)
    report = _report.get()
    if report is not None:
        report.clipping_norm = norm
    reply = call_next(msg, context)
    if norm is None or reply.has_error():
        return reply
    start = np.concatenate([ins.coef.reshape(-1), ins.intercept.reshape(-1)])
    update = sent_weights(reply, ins.legacy) - start
    length = float(np.linalg.norm(update))
    if length <= norm:
        return reply
    clipped = start + update * (norm / length)
    coef, intercept = clipped[: ins.coef.size].reshape(ins.coef.shape), clipped[ins.coef.size :]
    content = reply.content
    if ins.legacy:
        fitres = compat.recorddict_to_fitres(content, keep_input=True)
        fitres.parameters = ndarrays_to_parameters([coef, intercept])
        return Message(content=compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
    clipped_content = RecordDict({"arrays": task.to_record(coef, intercept), **dict(content.metric_records)})
    return Message(content=clipped_content, reply_to=msg)


# --- train and evaluate ------------------------------------------------------------------------


def _note(*, examples: int, raw_update_norm: float | None = None) -> None:
    report = _report.get()
    if report is not None:
        report.examples = examples
        report.raw_update_norm = raw_update_norm


@app.train(mods=[spool_mod, terms_mod, optional_secaggplus_mod, measure_mod, clipping_mod])
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
    # With DP (accepted by the site, or asked by the server) the average is uniform over sites (see the
    # module docstring).
    dp = accepted_terms(context).effective_clipping_norm(ins.clipping_norm) is not None
    weight = 1 if dp else len(y)
    metrics = {"train-loss": loss, "train-accuracy": accuracy, KEY_EXAMPLES: len(y)}
    if ins.legacy:
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([coef, intercept]), weight, metrics)
        return Message(content=compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
    content = RecordDict(
        {"arrays": task.to_record(coef, intercept), "metrics": MetricRecord({**metrics, KEY_WEIGHT: weight})}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate(mods=[spool_mod, terms_mod])
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
