"""A hostile or broken network between a real site and a real controller: the sync loop never stops.

The agent reaches the controller through `Network`, a TLS proxy on loopback the tests control.
Long-poll answers cut short, oversized or malformed are each reported (status, metrics, audit)
while the site keeps serving, and the loop goes on to apply the next desired state. A controller
that stalls past the site's fetch timeout and is then killed while the site downloads a release
leaves the release pending, never refused, and the rollout never Degraded; once the controller
is back, the download is retried until it completes.

Last, the fault is the site's own: its data dir lives on a small tmpfs, which fills up. The
agent answers 503 with the reason and `Retry-After` (never a 500), reports not-ready in
readiness, status and metrics, logs the failure once, and serves again by itself once space is
free, its audit log complete: every acknowledged request's entry there once, the outage recorded.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from audit import Log
from sitewarden import approval
from sitewarden.fraud_model import build_release, sample_features
from tests.agent_harness import BANK_PACK, POLICY, AgentProcess, Network, enroll_agent, push_policy, wait_for
from tests.controller_server import ControllerServer, serve, sitewarden, start_controller
from tests.system import fill, mount_tmpfs, unavailable, unmount
from tests.tls import TestPKI

MODEL = "fraud-scorer"
ROWS = sample_features(2, seed=6).tolist()
FETCH_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("hostile-network")
    network = Network(pki)
    controller = start_controller(base, pki, public_url=network.url)
    network.start(controller.url)
    keys = base / "approvers"
    approval.generate_approver_key(keys / "alice.pem", keys / "alice.pub.pem")
    public = str(keys / "alice.pub.pem")
    added = sitewarden("approver", "add", "alice", "--public-key", public, env=controller.cli_env())
    assert added.returncode == 0, added.stderr
    tokens = {"operator": controller.token("operator", "bob"), "alice": controller.token("approver", "alice")}
    disk = base / "branch-n" / "data"
    tmpfs_problem = mount_tmpfs(disk, "64m")  # the data dir on a disk that can fill up (last test)
    agent = enroll_agent(controller, base, "branch-n", {"region": "eu-west"}, {"alice": keys / "alice.pub.pem"})
    text = agent.config.read_text()
    agent.config.write_text(text.replace("[controller]\n", f"[controller]\nfetch_timeout_s = {FETCH_TIMEOUT_S}\n"))
    world = {"base": base, "controller": controller, "network": network, "keys": keys, "tokens": tokens}
    world["agent"], world["tmpfs_problem"] = agent, tmpfs_problem
    try:
        operator, alice = tokens["operator"], tokens["alice"]
        push_policy(controller, BANK_PACK, "1.0.0", operator=operator, approver=alice, approver_key=keys / "alice.pem")
        push(world, "1.0.0", 7)
        agent.start()
        assert rollout(world, "v1", "1.0.0").returncode == 0
        wait_for(lambda: agent.active() == (MODEL, "1.0.0"), what="the site to run 1.0.0")
        yield world
    finally:
        agent.stop()
        network.cut()
        network.stop()
        world["controller"].stop()
        if not tmpfs_problem:
            unmount(disk)


def push(world: dict[str, Any], version: str, seed: int, extra: dict[str, bytes] | None = None) -> None:
    directory = world["base"] / f"release-{version}"
    card = build_release(directory, seed=seed, n_samples=2000, version_note=version)
    for name, data in (extra or {}).items():
        (directory / name).write_bytes(data)
    env = world["controller"].cli_env(world["tokens"]["operator"])
    args = ["release", "push", str(directory), "--name", MODEL, "--version", version, "--metadata", str(card)]
    done = sitewarden(*args, env=env)
    assert done.returncode == 0, done.stderr
    env = world["controller"].cli_env(world["tokens"]["alice"])
    done = sitewarden("release", "approve", MODEL, version, "--key", str(world["keys"] / "alice.pem"), env=env)
    assert done.returncode == 0, done.stderr


def rollout(world: dict[str, Any], name: str, version: str) -> Any:
    args = ["rollout", "create", name, "--release", f"{MODEL}@{version}", "--policy", f"{POLICY}@1.0.0"]
    env = world["controller"].cli_env(world["tokens"]["operator"])
    return sitewarden(*args, "--selector", "region=eu-west", env=env)


def entries(agent: AgentProcess) -> list[dict[str, Any]]:
    with Log.open(agent.data / "audit", readonly=True) as log:
        return [json.loads(e) for e in log.iter_entries()]


def metric(agent: AgentProcess, name: str) -> float:
    answer = httpx.get(f"{agent.url}/metrics", headers={"Authorization": f"Bearer {agent.app_key}"}, timeout=10)
    for line in answer.text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


class Truncated(Response):
    """Headers that promise `length` bytes, then the connection ends after fewer."""

    def __init__(self, body: bytes, length: int) -> None:
        super().__init__(body, media_type="application/json")
        self.length = length

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(self.length).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


def test_truncated_oversized_and_malformed_long_poll_answers_are_reported_and_the_loop_goes_on(
    world: dict[str, Any],
) -> None:
    agent: AgentProcess = world["agent"]
    network: Network = world["network"]
    pointer = json.dumps({"version": 99, "target": "sites/x/desired.json", "sha256": None, "changed": True})
    answers: list[Response] = [
        Truncated(pointer.encode()[:20], 200),
        Response(b'{"version": 99, "pad": "' + b"x" * (1 << 20) + b'"}', media_type="application/json"),
        Response(b'{"version": "ninety-nine", "target": 7}', media_type="application/json"),
    ]

    def answer(request: Request) -> Response | None:
        if request.url.path == "/api/v1/agent/desired" and answers:
            return answers.pop(0)
        return None

    seen = len(entries(agent))
    network.answer = answer
    network.cut()  # the long poll parked at the controller ends; the next ones meet the attacker
    try:
        expected = ["cannot reach the controller", "over 4096 bytes", "is malformed"]

        def reported() -> bool:
            errors = [e["reason"] for e in entries(agent)[seen:] if e["type"] == "sync.error" and e["stage"] == "poll"]
            return all(any(text in reason for reason in errors) for text in expected)

        assert agent.infer(MODEL, ROWS).status_code == 200  # the site serves throughout
        wait_for(reported, 120, "every bad answer to be reported and audited")
        assert agent.infer(MODEL, ROWS).status_code == 200
        status = agent.status()
        assert status["sync"]["failures"].get("poll", 0) >= 3
        assert metric(agent, 'sitewarden_sync_failures_total{stage="poll"}') >= 3
        assert agent.active() == (MODEL, "1.0.0")
    finally:
        network.answer = None
    # The loop lives: the next desired state is applied, and sync says it works again.
    before = agent.status()["desired_version"]
    assert rollout(world, "after-bad-answers", "1.0.0").returncode == 0
    wait_for(lambda: agent.status()["desired_version"] > before, what="the next desired state to be applied")
    wait_for(lambda: agent.status()["sync"]["state"] == "ok", what="sync to say it works again")
    assert any(e["type"] == "sync.recovered" for e in entries(agent)[seen:])


def test_a_download_cut_by_a_stalled_then_killed_controller_is_retried_until_it_completes(
    world: dict[str, Any],
) -> None:
    agent: AgentProcess = world["agent"]
    network: Network = world["network"]
    controller: ControllerServer = world["controller"]
    calibration = random.Random(12).randbytes(2 << 20)
    push(world, "1.1.0", 8, extra={"calibration.bin": calibration})
    key = f"{MODEL}@1.1.0"

    def release_state() -> dict[str, str]:
        return agent.status()["artifacts"].get(key, {})

    def not_degraded() -> bool:
        return _condition(controller, "big", "Degraded") == "False"

    network.stall = lambda path: 3600.0 if path.endswith(".calibration.bin") else 0.0
    try:
        assert rollout(world, "big", "1.1.0").returncode == 0
        wait_for(lambda: release_state().get("state") == "pending", what="the stalled download to be retried")
        assert "will retry" in release_state()["reason"] and "Slow" in release_state()["reason"]
        assert agent.infer(MODEL, ROWS).json()["model_version"] == "1.0.0"
        failures = agent.status()["sync"]["failures"].get("apply", 0)
        wait_for(lambda: agent.status()["sync"]["failures"].get("apply", 0) > failures, what="another attempt")
        assert release_state()["state"] == "pending" and not_degraded()
        controller.stop()  # killed while the site still downloads
        network.stall = None
        network.cut()
        failures = agent.status()["sync"]["failures"].get("apply", 0)
        wait_for(lambda: agent.status()["sync"]["failures"].get("apply", 0) > failures, what="an attempt meanwhile")
        assert release_state()["state"] == "pending", release_state()
    finally:
        network.stall = None
        if controller.process.poll() is not None:
            port = int(controller.url.rsplit(":", 1)[1])
            back = serve(controller.data_dir, controller.pki, port, controller.admin_token, "sqlite")
            controller.process = back.process
    wait_for(lambda: agent.active() == (MODEL, "1.1.0"), 120, "the download to complete once the controller is back")
    staged = agent.data / "releases" / MODEL / "1.1.0" / "files" / "calibration.bin"
    assert hashlib.sha256(staged.read_bytes()).digest() == hashlib.sha256(calibration).digest()
    wait_for(lambda: _condition(controller, "big", "Complete") == "True", what="the rollout to complete")
    assert _condition(controller, "big", "Degraded") == "False"
    assert [e for e in entries(agent) if e["type"] == "sync.retry"], "the retries are audited"
    assert not [e for e in entries(agent) if e["type"] == "release.refused" and key in e["release"]]


def _condition(controller: ControllerServer, rollout_name: str, condition: str) -> str:
    with controller.client(controller.admin_token) as admin:
        status = admin.get(f"/api/v1/rollouts/{rollout_name}")
    return next((c["status"] for c in status["conditions"] if c["type"] == condition), "absent")


def test_an_unreadable_approver_key_file_is_reported_and_the_desired_state_applied_once_it_is_back(
    world: dict[str, Any],
) -> None:
    """An operator replacing a key file must not make the site refuse a release for good."""
    agent: AgentProcess = world["agent"]
    key = world["keys"] / "alice.pub.pem"
    aside = key.with_suffix(".moved")
    before = agent.status()["desired_version"]
    key.rename(aside)
    try:
        assert rollout(world, "while-keys-move", "1.0.0").returncode == 0
        wait_for(
            lambda: "approver keys cannot be read" in agent.status()["sync"]["error"],
            what="the unreadable key file to be reported",
        )
        assert agent.status()["desired_version"] == before, "the version is not used up"
        assert agent.infer(MODEL, ROWS).status_code == 200
    finally:
        aside.rename(key)
    wait_for(lambda: agent.status()["desired_version"] > before, what="the desired state to be applied")
    assert agent.status()["sync"]["state"] == "ok"
    assert any(e["type"] == "sync.retry" and "approver keys cannot be read" in e["reason"] for e in entries(agent))


def test_a_full_data_dir_is_a_503_with_its_reason_until_space_is_free_then_serving_resumes_by_itself(
    world: dict[str, Any],
) -> None:
    if world["tmpfs_problem"]:
        unavailable(world["tmpfs_problem"])
    agent: AgentProcess = world["agent"]
    assert agent.process is not None
    pid = agent.process.pid
    agent.acknowledged.clear()
    log_before = agent.log()
    filler = fill(agent.data)
    refused = []
    for n in range(3000):  # the audit log's zeros written ahead take some entries first
        response = agent.infer(MODEL, ROWS, request_id=f"full-{n}")
        assert response.status_code in (200, 503), response.text
        if response.status_code == 503:
            refused.append(response)
            break
    assert refused, "the full disk was never noticed"
    for n in range(5):
        response = agent.infer(MODEL, ROWS, request_id=f"refused-{n}")
        assert response.status_code == 503
        refused.append(response)
    for response in refused:
        assert "audit log cannot write" in response.json()["error"] and "No space left" in response.json()["error"]
        assert int(response.headers["Retry-After"]) >= 1
    assert httpx.get(f"{agent.url}/v2/health/ready", timeout=10).status_code == 503
    not_ready = httpx.get(f"{agent.url}/readyz", timeout=10)
    assert not_ready.status_code == 503 and "audit log cannot write" in not_ready.json()["reason"]
    status = agent.status()
    assert not status["ready"] and not status["audit"]["writable"] and status["audit"]["refused_requests"] >= 6
    assert any("audit log cannot write" in reason for reason in status["not_ready"])
    assert metric(agent, "sitewarden_audit_writable") == 0
    assert metric(agent, "sitewarden_ready") == 0
    assert metric(agent, "sitewarden_audit_refused_requests_total") >= 6
    assert metric(agent, "sitewarden_audit_write_failures") >= 1  # the chart's alert

    filler.unlink()
    wait_for(lambda: agent.infer(MODEL, ROWS).status_code == 200, 60, "serving to resume once space is free")
    assert agent.process.pid == pid, "no restart"
    assert httpx.get(f"{agent.url}/v2/health/ready", timeout=10).status_code == 200
    assert httpx.get(f"{agent.url}/readyz", timeout=10).status_code == 200
    assert metric(agent, "sitewarden_audit_writable") == 1
    assert metric(agent, "sitewarden_audit_write_failures") >= 1
    log = agent.log()[len(log_before) :]
    assert log.count("the audit log cannot write") == 1, log  # once per change of state, not per request
    assert log.count("the audit log writes again") == 1, log
    assert "Traceback" not in log
    stored = [e for e in entries(agent) if (e.get("request_id") or "").startswith(("full-", "refused-"))]
    ids = [e["request_id"] for e in stored]
    assert len(ids) == len(set(ids)), "an entry was written twice"
    assert {rid for rid, _ in agent.acknowledged} <= set(ids), "an acknowledged entry was lost"
    outage = [e for e in entries(agent) if e["type"] == "audit.outage"]
    assert outage and outage[-1]["refused_requests"] >= 6 and "No space left" in outage[-1]["reason"]
