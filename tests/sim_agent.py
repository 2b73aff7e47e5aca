"""A simulated agent that speaks the real protocol: enrollment, site JWTs, long polls for its desired
state, TUF-verified downloads of the desired-state document, and status reports."""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sitewarden import sitejwt, tufclient
from sitewarden.keys import encode_public_key
from tests.controller_server import ControllerServer


@dataclass
class SimulatedAgent:
    controller: ControllerServer
    site_id: str
    name: str
    key: Ed25519PrivateKey
    workdir: Path
    root: bytes
    version: int = 0
    document: dict[str, Any] = field(default_factory=dict)
    audit_vkey: str = ""  # the controller's audit-log key, as enrollment answered it (the site pins it)

    @classmethod
    def enroll(cls, controller: ControllerServer, name: str, labels: dict[str, str], workdir: Path) -> SimulatedAgent:
        with controller.client(controller.admin_token) as admin:
            site = admin.post("/api/v1/sites", {"name": name, "labels": labels})
            token = admin.post(f"/api/v1/sites/{site['id']}/join-tokens", {"ttl_seconds": 600})["token"]
        key = Ed25519PrivateKey.generate()
        with controller.http() as http:
            enrolled = http.post("/api/v1/enroll", json={"token": token, "public_key": encode_public_key(key)}).json()
        root = base64.b64decode(enrolled["root"])
        return cls(controller, enrolled["site_id"], name, key, workdir / name, root, audit_vkey=enrolled["audit_vkey"])

    def jwt(self) -> str:
        return sitejwt.sign(self.key, self.site_id, self.controller.url)

    def poll(self, wait: int = 0) -> dict[str, Any]:
        with self.controller.http(self.jwt()) as http:
            response = http.get(
                "/api/v1/agent/desired", params={"after": self.version, "wait": wait}, timeout=wait + 30
            )
        assert response.status_code == 200, response.text
        return response.json()

    def fetch(self, pointer: dict[str, Any]) -> dict[str, Any]:
        """Download the desired-state document through TUF (verified) and hold it."""
        updater = tufclient.updater(
            self.workdir / "tuf",
            self.controller.url,
            root=None if (self.workdir / "tuf" / "root.json").exists() else self.root,
            target_dir=self.workdir / "targets",
            ca_cert=str(self.controller.pki.ca_cert),
            credential=tufclient.site_credential(self.key, self.site_id, self.controller.url),
        )
        updater.refresh()
        info = updater.get_targetinfo(pointer["target"])
        assert info is not None, f"{pointer['target']} is not a TUF target"
        path = updater.download_target(info, str(self.workdir / f"desired-{uuid.uuid4().hex}.json"))
        document = json.loads(Path(path).read_bytes())
        assert document["site_id"] == self.site_id
        self.version, self.document = document["version"], document
        return document

    def sync(self, wait: int = 0) -> bool:
        """Poll once; fetch when there is a newer version. True if it changed."""
        pointer = self.poll(wait)
        if pointer["changed"]:
            self.fetch(pointer)
            return True
        return False

    def report(self, state: str = "active", reason: str = "") -> None:
        artifacts = [
            {"name": r["name"], "version": r["version"], "kind": r["kind"], "state": state, "reason": reason}
            for r in self.document.get("releases", [])
        ]
        body = {"desired_version": self.version, "agent_version": "sim-1", "checkpoint_size": 0, "artifacts": artifacts}
        with self.controller.http(self.jwt()) as http:
            response = http.post("/api/v1/agent/status", json=body)
        assert response.status_code == 204, response.text

    def releases(self) -> list[str]:
        return [f"{r['name']}@{r['version']}" for r in self.document.get("releases", [])]
