"""A hostile controller against a real site: the agent writes nothing it did not check, where it did not mean to.

A real controller (`sitewarden controller serve`) and a real agent (`sitewarden agent run`) on
loopback, the agent reaching the controller through `Network`. First the controller is honest
and the site's own disk is not: a link planted in `releases/` and a changed byte in the active
model. Then an approver revokes the release a site runs, and an operator pushes a release
crafted to flood the hash bin of the site's desired state. Last, the attacker takes the
controller's host: a server that holds its online TUF keys and its blobs answers the agent in
its place, and signs desired states that carry traversal and absolute paths, fingerprints and
job ids that are paths, another release's bytes, a replayed approval, a revoked release (with
and without its revocation), and a bin flooded past python-tuf's limits.

Each is refused, named in the agent's status and audited; the site's files outside its
staging area are byte for byte what they were; and the site keeps serving its last-known-good
release.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import shutil
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import rfc8785
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from tuf.api.metadata import Metadata, Targets

from audit import Log
from controller import tuf_repo
from controller.blobs import BlobStore
from controller.client import ApiError
from controller.tuf_repo import TargetSpec, TufRepository
from sitewarden import approval
from sitewarden.desired import approval_target, revocation_target, target_path
from sitewarden.fraud_model import build_release, sample_features
from tests.agent_harness import BANK_PACK, POLICY, AgentProcess, Network, enroll_agent, push_policy, wait_for
from tests.controller_server import ControllerServer, free_port, sitewarden, start_controller
from tests.tls import TestPKI

MODEL = "fraud-scorer"
ROWS = sample_features(2, seed=5).tolist()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("hostile-controller")
    network = Network(pki)
    controller = start_controller(base, pki, public_url=network.url)
    network.start(controller.url)
    keys = base / "approvers"
    approval.generate_approver_key(keys / "alice.pem", keys / "alice.pub.pem")
    added = sitewarden(
        "approver", "add", "alice", "--public-key", str(keys / "alice.pub.pem"), env=controller.cli_env()
    )
    assert added.returncode == 0, added.stderr
    tokens = {"operator": controller.token("operator", "bob"), "alice": controller.token("approver", "alice")}
    agent = enroll_agent(controller, base, "branch-h", {"region": "eu-west"}, {"alice": keys / "alice.pub.pem"})
    world = {"base": base, "controller": controller, "network": network, "keys": keys, "tokens": tokens}
    world["agent"] = agent
    try:
        key = keys / "alice.pem"
        push_policy(
            controller, BANK_PACK, "1.0.0", operator=tokens["operator"], approver=tokens["alice"], approver_key=key
        )
        for version, seed in (("1.0.0", 7), ("1.1.0", 8)):
            push(world, version, seed)
        agent.start()
        rollout(world, "v1", "1.0.0")
        wait_for(lambda: agent.active() == (MODEL, "1.0.0"), what="the site to run 1.0.0")
        yield world
    finally:
        agent.stop()
        network.cut()
        network.stop()
        if "attacker" in world:
            world["attacker"].stop()
        controller.stop()


def push(world: dict[str, Any], version: str, seed: int) -> None:
    directory = world["base"] / f"release-{version}"
    card = build_release(directory, seed=seed, n_samples=2000, version_note=version)
    env = world["controller"].cli_env(world["tokens"]["operator"])
    args = ["release", "push", str(directory), "--name", MODEL, "--version", version, "--metadata", str(card)]
    done = sitewarden(*args, env=env)
    assert done.returncode == 0, done.stderr
    env = world["controller"].cli_env(world["tokens"]["alice"])
    done = sitewarden("release", "approve", MODEL, version, "--key", str(world["keys"] / "alice.pem"), env=env)
    assert done.returncode == 0, done.stderr


def rollout(world: dict[str, Any], name: str, version: str) -> Any:
    args = ["rollout", "create", name, "--release", f"{MODEL}@{version}", "--policy", f"{POLICY}@1.0.0"]
    return sitewarden(
        *args, "--selector", "region=eu-west", env=world["controller"].cli_env(world["tokens"]["operator"])
    )


def entries(agent: AgentProcess) -> list[dict[str, Any]]:
    with Log.open(agent.data / "audit", readonly=True) as log:
        return [json.loads(e) for e in log.iter_entries()]


def serves_last_good(agent: AgentProcess, version: str = "1.0.0") -> None:
    assert agent.active() == (MODEL, version)
    response = agent.infer(MODEL, ROWS)
    assert response.status_code == 200 and response.json()["model_version"] == version, response.text


def snapshot(world: dict[str, Any]) -> dict[str, str]:
    """Every file and link the site holds outside what sync may change (its staging area, state.json,
    TUF metadata, the audit log), and the trust anchors and a directory outside the site: path -> digest."""
    agent: AgentProcess = world["agent"]
    # What the agent itself keeps changing: its audit log, TUF metadata, state, witnessing and status.
    changing = {"audit", "tuf", "state.json", "witness.json", "controller-witness.json", "status.json"}
    roots = [agent.data.parent, world["keys"], world["base"] / "outside"]
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(agent.data) if path.is_relative_to(agent.data) else None
            if relative is not None and relative.parts and relative.parts[0] in changing:
                continue
            if any(path.name.startswith(f".{name}.") for name in changing):
                continue  # one of those being written (the temporary file of sitewarden.files.write_atomically)
            if path.suffix == ".log":
                continue
            if path.is_symlink():
                found[str(path)] = f"link -> {path.readlink()}"
            elif path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[str(path)] = "dir"
    return found


# -- the site's own disk ------------------------------------------------------------------------


def test_a_link_planted_in_releases_is_moved_aside_never_followed(world: dict[str, Any]) -> None:
    agent: AgentProcess = world["agent"]
    outside = world["base"] / "outside"
    outside.mkdir()
    planted = agent.data / "releases" / MODEL / "1.1.0"
    planted.symlink_to(outside, target_is_directory=True)
    assert rollout(world, "v11", "1.1.0").returncode == 0
    wait_for(lambda: agent.active() == (MODEL, "1.1.0"), what="the site to run 1.1.0")
    assert list(outside.iterdir()) == [], "nothing was written through the link"
    assert planted.is_dir() and not planted.is_symlink()
    moved = [e for e in entries(agent) if e["type"] == "release.integrity"]
    assert moved and "symbolic link" in moved[-1]["reason"]


def test_a_changed_byte_in_the_active_model_is_caught_at_restart_and_fetched_again(world: dict[str, Any]) -> None:
    agent: AgentProcess = world["agent"]
    model = agent.data / "releases" / MODEL / "1.1.0" / "files" / "model.onnx"
    approved = hashlib.sha256(model.read_bytes()).hexdigest()
    agent.stop()
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte: enough to flip decisions, the issue measured
    model.write_bytes(bytes(data))
    agent.start()
    wait_for(lambda: agent.active() == (MODEL, "1.1.0"), what="the site to fetch 1.1.0 again and serve it")
    assert hashlib.sha256(model.read_bytes()).hexdigest() == approved
    caught = [e for e in entries(agent) if e["type"] == "release.integrity" and "changed on disk" in e["reason"]]
    assert caught and caught[-1]["release"]["version"] == "1.1.0"
    assert "model.onnx" in caught[-1]["reason"] and approved in caught[-1]["reason"]
    quarantined = agent.data / "releases" / f".quarantine-{MODEL}-1.1.0" / "files" / "model.onnx"
    assert quarantined.read_bytes() == bytes(data), "the changed bytes are kept for inspection"
    after = entries(agent)[entries(agent).index(caught[-1]) :]
    fallback = next(e for e in after if e["type"] == "activation")
    assert fallback["release"]["version"] == "1.0.0" and fallback["reason"] == "restart"
    serves_last_good(agent, "1.1.0")


# -- revocation ---------------------------------------------------------------------------------


def test_a_revoked_release_is_refused_and_the_site_falls_back_audited_at_both_ends(world: dict[str, Any]) -> None:
    agent: AgentProcess = world["agent"]
    controller: ControllerServer = world["controller"]
    env = controller.cli_env(world["tokens"]["alice"])
    revoke = ["release", "revoke", MODEL, "1.1.0", "--key", str(world["keys"] / "alice.pem")]
    done = sitewarden(*revoke, "--reason", "drift on card-not-present fraud", env=env)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: agent.active() == (MODEL, "1.0.0"), what="the site to fall back from the revoked release")
    serves_last_good(agent)
    revoked = [e for e in entries(agent) if e["type"] == "release.revoked"]
    assert revoked and revoked[-1]["revocation"]["approver"] == "alice"
    assert revoked[-1]["revocation"]["reason"] == "drift on card-not-present fraud"
    fell_back = [e for e in entries(agent) if e["type"] == "activation" and "revoked by alice" in e.get("reason", "")]
    assert fell_back and fell_back[-1]["previous"] == {"name": MODEL, "version": "1.1.0"}
    wait_for(
        lambda: "revoked by alice" in agent.status()["artifacts"].get(f"{MODEL}@1.1.0", {}).get("reason", ""),
        what="the rollout's release to show as refused",
    )
    # The controller: the revocation is a change record of its audit trail, the release lists it, a new rollout
    # of it is refused.
    with Log.open(controller.data_dir / "audit", readonly=True) as log:
        actions = [json.loads(e) for e in log.iter_entries()]
    recorded = [a for a in actions if a.get("type") == "change" and a["change"]["kind"] == "release.revoked"]
    assert recorded and recorded[-1]["action"] == "POST /api/v1/releases/{name}/{version}/revocations"
    assert recorded[-1]["actor"] == "alice" and recorded[-1]["change"]["reason"] == "drift on card-not-present fraud"
    with controller.client(controller.admin_token) as admin:
        shown = admin.get(f"/api/v1/releases/{MODEL}/1.1.0")
        status = admin.get("/api/v1/rollouts/v11")
    assert shown["revocations"][0]["approver"] == "alice"
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and "revoked" in degraded["message"]
    refused = rollout(world, "again", "1.1.0")
    assert refused.returncode == 1 and "revoked" in refused.stderr
    # Rolling back to the older approved, unrevoked release works.
    before = agent.status()["desired_version"]
    done = sitewarden("rollout", "rollback", "v11", env=controller.cli_env(world["tokens"]["operator"]))
    assert done.returncode == 0, done.stderr
    wait_for(lambda: agent.status()["desired_version"] > before, what="the rollback to reach the site")
    wait_for(lambda: agent.status()["artifacts"].get(f"{MODEL}@1.0.0", {}).get("state") == "active", what="1.0.0")
    serves_last_good(agent)


# -- metadata limits ----------------------------------------------------------------------------


def test_a_release_crafted_to_flood_the_sites_bin_is_refused_and_the_site_keeps_syncing(world: dict[str, Any]) -> None:
    agent: AgentProcess = world["agent"]
    controller: ControllerServer = world["controller"]
    metadata = controller.data_dir / "tuf" / "metadata"
    newest = max((p for p in metadata.glob("*.targets.json")), key=lambda p: int(p.name.split(".")[0]))
    bins = Metadata[Targets].from_file(str(newest)).signed.delegations.succinct_roles
    site_bin = bins.get_role_for_target(target_path(agent.site_id))
    paths, i = [], 0
    while len(paths) < 1300:
        path = f"{i:080d}"
        if bins.get_role_for_target(f"releases/flood/1.0.0/files/{path}") == site_bin:
            paths.append(path)
        i += 1
    one = b"\x00"
    sha = hashlib.sha256(one).hexdigest()
    with controller.client(world["tokens"]["operator"]) as operator:
        upload = operator.post("/api/v1/uploads", {"sha256": sha, "size": 1})
        if upload["id"]:
            operator.request("PATCH", f"/api/v1/uploads/{upload['id']}", content=one, headers={"Upload-Offset": "0"})
        files = [{"path": p, "sha256": sha, "size": 1} for p in paths]
        body = {"name": "flood", "version": "1.0.0", "kind": "model", "runtime": "onnx", "files": files}
        body["metadata"] = {"owner": "mallory"}
        with pytest.raises(ApiError) as refused:
            operator.post("/api/v1/releases", body)
        assert refused.value.status == 413 and site_bin in str(refused.value)
        with pytest.raises(ApiError) as missing:
            operator.get("/api/v1/releases/flood/1.0.0")
        assert missing.value.status == 404, "nothing of the release was kept"
    before = agent.status()["desired_version"]
    assert rollout(world, "after-flood", "1.0.0").returncode == 0
    wait_for(lambda: agent.status()["desired_version"] > before, what="the site to refresh its desired state")
    serves_last_good(agent)


# -- the controller's host in an attacker's hands -----------------------------------------------


class HostileController:
    """The controller's host, taken: its online TUF keys and blobs, and a server that answers agents."""

    def __init__(self, controller: ControllerServer, pki: TestPKI, workdir: Path, site_id: str) -> None:
        shutil.copytree(controller.data_dir / "tuf", workdir / "tuf")  # the repository as agents last saw it
        self.repo = TufRepository.open(workdir / "tuf", controller.data_dir / "keys")
        self.blobs = BlobStore(controller.data_dir / "blobs")
        self.site_id = site_id
        with controller.client(controller.admin_token) as admin:
            self.honest = admin.get(f"/api/v1/sites/{site_id}/desired")["document"]
        self.version = self.honest["version"]
        self.reports: list[dict[str, Any]] = []
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        app = Starlette(
            routes=[
                Route("/api/v1/agent/desired", self._desired),
                Route("/api/v1/agent/status", self._status, methods=["POST"]),
                Route("/api/v1/witness/add-checkpoint", self._nothing, methods=["POST"]),
                Route("/tuf/metadata/{name}", self._metadata),
                Route("/tuf/targets/{path:path}", self._target),
            ]
        )
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, ssl_certfile=str(pki.server_cert), ssl_keyfile=str(pki.server_key)
        )
        config.log_level = "warning"
        config.timeout_graceful_shutdown = 1
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self._thread.start()
        verify = ssl.create_default_context(cafile=str(pki.ca_cert))
        wait_for(lambda: self._answers(verify), 30, "the attacker's server")

    def _answers(self, verify: ssl.SSLContext) -> bool:
        try:
            return httpx.get(f"{self.url}/tuf/metadata/timestamp.json", verify=verify, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    async def _serve(self) -> None:
        self._loop, self._changed = asyncio.get_running_loop(), asyncio.Event()
        await self._server.serve()

    async def _desired(self, request: Request) -> Response:
        after = int(request.query_params.get("after", "0"))
        if self.version <= after:
            assert self._changed is not None
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                wait = min(int(request.query_params.get("wait", "30")), 30)
                await asyncio.wait_for(self._changed.wait(), wait)
        pointer = {"version": self.version, "target": target_path(self.site_id), "sha256": None}
        return JSONResponse({**pointer, "changed": self.version > after})

    async def _status(self, request: Request) -> Response:
        self.reports.append(json.loads(await request.body()))
        return Response(status_code=204)

    async def _nothing(self, request: Request) -> Response:
        return Response(b"the witness is not here", status_code=503)

    async def _metadata(self, request: Request) -> Response:
        path = self.repo.metadata_file(request.path_params["name"])
        return FileResponse(path) if path is not None else Response(status_code=404)

    async def _target(self, request: Request) -> Response:
        sha256 = self.repo.resolve_target(request.path_params["path"])
        if sha256 is None or not self.blobs.exists(sha256):
            return Response(status_code=404)
        return FileResponse(self.blobs.path(sha256))

    def document(self) -> dict[str, Any]:
        """The honest document, as a starting point for the next hostile version."""
        return copy.deepcopy(self.honest)

    def publish(self, document: dict[str, Any], extra: dict[str, bytes] | None = None) -> int:
        """Sign `document` as the site's next desired state (with the online key) and announce it."""
        self.version += 1
        document = {**document, "version": self.version}
        data = rfc8785.dumps(document)
        targets = {target_path(self.site_id): TargetSpec.for_bytes(data)}
        self.blobs.put_bytes(data)
        for path, content in (extra or {}).items():
            self.blobs.put_bytes(content)
            targets[path] = TargetSpec.for_bytes(content)
        self.repo.add_targets(targets)
        assert self._loop is not None and self._changed is not None
        self._loop.call_soon_threadsafe(self._changed.set)
        return self.version

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def attacker(world: dict[str, Any], pki: TestPKI) -> HostileController:
    hostile = HostileController(world["controller"], pki, world["base"] / "hostile", world["agent"].site_id)
    world["attacker"] = hostile
    world["network"].upstream = hostile.url  # from here on the site talks to the attacker
    world["network"].cut()  # the long poll parked at the honest controller ends
    return hostile


def _digest(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _release(document: dict[str, Any], version: str) -> dict[str, Any]:
    return next(r for r in document["releases"] if r["version"] == version)


def _set(path: str, value: Any) -> Callable[[HostileController], dict[str, Any]]:
    def change(hostile: HostileController) -> dict[str, Any]:
        document = hostile.document()
        *parents, last = path.split(".")
        node: Any = document
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value
        return document

    return change


def _another_releases_bytes(hostile: HostileController) -> dict[str, Any]:
    document = hostile.document()
    ref = document["releases"][0]
    ref["files"][0]["target"] = "releases/bank-policy/1.0.0/release.json"
    return document


def _job(job_id: str) -> Callable[[HostileController], dict[str, Any]]:
    def change(hostile: HostileController) -> dict[str, Any]:
        document = hostile.document()
        document["jobs"] = [
            {
                "id": job_id,
                "name": "exfiltrate",
                "base": {"name": MODEL, "version": "1.0.0"},
                "model_family": "tabular-logreg",
                "dataset": "transactions",
                "rounds": 1,
                "min_sites": 1,
                "strategy": "FedAvg",
                "differential_privacy": {"enabled": False},
                "secure_aggregation": False,
            }
        ]
        return document

    return change


HOSTILE_DOCUMENTS: dict[str, tuple[Callable[[HostileController], dict[str, Any]], str]] = {
    "traversal file path": (_set("releases.0.files.0.path", "../../keys/site.pem"), "releases.0.files.0.path"),
    "absolute file path": (_set("releases.0.files.0.path", "/tmp/sitewarden-pwned"), "releases.0.files.0.path"),
    "fingerprint that is a path": (
        _set("releases.0.approvals.0.key_fingerprint", "../../../approvers/alice.pub"),
        "key fingerprint",
    ),
    "job id that is a path": (_job("../../../keys"), "job id"),
    "another release's bytes": (_another_releases_bytes, "is not releases/fraud-scorer"),
}


@pytest.mark.parametrize("case", list(HOSTILE_DOCUMENTS))
def test_a_hostile_desired_state_is_refused_audited_and_writes_nothing(
    world: dict[str, Any], attacker: HostileController, case: str
) -> None:
    agent: AgentProcess = world["agent"]
    make, said = HOSTILE_DOCUMENTS[case]
    before = snapshot(world)
    version = attacker.publish(make(attacker))
    wait_for(lambda: agent.status()["desired_version"] >= version, what=f"the site to handle {case}")
    refusal = agent.status()["artifacts"]["desired-state"]
    assert refusal["state"] == "refused" and "malformed" in refusal["reason"] and said in refusal["reason"]
    audited = [e for e in entries(agent) if e["type"] == "sync.refused" and e["desired_version"] == version]
    assert audited and said in audited[0]["reason"]
    assert snapshot(world) == before, "the site's files changed"
    assert not Path("/tmp/sitewarden-pwned").exists()
    serves_last_good(agent)


def test_a_replayed_approval_is_refused_before_anything_is_written(
    world: dict[str, Any], attacker: HostileController
) -> None:
    """A release 6.6.6 the attacker made, carrying alice's approval of 1.0.0: valid names and paths all
    through, so only the approval check stands between it and the disk, and it comes first."""
    agent: AgentProcess = world["agent"]
    genuine = _release(attacker.document(), "1.0.0")
    prefix = f"releases/{MODEL}/6.6.6"
    manifest = json.loads(attacker.blobs.path(genuine["manifest"]["sha256"]).read_bytes())
    weights = b"\x08\x07" + b"attacker's model" * 64
    manifest.update(version="6.6.6", files=[{"path": "model.onnx", **_digest(weights)}])
    manifest_bytes = rfc8785.dumps(manifest)
    stolen = genuine["approvals"][0]
    bundle = attacker.blobs.path(stolen["sha256"]).read_bytes()
    ref = {
        "name": MODEL,
        "version": "6.6.6",
        "kind": "model",
        "runtime": "onnx",
        "manifest": {"target": f"{prefix}/release.json", **_digest(manifest_bytes)},
        "files": [{"target": f"{prefix}/files/model.onnx", "path": "model.onnx", **_digest(weights)}],
        "approvals": [
            {
                "target": approval_target(MODEL, "6.6.6", stolen["key_fingerprint"]),
                **_digest(bundle),
                "approver": "alice",
                "key_fingerprint": stolen["key_fingerprint"],
            }
        ],
    }
    document = attacker.document()
    document["releases"] = [ref]
    before = snapshot(world)
    version = attacker.publish(
        document,
        {
            f"{prefix}/release.json": manifest_bytes,
            f"{prefix}/files/model.onnx": weights,
            approval_target(MODEL, "6.6.6", stolen["key_fingerprint"]): bundle,
        },
    )
    wait_for(lambda: agent.status()["desired_version"] >= version, what="the site to handle the replayed approval")
    state = agent.status()["artifacts"][f"{MODEL}@6.6.6"]
    assert state["state"] == "refused" and "no approval by an approver this site trusts" in state["reason"]
    assert any(e["type"] == "release.refused" and e["release"] == f"{MODEL}@6.6.6" for e in entries(agent))
    assert snapshot(world) == before
    assert not (agent.data / "releases" / MODEL / "6.6.6").exists()
    assert not [p for p in (agent.data / "releases").iterdir() if p.name.startswith(".staging-")]
    serves_last_good(agent)


@pytest.mark.parametrize("hide", [False, True], ids=["revocation published", "revocation withdrawn"])
def test_a_revoked_release_named_by_a_hostile_desired_state_is_refused(
    world: dict[str, Any], attacker: HostileController, hide: bool
) -> None:
    agent: AgentProcess = world["agent"]
    alice = approval.key_fingerprint((world["keys"] / "alice.pub.pem").read_bytes())
    honest_revocation = revocation_target(MODEL, "1.1.0", alice)
    if hide:  # the attacker withdraws the revocation: the site remembers it
        attacker.repo.remove_targets([honest_revocation])
    with world["controller"].client(world["controller"].admin_token) as admin:
        release = admin.get(f"/api/v1/releases/{MODEL}/1.1.0")
    document = attacker.document()
    ref = copy.deepcopy(_release(document, "1.0.0"))
    ref["version"] = "1.1.0"
    prefix = f"releases/{MODEL}/1.1.0"
    manifest_size = attacker.blobs.path(release["manifest_sha256"]).stat().st_size
    ref["manifest"] = {"target": f"{prefix}/release.json", "sha256": release["manifest_sha256"], "size": manifest_size}
    ref["files"] = [{"target": f"{prefix}/files/{f['path']}", **f} for f in release["files"]]
    ref["approvals"] = [
        {
            "target": approval_target(MODEL, "1.1.0", a["key_fingerprint"]),
            "sha256": a["bundle_sha256"],
            "size": attacker.blobs.path(a["bundle_sha256"]).stat().st_size,
            "approver": a["approver"],
            "key_fingerprint": a["key_fingerprint"],
        }
        for a in release["approvals"]
    ]
    ref.pop("revocations", None)
    document["releases"] = [ref]
    before, seen = snapshot(world), len(entries(agent))
    version = attacker.publish(document)
    wait_for(lambda: agent.status()["desired_version"] >= version, what="the site to handle the revoked release")
    state = agent.status()["artifacts"][f"{MODEL}@1.1.0"]
    assert state["state"] == "refused" and "revoked by alice" in state["reason"]
    assert any(
        e["type"] == "release.refused" and e["release"] == f"{MODEL}@1.1.0" and "revoked" in e["reason"]
        for e in entries(agent)[seen:]
    )
    assert snapshot(world) == before
    serves_last_good(agent)


def test_a_bin_flooded_past_python_tufs_limits_is_refused_and_the_site_keeps_serving(
    world: dict[str, Any], attacker: HostileController, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attacker signs what the honest controller refuses to: the site's bin over 5 MB. python-tuf's
    client refuses the bin by its default length limit before parsing it; the site keeps serving."""
    agent: AgentProcess = world["agent"]
    monkeypatch.setattr(tuf_repo, "MAX_BIN_BYTES", 1 << 30)  # the attacker's tooling has no limits
    monkeypatch.setattr(tuf_repo, "MAX_PUBLICATION_BIN_BYTES", 1 << 30)
    site_bin = attacker.repo.bin_for(target_path(agent.site_id))
    spec = TargetSpec.for_bytes(b"\x00")
    flood, i = {}, 0
    while len(flood) < 5_500:  # about 1 KB of metadata each: past python-tuf's 5,000,000 bytes
        path = f"releases/flood/9.9.9/files/{i:0900d}"
        if attacker.repo.bin_for(path) == site_bin:
            flood[path] = spec
        i += 1
    attacker.blobs.put_bytes(b"\x00")
    attacker.repo.add_targets(flood)
    before = snapshot(world)
    attacker.publish(attacker.document())
    wait_for(
        lambda: "DownloadLengthMismatch" in json.dumps(agent.status()["artifacts"]),
        what="the site to refuse the flooded bin",
    )
    assert any(e["type"] == "sync.refused" and "DownloadLengthMismatch" in e["reason"] for e in entries(agent))
    assert snapshot(world) == before
    serves_last_good(agent)
