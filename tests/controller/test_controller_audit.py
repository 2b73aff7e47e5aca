"""The controller's own audit log: every state-changing request is in it, and its export verifies offline."""

from __future__ import annotations

import json
import tarfile
import uuid
from pathlib import Path

from audit import verify_export
from tests.controller_server import ControllerServer, sitewarden


def _entries(tarball: Path) -> list[dict]:
    entries = []
    with tarfile.open(tarball) as tar:
        bundles = sorted(
            (m for m in tar.getmembers() if m.isfile() and m.name.startswith("tile/entries/")),
            key=lambda m: [
                int(p.lstrip("x").split(".")[0])
                for p in m.name.removeprefix("tile/entries/").split("/")
                if p[0] in "x0123456789"
            ],
        )
        for member in bundles:
            data = tar.extractfile(member).read()
            pos = 0
            while pos < len(data):
                n = int.from_bytes(data[pos : pos + 2], "big")
                entries.append(json.loads(data[pos + 2 : pos + 2 + n]))
                pos += 2 + n
    return entries


def test_every_state_changing_request_is_audited_and_the_export_verifies(
    controller: ControllerServer, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    admin, operator = controller.token("admin", f"alice-{tag}"), controller.token("operator", f"bob-{tag}")
    scenario = [
        (admin, "POST", "/api/v1/sites", {"name": f"audited-{tag}", "labels": {"region": "eu"}}, 201),
        (admin, "POST", f"/api/v1/sites/audited-{tag}/join-tokens", {"ttl_seconds": 600}, 201),
        (operator, "POST", "/api/v1/sites", {"name": f"refused-{tag}"}, 403),
        (admin, "POST", "/api/v1/tokens", {"name": f"carol-{tag}", "role": "auditor"}, 201),
        (admin, "POST", f"/api/v1/sites/audited-{tag}/disable", None, 200),
        (None, "POST", "/api/v1/enroll", {"token": "swj1.garbage.garbage", "public_key": "A" * 44}, 400),
    ]
    request_ids = []
    for token, method, path, body, status in scenario:
        request_id = f"{tag}-{len(request_ids)}"
        request_ids.append(request_id)
        with controller.http(token) as http:
            response = http.request(method, path, json=body, headers={"X-Request-ID": request_id})
        assert response.status_code == status, response.text
        assert response.headers["x-request-id"] == request_id
    with controller.http(controller.token("admin")) as http:
        assert http.get("/api/v1/sites").status_code == 200  # reads are not state changes

    with controller.http(controller.token("auditor")) as http:
        response = http.get("/api/v1/audit/export")
    assert response.status_code == 200
    tarball = tmp_path / "controller-audit.tar.gz"
    tarball.write_bytes(response.content)
    vkey = next(
        line.split(": ", 1)[1]
        for line in sitewarden("controller", "keys", "--data", str(controller.data_dir)).stdout.splitlines()
        if line.startswith("audit vkey: ")
    )
    report = verify_export(tarball, [vkey])
    assert report.valid, report.reason
    assert report.origin == "sitewarden/controller/main"

    by_id: dict[str, list[dict]] = {}
    for entry in _entries(tarball):
        by_id.setdefault(entry.get("request_id"), []).append(entry)
    for request_id, (_, method, path, _, status) in zip(request_ids, scenario, strict=True):
        entries = by_id.get(request_id)
        assert entries, f"{method} {path} is missing from the audit log"
        assert all(e["action"].startswith(method) for e in entries)
        if status < 400:  # a change: its record, in the entry of the transaction that made it
            assert [e["type"] for e in entries] == ["change"]
        else:
            assert [(e["type"], e["result"]) for e in entries] == [("request", status)]
    created = by_id[request_ids[0]][0]
    assert created["actor"] == f"alice-{tag}" and created["role"] == "admin" and created["resource"] == {}
    assert created["change"]["kind"] == "site.created" and created["change"]["name"] == f"audited-{tag}"
    assert created["change"]["labels"] == {"region": "eu"}
    joined = by_id[request_ids[1]][0]
    assert joined["resource"] == {"site": f"audited-{tag}"} and joined["change"]["kind"] == "join_token.issued"
    refused = by_id[request_ids[2]][0]
    assert refused["outcome"] == "refused" and refused["actor"] == f"bob-{tag}"
    assert refused["error"] == "controller.errors.Forbidden"
    token = by_id[request_ids[3]][0]["change"]
    assert (token["kind"], token["name"], token["role"]) == ("token.created", f"carol-{tag}", "auditor")
    assert by_id[request_ids[4]][0]["change"] == {
        "kind": "site.disabled",
        "site_id": created["change"]["site_id"],
        "name": f"audited-{tag}",
        "status_before": "pending",
    }
    assert by_id[request_ids[5]][0]["actor"] == "anonymous"
    # Secrets never go in: not the API token made, not the join token.
    text = json.dumps([by_id[r] for r in request_ids])
    assert "swt_" not in text and "swj1." not in text


def test_only_auditors_export_the_audit_log(controller: ControllerServer) -> None:
    for role in ("admin", "operator", "approver"):
        with controller.http(controller.token(role)) as http:
            assert http.get("/api/v1/audit/export").status_code == 403
