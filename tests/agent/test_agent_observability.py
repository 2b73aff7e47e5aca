"""An operator can see what the agent does: its JSON log lines for every sync outcome, witnessing and app-key
changes; `sitewarden agent status` and `GET /sitewarden/status` telling what is active, what was refused and why,
the witness lag and whether the controller is reachable; the controller's list and status commands printing
whole tables to a pipe and JSON on request; and a controller that stops within its grace period while agents
long-poll it, and an agent that stops at once while a client keeps an idle TLS connection.

One world for the module (a controller, the bank pack and two approved versions of a small fraud scorer, one
agent logging JSON at the default level), its tests in order on one worker.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sitewarden import approval
from sitewarden.fraud_model import build_release, sample_features
from tests.agent_harness import BANK_PACK, POLICY, AgentProcess, enroll_agent, push_policy, wait_for
from tests.controller_server import ControllerServer, sitewarden, start_controller
from tests.tls import TestPKI

MODEL = "fraud-scorer"
LABELS = {"region": "eu-west", "purpose-of-this-long-label": "to-show-that-a-piped-table-is-never-cut-short"}
ROWS = sample_features(2, seed=4).tolist()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("observability")
    controller = start_controller(base, pki)
    agent: AgentProcess | None = None
    try:
        keys = base / "approvers"
        approval.generate_approver_key(keys / "alice.pem", keys / "alice.pub.pem")
        env = controller.cli_env()
        assert (
            sitewarden("approver", "add", "alice", "--public-key", str(keys / "alice.pub.pem"), env=env).returncode == 0
        )
        tokens = {"operator": controller.token("operator", "bob"), "alice": controller.token("approver", "alice")}
        push_policy(
            controller,
            BANK_PACK,
            "1.0.0",
            operator=tokens["operator"],
            approver=tokens["alice"],
            approver_key=keys / "alice.pem",
        )
        world = {"base": base, "controller": controller, "keys": keys, "tokens": tokens}
        push(world, "1.0.0", approved=True)
        agent = enroll_agent(controller, base, "branch-o", LABELS, {"alice": keys / "alice.pub.pem"})
        agent.run_args = ["--log-format", "json"]  # the default level: info
        agent.start()
        world["agent"] = agent
        rollout(world, "first", "1.0.0")
        wait_for(lambda: agent.active() == (MODEL, "1.0.0"), what="the agent to run 1.0.0")
        yield world
    finally:
        if agent is not None:
            agent.stop()
        controller.stop()


def push(world: dict[str, Any], version: str, *, approved: bool) -> None:
    """Push the world's model as `version` (the same graph each time: training once is enough here)."""
    directory = world["base"] / f"release-{version}"
    trained = world["base"] / "trained"
    if not trained.exists():
        build_release(trained, seed=7, n_samples=1_000)
    shutil.copytree(trained, directory)
    card = directory.with_name(f"{directory.name}.card.json")
    card.write_text(
        json.dumps({**json.loads(trained.with_name("trained.card.json").read_text()), "version_note": version})
    )
    env = world["controller"].cli_env(world["tokens"]["operator"])
    args = ["release", "push", str(directory), "--name", MODEL, "--version", version, "--metadata", str(card)]
    assert sitewarden(*args, env=env).returncode == 0
    if approved:
        approve = ["release", "approve", MODEL, version, "--key", str(world["keys"] / "alice.pem")]
        assert sitewarden(*approve, env=world["controller"].cli_env(world["tokens"]["alice"])).returncode == 0


def rollout(world: dict[str, Any], name: str, version: str) -> None:
    args = ["rollout", "create", name, "--release", f"{MODEL}@{version}", "--policy", f"{POLICY}@1.0.0"]
    args += ["--selector", "region=eu-west"]
    done = sitewarden(*args, env=world["controller"].cli_env(world["tokens"]["operator"]))
    assert done.returncode == 0, done.stderr


def log_lines(agent: AgentProcess) -> list[dict[str, Any]]:
    """Every line the agent wrote, each parsed as the JSON object it must be."""
    lines = [line for line in agent.log().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
    return parsed


def logged(agent: AgentProcess, needle: str, level: str | None = None) -> dict[str, Any] | None:
    return next(
        (r for r in log_lines(agent) if needle in r["message"] and (level is None or r["level"] == level)), None
    )


def status_cli(agent: AgentProcess, *extra: str) -> Any:
    done = sitewarden("agent", "status", "--data", str(agent.data), *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_log_line_is_json_and_the_sync_outcomes_are_there(world: dict[str, Any]) -> None:
    agent: AgentProcess = world["agent"]
    for needle in (
        "desired state 1 announced",
        f"downloaded {MODEL} 1.0.0",
        f"verified {MODEL} 1.0.0: approved by alice",
        f"activated {MODEL} 1.0.0 (before: nothing)",
        "activated policy bank-policy 1.0.0",
        "reachable; desired state",
    ):
        record = wait_for(lambda n=needle: logged(agent, n), 30, f"the log line {needle!r}")
        assert record["level"] == "INFO" and record["logger"].startswith("sitewarden.agent"), record
        assert {"time", "level", "logger", "message"} <= set(record)
    cosigned = wait_for(lambda: logged(agent, "the controller cosigned the audit checkpoint"), 30, "witnessing")
    assert cosigned["level"] == "INFO"
    # uvicorn's own lines come out as JSON too.
    assert any(r["logger"].startswith("uvicorn") for r in log_lines(agent))


def test_a_refused_release_is_logged_and_shown_with_its_reason_by_status(world: dict[str, Any]) -> None:
    agent: AgentProcess = world["agent"]
    push(world, "1.1.0", approved=False)
    rollout(world, "unapproved", "1.1.0")
    record = wait_for(lambda: logged(agent, f"refused {MODEL}@1.1.0"), 60, "the refusal in the log")
    assert record["level"] == "WARNING" and "no approval" in record["message"]
    live = httpx.get(f"{agent.url}/sitewarden/status", headers={"Authorization": f"Bearer {agent.app_key}"}, timeout=10)
    document = live.json()
    assert document["active"]["version"] == "1.0.0"
    assert [r["artifact"] for r in document["refused"]] == [f"{MODEL}@1.1.0"]
    assert "no approval" in document["refused"][0]["reason"]
    assert document["controller"]["reachable"] is True and document["agent"]["pid"] == agent.process.pid
    wait_for(lambda: json.loads(status_cli(agent, "--json"))["refused"], 20, "status.json to show the refusal")
    offline = json.loads(status_cli(agent, "--json"))
    assert offline["agent"]["running"] is True
    assert offline["active"]["name"] == MODEL and offline["active"]["version"] == "1.0.0"
    assert offline["refused"] == document["refused"]
    assert set(offline["audit"]) >= {"size", "witnessed_size", "witness_lag_entries", "witness_lag_seconds"}
    assert offline["controller"]["reachable"] is True
    text = status_cli(agent)  # piped: the whole reason, not cut to 80 columns
    assert "agent: running" in text and f"active: {MODEL} 1.0.0 (approved by alice)" in text
    assert document["refused"][0]["reason"] in text.replace("\n", "")
    assert "…" not in text


def test_app_key_changes_are_logged_without_their_secrets(world: dict[str, Any]) -> None:
    agent: AgentProcess = world["agent"]
    key = sitewarden("agent", "app-key", "create", "teller-app", "--data", str(agent.data)).stdout.strip()
    created = wait_for(lambda: logged(agent, "of app teller-app created"), 30, "the new key in the log")
    key_id, secret = key.split("_", 2)[1:]
    assert key_id in created["message"] and secret not in agent.log()
    assert sitewarden("agent", "app-key", "revoke", "teller-app", "--data", str(agent.data)).returncode == 0
    wait_for(lambda: logged(agent, "of app teller-app revoked at"), 30, "the revocation in the log")


def test_list_and_status_commands_print_whole_tables_to_a_pipe_and_json_on_request(world: dict[str, Any]) -> None:
    controller: ControllerServer = world["controller"]
    env = controller.cli_env()
    long_label = "purpose-of-this-long-label=to-show-that-a-piped-table-is-never-cut-short"
    for command in (
        ["site", "list"],
        ["token", "list"],
        ["release", "list"],
        ["approver", "list"],
        ["rollout", "list"],
    ):
        done = sitewarden(*command, env=env)
        assert done.returncode == 0, done.stderr
        assert "…" not in done.stdout, command
        as_json = sitewarden(*command, "--json", env=env)
        assert isinstance(json.loads(as_json.stdout), list), command
    assert long_label in sitewarden("site", "list", env=env).stdout
    rows = json.loads(sitewarden("site", "list", "--json", env=env).stdout)
    assert rows[0]["labels"]["purpose-of-this-long-label"] == "to-show-that-a-piped-table-is-never-cut-short"
    # The summary agrees with the conditions: a complete rollout is not "progressing".
    first = json.loads(sitewarden("rollout", "status", "first", "--json", env=env).stdout)
    complete = {c["type"]: c["status"] for c in first["conditions"]}
    assert complete.get("Complete") == "True" or complete.get("Superseded") == "True", first["conditions"]
    assert first["phase"] in ("complete", "superseded")
    unapproved = sitewarden("rollout", "status", "unapproved", "--wait", "1", env=env)
    assert unapproved.returncode == 1  # degraded: not complete
    assert unapproved.stdout.startswith("rollout unapproved: degraded, wave 1 of 1 released")
    assert "no approval" in unapproved.stdout and "…" not in unapproved.stdout
    listed = sitewarden("rollout", "list", env=env).stdout
    assert "degraded" in listed and "progressing" not in listed


def test_a_corrupted_active_release_rolls_back_to_last_known_good_at_start(world: dict[str, Any]) -> None:
    agent: AgentProcess = world["agent"]
    push(world, "1.2.0", approved=True)
    rollout(world, "second", "1.2.0")
    wait_for(lambda: agent.active() == (MODEL, "1.2.0"), what="the agent to run 1.2.0")
    agent.stop()
    stopped = json.loads(status_cli(agent, "--json"))
    assert stopped["agent"]["running"] is False and stopped["controller"]["reachable"] is None
    assert stopped["active"]["version"] == "1.2.0" and stopped["last_good"]["version"] == "1.0.0"
    assert "agent: not running" in status_cli(agent)
    model = agent.data / "releases" / MODEL / "1.2.0" / "files" / "model.onnx"
    model.write_bytes(b"not an ONNX graph any more")  # a disk fault: the release no longer loads
    agent.start()
    record = wait_for(lambda: logged(agent, "rolled back to last-known-good"), 30, "the rollback in the log")
    assert record["level"] == "WARNING" and f"{MODEL} 1.0.0" in record["message"]
    # The changed release was moved aside and its desired state applied again: fetched whole, it serves again.
    assert list((agent.data / "releases").glob(".quarantine-*"))
    wait_for(lambda: agent.active() == (MODEL, "1.2.0"), 60, "1.2.0 fetched again and active")


def test_the_agent_stops_at_once_while_a_client_keeps_an_idle_tls_connection(
    world: dict[str, Any], pki: TestPKI
) -> None:
    """A pooled keep-alive connection (every HTTP client keeps one) must not hold up a restart: closed gracefully,
    TLS would wait for a close_notify that no client sends until it reads again, the whole grace period."""
    controller: ControllerServer = world["controller"]
    approvers = {"alice": world["keys"] / "alice.pub.pem"}
    agent = enroll_agent(controller, world["base"], "branch-tls", {"region": "eu-west"}, approvers, tls=pki)
    agent.start()
    try:
        assert agent.process is not None
        with agent.client(timeout=10) as http:
            assert http.get(f"{agent.url}/v2/health/live").status_code == 200  # its connection stays in the pool
            started = time.monotonic()
            agent.process.send_signal(signal.SIGTERM)
            agent.process.wait(timeout=30)
            elapsed = time.monotonic() - started
        assert elapsed < 4.0, f"the agent took {elapsed:.1f} s to stop"
        log = agent.log()
        assert "Cancel" not in log and "Traceback" not in log, log[-2000:]
    finally:
        agent.stop()


def test_the_controller_stops_within_its_grace_period_while_agents_long_poll(world: dict[str, Any]) -> None:
    agent: AgentProcess = world["agent"]
    controller: ControllerServer = world["controller"]
    wait_for(lambda: agent.status()["controller"]["reachable"], 30, "the agent to long-poll the controller")
    time.sleep(0.5)  # let the agent park its next long poll
    started = time.monotonic()
    controller.process.send_signal(signal.SIGTERM)
    controller.process.wait(timeout=30)
    elapsed = time.monotonic() - started
    assert elapsed < 4.0, f"the controller took {elapsed:.1f} s to stop"
    assert controller.process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    log = controller.log()
    assert "ERROR" not in log and "Cancel" not in log and "Traceback" not in log, log[-2000:]
    wait_for(lambda: agent.status()["controller"]["reachable"] is False, 30, "the agent to see the controller gone")
    warning = wait_for(lambda: logged(agent, "controller unreachable", "WARNING"), 30, "the warning in the log")
    assert "serving goes on" in warning["message"]
    assert agent.infer(MODEL, ROWS).status_code == 200
    wait_for(lambda: "UNREACHABLE" in status_cli(agent), 30, "agent status to tell the controller is unreachable")
    text = status_cli(agent)
    assert "controller https://127.0.0.1:" in text and "last contact 20" in text
