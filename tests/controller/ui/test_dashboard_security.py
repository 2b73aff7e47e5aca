"""The dashboard's security, played as an attacker over HTTP against the real controller: the session
cookie's flags, CSRF on sign-in and on every state-changing form, 403 from the route for a role without
the right even when the form is posted by hand, a strict CSP with fresh nonces and no framing, sessions
that end with their token, at sign-out and at expiry, no open redirect, and assets that are exactly the
vendored bytes. Refusals are in the controller's audit log like the REST API's."""

from __future__ import annotations

import hashlib
import re
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from controller.ui import vendor
from tests.controller.ui.conftest import AXE, MODEL, Fleet, audit_entries

HTML = {"Accept": "text/html"}
PAGES = ["/ui/fleet", "/ui/sites/branch-1", "/ui/releases", f"/ui/releases/{MODEL}/1.0.0", "/ui/rollouts", "/ui/jobs"]
PAGES += ["/ui/audit", "/ui/people", "/ui/login"]


@dataclass
class Session:
    http: httpx.Client
    csrf: str
    set_cookie: str

    def post(self, path: str, data: dict[str, str] | None = None, csrf: str | None = "own") -> httpx.Response:
        form = dict(data or {})
        if csrf is not None:
            form["csrf_token"] = self.csrf if csrf == "own" else csrf
        return self.http.post(path, data=form, headers=HTML)


def _login_token(http: httpx.Client) -> str:
    page = http.get("/ui/login", headers=HTML)
    assert page.status_code == 200
    return re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]


def sign_in(fleet: Fleet, token: str) -> Session:
    http = fleet.controller.http()
    response = http.post("/ui/login", data={"token": token, "login_token": _login_token(http), "next": "/ui/releases"})
    assert response.status_code == 303, response.text
    page = http.get("/ui/releases", headers=HTML)
    csrf = re.search(r'"X-CSRF-Token": "([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    return Session(http, csrf, response.headers["set-cookie"])


@pytest.fixture(scope="module")
def rollout(dashboard_fleet: Fleet) -> str:
    with dashboard_fleet.http("operator") as http:
        created = http.post(
            "/api/v1/rollouts",
            json={
                "name": "sec-rollout",
                "releases": [{"name": MODEL, "version": "1.0.0"}],
                "selector": {"tier": "test"},
            },
        )
    assert created.status_code == 201, created.text
    return "sec-rollout"


def _state(fleet: Fleet, rollout: str) -> str:
    with fleet.http("auditor") as http:
        return http.get(f"/api/v1/rollouts/{rollout}").json()["state"]


def test_sign_in_sets_a_host_only_httponly_secure_strict_short_lived_cookie(dashboard_fleet: Fleet) -> None:
    session = sign_in(dashboard_fleet, dashboard_fleet.tokens["operator"])
    cookie = next(c for c in session.set_cookie.split(", __") if "sitewarden-session" in c)
    attributes = {a.strip().split("=")[0].lower(): a.strip() for a in cookie.split(";")}
    assert (
        session.set_cookie.startswith("__Host-sitewarden-session=")
        or "__Host-sitewarden-session=" in session.set_cookie
    )
    assert {"httponly", "secure", "path", "samesite", "max-age"} <= set(attributes)
    assert attributes["samesite"].lower() == "samesite=strict" and attributes["path"] == "Path=/"
    assert "domain" not in attributes
    assert 0 < int(attributes["max-age"].split("=")[1]) <= 3600


def test_sign_in_refuses_a_forged_form_and_a_bad_token(dashboard_fleet: Fleet) -> None:
    token = dashboard_fleet.tokens["operator"]
    with dashboard_fleet.controller.http() as http:  # a cross-site form: no login cookie to match
        forged = http.post("/ui/login", data={"token": token, "login_token": "guessed"}, headers=HTML)
        assert forged.status_code == 403 and "sign-in form" in forged.text
        assert "sitewarden-session" not in forged.headers.get("set-cookie", "")
    with dashboard_fleet.controller.http() as http:
        bad = http.post("/ui/login", data={"token": token + "x", "login_token": _login_token(http)}, headers=HTML)
        assert bad.status_code == 401 and "unknown API token" in bad.text
        assert "sitewarden-session" not in bad.headers.get("set-cookie", "")
    entries = audit_entries(dashboard_fleet)
    refused = [e for e in entries if e.get("action") == "POST /ui/login" and e.get("result") in (401, 403)]
    assert {e["result"] for e in refused} >= {401, 403}


def test_state_changing_forms_need_this_sessions_csrf_token(dashboard_fleet: Fleet, rollout: str) -> None:
    operator = sign_in(dashboard_fleet, dashboard_fleet.tokens["operator"])
    other = sign_in(dashboard_fleet, dashboard_fleet.tokens["operator"])
    for csrf in (None, "", other.csrf, operator.csrf[:-2] + "xx"):
        response = operator.post(f"/ui/rollouts/{rollout}/pause", csrf=csrf)
        assert response.status_code == 403, (csrf, response.status_code)
        assert "CSRF token" in response.text
    assert _state(dashboard_fleet, rollout) == "progressing"
    # htmx's header counts as the token too; the right token goes through.
    done = operator.http.post(f"/ui/rollouts/{rollout}/pause", headers={"X-CSRF-Token": operator.csrf})
    assert done.status_code == 303 and done.headers["location"].endswith("?done=pause")
    assert _state(dashboard_fleet, rollout) == "paused"
    assert operator.post(f"/ui/rollouts/{rollout}/resume").status_code == 303
    assert _state(dashboard_fleet, rollout) == "progressing"


def test_a_role_without_the_right_is_refused_by_the_route_even_posting_the_form_by_hand(
    dashboard_fleet: Fleet, rollout: str
) -> None:
    auditor = sign_in(dashboard_fleet, dashboard_fleet.tokens["auditor"])
    attempts = [
        (f"/ui/rollouts/{rollout}/pause", {}),
        (f"/ui/rollouts/{rollout}/rollback", {}),
        ("/ui/tokens", {"name": "mallory", "role": "admin", "ttl_days": "90"}),
        ("/ui/sites/lab-1/disable", {}),
        ("/ui/rollouts", {"name": "sneaky", "release": f"{MODEL}@1.0.0"}),
        ("/ui/approvers", {"approver": "carol", "public_key_pem": "x" * 60}),
    ]
    for path, form in attempts:
        response = auditor.post(path, form)
        assert response.status_code == 403, (path, response.status_code)
        assert "role auditor may not call this route" in response.text
    approver = sign_in(dashboard_fleet, dashboard_fleet.tokens["approver"])
    assert approver.http.get("/ui/fleet", headers=HTML).status_code == 403
    assert approver.http.get(f"/ui/rollouts/{rollout}/pause", headers=HTML).status_code == 403  # the confirmation too
    operator = sign_in(dashboard_fleet, dashboard_fleet.tokens["operator"])
    assert operator.post("/ui/tokens", {"name": "mallory", "role": "admin"}).status_code == 403

    assert _state(dashboard_fleet, rollout) == "progressing"
    with dashboard_fleet.http("admin") as http:
        assert http.get("/api/v1/sites/lab-1").json()["status"] == "active"
        assert "mallory" not in http.get("/api/v1/tokens", params={"limit": 500}).text
    refused = [e for e in audit_entries(dashboard_fleet) if e.get("actor") == "carol" and e.get("via") == "dashboard"]
    assert ("POST /api/v1/tokens", 403) in {(e["action"], e["result"]) for e in refused}


def test_every_page_has_a_strict_csp_with_a_fresh_nonce_and_cannot_be_framed(dashboard_fleet: Fleet) -> None:
    admin = sign_in(dashboard_fleet, dashboard_fleet.tokens["admin"])
    nonces = set()
    for path in PAGES:
        response = admin.http.get(path, headers=HTML)
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        nonce = re.search(r"script-src 'nonce-([A-Za-z0-9_-]+)'", policy).group(1)  # type: ignore[union-attr]
        nonces.add(nonce)
        for directive in ("default-src 'none'", "frame-ancestors 'none'", "base-uri 'none'", "form-action 'self'"):
            assert directive in policy, (path, directive)
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-store"
        tags = re.findall(r"<(script|link)\b([^>]*)>", response.text)
        assert len(tags) == 6, path
        for _, attributes in tags:
            assert f'nonce="{nonce}"' in attributes and 'integrity="sha384-' in attributes, (path, attributes)
        assert not re.search(r"<script(?![^>]*\bsrc=)", response.text), f"inline script on {path}"
        assert not re.search(r"\sstyle=", response.text), f"inline style on {path}"
        assert not re.search(r"\son[a-z]+=", response.text), f"inline event handler on {path}"
    assert len(nonces) == len(PAGES), "a nonce was reused"


def test_a_session_ends_with_its_token_at_sign_out_and_when_it_expires(dashboard_fleet: Fleet) -> None:
    fleet = dashboard_fleet
    token = fleet.token("operator", "erin")
    revoked = sign_in(fleet, token)
    token_id = token.split("_")[1]
    with fleet.http("admin") as http:
        assert http.post(f"/api/v1/tokens/{token_id}/revoke").status_code == 200
    page = revoked.http.get("/ui/fleet", headers=HTML)
    assert page.status_code == 303 and page.headers["location"].startswith("/ui/login")
    poll = revoked.http.get(
        "/ui/fleet", headers={"HX-Request": "true", "HX-Current-URL": fleet.controller.url + "/ui/fleet"}
    )
    assert poll.status_code == 401 and poll.headers["hx-redirect"].startswith("/ui/login?next=")
    tool = revoked.http.get("/ui/fleet")
    assert tool.status_code == 401 and "token of this session was revoked" in tool.json()["detail"]

    out = sign_in(fleet, fleet.tokens["operator"])
    cookie = out.http.cookies.get("__Host-sitewarden-session")
    assert out.post("/ui/logout").status_code == 303
    with fleet.controller.http() as replay:
        replay.cookies.set("__Host-sitewarden-session", cookie)
        response = replay.get("/ui/fleet")
        assert response.status_code == 401 and "signed out" in response.json()["detail"]

    expiring = sign_in(fleet, fleet.tokens["operator"])
    digest = hashlib.sha256(expiring.http.cookies.get("__Host-sitewarden-session").encode()).hexdigest()
    past = (datetime.now(UTC) - timedelta(seconds=1)).strftime("%Y-%m-%d %H:%M:%S.%f")
    with sqlite3.connect(fleet.controller.data_dir / "controller.db") as db:
        assert db.execute("UPDATE ui_sessions SET expires_at = ? WHERE id = ?", (past, digest)).rowcount == 1
    response = expiring.http.get("/ui/fleet")
    assert response.status_code == 401 and "expired" in response.json()["detail"]


@pytest.mark.parametrize("target", ["https://evil.example/ui", "//evil.example/ui", "/ui\\@evil.example", "/api/v1/me"])
def test_sign_in_never_sends_anyone_off_the_dashboard(dashboard_fleet: Fleet, target: str) -> None:
    with dashboard_fleet.controller.http() as http:
        data = {"token": dashboard_fleet.tokens["auditor"], "login_token": _login_token(http), "next": target}
        response = http.post("/ui/login", data=data)
    assert response.status_code == 303 and response.headers["location"] == "/ui"


def test_assets_are_exactly_the_vendored_bytes_and_nothing_else_is_served(dashboard_fleet: Fleet) -> None:
    packages = vendor.check(vendor.SERVED_MANIFEST) + vendor.check(AXE.parent.parent / "manifest.json")
    assert {p.name for p in packages} == {"htmx.org", "uplot", "@picocss/pico", "axe-core"}
    with dashboard_fleet.controller.http() as http:
        for package in packages[:3]:
            for f in package.files:
                response = http.get(f"/ui/static/vendor/{f.target}")
                assert response.status_code == 200 and vendor.sri(response.content) == f.sha384, f.target
        for path in (
            "/ui/static/vendor/manifest.json",
            "/ui/static/..%2f..%2fsessions.py",
            "/ui/static/vendor/..%2Fapp.js",
        ):
            assert http.get(path).status_code == 404, path


def test_a_dashboard_action_is_audited_as_its_rest_call(dashboard_fleet: Fleet, rollout: str) -> None:
    operator = sign_in(dashboard_fleet, dashboard_fleet.tokens["operator"])
    assert operator.post(f"/ui/rollouts/{rollout}/pause").status_code == 303
    with dashboard_fleet.http("operator") as http:
        assert http.post(f"/api/v1/rollouts/{rollout}/resume").status_code == 200
    entries = audit_entries(dashboard_fleet)
    ui = next(e for e in reversed(entries) if e.get("via") == "dashboard" and e.get("action", "").endswith("/pause"))
    rest = next(e for e in reversed(entries) if e.get("action", "").endswith("/resume") and "via" not in e)
    for key in ("type", "actor", "kind", "role", "resource", "outcome"):
        assert ui[key] == rest[key], key
    assert ui["action"] == "POST /api/v1/rollouts/{rollout}/pause" and ui["resource"] == {"rollout": rollout}
