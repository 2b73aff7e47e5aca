"""Rollouts with simulated agents speaking the real HTTP protocol: waves, promotion, rollback,
long polls, conditions, and idempotent reconciliation."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from sitewarden import approval
from tests.controller_server import ControllerServer
from tests.sim_agent import SimulatedAgent


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _release(controller: ControllerServer, name: str, version: str, payload: bytes) -> None:
    token = controller.token("operator")
    sha = hashlib.sha256(payload).hexdigest()
    with controller.http(token) as http:
        info = http.post("/api/v1/uploads", json={"sha256": sha, "size": len(payload)}).json()
        if not info["complete"]:
            http.patch(f"/api/v1/uploads/{info['id']}", content=payload, headers={"Upload-Offset": "0"})
        created = http.post(
            "/api/v1/releases",
            json={
                "name": name,
                "version": version,
                "kind": "model",
                "runtime": "onnx",
                "files": [{"path": "model.onnx", "sha256": sha, "size": len(payload)}],
                "metadata": {"owner": "rollout-test", "intended_purposes": ["fraud"]},
            },
        )
        assert created.status_code == 201, created.text


def _rollout(controller: ControllerServer, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
    with controller.http(controller.token("operator")) as http:
        response = http.post("/api/v1/rollouts", json=body)
    assert response.status_code == status, response.text
    return response.json()


def _act(controller: ControllerServer, name: str, action: str) -> dict[str, Any]:
    with controller.http(controller.token("operator")) as http:
        response = http.post(f"/api/v1/rollouts/{name}/{action}")
    assert response.status_code == 200, response.text
    return response.json()


def _status(controller: ControllerServer, name: str) -> dict[str, Any]:
    with controller.http(controller.token("auditor")) as http:
        return http.get(f"/api/v1/rollouts/{name}").json()


def _condition(rollout: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in rollout["conditions"] if c["type"] == kind)


@pytest.fixture
def fleet(controller: ControllerServer, tmp_path: Path) -> dict[str, SimulatedAgent]:
    region = _unique("region")
    agents = {
        "canary": SimulatedAgent.enroll(controller, _unique("canary"), {"region": region, "tier": "prod"}, tmp_path),
        "main": SimulatedAgent.enroll(controller, _unique("main"), {"region": region, "tier": "prod"}, tmp_path),
        "elsewhere": SimulatedAgent.enroll(controller, _unique("other"), {"region": "us-east"}, tmp_path),
    }
    agents["region"] = region  # type: ignore[assignment]
    return agents


def test_canary_then_rest_by_label_with_promotion_and_conditions(
    controller: ControllerServer, fleet: dict[str, Any]
) -> None:
    model = _unique("scorer")
    _release(controller, model, "1.0.0", b"weights 1.0.0 " + model.encode())
    canary, main, elsewhere = fleet["canary"], fleet["main"], fleet["elsewhere"]
    name = _unique("roll")
    created = _rollout(
        controller,
        {
            "name": name,
            "releases": [{"name": model, "version": "1.0.0"}],
            "selector": {"region": fleet["region"]},
            "canary": [canary.name],
        },
    )
    assert created["waves"] == 2 and created["waves_released"] == 1
    assert {s["site"]: s["wave"] for s in created["sites"]} == {canary.name: 0, main.name: 1}
    # Only the canary has a new desired state; the rest and the unselected site do not.
    assert canary.sync() and canary.releases() == [f"{model}@1.0.0"]
    assert not main.sync() and not elsewhere.sync()
    files = canary.document["releases"][0]["files"]
    assert files[0]["target"] == f"releases/{model}/1.0.0/files/model.onnx"
    assert _condition(_status(controller, name), "CanaryHealthy")["status"] == "False"
    canary.report("active")
    status = _status(controller, name)
    assert _condition(status, "CanaryHealthy")["status"] == "True"
    assert _condition(status, "Progressing")["reason"] == "WaitingForPromotion"

    promoted = _act(controller, name, "promote")
    assert promoted["waves_released"] == 2
    assert main.sync() and main.releases() == [f"{model}@1.0.0"]
    assert not elsewhere.sync()
    main.report("active")
    assert _condition(_status(controller, name), "Complete")["status"] == "True"

    # Reconciling again changes nothing: no new desired-state version anywhere.
    before = (canary.poll()["version"], main.poll()["version"])
    _act(controller, name, "promote")
    _act(controller, name, "resume")
    assert (canary.poll()["version"], main.poll()["version"]) == before


def test_rollback_re_points_sites_to_their_previous_desired_state(
    controller: ControllerServer, fleet: dict[str, Any]
) -> None:
    model = _unique("scorer")
    _release(controller, model, "1.0.0", b"v1 " + model.encode())
    _release(controller, model, "2.0.0", b"v2 " + model.encode())
    canary, main = fleet["canary"], fleet["main"]
    first, second = _unique("first"), _unique("second")
    selector = {"region": fleet["region"]}
    _rollout(controller, {"name": first, "releases": [{"name": model, "version": "1.0.0"}], "selector": selector})
    assert canary.sync() and main.sync()
    v1 = canary.version
    _rollout(controller, {"name": second, "releases": [{"name": model, "version": "2.0.0"}], "selector": selector})
    assert canary.sync() and canary.releases() == [f"{model}@2.0.0"]
    assert _condition(_status(controller, first), "Superseded")["status"] == "True"
    rolled = _act(controller, second, "rollback")
    assert rolled["state"] == "rolled_back"
    assert _condition(rolled, "RolledBack")["status"] == "True"
    for agent in (canary, main):
        assert agent.sync()
        assert agent.releases() == [f"{model}@1.0.0"]
        assert agent.version > v1  # a new version with the old content: versions only go up
    # Rolling back again, or promoting a rolled-back rollout, changes nothing.
    again = _act(controller, second, "rollback")
    assert again["state"] == "rolled_back" and not canary.sync()
    with controller.http(controller.token("operator")) as http:
        assert http.post(f"/api/v1/rollouts/{second}/promote").status_code == 409


def test_long_poll_answers_within_a_second_of_a_change(controller: ControllerServer, fleet: dict[str, Any]) -> None:
    model = _unique("scorer")
    _release(controller, model, "1.0.0", b"lp " + model.encode())
    main = fleet["main"]
    main.sync()
    answered: dict[str, float] = {}

    def wait_for_push() -> None:
        pointer = main.poll(wait=20)
        answered["at"] = time.monotonic()
        answered["changed"] = pointer["changed"]

    waiter = threading.Thread(target=wait_for_push)
    waiter.start()
    time.sleep(1.0)  # let the request reach the controller and block there
    assert waiter.is_alive(), "the long poll returned before anything changed"
    changed_at = time.monotonic()
    _rollout(
        controller,
        {
            "name": _unique("lp"),
            "releases": [{"name": model, "version": "1.0.0"}],
            "selector": {"region": fleet["region"]},
        },
    )
    waiter.join(timeout=15)
    assert answered["changed"] is True
    assert answered["at"] - changed_at < 1.0, f"answered {answered['at'] - changed_at:.2f} s after the change"


def test_long_poll_without_change_times_out_with_the_same_version(
    controller: ControllerServer, fleet: dict[str, Any]
) -> None:
    agent = fleet["elsewhere"]
    started = time.monotonic()
    pointer = agent.poll(wait=1)
    assert pointer["changed"] is False and pointer["version"] == agent.version
    assert 0.9 < time.monotonic() - started < 10


def test_canaries_auto_promote_once_active_long_enough(controller: ControllerServer, fleet: dict[str, Any]) -> None:
    model = _unique("scorer")
    _release(controller, model, "1.0.0", b"auto " + model.encode())
    canary, main = fleet["canary"], fleet["main"]
    name = _unique("auto")
    _rollout(
        controller,
        {
            "name": name,
            "releases": [{"name": model, "version": "1.0.0"}],
            "selector": {"region": fleet["region"]},
            "canary_percent": 50,
            "auto_promote_after_s": 1,
        },
    )
    got = {agent.name: agent.sync() for agent in (canary, main)}
    assert sorted(got.values()) == [False, True], "50% of two sites is one canary"
    first, second = (canary, main) if got[canary.name] else (main, canary)
    assert first.releases() == [f"{model}@1.0.0"]
    first.report("active")
    deadline = time.monotonic() + 30
    while not second.sync(wait=5):
        assert time.monotonic() < deadline, "the second wave was never released"
    assert second.releases() == [f"{model}@1.0.0"]
    assert _status(controller, name)["waves_released"] == 2


def test_paused_rollout_does_not_promote_and_refusals_show_as_degraded(
    controller: ControllerServer, fleet: dict[str, Any]
) -> None:
    model = _unique("scorer")
    _release(controller, model, "1.0.0", b"paused " + model.encode())
    canary = fleet["canary"]
    name = _unique("paused")
    _rollout(
        controller,
        {
            "name": name,
            "releases": [{"name": model, "version": "1.0.0"}],
            "selector": {"region": fleet["region"]},
            "canary": [canary.name],
            "auto_promote_after_s": 0,
        },
    )
    assert _act(controller, name, "pause")["state"] == "paused"
    canary.sync()
    canary.report("refused", "approval by an untrusted key")
    status = _status(controller, name)
    assert _condition(status, "Paused")["status"] == "True"
    degraded = _condition(status, "Degraded")
    assert degraded["status"] == "True" and "untrusted key" in degraded["message"]
    assert status["waves_released"] == 1
    assert _act(controller, name, "resume")["state"] == "progressing"


def test_an_approval_added_later_reaches_the_sites_desired_state(
    controller: ControllerServer, fleet: dict[str, Any], tmp_path: Path
) -> None:
    model = _unique("scorer")
    payload = b"to be approved " + model.encode()
    _release(controller, model, "1.0.0", payload)
    main = fleet["main"]
    _rollout(
        controller,
        {
            "name": _unique("appr"),
            "releases": [{"name": model, "version": "1.0.0"}],
            "selector": {"region": fleet["region"]},
        },
    )
    main.sync()
    assert main.document["releases"][0]["approvals"] == []
    approver = _unique("approver")
    approval.generate_approver_key(tmp_path / "a.pem", tmp_path / "a.pub.pem")
    with controller.client(controller.admin_token) as admin:
        admin.post("/api/v1/approvers", {"approver": approver, "public_key_pem": (tmp_path / "a.pub.pem").read_text()})
    layout = tmp_path / "layout"
    (layout / "files").mkdir(parents=True)
    base = f"/api/v1/releases/{model}/1.0.0/files"
    with controller.http(controller.token("operator")) as http:
        (layout / "release.json").write_bytes(http.get(f"{base}/release.json").content)
        (layout / "files" / "model.onnx").write_bytes(http.get(f"{base}/model.onnx").content)
    bundle = approval.sign_release(layout, tmp_path / "a.pem")
    with controller.http(controller.token("approver", approver)) as http:
        assert http.post(f"/api/v1/releases/{model}/1.0.0/approvals", content=bundle).status_code == 201
    deadline = time.monotonic() + 30
    while not main.sync(wait=5):
        assert time.monotonic() < deadline, "the approval never reached the desired state"
    approvals = main.document["releases"][0]["approvals"]
    assert [a["approver"] for a in approvals] == [approver]


def test_rollout_input_is_validated(controller: ControllerServer, fleet: dict[str, Any]) -> None:
    model = _unique("scorer")
    _release(controller, model, "1.0.0", b"validated " + model.encode())
    ok = {
        "name": _unique("v"),
        "releases": [{"name": model, "version": "1.0.0"}],
        "selector": {"region": fleet["region"]},
    }
    _rollout(controller, {**ok, "selector": {"region": "nowhere"}}, 422)
    _rollout(controller, {**ok, "canary": ["not-a-selected-site"]}, 422)
    _rollout(controller, {**ok, "releases": [{"name": model, "version": "9.9.9"}]}, 404)
    _rollout(controller, {**ok, "releases": []}, 400)
    _rollout(controller, {**ok, "canary": [fleet["canary"].name], "canary_percent": 10}, 400)
    _rollout(controller, ok)
    _rollout(controller, ok, 409)
