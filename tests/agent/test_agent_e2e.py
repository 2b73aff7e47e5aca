"""End to end with real processes: a controller, two agents, and the network between them.

A release reaches both sites through a canary rollout; tampered bytes, an unapproved
model, an approval by a key the site does not trust and replayed TUF metadata are each
refused while the good version keeps serving; the agents keep serving and auditing while
the controller is away and have their logs witnessed when it is back; `kill -9` during a
download and during serving leaves them consistent, with no acknowledged audit entry lost.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.identity import DataDir
from audit import Log, verify_export
from audit.entry import canonical
from sitewarden import approval
from sitewarden.fraud_model import build_release, sample_features
from tests.agent_harness import BANK_PACK, POLICY, AgentProcess, Network, enroll_agent, wait_for
from tests.agent_harness import push_policy as harness_push_policy
from tests.controller_server import ControllerServer, serve, sitewarden, start_controller
from tests.tls import TestPKI

# One world, its tests in order, on one worker: `make test` distributes whole files (--dist loadfile).

MODEL = "fraud-scorer"
ROWS = sample_features(4, seed=3).tolist()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("e2e")
    network = Network(pki)
    controller = start_controller(base, pki, public_url=network.url)
    network.start(controller.url)
    env = controller.cli_env()
    keys = base / "approvers"
    for who in ("alice", "mallory"):
        approval.generate_approver_key(keys / f"{who}.pem", keys / f"{who}.pub.pem")
        assert sitewarden("approver", "add", who, "--public-key", str(keys / f"{who}.pub.pem"), env=env).returncode == 0
    tokens = {
        "operator": controller.token("operator", "bob"),
        "alice": controller.token("approver", "alice"),
        "mallory": controller.token("approver", "mallory"),
    }
    agents = [
        enroll_agent(controller, base, name, {"region": "eu-west"}, {"alice": keys / "alice.pub.pem"})
        for name in ("branch-a", "branch-b")
    ]
    # branch-b traces with OpenTelemetry (spans to its log); its audit entries carry the trace ids.
    agents[1].env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "branch-b"}
    world = {
        "base": base,
        "controller": controller,
        "network": network,
        "keys": keys,
        "tokens": tokens,
        "agents": agents,
    }
    try:
        push_policy(world, BANK_PACK, "1.0.0", approver="alice")
        push(world, "1.0.0", seed=7, approver="alice")
        for agent in agents:
            agent.start()
        rollout(world, "v1", "1.0.0", canary=["branch-a"])
        wait_for(lambda: agents[0].active() == (MODEL, "1.0.0"), what="the canary to run 1.0.0")
        assert agents[1].active() is None, "the second wave must wait for promotion"
        promote(world, "v1")
        wait_for(lambda: agents[1].active() == (MODEL, "1.0.0"), what="branch-b to run 1.0.0")
        yield world
    finally:
        for agent in agents:
            agent.stop()
        network.stop()
        controller.stop()


def push(
    world: dict[str, Any], version: str, *, seed: int, approver: str | None, files: dict[str, bytes] | None = None
) -> None:
    directory = world["base"] / f"release-{version}"
    card = build_release(directory, seed=seed, version_note=version)
    for name, data in (files or {}).items():
        (directory / name).write_bytes(data)
    env = {**world["controller"].cli_env(world["tokens"]["operator"])}
    done = sitewarden(
        "release", "push", str(directory), "--name", MODEL, "--version", version, "--metadata", str(card), env=env
    )
    assert done.returncode == 0, done.stderr
    if approver is not None:
        key = world["keys"] / f"{approver}.pem"
        env = world["controller"].cli_env(world["tokens"][approver])
        done = sitewarden("release", "approve", MODEL, version, "--key", str(key), env=env)
        assert done.returncode == 0, done.stderr


def push_policy(world: dict[str, Any], bundle: Path, version: str, *, approver: str) -> None:
    tokens = world["tokens"]
    key = world["keys"] / f"{approver}.pem"
    harness_push_policy(
        world["controller"], bundle, version, operator=tokens["operator"], approver=tokens[approver], approver_key=key
    )


def rollout(
    world: dict[str, Any], name: str, version: str, canary: list[str] | None = None, policy: str = "1.0.0"
) -> None:
    args = ["rollout", "create", name, "--release", f"{MODEL}@{version}", "--selector", "region=eu-west"]
    args += ["--policy", f"{POLICY}@{policy}"]
    for site in canary or []:
        args += ["--canary", site]
    done = sitewarden(*args, env=world["controller"].cli_env(world["tokens"]["operator"]))
    assert done.returncode == 0, done.stderr


def promote(world: dict[str, Any], name: str) -> None:
    done = sitewarden("rollout", "promote", name, env=world["controller"].cli_env(world["tokens"]["operator"]))
    assert done.returncode == 0, done.stderr


def artifact(agent: AgentProcess, version: str) -> dict[str, str]:
    return agent.status()["artifacts"].get(f"{MODEL}@{version}", {})


def refused(agent: AgentProcess, version: str) -> str:
    state = artifact(agent, version)
    return state.get("reason", "") if state.get("state") == "refused" else ""


def audit_entries(agent: AgentProcess) -> list[dict[str, Any]]:
    with Log.open(agent.data / "audit", readonly=True) as log:
        return [json.loads(e) for e in log.iter_entries()]


def test_both_sites_serve_the_rolled_out_model_and_cite_their_audit_entries(world: dict[str, Any]) -> None:
    for agent in world["agents"]:
        response = agent.infer(MODEL, ROWS)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_version"] == "1.0.0"
        assert [o["name"] for o in body["outputs"]] == ["label", "probabilities"]
        index = body["parameters"]["audit_index"]
        entry = next(e for e in audit_entries(agent)[index : index + 1])
        assert entry["type"] == "inference" and entry["decision"]["allow"] is True
        assert entry["model"]["version"] == "1.0.0" and entry["purpose"] == "fraud"
        # Digests (HMAC with the site secret) of the request body and of the response's outputs, never raw content:
        # whoever holds the secret and an exchange can tie it to its entry.
        secret = DataDir(agent.data).hmac_secret()
        assert entry["input_digest"] == hmac.digest(secret, response.request.content, "sha256").hex()
        assert entry["output_digest"] == hmac.digest(secret, canonical(body["outputs"]), "sha256").hex()
        assert "inputs" not in entry and f"{ROWS[0][0]:.4f}"[:-1] not in json.dumps(entry)


def test_the_agent_documents_its_api_in_openapi(world: dict[str, Any]) -> None:
    agent: AgentProcess = world["agents"][0]
    document = httpx.get(f"{agent.url}/openapi.json", timeout=10).json()
    infer = document["paths"]["/v2/models/{name}/infer"]["post"]
    assert "purpose" in infer["description"] and set(infer["responses"]) >= {"200", "400", "401", "403", "413"}
    assert "/v2/models/{name}/versions/{version}/infer" in document["paths"]
    assert "InferenceRequest" in json.dumps(infer["requestBody"])


def test_audit_entries_carry_the_trace_id_of_the_request(world: dict[str, Any]) -> None:
    agent = world["agents"][1]
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = agent.infer(MODEL, ROWS, headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert response.status_code == 200, response.text
    entry = audit_entries(agent)[response.json()["parameters"]["audit_index"]]
    assert entry["trace_id"] == trace_id


def test_a_denied_request_is_403_with_reasons_and_audited(world: dict[str, Any]) -> None:
    agent = world["agents"][0]
    response = agent.infer(MODEL, ROWS, purpose="marketing")
    assert response.status_code == 403
    body = response.json()
    assert "marketing" in body["reasons"][0]
    entry = audit_entries(agent)[body["audit_index"]]
    assert entry["decision"]["allow"] is False and entry["status"] == 403


def test_bad_inference_input_is_a_clear_4xx_and_audited(world: dict[str, Any]) -> None:
    agent = world["agents"][1]
    cases = {
        "wrong name": (
            agent.infer(
                MODEL,
                ROWS,
                body=json.dumps(
                    {
                        "inputs": [{"name": "feats", "shape": [1, 8], "datatype": "FP32", "data": ROWS[0]}],
                        "parameters": {"purpose": "fraud", "data_class": "internal"},
                    }
                ).encode(),
            ),
            400,
            "feats",
        ),
        "wrong shape": (
            agent.infer(
                MODEL,
                ROWS,
                body=json.dumps(
                    {
                        "inputs": [{"name": "features", "shape": [1, 7], "datatype": "FP32", "data": ROWS[0][:7]}],
                        "parameters": {"purpose": "fraud", "data_class": "internal"},
                    }
                ).encode(),
            ),
            400,
            "shape",
        ),
        "wrong datatype": (
            agent.infer(
                MODEL,
                ROWS,
                body=json.dumps(
                    {
                        "inputs": [{"name": "features", "shape": [1, 8], "datatype": "INT64", "data": [1] * 8}],
                        "parameters": {"purpose": "fraud", "data_class": "internal"},
                    }
                ).encode(),
            ),
            400,
            "INT64",
        ),
        "missing purpose": (agent.infer(MODEL, ROWS, purpose=None), 400, "purpose"),
        "huge body": (agent.infer(MODEL, ROWS, body=b"[" + b"1," * (3 << 20) + b"1]"), 413, "over"),
        "unknown model": (agent.infer("other-model", ROWS), 404, "other-model"),
        "no app key": (agent.infer(MODEL, ROWS, headers={"Authorization": "Bearer swa_nope_nope"}), 401, "app key"),
    }
    entries = audit_entries(agent)
    for why, (response, status, needle) in cases.items():
        assert response.status_code == status, (why, response.text)
        body = response.json()
        assert needle in body["error"], (why, body)
        index = body["audit_index"]
        entries = entries if index < len(entries) else audit_entries(agent)
        assert entries[index]["status"] == status, why
    purposes = agent.infer(
        MODEL,
        ROWS,
        purpose=None,
        data_class=None,
        headers={"X-Sitewarden-Purpose": "fraud", "X-Sitewarden-Data-Class": "internal"},
    )
    assert purposes.status_code == 200, purposes.text


def test_an_unapproved_release_is_refused_and_the_good_one_keeps_serving(world: dict[str, Any]) -> None:
    push(world, "1.1.0", seed=8, approver=None)
    rollout(world, "unapproved", "1.1.0")
    for agent in world["agents"]:
        reason = wait_for(lambda a=agent: refused(a, "1.1.0"), what=f"{agent.name} to refuse 1.1.0")
        assert "no approval" in reason
        assert agent.active() == (MODEL, "1.0.0")
        assert agent.infer(MODEL, ROWS).json()["model_version"] == "1.0.0"
        assert any(e.get("type") == "release.refused" and "1.1.0" in e.get("release", "") for e in audit_entries(agent))


def test_an_approval_by_a_key_the_site_does_not_trust_is_refused(world: dict[str, Any]) -> None:
    push(world, "1.2.0", seed=9, approver="mallory")
    rollout(world, "untrusted", "1.2.0")
    agent = world["agents"][0]
    reason = wait_for(lambda: refused(agent, "1.2.0"), what="the refusal of an untrusted approval")
    assert "no approval by an approver this site trusts" in reason
    assert agent.active() == (MODEL, "1.0.0")


def test_target_bytes_changed_in_flight_are_refused(world: dict[str, Any]) -> None:
    network: Network = world["network"]
    push(world, "1.3.0", seed=10, approver="alice")
    network.tamper = lambda path, body: body[:-1] + bytes([body[-1] ^ 1]) if path.endswith(".model.onnx") else body
    try:
        rollout(world, "tampered", "1.3.0")
        agent = world["agents"][1]
        reason = wait_for(lambda: refused(agent, "1.3.0"), what="the refusal of tampered bytes")
        assert "LengthOrHashMismatch" in reason
        assert agent.active() == (MODEL, "1.0.0")
        assert agent.infer(MODEL, ROWS).status_code == 200
    finally:
        network.tamper = None


def test_replayed_tuf_metadata_is_refused_and_the_good_version_keeps_serving(world: dict[str, Any]) -> None:
    network: Network = world["network"]
    controller: ControllerServer = world["controller"]
    stale = (controller.data_dir / "tuf" / "metadata" / "timestamp.json").read_bytes()
    push(world, "1.4.0", seed=11, approver="alice")  # newer metadata the agents will see below
    agent = world["agents"][0]
    before = agent.status()["desired_version"]
    rollout(world, "fresh", "1.0.0")  # same release: a new desired-state version, metadata the agents now trust
    wait_for(lambda: agent.status()["desired_version"] > before, what="the agent to take the newer metadata")
    network.replay["/tuf/metadata/timestamp.json"] = stale
    try:
        rollout(world, "replayed", "1.4.0")
        wait_for(
            lambda: "BadVersionNumber" in json.dumps(agent.status()["artifacts"]),
            what="the refusal of replayed metadata",
        )
        assert agent.active() == (MODEL, "1.0.0")
        assert agent.infer(MODEL, ROWS).status_code == 200
        assert any("BadVersionNumber" in e.get("reason", "") for e in audit_entries(agent))
    finally:
        network.replay.clear()


def test_agents_serve_and_audit_while_the_controller_is_away_then_get_witnessed(world: dict[str, Any]) -> None:
    controller: ControllerServer = world["controller"]
    agents: list[AgentProcess] = world["agents"]
    controller.stop()
    try:
        for agent in agents:
            for _ in range(20):
                assert agent.infer(MODEL, ROWS).status_code == 200
        wait_for(lambda: all(not a.status()["controller"]["reachable"] for a in agents), what="agents to notice")
        lagging = {a.name: a.status()["audit"]["witness_lag_entries"] for a in agents}
        assert all(lag >= 20 for lag in lagging.values()), lagging
    finally:
        restarted = serve(
            controller.data_dir, controller.pki, int(controller.url.rsplit(":", 1)[1]), controller.admin_token, "sqlite"
        )
        controller.process = restarted.process
    for agent in agents:
        wait_for(lambda a=agent: a.status()["audit"]["witness_lag_entries"] == 0, what=f"{agent.name} to be witnessed")
    agent = agents[0]
    export = agent.data.parent / "export.tar.gz"
    done = sitewarden("agent", "audit", "export", "--data", str(agent.data), "--out", str(export))
    assert done.returncode == 0, done.stderr
    identity = json.loads((agent.data / "identity.json").read_text())
    report = verify_export(export, [agent.audit_vkey()], witnesses=[identity["witness_vkey"]])
    assert report.valid, report.reason
    assert report.witnesses


def test_kill_9_while_serving_loses_no_acknowledged_audit_entry(world: dict[str, Any]) -> None:
    agent: AgentProcess = world["agents"][1]
    agent.acknowledged.clear()

    def client(n: int) -> None:
        for i in range(10_000):
            try:
                agent.infer(MODEL, ROWS, request_id=f"k9-{n}-{i}")
            except Exception:
                return

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for n in range(8):
            pool.submit(client, n)
        wait_for(lambda: len(agent.acknowledged) > 200, what="acknowledged requests")
        agent.stop(signal.SIGKILL)
    acknowledged = list(agent.acknowledged)
    agent.start()
    entries = audit_entries(agent)
    for request_id, index in acknowledged:
        assert entries[index].get("request_id") == request_id, f"acknowledged entry {index} lost or changed"
    wait_for(lambda: agent.active() == (MODEL, "1.0.0"), what="the agent to serve again after kill -9")
    assert agent.infer(MODEL, ROWS).status_code == 200


def test_kill_9_during_a_download_leaves_the_site_consistent(world: dict[str, Any]) -> None:
    agent: AgentProcess = world["agents"][0]
    big = hashlib.sha256(b"padding").digest() * ((40 << 20) // 32)  # 40 MiB extra file: a download that takes time
    push(world, "1.5.0", seed=12, approver="alice", files={"calibration.bin": big})
    rollout(world, "big", "1.5.0")
    staging = agent.data / "releases"
    wait_for(lambda: any(p.name.startswith(".staging-") for p in staging.iterdir()), what="the download to start")
    agent.stop(signal.SIGKILL)
    interrupted = {p.name for p in staging.iterdir() if p.name.startswith(".staging-")}
    agent.start()
    # The restarted agent may already be downloading again, into a staging directory of its own.
    assert not interrupted & {p.name for p in staging.iterdir()}, "the interrupted staging was left behind"
    assert agent.infer(MODEL, ROWS).status_code == 200  # the last-known-good serves at once
    wait_for(lambda: agent.active() == (MODEL, "1.5.0"), timeout=120, what="the agent to finish 1.5.0 after restart")
    assert (staging / MODEL / "1.0.0").is_dir(), "the previous version stays as last-known-good"
    state = json.loads((agent.data / "state.json").read_text())
    assert state["last_good"]["version"] == "1.0.0"
