"""The dashboard in a browser, signed in as each role: the pages and buttons each role may use and no
others, every page free of CSP and serious accessibility violations (axe-core), with screenshots."""

from __future__ import annotations

import re

import pytest

from tests.controller.ui.conftest import MODEL, Browser, Fleet

NAV = {
    "admin": ["Fleet", "Releases", "Rollouts", "Jobs", "Audit", "People and keys"],
    "operator": ["Fleet", "Releases", "Rollouts", "Jobs"],
    "approver": ["Releases"],
    "auditor": ["Fleet", "Releases", "Rollouts", "Jobs", "Audit"],
}


@pytest.fixture(scope="module")
def rollout(dashboard_fleet: Fleet) -> str:
    """A rollout of two waves (canary branch-1), created over REST, its canary active."""
    name = "pages-rollout"
    with dashboard_fleet.http("operator") as http:
        response = http.post(
            "/api/v1/rollouts",
            json={
                "name": name,
                "releases": [{"name": MODEL, "version": "1.0.0"}],
                "selector": {"region": "eu-west"},
                "canary": ["branch-1"],
            },
        )
    assert response.status_code == 201, response.text
    dashboard_fleet.sync_all()
    return name


@pytest.fixture(scope="module")
def declined_job(dashboard_fleet: Fleet) -> str:
    """A federated job both prod sites decline over the real agent API, with their policies' reasons."""
    name = "pages-tuning"
    body = {
        "name": name,
        "base": {"name": MODEL, "version": "1.0.0"},
        "dataset": "transactions",
        "selector": {"tier": "prod"},
        "rounds": 3,
        "min_sites": 2,
        "differential_privacy": {"noise_multiplier": 1.1, "clipping_norm": 1.0},
    }
    with dashboard_fleet.http("operator") as http:
        created = http.post("/api/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    for site in ("branch-1", "branch-2"):
        agent = dashboard_fleet.agents[site]
        with dashboard_fleet.controller.http(agent.jwt()) as http:
            answer = {"join": False, "reasons": [f"{site}: epsilon 4.2 is above this site's budget of 1.0"]}
            response = http.post(f"/api/v1/agent/jobs/{created.json()['id']}/participation", json=answer)
        assert response.status_code == 200, response.text
    return name


def _nav(page) -> list[str]:
    return [t.strip() for t in page.locator("header nav ul:nth-of-type(2) a").all_inner_texts()]


@pytest.mark.parametrize("role", ["admin", "operator", "approver", "auditor"])
def test_each_role_sees_its_pages_and_buttons_and_no_others(
    browser: Browser, dashboard_fleet: Fleet, rollout: str, declined_job: str, role: str
) -> None:
    page = browser.sign_in(dashboard_fleet.tokens[role])
    try:
        home = "/ui/releases" if role == "approver" else "/ui/fleet"
        assert page.url.endswith(home)
        assert _nav(page) == NAV[role]
        assert page.locator("header").inner_text().count(dashboard_fleet.people[role]) == 1
        browser.check(page, f"{role}-home", "home")

        browser.visit(page, "/ui/releases", f"{role}-releases", "releases")
        browser.visit(page, f"/ui/releases/{MODEL}/1.0.0", f"{role}-release", "release")
        approve = page.get_by_role("button", name="Approve this release…")
        approved_note = page.get_by_text("You approved this release.")
        if role == "approver":
            assert approved_note.count() == 1  # alice approved it with the CLI (fixture)
            browser.visit(page, f"/ui/releases/{MODEL}/1.0.0/approve", f"{role}-approve", "approve")
            assert (
                page.locator("#approve-command").inner_text()
                == f"sitewarden release approve {MODEL} 1.0.0 --key approver.pem"
            )
            manifest = page.locator("#manifest-digest").inner_text()
            assert re.fullmatch(r"[0-9a-f]{64}", manifest)
        else:
            assert approve.count() == 0 and approved_note.count() == 0

        if role != "approver":
            browser.visit(page, "/ui/fleet", f"{role}-fleet", "fleet")
            assert page.locator("#fleet-live tbody tr").count() >= 3
            browser.visit(page, "/ui/sites/branch-1", f"{role}-site", "site")
            disable = page.get_by_role("button", name="Disable this site…")
            assert disable.count() == (1 if role == "admin" else 0)
            browser.visit(page, "/ui/rollouts", f"{role}-rollouts", "rollouts")
            assert (page.locator("#new-rollout").count() == 1) == (role in ("admin", "operator"))
            browser.visit(page, f"/ui/rollouts/{rollout}", f"{role}-rollout", "rollout")
            promote = page.get_by_role("button", name="Promote…")
            assert promote.count() == (1 if role in ("admin", "operator") else 0)
            browser.visit(page, "/ui/jobs", f"{role}-jobs", "jobs")
            browser.visit(page, f"/ui/jobs/{declined_job}", f"{role}-job", "job")
            text = page.locator("main").inner_text()
            assert "branch-1: epsilon 4.2 is above this site's budget of 1.0" in text and "declined" in text
        if role in ("admin", "auditor"):
            browser.visit(page, "/ui/audit", f"{role}-audit", "audit")
            export = page.get_by_role("button", name=re.compile("Export the whole log"))
            assert export.count() == (1 if role == "auditor" else 0)  # export is the auditors' own, as over REST
            first = page.locator("#main table tbody tr td a").first if False else page.locator("table").last
            assert first.locator("tbody tr").count() >= 1
            index = page.locator("table").last.locator("tbody tr td a").first.inner_text()
            browser.visit(page, f"/ui/audit/entries/{index}", f"{role}-audit-entry", "audit-entry")
        if role == "admin":
            browser.visit(page, "/ui/people", f"{role}-people", "people")
            assert page.locator("text=alice").count() >= 1
            browser.visit(page, f"/ui/rollouts/{rollout}/promote", f"{role}-confirm-promote", "confirm-promote")
            assert "branch-2" in page.locator("main").inner_text()

        # A page the role may not see is refused by its route, whatever the links say.
        forbidden = {"approver": "/ui/fleet", "operator": "/ui/audit", "auditor": "/ui/people", "admin": None}[role]
        if forbidden:
            response = page.goto(forbidden)
            assert response is not None and response.status == 403
            assert "may not call this route" in page.locator("main").inner_text()
            browser.check(page, f"{role}-forbidden", "forbidden")
    finally:
        page.context.close()
