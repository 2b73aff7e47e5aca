"""Policies end to end with real processes: a controller, an agent, the bank pack and a site-local policy.

The central bank pack arrives as an approved TUF target and is activated after its own Rego
tests pass; the site's local modules tighten it (an extra redaction pattern, a lower rate limit
and content logging for one app). Through the agent's HTTP API: text outputs are redacted,
rate limits answer 429, a new bundle swaps in under concurrent load with no request seeing
half of one version, a bundle whose tests fail is refused while the old one keeps deciding,
and a model below its evaluation thresholds is refused by the acceptance decision.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from audit import Log
from policies import Bundle
from sitewarden import approval
from tests import notes_model
from tests.agent_harness import BANK_PACK, FED_APP, POLICY, AgentProcess, enroll_agent, push_app, push_policy, wait_for
from tests.controller_server import sitewarden, start_controller
from tests.sim_agent import SimulatedAgent
from tests.tls import TestPKI

MODEL = "notes"
IBAN = "DE89 3704 0044 0532 0130 00"
LOCAL_POLICY = """package sitewarden.inference
import rego.v1

# This site also redacts e-mail addresses, and holds the batch app to 5 requests a minute with content logged.
decision := decide(input)

decide(inp) := {"allow": true, "reasons": ["site: batch-app is rate limited and logged"], "obligations": o} if {
    inp.caller.app == "batch-app"
    o := {"rate_limit": 5, "log_content": true, "redact": {"patterns": [`[\\w.+-]+@[\\w-]+\\.[\\w.]+`]}}
} else := {"allow": true, "reasons": ["site: e-mail addresses redacted"], "obligations": o} if {
    o := {"redact": {"patterns": [`[\\w.+-]+@[\\w-]+\\.[\\w.]+`]}}
}
"""
LOCAL_TEST = """package sitewarden.local_test
import rego.v1
import data.sitewarden.inference

test_batch_app_is_limited if { inference.decide({"caller": {"app": "batch-app"}}).obligations.rate_limit == 5 }
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("policy-e2e")
    controller = start_controller(base, pki)
    keys = base / "approvers"
    approval.generate_approver_key(keys / "alice.pem", keys / "alice.pub.pem")
    assert (
        sitewarden(
            "approver", "add", "alice", "--public-key", str(keys / "alice.pub.pem"), env=controller.cli_env()
        ).returncode
        == 0
    )
    operator, alice = controller.token("operator", "bob"), controller.token("approver", "alice")
    local = base / "site-policy"
    local.mkdir()
    (local / "local.rego").write_text(LOCAL_POLICY)
    (local / "local_test.rego").write_text(LOCAL_TEST)
    agent = enroll_agent(
        controller,
        base,
        "branch-p",
        {"region": "eu-west"},
        {"alice": keys / "alice.pub.pem"},
        extra_config=f'[policy]\nlocal = "{local}"\n',
    )
    keys_made = {
        app: sitewarden("agent", "app-key", "create", app, "--data", str(agent.data)).stdout.strip()
        for app in ("batch-app", "load-app")
    }
    world = {
        "base": base,
        "controller": controller,
        "agent": agent,
        "operator": operator,
        "alice": alice,
        "key": keys / "alice.pem",
        "apps": keys_made,
    }
    try:
        push_model(world, "1.0.0", notes_model.CARD)
        push(world, BANK_PACK, "1.0.0")
        agent.start()
        rollout(world, "p1", "1.0.0", "1.0.0")
        wait_for(lambda: agent.active() == (MODEL, "1.0.0"), what="the agent to serve notes 1.0.0")
        assert agent.policy() == (POLICY, "1.0.0")
        # 1.1.0: the bank pack with short answers for internal data, to swap in. Each test brings the
        # agent to the policy version it needs, so the tests do not depend on each other's order.
        push(world, variant(world, "bank-short", "short-answers", tokens=3), "1.1.0")
        yield world
    finally:
        agent.stop()
        controller.stop()


def push(world: dict[str, Any], bundle: Path, version: str) -> None:
    push_policy(
        world["controller"],
        bundle,
        version,
        operator=world["operator"],
        approver=world["alice"],
        approver_key=world["key"],
    )


def push_model(world: dict[str, Any], version: str, card: dict[str, Any]) -> None:
    directory = world["base"] / f"notes-{version}"
    card_path = notes_model.build_release(directory)
    card_path.write_text(json.dumps(card))
    env = world["controller"].cli_env(world["operator"])
    args = ["release", "push", str(directory), "--name", MODEL, "--version", version, "--metadata", str(card_path)]
    assert (done := sitewarden(*args, env=env)).returncode == 0, done.stderr
    approve = ["release", "approve", MODEL, version, "--key", str(world["key"])]
    assert (done := sitewarden(*approve, env=world["controller"].cli_env(world["alice"]))).returncode == 0, done.stderr


def rollout(world: dict[str, Any], name: str, model: str, policy: str) -> None:
    name = f"{name}-{uuid.uuid4().hex[:8]}"
    args = ["rollout", "create", name, "--release", f"{MODEL}@{model}", "--policy", f"{POLICY}@{policy}"]
    args += ["--selector", "region=eu-west"]
    done = sitewarden(*args, env=world["controller"].cli_env(world["operator"]))
    assert done.returncode == 0, done.stderr


def use_policy(world: dict[str, Any], version: str) -> None:
    """Have the agent run notes 1.0.0 under bank-policy `version` (rolled out unless it already does)."""
    agent = world["agent"]
    if agent.policy() != (POLICY, version) or agent.active() != (MODEL, "1.0.0"):
        rollout(world, "use", "1.0.0", version)
        wait_for(lambda: agent.policy() == (POLICY, version), what=f"bank-policy {version} to be active")
        wait_for(lambda: agent.active() == (MODEL, "1.0.0"), what="notes 1.0.0 to be active")


def notes(agent: AgentProcess, texts: list[str], *, key: str | None = None, **params: str) -> httpx.Response:
    body = {
        "inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}],
        "parameters": {"purpose": "service", "data_class": "confidential", **params},
    }
    return httpx.post(
        f"{agent.url}/v2/models/{MODEL}/infer",
        json=body,
        headers={"Authorization": f"Bearer {key or agent.app_key}"},
        timeout=30,
    )


def entry(agent: AgentProcess, index: int) -> dict[str, Any]:
    with Log.open(agent.data / "audit", readonly=True) as log:
        return json.loads(log.entry(index))


def entries(agent: AgentProcess) -> list[dict[str, Any]]:
    with Log.open(agent.data / "audit", readonly=True) as log:
        return [json.loads(e) for e in log.iter_entries()]


def variant(
    world: dict[str, Any], name: str, revision: str, *, tokens: int | None = None, failing: bool = False
) -> Path:
    """A copy of the bank pack with another revision, optionally another token limit for internal data
    or a failing test."""
    directory = world["base"] / name
    shutil.copytree(BANK_PACK, directory)
    manifest = json.loads((directory / ".manifest").read_text())
    (directory / ".manifest").write_text(json.dumps({**manifest, "revision": revision}))
    if tokens is not None:
        data = json.loads((directory / "data.json").read_text())
        data["sitewarden"]["bank"]["data_class_obligations"]["internal"]["max_output_tokens"] = tokens
        (directory / "data.json").write_text(json.dumps(data))
    if failing:
        (directory / "zz_failing_test.rego").write_text(
            "package sitewarden.failing_test\nimport rego.v1\ntest_always_fails if { 1 == 2 }\n"
        )
    return directory


def refusal(agent: AgentProcess, artifact: str) -> str:
    """The reason the agent gives for refusing an artifact (name@version), or "" while it has not."""
    state = agent.status()["artifacts"].get(artifact, {})
    return state.get("reason", "") if state.get("state") == "refused" else ""


def test_text_outputs_are_redacted_by_central_and_local_patterns(world: dict[str, Any]) -> None:
    agent = world["agent"]
    use_policy(world, "1.0.0")
    text = f"refund to {IBAN} and tell jane.doe@bank.example"
    confidential = notes(agent, [text])
    assert confidential.status_code == 200, confidential.text
    reply = confidential.json()["outputs"][0]["data"][0]
    assert IBAN not in reply and "jane.doe@bank.example" not in reply and reply.count("[REDACTED]") == 2
    assert confidential.json()["parameters"]["redactions"] == 2
    public = notes(agent, [text], data_class="public")
    reply = public.json()["outputs"][0]["data"][0]
    assert IBAN in reply and "jane.doe" not in reply, "the bank redacts IBANs in confidential data; the site e-mails"
    record = entry(agent, confidential.json()["parameters"]["audit_index"])
    patterns = record["decision"]["obligations"]["redact"]["patterns"]
    assert len(patterns) >= 2 and any("@" in p for p in patterns)
    assert record["policy"]["central"]["digest"] == Bundle.load(BANK_PACK).digest
    assert record["policy"]["central"]["version"] == "1.0.0" and record["policy"]["local"]["digest"]
    assert "content" not in record and IBAN not in json.dumps(record), "raw content is not logged by default"


def test_a_denial_names_its_reasons_and_the_bundle_that_decided(world: dict[str, Any]) -> None:
    agent = world["agent"]
    use_policy(world, "1.0.0")
    denied = notes(agent, ["hello"], purpose="marketing")
    assert denied.status_code == 403
    assert any("marketing" in r for r in denied.json()["reasons"])
    record = entry(agent, denied.json()["audit_index"])
    assert record["status"] == 403 and record["decision"]["allow"] is False
    assert record["policy"]["central"]["revision"] == Bundle.load(BANK_PACK).revision


def test_the_local_rate_limit_is_429_with_retry_after_and_the_content_is_logged(world: dict[str, Any]) -> None:
    agent = world["agent"]
    batch_key = world["apps"]["batch-app"]
    answers = [notes(agent, [f"note {i}"], key=batch_key) for i in range(6)]
    assert [a.status_code for a in answers] == [200] * 5 + [429]
    assert int(answers[5].headers["retry-after"]) >= 1
    assert "5 requests per minute" in answers[5].json()["error"]
    assert notes(agent, ["other app"]).status_code == 200, "another app has its own budget"
    refused = entry(agent, answers[5].json()["audit_index"])
    assert refused["status"] == 429 and refused["caller"] == "batch-app"
    logged = entry(agent, answers[0].json()["parameters"]["audit_index"])
    assert logged["content"]["outputs"][0]["data"] == ["note 0"], "log_content puts the raw exchange in the entry"


def test_a_new_policy_swaps_in_under_concurrent_load_without_mixing_versions(world: dict[str, Any]) -> None:
    agent = world["agent"]
    use_policy(world, "1.0.0")
    load_key = world["apps"]["load-app"]
    stop = threading.Event()
    text = "one two three four five six seven eight"

    def load() -> list[httpx.Response]:
        answers = []
        while not stop.is_set():
            answers.append(notes(agent, [text], key=load_key, data_class="internal"))
            stop.wait(0.02)
        return answers

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(load) for _ in range(4)]
        rollout(world, "p2", "1.0.0", "1.1.0")
        wait_for(lambda: agent.policy() == (POLICY, "1.1.0"), what="bank-policy 1.1.0 to be active")
        stop.wait(0.5)
        stop.set()
        answers = [a for f in futures for a in f.result()]
    assert answers and all(a.status_code == 200 for a in answers), {a.status_code for a in answers}
    seen = set()
    for answer in answers:
        body = answer.json()
        record = entry(agent, body["parameters"]["audit_index"])
        version = record["policy"]["central"]["version"]
        seen.add(version)
        words = len(body["outputs"][0]["data"][0].split())
        assert words == (3 if version == "1.1.0" else 8), (version, words)
        assert record["decision"]["obligations"].get("max_output_tokens") == (3 if version == "1.1.0" else 512)
    assert seen == {"1.0.0", "1.1.0"}, seen


def test_a_bundle_whose_tests_fail_is_refused_and_the_old_one_keeps_deciding(world: dict[str, Any]) -> None:
    agent = world["agent"]
    use_policy(world, "1.1.0")
    broken = variant(world, "bank-failing", "failing", failing=True)
    tarball = world["base"] / "failing-bundle"
    tarball.mkdir()
    assert sitewarden("policy", "build", str(broken), "--out", str(tarball / "bundle.tar.gz")).returncode == 0
    assert sitewarden("policy", "test", str(broken)).returncode == 1
    env = world["controller"].cli_env(world["operator"])
    args = ["release", "push", str(tarball), "--name", POLICY, "--version", "1.2.0", "--kind", "policy"]
    assert (done := sitewarden(*args, "--runtime", "rego", env=env)).returncode == 0, done.stderr
    approve = ["release", "approve", POLICY, "1.2.0", "--key", str(world["key"])]
    assert sitewarden(*approve, env=world["controller"].cli_env(world["alice"])).returncode == 0
    rollout(world, "p3", "1.0.0", "1.2.0")
    reason = wait_for(lambda: refusal(agent, f"{POLICY}@1.2.0"), what="bank-policy 1.2.0 to be refused")
    assert "test_always_fails" in reason and "Rego tests fail" in reason
    assert agent.policy() == (POLICY, "1.1.0")
    answer = notes(agent, ["still decided by one two three four"], data_class="internal")
    assert answer.status_code == 200 and len(answer.json()["outputs"][0]["data"][0].split()) == 3
    assert any(e.get("type") == "release.refused" and e["release"] == f"{POLICY}@1.2.0" for e in entries(agent))


def test_a_model_below_its_evaluation_thresholds_is_refused_by_the_accept_decision(world: dict[str, Any]) -> None:
    agent = world["agent"]
    use_policy(world, "1.1.0")
    push_model(world, "1.1.0", {**notes_model.CARD, "evaluation": {"exact_match": 0.5}})
    rollout(world, "p4", "1.1.0", "1.1.0")
    reason = wait_for(lambda: refusal(agent, f"{MODEL}@1.1.0"), what="notes 1.1.0 to be refused")
    assert "acceptance refused" in reason and "exact_match" in reason
    assert agent.active() == (MODEL, "1.0.0")
    decision = [e for e in entries(agent) if e.get("type") == "decision" and e["release"] == f"{MODEL}@1.1.0"][-1]
    assert decision["decision"]["allow"] is False and decision["policy"]["central"]["version"] == "1.1.0"


def test_after_a_restart_the_active_policy_still_decides(world: dict[str, Any]) -> None:
    agent = world["agent"]
    use_policy(world, "1.1.0")
    agent.stop()
    agent.start()
    assert agent.policy() == (POLICY, "1.1.0")
    answer = notes(agent, [f"pay {IBAN} one two"])
    assert answer.status_code == 200
    assert answer.json()["outputs"][0]["data"][0].split()[:2] == ["pay", "[REDACTED]"]


def test_a_job_in_the_desired_state_is_decided_by_the_federation_policy_and_audited(world: dict[str, Any]) -> None:
    agent = world["agent"]
    use_policy(world, "1.0.0")
    # A second, simulated site: the bank pack wants at least two sites in a federation.
    SimulatedAgent.enroll(world["controller"], f"peer-{uuid.uuid4().hex[:6]}", {"role": "peer"}, world["base"])
    base = {"name": MODEL, "version": "1.0.0"}
    push_app(
        world["controller"],
        world["base"] / "fedapp",
        "0.1.0",
        operator=world["operator"],
        approver=world["alice"],
        approver_key=world["key"],
    )
    app = {"name": FED_APP, "version": "0.1.0"}
    common = {"base": base, "app": app, "dataset": "notes", "selector": {}, "rounds": 3, "min_sites": 2}
    private = {"noise_multiplier": 1.5, "clipping_norm": 1.0, "delta": 1e-5}  # epsilon about 6.2 after 3 rounds
    with world["controller"].http(world["operator"]) as http:
        good = http.post(
            "/api/v1/jobs",
            json={
                **common,
                "name": f"dp-{uuid.uuid4().hex[:6]}",
                "differential_privacy": private,
                "secure_aggregation": True,
            },
        )
        bare = http.post("/api/v1/jobs", json={**common, "name": f"bare-{uuid.uuid4().hex[:6]}"})
    assert good.status_code == bare.status_code == 201, (good.text, bare.text)
    allowed_key = f"{good.json()['name']}@{good.json()['id']}"
    denied_key = f"{bare.json()['name']}@{bare.json()['id']}"

    def decided() -> bool:
        artifacts = agent.status()["artifacts"]
        return allowed_key in artifacts and denied_key in artifacts

    wait_for(decided, what="the agent to decide on both jobs")
    artifacts = agent.status()["artifacts"]
    # Allowed by the policy, but this site maps no local data set "notes": it declines, saying so.
    assert artifacts[allowed_key]["state"] == "failed", artifacts[allowed_key]
    assert "data set 'notes' is not mapped" in artifacts[allowed_key]["reason"]
    assert artifacts[denied_key]["state"] == "refused"
    assert "differential privacy" in artifacts[denied_key]["reason"]
    assert "secure aggregation" in artifacts[denied_key]["reason"]
    decisions = {e["job"]["id"]: e for e in entries(agent) if e.get("point") == "federation"}
    assert decisions[good.json()["id"]]["decision"]["allow"] is True
    assert decisions[bare.json()["id"]]["decision"]["allow"] is False
    assert decisions[bare.json()["id"]]["policy"]["central"]["version"] == "1.0.0"
    with world["controller"].http(world["operator"]) as http:  # leave no job behind for the other tests
        for job in (good.json(), bare.json()):
            assert http.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 200
