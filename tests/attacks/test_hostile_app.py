"""A hostile (or careless) local app against a site's agent: claims it may not make, keys it no longer has.

A real controller and a real agent process serving an approved model under a central policy
that allows what the app's binding covers (so the binding's place in the decision input is
tested too; the bank pack's own Rego tests cover its binding rules). The site binds
`fraud-app` to purpose `fraud` and data class `confidential`: the app
claims `marketing`, or `public` data to escape redaction and rate limits, by parameters and
by headers; each claim is refused with 403 before any policy runs and audited with what was
claimed, and the next honest request is served. A key revoked with the CLI is refused on the
very next request, even when the keys file keeps the same modification time, and creating
and revoking keys concurrently loses no change; each change is recorded in the site's audit
log by the running agent.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import stat
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from audit import Log
from sitewarden import approval
from sitewarden.fraud_model import build_release, sample_features
from tests.agent_harness import AgentProcess, app_bindings, enroll_agent, push_policy, wait_for
from tests.controller_server import sitewarden, start_controller
from tests.tls import TestPKI

MODEL = "fraud-scorer"
ROWS = sample_features(2, seed=5).tolist()
# A central policy that allows exactly what the caller's binding covers, and says so.
POLICY = {
    ".manifest": '{"revision": "binding-1", "roots": ["sitewarden"]}',
    "inference.rego": """package sitewarden.inference

decision := decide(input)

decide(inp) := {"allow": true, "reasons": [concat("", ["bound to ", concat(",", inp.caller.binding.purposes)])],
    "obligations": {}} if {
    inp.purpose in inp.caller.binding.purposes
    inp.data_class in inp.caller.binding.data_classes
} else := {"allow": false, "reasons": ["outside the app's binding"], "obligations": {}}
""",
    "accept.rego": """package sitewarden.accept

decision := {"allow": true, "reasons": ["approved by a trusted approver"], "obligations": {}}
""",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("hostile-app")
    controller = start_controller(base, pki)
    keys = base / "approvers"
    approval.generate_approver_key(keys / "alice.pem", keys / "alice.pub.pem")
    env = controller.cli_env()
    assert sitewarden("approver", "add", "alice", "--public-key", str(keys / "alice.pub.pem"), env=env).returncode == 0
    operator, alice = controller.token("operator", "bob"), controller.token("approver", "alice")
    bindings = app_bindings(("fraud-app",), purposes=("fraud",), data_classes=("confidential",))
    # The data dir exists already, made wide open by an operator, and the agent inherits umask 0:
    # what it keeps at rest must be private all the same (checked by the last test).
    (base / "branch" / "data").mkdir(parents=True)
    os.chmod(base / "branch" / "data", 0o755)
    agent = enroll_agent(
        controller, base, "branch", {"region": "eu-west"}, {"alice": keys / "alice.pub.pem"}, apps=bindings
    )
    try:
        bundle = base / "policy"
        bundle.mkdir()
        for name, text in POLICY.items():
            (bundle / name).write_text(text)
        push_policy(controller, bundle, "1.0.0", operator=operator, approver=alice, approver_key=keys / "alice.pem")
        card = build_release(base / "release", seed=7)
        done = sitewarden(
            "release", "push", str(base / "release"), "--name", MODEL, "--version", "1.0.0", "--metadata", str(card),
            env=controller.cli_env(operator),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        done = sitewarden(
            "release", "approve", MODEL, "1.0.0", "--key", str(keys / "alice.pem"), env=controller.cli_env(alice)
        )
        assert done.returncode == 0, done.stderr
        agent.umask = 0
        agent.start()
        done = sitewarden(
            "rollout", "create", "v1", "--release", f"{MODEL}@1.0.0", "--policy", "bank-policy@1.0.0",
            "--selector", "region=eu-west", env=controller.cli_env(operator),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        wait_for(lambda: agent.active() == (MODEL, "1.0.0"), what="the site to run 1.0.0")
        yield {"controller": controller, "agent": agent}
    finally:
        agent.stop()
        controller.stop()


def _entries(agent: AgentProcess) -> list[dict[str, Any]]:
    with Log.open(agent.data / "audit", readonly=True) as log:
        return [json.loads(e) for e in log.iter_entries()]


def _entry(agent: AgentProcess, index: int) -> dict[str, Any]:
    with Log.open(agent.data / "audit", readonly=True) as log:
        return json.loads(log.entry(index))


def _served(agent: AgentProcess, key: str | None = None) -> None:
    """An honest request is served (with `key`, or the agent's own)."""
    if key is not None:
        agent.app_key, key = key, agent.app_key
    try:
        response = agent.infer(MODEL, ROWS)
    finally:
        if key is not None:
            agent.app_key = key
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("purpose", "data_class", "headers", "claimed"),
    [
        ("marketing", "confidential", None, "purpose 'marketing'"),
        ("fraud", "public", None, "data class 'public'"),  # laxer obligations: no redaction, higher rate limit
        ("fraud", "restricted", None, "data class 'restricted'"),
        (None, None, {"X-Sitewarden-Purpose": "credit", "X-Sitewarden-Data-Class": "confidential"}, "purpose 'credit'"),
    ],
)
def test_a_claim_outside_the_apps_binding_is_refused_before_the_policy_and_audited(
    site: dict[str, Any], purpose: str | None, data_class: str | None, headers: dict[str, str] | None, claimed: str
) -> None:
    agent: AgentProcess = site["agent"]
    response = agent.infer(MODEL, ROWS, purpose=purpose, data_class=data_class, headers=headers)
    assert response.status_code == 403, response.text
    body = response.json()
    assert f"app fraud-app may not state {claimed}" in body["error"]
    assert "reasons" not in body, "the policy must not have run"
    entry = _entry(agent, body["audit_index"])
    assert entry["type"] == "inference" and entry["status"] == 403 and entry["caller"] == "fraud-app"
    assert claimed.split("'")[1] in (entry["purpose"], entry["data_class"])
    assert "decision" not in entry and "may not state" in entry["refusal"]
    _served(agent)


def test_the_binding_reaches_the_policy_input(site: dict[str, Any]) -> None:
    """The central policy reads `input.caller.binding`; its audited decision says what it read."""
    agent: AgentProcess = site["agent"]
    response = agent.infer(MODEL, ROWS)
    assert response.status_code == 200
    entry = _entry(agent, response.json()["parameters"]["audit_index"])
    assert entry["decision"] == {"allow": True, "reasons": ["bound to fraud"], "obligations": {}}


def _cli_key(agent: AgentProcess, action: str, name: str) -> str:
    done = sitewarden("agent", "app-key", action, name, "--data", str(agent.data))
    assert done.returncode == 0, done.stderr
    assert "the running agent recorded the change in the site's audit log" in done.stderr, done.stderr
    return done.stdout.strip()


def test_a_revoked_key_is_refused_on_the_very_next_request(site: dict[str, Any]) -> None:
    agent: AgentProcess = site["agent"]
    for _ in range(2):
        key = _cli_key(agent, "create", "fraud-app")
        _served(agent, key)  # works at once
        apps_file = agent.data / "apps.json"
        before = apps_file.stat()
        _cli_key(agent, "revoke", "fraud-app")
        # Put the old modification time back: a file system with a coarse clock would show this.
        os.utime(apps_file, ns=(before.st_atime_ns, before.st_mtime_ns))
        agent.app_key, own = key, agent.app_key
        try:
            response = agent.infer(MODEL, ROWS)
        finally:
            agent.app_key = own
        assert response.status_code == 401, response.text
        entry = _entry(agent, response.json()["audit_index"])
        # Refused, and the entry names the revoked key's app (the secret matched a key that no longer works).
        assert entry["status"] == 401 and entry["caller"] == "fraud-app" and entry["credential"] == "revoked"
        # Revoking fraud-app revoked every key of it: a new one keeps the app serving.
        agent.app_key = _cli_key(agent, "create", "fraud-app")
        _served(agent)


def test_key_changes_are_audited_by_the_running_agent_and_none_is_lost(site: dict[str, Any]) -> None:
    agent: AgentProcess = site["agent"]
    names = [f"batch-{i}" for i in range(6)]

    def create(name: str) -> tuple[str, str]:
        done = sitewarden("agent", "app-key", "create", name, "--data", str(agent.data))
        assert done.returncode == 0, done.stderr
        return name, done.stdout.strip()

    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        created = dict(pool.map(create, names))
    stored = json.loads((agent.data / "apps.json").read_text())["keys"]
    assert {r["name"] for r in stored.values()} >= set(names), "a concurrent change was lost"

    def recorded() -> list[dict[str, Any]]:
        return [e for e in _entries(agent) if e["type"] == "app_key.created" and e["app"] in names]

    wait_for(lambda: len(recorded()) == len(names), what="the agent to record every key created")
    for event in recorded():
        assert event["key_id"] == created[event["app"]].split("_")[1]
        assert event["binding"] is None  # these apps have no binding: their keys may state nothing
        assert created[event["app"]] not in json.dumps(event)  # never the secret
    # Such a key authenticates, but may claim nothing.
    agent.app_key, own = created[names[0]], agent.app_key
    try:
        unbound = agent.infer(MODEL, ROWS)
    finally:
        agent.app_key = own
    assert unbound.status_code == 403 and "has no binding in the site configuration" in unbound.json()["error"]
    _cli_key(agent, "revoke", names[0])
    revoked = [e for e in _entries(agent) if e["type"] == "app_key.revoked" and e["app"] == names[0]]
    assert len(revoked) == 1 and revoked[0]["key_id"] == created[names[0]].split("_")[1]


def test_readiness_and_metrics_say_nothing_without_an_app_key(site: dict[str, Any]) -> None:
    agent: AgentProcess = site["agent"]
    assert httpx.get(f"{agent.url}/v2/models/{MODEL}/ready", timeout=10).status_code == 401
    assert httpx.get(f"{agent.url}/v2/models/nothing/ready", timeout=10).status_code == 401  # the same answer
    assert httpx.get(f"{agent.url}/metrics", timeout=10).status_code == 401
    ready = httpx.get(f"{agent.url}/v2/health/ready", timeout=10)
    assert ready.status_code == 200 and MODEL not in ready.text
    auth = {"Authorization": f"Bearer {agent.app_key}"}
    assert httpx.get(f"{agent.url}/v2/models/{MODEL}/ready", headers=auth, timeout=10).json()["ready"] is True
    assert "sitewarden_inference_requests" in httpx.get(f"{agent.url}/metrics", headers=auth, timeout=10).text


def test_what_the_site_keeps_at_rest_is_private_whatever_the_umask(site: dict[str, Any]) -> None:
    """Keys, the audit log and its index, state, app keys, TUF metadata and the model's files: after
    serving, syncing and auditing under umask 0 in a data dir that existed with mode 0755."""
    agent: AgentProcess = site["agent"]
    data = agent.data
    wrong = []
    for path in [data, *data.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_symlink():  # python-tuf's root.json points at the newest root it keeps: modes are the target's
            assert path.resolve().is_relative_to(data), path
            continue
        if path.is_dir():
            if mode != 0o700:
                wrong.append(f"{path.relative_to(data)}: {mode:o}")
        elif mode & 0o077:
            wrong.append(f"{path.relative_to(data)}: {mode:o}")
    assert wrong == []
    assert list(data.glob("releases/*/1.0.0/files/*.onnx")), "the model's files are part of the check"
    assert (data / "audit" / "index.offsets").exists() and (data / "state.json").exists()
