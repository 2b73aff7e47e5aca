"""The dashboard under test: one real controller (HTTPS on loopback, SQLite) with simulated agents that
speak the real protocol, people of every role, a release approved with the real CLI, and headless
Chromium from Debian driven by Playwright (never a browser Playwright downloads).

Every page a test visits goes through `Browser.visit`, which fails on a Content-Security-Policy
violation the browser reports, runs axe-core (vendored from npm, `vendor/manifest.json`) and fails on
a serious or critical violation, and writes a full-page screenshot to the artefacts directory
(`build/test-artifacts/dashboard/`, or `$SITEWARDEN_TEST_ARTIFACTS/dashboard/`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from sitewarden import approval
from tests.controller_server import ControllerServer, sitewarden, start_controller
from tests.sim_agent import SimulatedAgent
from tests.system import require
from tests.tls import TestPKI

REPO = Path(__file__).resolve().parents[3]
ARTIFACTS = Path(os.environ.get("SITEWARDEN_TEST_ARTIFACTS", REPO / "build" / "test-artifacts")) / "dashboard"
AXE = Path(__file__).parent / "vendor" / "axe-core-4.14.1" / "axe.min.js"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
DEADLINE_S = 30.0
MODEL = "fraud-scorer"
POLICY = "bank-policy"

# Records every CSP violation the page reports (an init script runs through DevTools, outside the page's CSP).
CSP_WATCH = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  const where = e.sourceFile + ":" + e.lineNumber;
  window.__cspViolations.push(e.violatedDirective + " blocked " + (e.blockedURI || "inline") + " at " + where);
});
"""


def wait_for(condition: Callable[[], Any], what: str, deadline_s: float = DEADLINE_S) -> Any:
    """Poll `condition` until it returns something truthy; fail naming `what` after the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(0.2)


@dataclass
class Fleet:
    """The controller and what the tests find on it."""

    controller: ControllerServer
    agents: dict[str, SimulatedAgent]
    tokens: dict[str, str]  # role -> token of that role's person
    people: dict[str, str]  # role -> the person's name
    workdir: Path
    release: str = f"{MODEL}@1.0.0"
    release_v2: str = f"{MODEL}@1.1.0"
    extra: dict[str, Any] = field(default_factory=dict)

    def http(self, role: str | None = None) -> httpx.Client:
        return self.controller.http(self.tokens[role] if role else None)

    def token(self, role: str, name: str | None = None) -> str:
        with self.controller.client(self.controller.admin_token) as admin:
            return admin.post("/api/v1/tokens", {"name": name or f"{role}-{uuid.uuid4().hex[:6]}", "role": role})[
                "token"
            ]

    def sync_all(self, state: str = "active", reason: str = "") -> None:
        """Every agent polls, fetches a newer desired state through TUF, and reports."""
        for agent in self.agents.values():
            agent.sync()
            agent.report(state, reason)


def _push(fleet_http: httpx.Client, name: str, version: str, payload: bytes, kind: str = "model") -> None:
    sha = hashlib.sha256(payload).hexdigest()
    info = fleet_http.post("/api/v1/uploads", json={"sha256": sha, "size": len(payload)}).json()
    if not info["complete"]:
        fleet_http.patch(f"/api/v1/uploads/{info['id']}", content=payload, headers={"Upload-Offset": "0"})
    filename = "model.onnx" if kind == "model" else "policy.tar.gz"
    created = fleet_http.post(
        "/api/v1/releases",
        json={
            "name": name,
            "version": version,
            "kind": kind,
            "runtime": "onnx" if kind == "model" else "rego",
            "files": [{"path": filename, "sha256": sha, "size": len(payload)}],
            "metadata": {
                "owner": "fraud-team",
                "intended_purposes": ["fraud"],
                "risk_tier": "medium",
                "evaluation": {"auc": 0.91, "accuracy": 0.88},
                "licence": "Apache-2.0",
            },
        },
    )
    assert created.status_code == 201, created.text


def approve_with_cli(fleet: Fleet, name: str, version: str) -> None:
    """What the approve page tells approvers to run, run for real: `sitewarden release approve`."""
    done = sitewarden(
        "release",
        "approve",
        name,
        version,
        "--key",
        str(fleet.workdir / "alice.pem"),
        env=fleet.controller.cli_env(fleet.tokens["approver"]),
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _approve_in_process(fleet: Fleet, name: str, version: str) -> None:
    """The same signature as the CLI's, made in this process (one CLI run is enough to prove the command)."""
    layout = fleet.workdir / f"layout-{name}-{version}"
    (layout / "files").mkdir(parents=True)
    base = f"/api/v1/releases/{name}/{version}/files"
    with fleet.http("approver") as http:
        (layout / "release.json").write_bytes(http.get(f"{base}/release.json").content)
        (layout / "files" / "model.onnx").write_bytes(http.get(f"{base}/model.onnx").content)
        bundle = approval.sign_release(layout, fleet.workdir / "alice.pem")
        response = http.post(f"/api/v1/releases/{name}/{version}/approvals", content=bundle)
    assert response.status_code == 201, response.text


@pytest.fixture(scope="session")
def dashboard_fleet(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[Fleet]:
    """A controller sampling site history every second, three simulated sites, people of every role,
    and a model release pushed by the operator and approved by the approver with the CLI."""
    workdir = tmp_path_factory.mktemp("dashboard")
    previous = os.environ.get("SITEWARDEN_UI_SAMPLE_SECONDS")
    os.environ["SITEWARDEN_UI_SAMPLE_SECONDS"] = "1"
    try:
        controller = start_controller(workdir, pki)
    finally:
        if previous is None:
            os.environ.pop("SITEWARDEN_UI_SAMPLE_SECONDS", None)
        else:
            os.environ["SITEWARDEN_UI_SAMPLE_SECONDS"] = previous
    try:
        people = {"admin": "root-admin", "operator": "bob", "approver": "alice", "auditor": "carol"}
        tokens = {"admin": controller.admin_token}
        with controller.client(controller.admin_token) as admin:
            for role in ("operator", "approver", "auditor"):
                tokens[role] = admin.post("/api/v1/tokens", {"name": people[role], "role": role})["token"]
            me = admin.get("/api/v1/me")
            people["admin"] = me["name"]
        agents = {
            "branch-1": SimulatedAgent.enroll(controller, "branch-1", {"region": "eu-west", "tier": "prod"}, workdir),
            "branch-2": SimulatedAgent.enroll(controller, "branch-2", {"region": "eu-west", "tier": "prod"}, workdir),
            "lab-1": SimulatedAgent.enroll(controller, "lab-1", {"region": "us-east", "tier": "test"}, workdir),
        }
        fleet = Fleet(controller, agents, tokens, people, workdir)
        fleet.sync_all()
        approval.generate_approver_key(workdir / "alice.pem", workdir / "alice.pub.pem")
        with controller.client(controller.admin_token) as admin:
            admin.post(
                "/api/v1/approvers", {"approver": "alice", "public_key_pem": (workdir / "alice.pub.pem").read_text()}
            )
        with fleet.http("operator") as http:
            _push(http, MODEL, "1.0.0", b"onnx weights v1")
            _push(http, MODEL, "1.1.0", b"onnx weights v1.1")
        approve_with_cli(fleet, MODEL, "1.0.0")
        _approve_in_process(fleet, MODEL, "1.1.0")
        yield fleet
    finally:
        controller.stop()


class Browser:
    """One headless Chromium (Debian's) for a test module; a fresh context (cookies) per person."""

    def __init__(self, playwright: Any, base_url: str) -> None:
        self.base_url = base_url
        self.checked: set[str] = set()
        self.chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        self.axe = AXE.read_text()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        self.chromium.close()

    def new_page(self) -> Any:
        context = self.chromium.new_context(
            base_url=self.base_url,
            ignore_https_errors=True,
            viewport={"width": 1400, "height": 900},
            accept_downloads=True,
        )
        context.add_init_script(CSP_WATCH)
        page = context.new_page()
        page.set_default_timeout(DEADLINE_S * 1000)
        page.csp_console = []  # type: ignore[attr-defined]
        page.on(
            "console",
            lambda msg: (
                page.csp_console.append(msg.text)  # type: ignore[attr-defined]
                if "Content Security Policy" in msg.text or "Content-Security-Policy" in msg.text
                else None
            ),
        )
        return page

    def sign_in(self, token: str, target: str = "/ui") -> Any:
        page = self.new_page()
        page.goto(f"/ui/login?next={target}")
        self.check(page, "login")
        page.fill("#token", token)
        page.click("button[type=submit]")
        page.wait_for_url(re.compile(r".*/ui/(?!login).*"))
        return page

    def check(self, page: Any, shot: str, kind: str | None = None) -> None:
        """No CSP violation; and, the first time this module sees a kind of page (by default: every shot),
        no serious or critical accessibility violation and a screenshot as an artefact."""
        page.wait_for_load_state("load")
        violations = page.evaluate("window.__cspViolations") + page.csp_console
        assert not violations, f"CSP violations on {page.url}: {violations}"
        kind = kind or shot
        if kind in self.checked:
            return
        self.checked.add(kind)
        page.evaluate(self.axe)
        found = page.evaluate(
            "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
            ".filter(v => v.impact === 'serious' || v.impact === 'critical')"
            ".map(v => v.id + ' (' + v.impact + '): ' + v.help + ' — '"
            " + v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(', '))"
        )
        page.screenshot(path=str(ARTIFACTS / f"{shot}.png"), full_page=True)
        assert not found, f"accessibility violations on {page.url}:\n" + "\n".join(found)

    def visit(self, page: Any, path: str, shot: str, kind: str | None = None) -> Any:
        response = page.goto(path)
        assert response is not None and response.status < 400, f"{path}: HTTP {response.status if response else '?'}"
        self.check(page, shot, kind)
        return response


@pytest.fixture(scope="module")
def browser(dashboard_fleet: Fleet) -> Iterator[Browser]:
    require("chromium")
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - only where a browser runs

    with sync_playwright() as playwright:
        opened = Browser(playwright, dashboard_fleet.controller.url)
        try:
            yield opened
        finally:
            opened.close()


def audit_entries(fleet: Fleet) -> list[dict[str, Any]]:
    """The controller's audit entries as an auditor gets them: the REST export (C2SP tlog-tiles), oldest first."""
    with fleet.http("auditor") as http:
        response = http.get("/api/v1/audit/export")
    assert response.status_code == 200, response.text
    entries = []
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("tile/entries/")]

        def order(member: tarfile.TarInfo) -> list[int]:
            parts = member.name.removeprefix("tile/entries/").split("/")
            return [int(p.lstrip("x").split(".")[0]) for p in parts if p[0] in "x0123456789"]

        for member in sorted(members, key=order):
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            pos = 0
            while pos < len(data):
                n = int.from_bytes(data[pos : pos + 2], "big")
                entries.append(json.loads(data[pos + 2 : pos + 2 + n]))
                pos += 2 + n
    return entries
