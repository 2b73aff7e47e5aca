"""Federated fine-tuning jobs at the controller: created only from an approved ONNX base and an approved
Flower App release (kind app) with enough enrolled sites, their privacy budget planned, listed, shown
and cancelled; on SQLite and PostgreSQL."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path

import httpx
import pytest

from federation import APP_DIR, fab
from federation.privacy import epsilon
from sitewarden.desired import DesiredState
from tests.controller.test_controller_api import _approve, _approver_key, _problem, _release, _unique, _upload
from tests.controller_server import ControllerServer, serve, sitewarden, start_controller
from tests.sim_agent import SimulatedAgent
from tests.tls import TestPKI


@pytest.fixture
def approved_base(controller: ControllerServer, tmp_path: Path) -> dict:
    release = _release(controller, controller.token("operator"), {"model.onnx": b"base weights"})
    key = _approver_key(controller, tmp_path, approver := _unique("approver"))
    assert _approve(controller, tmp_path, release, key, controller.token("approver", approver)).status_code == 201
    return release


@functools.cache
def _fab() -> bytes:
    return fab.build(APP_DIR)


def _app(controller: ControllerServer, files: dict[str, bytes] | None = None, kind: str = "app") -> httpx.Response:
    """POST an app release (the Flower App's FAB) as the operator; the raw answer."""
    token = controller.token("operator")
    files = {"fedapp.fab": _fab()} if files is None else files
    entries = [{"path": p, "sha256": _upload(controller, token, d), "size": len(d)} for p, d in files.items()]
    body = {"name": _unique("fedapp"), "version": "0.1.0", "kind": kind, "runtime": "flower", "files": entries}
    with controller.http(token) as http:
        return http.post("/api/v1/releases", json={**body, "metadata": {"owner": "fl-team"}})


@pytest.fixture
def approved_app(controller: ControllerServer, tmp_path: Path) -> dict:
    created = _app(controller)
    assert created.status_code == 201, created.text
    release = created.json()
    key = _approver_key(controller, tmp_path, approver := _unique("approver"))
    assert _approve(controller, tmp_path, release, key, controller.token("approver", approver)).status_code == 201
    return release


def _job(base: dict, label: str, app: dict | None = None, **changes: object) -> dict:
    body = {
        "name": _unique("job"),
        "base": {"name": base["name"], "version": base["version"]},
        "app": {"name": app["name"], "version": app["version"]} if app else {"name": "fedapp", "version": "0.1.0"},
        "dataset": "transactions",
        "selector": {"fl": label},
        "rounds": 3,
        "min_sites": 2,
        "differential_privacy": {"noise_multiplier": 1.1, "clipping_norm": 1.0, "delta": 1e-5},
        "secure_aggregation": True,
    }
    return {**body, **changes}


def test_a_job_is_created_with_its_sites_and_planned_epsilon(
    controller: ControllerServer, approved_base: dict, approved_app: dict, tmp_path: Path
) -> None:
    label = _unique("fl")
    sites = [SimulatedAgent.enroll(controller, _unique("site"), {"fl": label}, tmp_path) for _ in range(2)]
    with controller.http(controller.token("operator")) as http:
        created = http.post("/api/v1/jobs", json=_job(approved_base, label, approved_app))
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["state"] == "pending" and sorted(job["sites"]) == sorted(s.site_id for s in sites)
    assert job["epsilon_planned"] == pytest.approx(epsilon(1.1, 3, 1e-5))
    assert job["spec"]["differential_privacy"]["epsilon"] == job["epsilon_planned"]
    with controller.http(controller.token("auditor")) as http:
        assert http.get(f"/api/v1/jobs/{job['name']}").json()["id"] == job["id"]
        assert job["name"] in [j["name"] for j in http.get("/api/v1/jobs", params={"limit": 500}).json()["items"]]
    for site in sites:  # the job reaches each site through its desired state (a TUF target)
        assert site.sync()
        DesiredState.model_validate(site.document)
        [ref] = site.document["jobs"]
        assert ref["id"] == job["id"] and ref["differential_privacy"]["epsilon"] == job["epsilon_planned"]
        assert ref["secure_aggregation"] is True and ref["dataset"] == "transactions"
        # The app as a release reference: the site fetches its FAB and approval through TUF and checks both.
        app = ref["app"]
        assert (app["name"], app["kind"], app["runtime"]) == (approved_app["name"], "app", "flower")
        assert app["files"][0]["sha256"] == hashlib.sha256(_fab()).hexdigest()
        assert app["files"][0]["target"].startswith(f"releases/{approved_app['name']}/0.1.0/files/")
        assert len(app["approvals"]) == 1 and app["approvals"][0]["size"] > 0
    done = sitewarden("job", "cancel", job["name"], env=controller.cli_env(controller.token("operator")))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "cancelled"
    for site in sites:  # and is withdrawn when cancelled
        assert site.sync()
        assert "jobs" not in site.document
    with controller.http(controller.token("operator")) as http:
        _problem(http.post(f"/api/v1/jobs/{job['id']}/cancel"), 409)


def test_a_job_below_its_minimum_sites_is_refused_with_the_count(
    controller: ControllerServer, approved_base: dict, approved_app: dict, tmp_path: Path
) -> None:
    label = _unique("fl")
    SimulatedAgent.enroll(controller, _unique("site"), {"fl": label}, tmp_path)
    with controller.http(controller.token("operator")) as http:
        body = _problem(http.post("/api/v1/jobs", json=_job(approved_base, label, approved_app, min_sites=3)), 422)
    assert "at least 3 sites" in body["detail"] and "matches 1 enrolled" in body["detail"]


def test_a_job_needs_an_approved_flower_app(controller: ControllerServer, approved_base: dict, tmp_path: Path) -> None:
    label = _unique("fl")
    for _ in range(2):
        SimulatedAgent.enroll(controller, _unique("site"), {"fl": label}, tmp_path)
    unapproved = _app(controller).json()
    with controller.http(controller.token("operator")) as http:
        body = _problem(http.post("/api/v1/jobs", json=_job(approved_base, label, unapproved)), 422)
        assert "has no approval" in body["detail"] and "Flower App" in body["detail"]
        body = _problem(http.post("/api/v1/jobs", json=_job(approved_base, label, approved_base)), 422)
        assert "not a Flower App" in body["detail"]  # a model named as the app
        _problem(http.post("/api/v1/jobs", json=_job(approved_base, label, {"name": "nope", "version": "1.0.0"})), 404)
        missing = {k: v for k, v in _job(approved_base, label).items() if k != "app"}
        assert _problem(http.post("/api/v1/jobs", json=missing), 422)["errors"][0]["field"] == "app"


def test_an_app_release_is_exactly_one_flower_app_bundle(controller: ControllerServer) -> None:
    assert "not a Flower App Bundle" in _problem(_app(controller, {"fedapp.fab": b"PK not a zip"}), 422)["detail"]
    assert "exactly one .fab" in _problem(_app(controller, {"app.zip": _fab()}), 400)["detail"]
    two = {"a.fab": _fab(), "b.fab": _fab() + b"\0"}
    assert "exactly one .fab" in _problem(_app(controller, two), 400)["detail"]
    assert "runtime 'flower' is not valid for kind model" in _problem(_app(controller, kind="model"), 400)["detail"]


def test_a_job_needs_an_approved_onnx_base_and_sane_privacy_terms(controller: ControllerServer) -> None:
    unapproved = _release(controller, controller.token("operator"), {"model.onnx": b"not approved"})
    with controller.http(controller.token("operator")) as http:
        body = _problem(http.post("/api/v1/jobs", json=_job(unapproved, "none")), 422)
        assert "has no approval" in body["detail"]
        body = _problem(
            http.post("/api/v1/jobs", json=_job(unapproved, "none", differential_privacy={"noise_multiplier": -1})),
            422,
        )
        assert body["errors"][0]["field"].startswith("differential_privacy")
        _problem(http.post("/api/v1/jobs", json=_job(unapproved, "none", strategy="FedMagic")), 400)
    with controller.http(controller.token("auditor")) as http:
        _problem(http.post("/api/v1/jobs", json=_job(unapproved, "none")), 403)


def test_sites_answer_a_pending_job_and_a_job_nobody_joins_fails_with_their_reasons(
    controller: ControllerServer, approved_base: dict, approved_app: dict, tmp_path: Path
) -> None:
    label = _unique("fl")
    sites = [SimulatedAgent.enroll(controller, _unique("site"), {"fl": label}, tmp_path) for _ in range(2)]
    outsider = SimulatedAgent.enroll(controller, _unique("site"), {"fl": "other"}, tmp_path)
    with controller.http(controller.token("operator")) as http:
        job = http.post("/api/v1/jobs", json=_job(approved_base, label, approved_app)).json()
    path = f"/api/v1/agent/jobs/{job['id']}/participation"
    digest = "ab" * 32
    with controller.http(sites[0].jwt()) as http:  # joining needs a SuperNode key (ECDSA, OpenSSH) and a digest
        body = _problem(http.post(path, json={"join": True, "dataset_sha256": digest}), 422)
        assert "supernode_public_key" in body["detail"]
    rsa_line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    with controller.http(sites[0].jwt()) as http:
        body = _problem(
            http.post(path, json={"join": True, "dataset_sha256": digest, "supernode_public_key": rsa_line}), 422
        )
        assert "ECDSA" in body["detail"]
    with controller.http(sites[0].jwt()) as http:
        _problem(http.post(path, json={"join": True, "dataset_sha256": "not hex"}), 422)
    with controller.http(outsider.jwt()) as http:  # a site the job did not select
        _problem(http.post(path, json={"join": False, "reasons": ["no"]}), 404)
    with controller.http(controller.token("operator")) as http:  # people do not answer for sites
        _problem(http.post(path, json={"join": False}), 403)
    for site in sites:
        with controller.http(site.jwt()) as http:
            answered = http.post(path, json={"join": False, "reasons": [f"{site.name}: not this quarter"]})
        assert answered.status_code == 200, answered.text
    with controller.http(controller.token("auditor")) as http:
        for _ in range(100):
            done = http.get(f"/api/v1/jobs/{job['id']}").json()
            if done["state"] != "pending":
                break
            time.sleep(0.1)
    assert done["state"] == "failed"
    assert done["reason"].startswith("0 of the 2 selected sites joined; the job needs at least 2")
    assert all(f"{s.name} declined: {s.name}: not this quarter" in done["reason"] for s in sites)
    assert done["declined"] == {s.site_id: [f"{s.name}: not this quarter"] for s in sites}
    with controller.http(sites[0].jwt()) as http:  # too late now
        _problem(http.post(path, json={"join": False}), 409)


def test_a_pending_job_survives_a_controller_restart(tmp_path: Path, pki: TestPKI) -> None:
    first = start_controller(tmp_path / "one", pki)
    try:
        release = _release(first, first.token("operator"), {"model.onnx": b"base weights"})
        key = _approver_key(first, tmp_path, approver := _unique("approver"))
        assert _approve(first, tmp_path, release, key, first.token("approver", approver)).status_code == 201
        label = _unique("fl")
        sites = [SimulatedAgent.enroll(first, _unique("site"), {"fl": label}, tmp_path) for _ in range(2)]
        app = _app(first).json()
        app_key = _approver_key(first, tmp_path, app_approver := _unique("approver"))
        assert _approve(first, tmp_path, app, app_key, first.token("approver", app_approver)).status_code == 201
        with first.http(first.token("operator")) as http:
            job = http.post("/api/v1/jobs", json=_job(release, label, app)).json()
        operator = first.token("operator")
    finally:
        first.stop()
    port = int(first.url.rsplit(":", 1)[1])
    second = serve(first.data_dir, pki, port, first.admin_token, "sqlite", ["--fleet-port", str(first.fleet_port)])
    try:
        with second.http(operator) as http:
            again = http.get(f"/api/v1/jobs/{job['id']}").json()
            assert again["state"] == "pending" and again["sites"] == job["sites"]
            assert http.post(f"/api/v1/jobs/{job['id']}/cancel").json()["state"] == "cancelled"
        assert sites[0].sync()
        assert "jobs" not in sites[0].document
    finally:
        second.stop()
