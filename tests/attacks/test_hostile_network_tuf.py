"""A hostile network against the controller's TUF repository and desired states.

A real controller process (HTTPS on loopback) with two enrolled sites: `branch` has a desired
state that names a release, `intruder` is enrolled too but its desired state names nothing of
it. The attacker tries, with no credential, with the other site's JWT, with a replayed,
expired, forged or misaddressed JWT, and with people's tokens of roles that may not read a
target: metadata, targets and desired states are 401 without credentials, another site's
desired state and a release not named for the caller are 404, and the legitimate site,
through python-tuf's client and the project's fetcher, still gets everything it needs.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tuf.api import exceptions as tuf_errors

from sitewarden import sitejwt, tufclient
from tests.controller_server import ControllerServer, start_controller
from tests.sim_agent import SimulatedAgent
from tests.tls import TestPKI

WEIGHTS = b"model weights fine-tuned on regulated data " * 64


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[ControllerServer]:
    started = start_controller(tmp_path_factory.mktemp("hostile-network"), pki)
    yield started
    started.stop()


def _release(controller: ControllerServer, name: str) -> dict[str, Any]:
    token = controller.token("operator")
    sha = hashlib.sha256(WEIGHTS + name.encode()).hexdigest()
    payload = WEIGHTS + name.encode()
    with controller.http(token) as http:
        info = http.post("/api/v1/uploads", json={"sha256": sha, "size": len(payload)}).json()
        if not info["complete"]:
            http.patch(f"/api/v1/uploads/{info['id']}", content=payload, headers={"Upload-Offset": "0"})
        created = http.post(
            "/api/v1/releases",
            json={
                "name": name,
                "version": "1.0.0",
                "kind": "model",
                "runtime": "onnx",
                "files": [{"path": "model.onnx", "sha256": sha, "size": len(payload)}],
                "metadata": {"owner": "attack-test", "intended_purposes": ["fraud"]},
            },
        )
        assert created.status_code == 201, created.text
    return {"name": name, "sha256": sha, "url": f"/tuf/targets/releases/{name}/1.0.0/files/{sha}.model.onnx"}


@pytest.fixture(scope="module")
def world(controller: ControllerServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("sites")
    region = f"r-{uuid.uuid4().hex[:6]}"
    branch = SimulatedAgent.enroll(controller, f"branch-{region}", {"region": region}, work)
    intruder = SimulatedAgent.enroll(controller, f"intruder-{region}", {"region": "elsewhere"}, work)
    named = _release(controller, f"named-{region}")
    other = _release(controller, f"other-{region}")
    with controller.http(controller.token("operator")) as http:
        response = http.post(
            "/api/v1/rollouts",
            json={
                "name": f"to-branch-{region}",
                "releases": [{"name": named["name"], "version": "1.0.0"}],
                "selector": {"region": region},
            },
        )
        assert response.status_code == 201, response.text
    pointer = branch.poll()
    assert pointer["changed"]
    directory, _, name = pointer["target"].rpartition("/")
    desired_url = f"/tuf/targets/{directory}/{pointer['sha256']}.{name}"
    return {
        "branch": branch,
        "intruder": intruder,
        "named": named,
        "other": other,
        "desired_url": desired_url,
        "pointer": pointer,
        "work": work,
    }


def _get(controller: ControllerServer, path: str, credential: str | None) -> httpx.Response:
    with controller.http(credential) as http:
        return http.get(path)


def _metadata_urls() -> list[str]:
    return ["/tuf/metadata/timestamp.json", "/tuf/metadata/1.root.json", "/tuf/metadata/1.snapshot.json"]


def test_without_credentials_nothing_of_the_repository_is_served(controller: ControllerServer, world: dict) -> None:
    for path in [*_metadata_urls(), world["desired_url"], world["named"]["url"], world["other"]["url"]]:
        response = _get(controller, path, None)
        assert response.status_code == 401, (path, response.status_code)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert WEIGHTS not in response.content
    # A malformed credential, a person's revoked token: the same.
    for credential in ("not-a-token", "swt_0000_nope", "eyJhbGciOiJFZERTQSJ9.e30.AAAA"):
        assert _get(controller, world["named"]["url"], credential).status_code == 401, credential


def test_python_tuf_without_credentials_cannot_even_refresh(controller: ControllerServer, world: dict) -> None:
    updater = tufclient.updater(
        world["work"] / "anonymous" / "tuf",
        controller.url,
        root=world["branch"].root,
        ca_cert=str(controller.pki.ca_cert),
    )
    with pytest.raises(tuf_errors.DownloadHTTPError) as refused:
        updater.refresh()
    assert refused.value.status_code == 401


def test_another_sites_jwt_gets_metadata_but_not_the_desired_state_or_release(
    controller: ControllerServer, world: dict
) -> None:
    intruder: SimulatedAgent = world["intruder"]
    assert _get(controller, "/tuf/metadata/timestamp.json", intruder.jwt()).status_code == 200
    stolen = _get(controller, world["desired_url"], intruder.jwt())
    assert stolen.status_code == 404
    assert b'"releases"' not in stolen.content and world["named"]["name"].encode() not in stolen.content
    weights = _get(controller, world["named"]["url"], intruder.jwt())
    assert weights.status_code == 404 and WEIGHTS not in weights.content
    # The same answer as for a target that does not exist: nothing tells the intruder it is there.
    missing = _get(controller, world["named"]["url"].replace(world["named"]["sha256"], "0" * 64), intruder.jwt())
    assert missing.status_code == 404
    assert weights.json()["title"] == missing.json()["title"]


def test_the_site_reads_its_desired_state_and_named_release_but_nothing_else(
    controller: ControllerServer, world: dict
) -> None:
    branch: SimulatedAgent = world["branch"]
    own = _get(controller, world["desired_url"], branch.jwt())
    assert own.status_code == 200 and own.json()["site_id"] == branch.site_id
    assert _get(controller, world["named"]["url"], branch.jwt()).content == WEIGHTS + world["named"]["name"].encode()
    # A release its desired state does not name, though it exists and the site is enrolled.
    assert _get(controller, world["other"]["url"], branch.jwt()).status_code == 404
    # The intruder's desired-state path, by its site id: 404 whatever it holds.
    intruder_doc = f"/tuf/targets/sites/{world['intruder'].site_id}/{'0' * 64}.desired.json"
    assert _get(controller, intruder_doc, branch.jwt()).status_code == 404


def test_a_replayed_expired_forged_or_misaddressed_jwt_is_refused(controller: ControllerServer, world: dict) -> None:
    branch: SimulatedAgent = world["branch"]
    token = branch.jwt()
    assert _get(controller, world["desired_url"], token).status_code == 200
    replayed = _get(controller, world["desired_url"], token)
    assert replayed.status_code == 401 and "replayed" in replayed.json()["detail"]
    assert _get(controller, "/tuf/metadata/timestamp.json", token).status_code == 401  # on metadata too
    expired = sitejwt.sign(branch.key, branch.site_id, controller.url, ttl_s=60, now=time.time() - 3600)
    assert _get(controller, world["desired_url"], expired).status_code == 401
    forged = sitejwt.sign(Ed25519PrivateKey.generate(), branch.site_id, controller.url)
    assert _get(controller, world["desired_url"], forged).status_code == 401
    elsewhere = sitejwt.sign(branch.key, branch.site_id, "https://another-controller.example")
    assert _get(controller, world["desired_url"], elsewhere).status_code == 401


def test_people_read_what_their_role_reads_through_the_api(controller: ControllerServer, world: dict) -> None:
    auditor, approver = controller.token("auditor"), controller.token("approver")
    assert _get(controller, "/tuf/metadata/timestamp.json", auditor).status_code == 200
    assert _get(controller, world["desired_url"], auditor).status_code == 200  # desired states: readers
    assert _get(controller, world["named"]["url"], auditor).status_code == 404  # release files: not auditors
    assert _get(controller, world["named"]["url"], approver).status_code == 200  # approvers review files
    assert _get(controller, world["desired_url"], approver).status_code == 404


def test_the_site_syncs_through_python_tuf_with_its_jwt_and_the_intruder_cannot(
    controller: ControllerServer, world: dict, tmp_path: Path
) -> None:
    branch: SimulatedAgent = world["branch"]
    document = branch.fetch(world["pointer"])  # python-tuf's Updater with the project's fetcher
    assert [r["name"] for r in document["releases"]] == [world["named"]["name"]]
    intruder: SimulatedAgent = world["intruder"]
    fetcher = tufclient.HttpxFetcher(
        str(controller.pki.ca_cert),
        credential=tufclient.site_credential(intruder.key, intruder.site_id, controller.url),
        origin=controller.url,
    )
    updater = tufclient.updater(
        tmp_path / "intruder-tuf", controller.url, root=intruder.root, target_dir=tmp_path, fetcher=fetcher
    )
    updater.refresh()  # metadata, signed and public to every enrolled site
    info = updater.get_targetinfo(world["pointer"]["target"])
    assert info is not None
    with pytest.raises(tuf_errors.DownloadHTTPError) as refused:
        updater.download_target(info, str(tmp_path / "stolen.json"))
    assert refused.value.status_code == 404
    assert not (tmp_path / "stolen.json").exists()


def test_the_fetcher_never_sends_the_credential_to_another_origin(controller: ControllerServer, world: dict) -> None:
    branch: SimulatedAgent = world["branch"]
    fetcher = tufclient.HttpxFetcher(
        str(controller.pki.ca_cert),
        credential=tufclient.site_credential(branch.key, branch.site_id, controller.url),
        origin=controller.url,
    )
    with pytest.raises(tuf_errors.DownloadError, match="refusing to send"):
        list(fetcher.fetch("https://127.0.0.1:1/tuf/metadata/timestamp.json"))


def test_a_disabled_site_is_refused_at_once(controller: ControllerServer, world: dict, tmp_path: Path) -> None:
    victim = SimulatedAgent.enroll(controller, f"gone-{uuid.uuid4().hex[:6]}", {}, tmp_path)
    assert _get(controller, "/tuf/metadata/timestamp.json", victim.jwt()).status_code == 200
    with controller.http(controller.admin_token) as admin:
        assert admin.post(f"/api/v1/sites/{victim.site_id}/disable").status_code == 200
    assert _get(controller, "/tuf/metadata/timestamp.json", victim.jwt()).status_code == 403
