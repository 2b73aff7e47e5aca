"""Every state-changing route says what it changed: a walk over the access table.

For each state-changing route of `controller/access.py` the walk needs its line in `controller.changes.ROUTES`
and a scenario here that calls it successfully; then the route's entries in the controller's audit log must
carry a change record of a kind the table names, which names the resource (its identifying fields filled in,
the route's path parameters among them) and what changed. A new state-changing route without all three
fails this test.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from audit import Log
from audit.note import ALG_COSIGNATURE_V1, Signer, note_text, signature_lines
from controller import access, changes
from controller.app import MUTATING
from sitewarden import approval, revocation, sitejwt, witnessing
from sitewarden.keys import encode_public_key
from tests.controller.test_controller_api import _approve, _approver_key, _release, _unique, _upload
from tests.controller.test_controller_jobs import _app
from tests.controller_server import ControllerServer
from tests.sim_agent import SimulatedAgent

Route = tuple[str, str]
KINDS: dict[str, type[changes.Change]] = {}


def _all_changes(cls: type[changes.Change]) -> None:
    for sub in cls.__subclasses__():
        KINDS[sub.KIND] = sub
        _all_changes(sub)


_all_changes(changes.Change)


@dataclass
class Dashboard:
    """A signed-in dashboard session: its client (with the session cookie) and its CSRF token."""

    http: httpx.Client
    csrf: str

    def post(self, path: str, data: dict[str, Any] | None = None) -> tuple[httpx.Response, str]:
        rid = uuid.uuid4().hex
        form = {**(data or {}), "csrf_token": self.csrf}
        response = self.http.post(path, data=form, headers={"X-Request-ID": rid, "Accept": "text/html"})
        return response, rid


def sign_in(controller: ControllerServer, token: str, rid: str | None = None) -> tuple[Dashboard, httpx.Response]:
    http = controller.http()
    page = http.get("/ui/login", headers={"Accept": "text/html"})
    login_token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    form = {"token": token, "login_token": login_token, "next": "/ui/releases"}
    signed_in = http.post("/ui/login", data=form, headers={"X-Request-ID": rid or uuid.uuid4().hex})
    assert signed_in.status_code == 303, signed_in.text
    page = http.get("/ui/releases", headers={"Accept": "text/html"})
    csrf = re.search(r'"X-CSRF-Token": "([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    return Dashboard(http, csrf), signed_in


@dataclass
class World:
    controller: ControllerServer
    tmp: Path
    _dashboard: Dashboard | None = None

    @property
    def dashboard(self) -> Dashboard:
        """An admin's dashboard session (admins may do every dashboard action)."""
        if self._dashboard is None:
            self._dashboard = sign_in(self.controller, self.admin)[0]
        return self._dashboard

    def call(self, token: str | None, method: str, path: str, **kwargs: Any) -> tuple[httpx.Response, str]:
        rid = uuid.uuid4().hex
        with self.controller.http(token) as http:
            response = http.request(method, path, headers={"X-Request-ID": rid, **kwargs.pop("headers", {})}, **kwargs)
        return response, rid

    @property
    def admin(self) -> str:
        return self.controller.admin_token

    @property
    def operator(self) -> str:
        return self.controller.token("operator")

    def site(self, **labels: str) -> str:
        with self.controller.client(self.admin) as admin:
            return admin.post("/api/v1/sites", {"name": _unique("walk"), "labels": labels})["name"]

    def agent(self, **labels: str) -> SimulatedAgent:
        return SimulatedAgent.enroll(self.controller, _unique("walk"), labels, self.tmp)

    def release(self) -> dict[str, Any]:
        return _release(self.controller, self.operator, {"model.onnx": uuid.uuid4().bytes})

    def rollout(self, canary: bool = False) -> str:
        release, label = self.release(), _unique("l")
        first = self.site(walk=label)
        self.site(walk=label)
        body = {
            "name": _unique("ro"),
            "releases": [{"name": release["name"], "version": release["version"]}],
            "selector": {"walk": label},
            **({"canary": [first]} if canary else {}),
        }
        with self.controller.client(self.operator) as operator:
            return operator.post("/api/v1/rollouts", body)["name"]

    def app(self) -> dict[str, Any]:
        """An approved Flower App release, which every job names."""
        created = _app(self.controller)
        assert created.status_code == 201, created.text
        app = created.json()
        key = _approver_key(self.controller, self.tmp, approver := _unique("approver"))
        assert _approve(self.controller, self.tmp, app, key, self.controller.token("approver", approver)).is_success
        return app

    def job(self) -> tuple[dict[str, Any], list[SimulatedAgent]]:
        base = self.release()
        key = _approver_key(self.controller, self.tmp, approver := _unique("approver"))
        assert _approve(self.controller, self.tmp, base, key, self.controller.token("approver", approver)).is_success
        app = self.app()
        label = _unique("fl")
        agents = [self.agent(fl=label), self.agent(fl=label)]
        body = {
            "name": _unique("job"),
            "base": {"name": base["name"], "version": base["version"]},
            "app": {"name": app["name"], "version": app["version"]},
            "dataset": "transactions",
            "selector": {"fl": label},
            "rounds": 1,
            "min_sites": 2,
        }
        with self.controller.client(self.operator) as operator:
            return operator.post("/api/v1/jobs", body), agents


def _jwt(agent: SimulatedAgent) -> str:
    return agent.jwt()


# -- one scenario per state-changing route -----------------------------------------------------


def tokens_create(w: World) -> tuple[httpx.Response, str]:
    return w.call(w.admin, "POST", "/api/v1/tokens", json={"name": _unique("t"), "role": "auditor"})


def tokens_revoke(w: World) -> tuple[httpx.Response, str]:
    token = w.call(w.admin, "POST", "/api/v1/tokens", json={"name": _unique("t"), "role": "auditor"})[0].json()
    return w.call(w.admin, "POST", f"/api/v1/tokens/{token['id']}/revoke")


def sites_create(w: World) -> tuple[httpx.Response, str]:
    return w.call(w.admin, "POST", "/api/v1/sites", json={"name": _unique("walk"), "labels": {"region": "eu"}})


def sites_labels(w: World) -> tuple[httpx.Response, str]:
    return w.call(w.admin, "PUT", f"/api/v1/sites/{w.site(region='eu')}/labels", json={"labels": {"region": "us"}})


def sites_disable(w: World) -> tuple[httpx.Response, str]:
    return w.call(w.admin, "POST", f"/api/v1/sites/{w.site()}/disable")


def join_tokens(w: World) -> tuple[httpx.Response, str]:
    return w.call(w.admin, "POST", f"/api/v1/sites/{w.site()}/join-tokens", json={"ttl_seconds": 600})


def enroll(w: World) -> tuple[httpx.Response, str]:
    token = w.call(w.admin, "POST", f"/api/v1/sites/{w.site()}/join-tokens", json={"ttl_seconds": 600})[0].json()
    body = {"token": token["token"], "public_key": encode_public_key(Ed25519PrivateKey.generate())}
    return w.call(None, "POST", "/api/v1/enroll", json=body)


def rotate_key(w: World) -> tuple[httpx.Response, str]:
    agent = w.agent()
    new = Ed25519PrivateKey.generate()
    body = {"public_key": encode_public_key(new), "proof": sitejwt.sign(new, agent.site_id, w.controller.url)}
    return w.call(_jwt(agent), "POST", "/api/v1/agent/rotate-key", json=body)


def _approver_pem(w: World) -> str:
    directory = w.tmp / _unique("key")
    directory.mkdir()
    approval.generate_approver_key(directory / "a.pem", directory / "a.pub.pem")
    return (directory / "a.pub.pem").read_text()


def approvers_add(w: World) -> tuple[httpx.Response, str]:
    return w.call(
        w.admin, "POST", "/api/v1/approvers", json={"approver": _unique("ap"), "public_key_pem": _approver_pem(w)}
    )


def approvers_revoke(w: World) -> tuple[httpx.Response, str]:
    key = approvers_add(w)[0].json()
    return w.call(w.admin, "POST", f"/api/v1/approvers/{key['id']}/revoke")


def uploads_start(w: World) -> tuple[httpx.Response, str]:
    data = uuid.uuid4().bytes
    return w.call(w.operator, "POST", "/api/v1/uploads", json={"sha256": hashlib.sha256(data).hexdigest(), "size": 16})


def uploads_patch(w: World) -> tuple[httpx.Response, str]:
    data = uuid.uuid4().bytes * 4
    started = w.call(
        w.operator, "POST", "/api/v1/uploads", json={"sha256": hashlib.sha256(data).hexdigest(), "size": 64}
    )
    return w.call(
        w.operator, "PATCH", f"/api/v1/uploads/{started[0].json()['id']}", content=data, headers={"Upload-Offset": "0"}
    )


def releases_create(w: World) -> tuple[httpx.Response, str]:
    data = uuid.uuid4().bytes
    sha = _upload(w.controller, w.operator, data)
    body = {
        "name": _unique("model"),
        "version": "1.0.0",
        "kind": "model",
        "runtime": "onnx",
        "files": [{"path": "model.onnx", "sha256": sha, "size": len(data)}],
        "metadata": {"owner": "walk"},
    }
    return w.call(w.operator, "POST", "/api/v1/releases", json=body)


def approvals_add(w: World) -> tuple[httpx.Response, str]:
    release = w.release()
    key = _approver_key(w.controller, w.tmp, approver := _unique("approver"))
    layout = w.tmp / _unique("layout")
    (layout / "files").mkdir(parents=True)
    base = f"/api/v1/releases/{release['name']}/{release['version']}/files"
    with w.controller.http(w.operator) as http:
        (layout / "release.json").write_bytes(http.get(f"{base}/release.json").content)
        (layout / "files" / "model.onnx").write_bytes(http.get(f"{base}/model.onnx").content)
    bundle = approval.sign_release(layout, key)
    return w.call(
        w.controller.token("approver", approver),
        "POST",
        f"/api/v1/releases/{release['name']}/{release['version']}/approvals",
        content=bundle,
        headers={"content-type": "application/json"},
    )


def revocations_add(w: World) -> tuple[httpx.Response, str]:
    release = w.release()
    key = _approver_key(w.controller, w.tmp, approver := _unique("approver"))
    document = revocation.sign_revocation(
        approval.load_approver_key(key, None),
        name=release["name"],
        version=release["version"],
        manifest_sha256=release["manifest_sha256"],
        reason="the walk revokes it",
    )
    return w.call(
        w.controller.token("approver", approver),
        "POST",
        f"/api/v1/releases/{release['name']}/{release['version']}/revocations",
        content=document,
        headers={"content-type": "application/json"},
    )


def rollouts_create(w: World) -> tuple[httpx.Response, str]:
    release, label = w.release(), _unique("l")
    w.site(walk=label)
    body = {
        "name": _unique("ro"),
        "releases": [{"name": release["name"], "version": release["version"]}],
        "selector": {"walk": label},
    }
    return w.call(w.operator, "POST", "/api/v1/rollouts", json=body)


def rollouts_promote(w: World) -> tuple[httpx.Response, str]:
    return w.call(w.operator, "POST", f"/api/v1/rollouts/{w.rollout(canary=True)}/promote")


def rollouts_pause(w: World) -> tuple[httpx.Response, str]:
    return w.call(w.operator, "POST", f"/api/v1/rollouts/{w.rollout()}/pause")


def rollouts_resume(w: World) -> tuple[httpx.Response, str]:
    name = w.rollout()
    w.call(w.operator, "POST", f"/api/v1/rollouts/{name}/pause")
    return w.call(w.operator, "POST", f"/api/v1/rollouts/{name}/resume")


def rollouts_rollback(w: World) -> tuple[httpx.Response, str]:
    return w.call(w.operator, "POST", f"/api/v1/rollouts/{w.rollout()}/rollback")


def jobs_create(w: World) -> tuple[httpx.Response, str]:
    base = w.release()
    key = _approver_key(w.controller, w.tmp, approver := _unique("approver"))
    assert _approve(w.controller, w.tmp, base, key, w.controller.token("approver", approver)).is_success
    app = w.app()
    label = _unique("fl")
    w.agent(fl=label)
    body = {
        "name": _unique("job"),
        "base": {"name": base["name"], "version": base["version"]},
        "app": {"name": app["name"], "version": app["version"]},
        "dataset": "transactions",
        "selector": {"fl": label},
        "rounds": 1,
        "min_sites": 1,
    }
    response = w.call(w.operator, "POST", "/api/v1/jobs", json=body)
    w.call(w.operator, "POST", f"/api/v1/jobs/{body['name']}/cancel")  # it must not start a SuperLink here
    return response


def jobs_cancel(w: World) -> tuple[httpx.Response, str]:
    job, _ = w.job()
    return w.call(w.operator, "POST", f"/api/v1/jobs/{job['name']}/cancel")


def participation(w: World) -> tuple[httpx.Response, str]:
    job, agents = w.job()
    public = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    body = {"join": True, "supernode_public_key": public.decode(), "dataset_sha256": "ab" * 32, "examples": 10}
    response = w.call(_jwt(agents[0]), "POST", f"/api/v1/agent/jobs/{job['id']}/participation", json=body)
    w.call(w.operator, "POST", f"/api/v1/jobs/{job['name']}/cancel")  # the other site never answers
    return response


def status(w: World) -> tuple[httpx.Response, str]:
    agent = w.agent()
    body = {
        "desired_version": 0,
        "agent_version": "walk",
        "checkpoint_size": 0,
        "artifacts": [{"name": "m", "version": "1.0.0", "kind": "model", "state": "refused", "reason": "walk"}],
    }
    return w.call(_jwt(agent), "POST", "/api/v1/agent/status", json=body)


def add_checkpoint(w: World) -> tuple[httpx.Response, str]:
    agent = w.agent()
    with Log.open(w.tmp / _unique("site-log"), Signer.from_ed25519(f"sitewarden/{agent.site_id}", agent.key)) as log:
        log.append(b'{"walk":1}')
        log.checkpoint()
        sent = witnessing.submission(log, 0)
    return w.call(_jwt(agent), "POST", "/api/v1/witness/add-checkpoint", content=sent.body())


def audit_refusal(w: World) -> tuple[httpx.Response, str]:
    body = {"reason": "walk: the consistency proof fails", "cosigned_size": 3, "presented_size": 5}
    return w.call(_jwt(w.agent()), "POST", "/api/v1/agent/audit-refusals", json=body)


def audit_cosignature(w: World) -> tuple[httpx.Response, str]:
    agent = w.agent()
    with w.controller.http(w.controller.token("auditor")) as http:
        assert http.get("/api/v1/audit/export").status_code == 200  # a checkpoint signed now
        checkpoint = http.get("/api/v1/audit/checkpoint").text
    signer = Signer.from_ed25519(witnessing.site_witness_name(agent.site_id), agent.key, ALG_COSIGNATURE_V1)
    text = note_text(checkpoint)
    body = text + "\n" + signature_lines(text, signer)
    return w.call(_jwt(agent), "POST", "/api/v1/agent/audit-cosignatures", content=body.encode())


# -- the dashboard's state-changing routes: forms, with the session's CSRF token -----------------


def ui_login(w: World) -> tuple[httpx.Response, str]:
    rid = uuid.uuid4().hex
    return sign_in(w.controller, w.controller.token("auditor", _unique("reader")), rid)[1], rid


def ui_logout(w: World) -> tuple[httpx.Response, str]:
    session, _ = sign_in(w.controller, w.controller.token("auditor", _unique("reader")))
    return session.post("/ui/logout")


def ui_disable(w: World) -> tuple[httpx.Response, str]:
    return w.dashboard.post(f"/ui/sites/{w.site()}/disable")


def ui_rollout_create(w: World) -> tuple[httpx.Response, str]:
    release, label = w.release(), _unique("l")
    w.site(walk=label)
    form = {"name": _unique("ro"), "release": f"{release['name']}@{release['version']}", "selector": f"walk={label}"}
    return w.dashboard.post("/ui/rollouts", form)


def ui_rollout(action: str) -> Callable[[World], tuple[httpx.Response, str]]:
    def scenario(w: World) -> tuple[httpx.Response, str]:
        name = w.rollout(canary=action == "promote")
        if action == "resume":
            w.dashboard.post(f"/ui/rollouts/{name}/pause")
        return w.dashboard.post(f"/ui/rollouts/{name}/{action}")

    return scenario


def ui_job_cancel(w: World) -> tuple[httpx.Response, str]:
    job, _ = w.job()
    return w.dashboard.post(f"/ui/jobs/{job['name']}/cancel")


def ui_token_create(w: World) -> tuple[httpx.Response, str]:
    return w.dashboard.post("/ui/tokens", {"name": _unique("t"), "role": "auditor", "ttl_days": "30"})


def ui_token_revoke(w: World) -> tuple[httpx.Response, str]:
    token = w.call(w.admin, "POST", "/api/v1/tokens", json={"name": _unique("t"), "role": "auditor"})[0].json()
    return w.dashboard.post(f"/ui/tokens/{token['id']}/revoke")


def ui_approver_add(w: World) -> tuple[httpx.Response, str]:
    return w.dashboard.post("/ui/approvers", {"approver": _unique("ap"), "public_key_pem": _approver_pem(w)})


def ui_approver_revoke(w: World) -> tuple[httpx.Response, str]:
    key = approvers_add(w)[0].json()
    return w.dashboard.post(f"/ui/approvers/{key['id']}/revoke")


SCENARIOS: dict[Route, Callable[[World], tuple[httpx.Response, str]]] = {
    ("POST", "/api/v1/tokens"): tokens_create,
    ("POST", "/api/v1/tokens/{token_id}/revoke"): tokens_revoke,
    ("POST", "/api/v1/sites"): sites_create,
    ("PUT", "/api/v1/sites/{site}/labels"): sites_labels,
    ("POST", "/api/v1/sites/{site}/disable"): sites_disable,
    ("POST", "/api/v1/sites/{site}/join-tokens"): join_tokens,
    ("POST", "/api/v1/enroll"): enroll,
    ("POST", "/api/v1/agent/rotate-key"): rotate_key,
    ("POST", "/api/v1/approvers"): approvers_add,
    ("POST", "/api/v1/approvers/{key_id}/revoke"): approvers_revoke,
    ("POST", "/api/v1/uploads"): uploads_start,
    ("PATCH", "/api/v1/uploads/{upload_id}"): uploads_patch,
    ("POST", "/api/v1/releases"): releases_create,
    ("POST", "/api/v1/releases/{name}/{version}/approvals"): approvals_add,
    ("POST", "/api/v1/releases/{name}/{version}/revocations"): revocations_add,
    ("POST", "/api/v1/rollouts"): rollouts_create,
    ("POST", "/api/v1/rollouts/{rollout}/promote"): rollouts_promote,
    ("POST", "/api/v1/rollouts/{rollout}/pause"): rollouts_pause,
    ("POST", "/api/v1/rollouts/{rollout}/resume"): rollouts_resume,
    ("POST", "/api/v1/rollouts/{rollout}/rollback"): rollouts_rollback,
    ("POST", "/api/v1/jobs"): jobs_create,
    ("POST", "/api/v1/jobs/{job}/cancel"): jobs_cancel,
    ("POST", "/api/v1/agent/status"): status,
    ("POST", "/api/v1/agent/jobs/{job_id}/participation"): participation,
    ("POST", "/api/v1/witness/add-checkpoint"): add_checkpoint,
    ("POST", "/api/v1/agent/audit-refusals"): audit_refusal,
    ("POST", "/api/v1/agent/audit-cosignatures"): audit_cosignature,
    ("POST", "/ui/login"): ui_login,
    ("POST", "/ui/logout"): ui_logout,
    ("POST", "/ui/sites/{site}/disable"): ui_disable,
    ("POST", "/ui/rollouts"): ui_rollout_create,
    **{("POST", f"/ui/rollouts/{{rollout}}/{a}"): ui_rollout(a) for a in ("promote", "pause", "resume", "rollback")},
    ("POST", "/ui/jobs/{job}/cancel"): ui_job_cancel,
    ("POST", "/ui/tokens"): ui_token_create,
    ("POST", "/ui/tokens/{token_id}/revoke"): ui_token_revoke,
    ("POST", "/ui/approvers"): ui_approver_add,
    ("POST", "/ui/approvers/{key_id}/revoke"): ui_approver_revoke,
}


def _problems(route: Route, record: changes.RouteRecord, entries: list[dict[str, Any]]) -> list[str]:
    """What is wrong with a route's entries, given what its line in `changes.ROUTES` says it records."""
    mine = [e for e in entries if e["type"] != "change"]
    found = [e for e in entries if e["type"] == "change"]
    if isinstance(record, changes.Exempt):
        return [f"{route}: exempt, but it wrote {len(entries)} entries"] if entries else []
    out = [f"{route}: an entry of its own on success: {e}" for e in mine]
    wanted = [e for e in found if e["change"]["kind"] in record]
    if not wanted:
        return [
            *out,
            f"{route}: no change record of kind {sorted(record)} (found {[e['change']['kind'] for e in found]})",
        ]
    for entry in wanted:
        change = entry["change"]
        cls = KINDS[change["kind"]]
        named = [change.get(f) for f in cls.RESOURCE]
        if not all(isinstance(v, str) and v for v in named):
            out.append(f"{route}: {change['kind']} does not name its resource ({cls.RESOURCE}: {named})")
        if entry.get("resource") and not set(entry["resource"].values()) & {str(v) for v in named}:
            out.append(f"{route}: {change['kind']} names {named}, not the route's {entry['resource']}")
        what = {k: v for k, v in change.items() if k != "kind" and k not in cls.RESOURCE}
        if not any(v not in (None, "", [], {}) for v in what.values()):
            out.append(f"{route}: {change['kind']} says nothing of what changed: {change}")
        if entry["actor"] == "anonymous" and route != ("POST", "/api/v1/enroll"):
            out.append(f"{route}: {change['kind']} does not name who acted")
        if route[1].startswith("/ui/") and route[1] not in ("/ui/login", "/ui/logout"):
            twin = access.UI_SAME_AS[route]
            if entry.get("via") != "dashboard" or entry["action"] != f"{twin[0]} {twin[1]}":
                out.append(f"{route}: not recorded as its REST twin {twin} via the dashboard: {entry['action']}")
    return out


@pytest.mark.parametrize("controller", ["sqlite"], indirect=True)
def test_every_state_changing_route_records_what_it_changed(controller: ControllerServer, tmp_path: Path) -> None:
    world = World(controller, tmp_path)
    routes = sorted(r for r in access.RULES if r[0] in MUTATING)
    missing_record = [r for r in routes if changes.record_for(*r) is None]
    assert not missing_record, f"state-changing routes without a line in controller.changes.ROUTES: {missing_record}"
    missing_scenario = [r for r in routes if r not in SCENARIOS]
    assert not missing_scenario, f"state-changing routes without a scenario in this test: {missing_scenario}"
    assert not set(changes.ROUTES) - set(routes), "lines in controller.changes.ROUTES for routes that do not exist"
    calls = {}
    for route in routes:
        response, rid = SCENARIOS[route](world)
        done = response.is_success or (route[1].startswith("/ui") and response.status_code == 303)  # Post/Redirect/Get
        assert done, f"{route}: {response.status_code} {response.text[:2000]}"
        calls[route] = rid
    with Log.open(controller.data_dir / "audit", readonly=True) as log:
        entries = [json.loads(e) for e in log.iter_entries()]
    by_request: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_request.setdefault(entry.get("request_id", ""), []).append(entry)
    problems = []
    for route, rid in calls.items():
        record = changes.record_for(*route)
        assert record is not None
        problems += _problems(route, record, by_request.get(rid, []))
    assert not problems, "\n".join(problems)
