"""The accepted terms as the ClientApp enforces them, message by message, without a federation running.

The server's messages are built here the way Flower's strategies and SecAgg+ workflow build them;
each check plays a server that asks for more than the site accepted. The same functions run in the
real SuperNodes of tests/attacks/test_hostile_controller_federation.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from federation import APP_DIR
from federation.terms import Terms, TermsError, rounds_taken

sys.path.insert(0, str(APP_DIR))
try:
    from sitewarden_fedapp import client_app, task
finally:
    sys.path.remove(str(APP_DIR))

# Messages take their sender from the task that creates them: this test process plays the ServerApp's task.
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

TERMS = Terms("job-7", rounds=2, min_sites=2, secure_aggregation=True, clipping_norm=0.1)
GLOBAL = (np.zeros(8), np.zeros(1))


def train_message(content: RecordDict) -> Message:
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN, group_id="1")


def plain_train(config: dict[str, Any] | None = None) -> Message:
    """A message-API training message, as FedAvg sends it (no SecAgg+)."""
    content = RecordDict(
        {"arrays": task.to_record(*GLOBAL), "config": ConfigRecord({"server-round": 1, **(config or {})})}
    )
    return train_message(content)


def secagg_stage(stage: str, **configs: Any) -> Message:
    """A SecAgg+ stage as the legacy workflow sends it; the collect stage carries the fit instructions."""
    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage, **configs})})
    if stage == Stage.COLLECT_MASKED_VECTORS:
        fitins = FitIns(ndarrays_to_parameters(list(GLOBAL)), {"server-round": 1})
        legacy = compat.fitins_to_recorddict(fitins, keep_input=True)
        for name, record in legacy.items():
            content[name] = record
    return train_message(content)


def evaluate_message() -> Message:
    content = RecordDict({"arrays": task.to_record(*GLOBAL), "config": ConfigRecord({"server-round": 1})})
    return Message(content, dst_node_id=1, message_type=MessageType.EVALUATE, group_id="1")


def context(node_config: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_terms_travel_in_the_node_config_and_come_back_equal() -> None:
    assert Terms.from_node_config(TERMS.to_node_config()) == TERMS
    no_dp = Terms("job-7", 3, 2, False, None)
    assert no_dp.to_node_config()["accepted-clipping-norm"] == 0.0
    assert Terms.from_node_config(no_dp.to_node_config()) == no_dp


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({}, "no accepted terms"),
        ({**TERMS.to_node_config(), "accepted-rounds": 0}, "must be at least 1"),
        ({**TERMS.to_node_config(), "accepted-secure-aggregation": "yes"}, "true or false"),
        ({**TERMS.to_node_config(), "accepted-clipping-norm": float("nan")}, "positive number"),
        ({**TERMS.to_node_config(), "accepted-job-id": ""}, "name no job"),
    ],
)
def test_missing_or_malformed_terms_are_an_error(config: dict[str, Any], problem: str) -> None:
    with pytest.raises(TermsError, match=problem):
        Terms.from_node_config(config)


def test_a_plain_training_message_is_refused_when_secagg_was_accepted() -> None:
    problem = client_app.terms_problem(plain_train(), TERMS, {})
    assert problem is not None and "not part of SecAgg+" in problem
    # Without SecAgg+ in the terms the same message is within them.
    assert client_app.terms_problem(plain_train(), Terms("job-7", 2, 2, False, 0.1), {}) is None


def test_secagg_stages_are_within_the_terms_until_the_rounds_are_spent() -> None:
    for stage in (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK):
        assert client_app.terms_problem(secagg_stage(stage, **{Key.SAMPLE_NUMBER: 2}), TERMS, {"train": 1}) is None
    for stage in (Stage.SETUP, Stage.COLLECT_MASKED_VECTORS):
        problem = client_app.terms_problem(secagg_stage(stage, **{Key.SAMPLE_NUMBER: 2}), TERMS, {"train": 2})
        assert problem == "a training round beyond the 2 accepted for job job-7"
    # The stages that finish a round already counted go on (the unmasking needs this site's shares).
    assert client_app.terms_problem(secagg_stage(Stage.UNMASK), TERMS, {"train": 2}) is None


def test_secagg_among_fewer_sites_than_accepted_is_refused() -> None:
    problem = client_app.terms_problem(secagg_stage(Stage.SETUP, **{Key.SAMPLE_NUMBER: 1}), TERMS, {})
    assert problem == "SecAgg+ among 1 site(s), fewer than the 2 accepted for job job-7"


def test_evaluations_follow_the_rounds_the_site_trained() -> None:
    assert client_app.terms_problem(evaluate_message(), TERMS, {}) is not None  # it has not trained yet
    assert client_app.terms_problem(evaluate_message(), TERMS, {"train": 1}) is None
    problem = client_app.terms_problem(evaluate_message(), TERMS, {"train": 1, "evaluate": 1})
    assert problem == "an evaluation beyond the 1 round(s) this site trained for job job-7"


def test_other_message_types_are_refused() -> None:
    query = Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY, group_id="1")
    assert "is not part of job job-7" in str(client_app.terms_problem(query, TERMS, {}))


def test_rounds_are_counted_from_the_spool_and_refusals_do_not_count(tmp_path: Path) -> None:
    spool = tmp_path / "job.jsonl"
    lines = [
        {"phase": "train", "round": 1, "run_id": 5},
        {"phase": "evaluate", "round": 1, "run_id": 5},
        {"event": "refused", "reason": "x", "run_id": 6},
        {"phase": "train", "round": 1, "run_id": 7},  # another run: the server's round numbers do not reset it
    ]
    spool.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"phase": "tra')
    assert rounds_taken(str(spool)) == {"train": 2, "evaluate": 1}
    assert rounds_taken(str(tmp_path / "absent.jsonl")) == {}


def test_the_terms_mod_refuses_records_and_raises(tmp_path: Path) -> None:
    spool = tmp_path / "job.jsonl"
    ran: list[Message] = []
    node = {**TERMS.to_node_config(), "report-path": str(spool)}
    with pytest.raises(client_app.Refused, match="not part of SecAgg"):
        client_app.terms_mod(plain_train(), context(node), lambda m, c: ran.append(m) or m)
    assert ran == []  # nothing after the mod ran: no training, no update
    [line] = [json.loads(x) for x in spool.read_text().splitlines()]
    assert line["event"] == "refused" and line["job"] == "job-7" and "SecAgg+" in line["reason"]
    # No terms at all (a SuperNode the agent did not configure): refused too.
    with pytest.raises(client_app.Refused, match="no accepted terms"):
        client_app.terms_mod(plain_train(), context({"report-path": str(spool)}), lambda m, c: m)


def _trained_reply(msg: Message, weights: np.ndarray) -> Message:
    content = RecordDict(
        {"arrays": task.to_record(weights[:8], weights[8:]), "metrics": MetricRecord({"num-examples": 10})}
    )
    return Message(content=content, reply_to=msg)


@pytest.mark.parametrize(("server_norm", "clipped_to"), [(None, 0.1), (5.0, 0.1), (0.05, 0.05)])
def test_updates_are_clipped_to_the_accepted_norm_whatever_the_server_asks(
    server_norm: float | None, clipped_to: float
) -> None:
    """The accepted norm holds when the server sends none or a larger one; a smaller one is stricter still."""
    terms = Terms("job-7", 2, 2, False, 0.1)
    msg = plain_train({} if server_norm is None else {"clipping_norm": server_norm})
    big = np.arange(1.0, 10.0)  # an update of norm ~16.9 from the zero global model
    reply = client_app.clipping_mod(msg, context(terms.to_node_config()), lambda m, c: _trained_reply(m, big))
    coef, intercept = task.from_record(reply.content["arrays"])
    sent = np.concatenate([coef, intercept])
    assert np.linalg.norm(sent) == pytest.approx(clipped_to, rel=1e-12)
    np.testing.assert_allclose(sent / np.linalg.norm(sent), big / np.linalg.norm(big))  # same direction
    assert reply.content.metric_records["metrics"]["num-examples"] == 10


def test_an_update_within_the_norm_is_sent_as_it_is() -> None:
    small = np.full(9, 0.01)
    msg = plain_train()
    reply = client_app.clipping_mod(msg, context(TERMS.to_node_config()), lambda m, c: _trained_reply(m, small))
    coef, intercept = task.from_record(reply.content["arrays"])
    np.testing.assert_array_equal(np.concatenate([coef, intercept]), small)


def test_a_plain_update_shows_in_its_wire_bytes() -> None:
    """Why the attack tests can look for an update's float64 bytes in what a site sent: Flower puts an
    array's bytes on the wire as they are (so their absence means the update did not leave)."""
    weights = np.linspace(-0.3, 0.7, 9)
    reply = _trained_reply(plain_train(), weights)
    wire = b"".join(obj.deflate() for obj in get_all_nested_objects(reply.content).values())
    assert weights[:8].tobytes() in wire
