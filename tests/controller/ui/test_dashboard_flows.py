"""What people do in the dashboard, in a browser against a real controller and simulated agents: a rollout
from creation through promotion to rollback, a site's state changing on screen without a reload, an
audit search whose proof `sitewarden audit verify-proof` accepts, a token shown once, and a session
that ends the moment its token is revoked."""

from __future__ import annotations

import re
from pathlib import Path

from sitewarden import approval
from tests.controller.ui.conftest import MODEL, Browser, Fleet, audit_entries, wait_for
from tests.controller_server import sitewarden

MARK = "window.__notReloaded = true"
STILL_SAME_PAGE = "window.__notReloaded === true"


def test_rollout_from_creation_to_promotion_and_rollback(browser: Browser, dashboard_fleet: Fleet) -> None:
    fleet = dashboard_fleet
    page = browser.sign_in(fleet.tokens["operator"], "/ui/rollouts")
    try:
        page.fill("#rollout-name", "eu-upgrade")
        page.select_option("#rollout-releases", [f"{MODEL}@1.1.0"])
        page.fill("#rollout-selector", "region=eu-west")
        page.fill("#rollout-canary", "branch-9")
        page.click("text=Create the rollout")
        # Refused by the same service function as over REST: the form comes back, filled in, with the reason.
        assert (
            "Not created: canary sites branch-9 are not among the selected sites" in page.locator("main").inner_text()
        )
        assert page.input_value("#rollout-selector") == "region=eu-west"
        browser.check(page, "operator-rollout-form-refused")
        page.fill("#rollout-canary", "branch-1")
        page.click("text=Create the rollout")
        page.wait_for_url(re.compile(r".*/ui/rollouts/eu-upgrade\?done=created"))
        browser.check(page, "rollout-created")
        page.evaluate(MARK)
        live = page.locator("#rollout-live")
        assert "1 of 2 waves released" in live.inner_text()

        # The canary takes the new desired state and reports it: the page shows it live.
        fleet.agents["branch-1"].sync()
        fleet.agents["branch-1"].report("active")
        wait_for(lambda: "1 of 1 healthy" in live.inner_text(), "the canary to show healthy")
        assert page.evaluate(STILL_SAME_PAGE)

        page.get_by_role("button", name="Promote…").click()
        page.wait_for_url(re.compile(r".*/ui/rollouts/eu-upgrade/promote$"))
        changes = page.locator("main ul").inner_text()
        assert "Wave 2 of 2" in changes and "branch-2" in changes and f"{MODEL} 1.1.0" in changes
        browser.check(page, "rollout-confirm-promote")
        page.get_by_role("button", name="Promote eu-upgrade").click()
        page.wait_for_url(re.compile(r".*/ui/rollouts/eu-upgrade\?done=promote"))
        assert "2 of 2 waves released" in page.locator("#rollout-live").inner_text()
        fleet.agents["branch-2"].sync()
        fleet.agents["branch-2"].report("active")
        assert fleet.agents["branch-2"].releases() == [f"{MODEL}@1.1.0"]
        wait_for(lambda: "AllSitesActive" in page.locator("#rollout-live").inner_text(), "the rollout to complete")
        browser.check(page, "rollout-complete")

        page.get_by_role("button", name="Rollback…").click()
        changes = page.locator("main ul").inner_text()
        assert "branch-1 →" in changes and "branch-2 →" in changes
        browser.check(page, "rollout-confirm-rollback")
        page.get_by_role("button", name="Rollback eu-upgrade").click()
        page.wait_for_url(re.compile(r".*/ui/rollouts/eu-upgrade\?done=rollback"))
        assert "rolled_back" in page.locator("#rollout-live").inner_text()
        assert page.get_by_role("button", name="Promote…").count() == 0
        for name in ("branch-1", "branch-2"):
            fleet.agents[name].sync()
            assert f"{MODEL}@1.1.0" not in fleet.agents[name].releases()
        browser.check(page, "rollout-rolled-back")
    finally:
        page.context.close()

    # Each action is in the controller's audit log as the REST call it made, by the person who made it.
    entries = audit_entries(fleet)
    dashboard = [
        (e["action"], e["resource"]) for e in entries if e.get("via") == "dashboard" and e.get("actor") == "bob"
    ]
    for action in ("promote", "rollback"):
        assert (f"POST /api/v1/rollouts/{{rollout}}/{action}", {"rollout": "eu-upgrade"}) in dashboard
    assert ("POST /api/v1/rollouts", {}) in dashboard


def test_a_site_state_change_shows_without_reloading(browser: Browser, dashboard_fleet: Fleet) -> None:
    fleet = dashboard_fleet
    with fleet.http("operator") as http:
        created = http.post(
            "/api/v1/rollouts",
            json={"name": "lab-trial", "releases": [{"name": MODEL, "version": "1.0.0"}], "selector": {"tier": "test"}},
        )
    assert created.status_code == 201, created.text
    lab = fleet.agents["lab-1"]
    lab.sync()
    lab.report("active")
    page = browser.sign_in(fleet.tokens["operator"], "/ui/sites/lab-1")
    try:
        page.evaluate(MARK)
        live = page.locator("#site-live")
        wait_for(lambda: "in-sync" in live.inner_text(), "lab-1 to show in sync")
        reason = "approval: no approver this site trusts signed fraud-scorer 1.0.0"
        lab.report("refused", reason)
        wait_for(lambda: "refusing" in live.inner_text() and reason in live.inner_text(), "the refusal to appear")
        assert page.evaluate(STILL_SAME_PAGE), "the page was reloaded"
        assert page.locator("#site-history .uplot").count() == 1  # the heartbeat and witness-lag chart
        browser.check(page, "site-refusing")

        browser.visit(page, "/ui/fleet?state=refusing", "fleet-refusing")
        page.evaluate(MARK)
        rows = page.locator("#fleet-live tbody")
        counts = page.locator("#fleet-live .summary")
        assert "lab-1" in rows.inner_text() and reason in rows.inner_text()
        wait_for(lambda: "refusing: 1" in counts.inner_text(), "the fleet's counts to show the refusing site")
        lab.report("active")
        wait_for(lambda: "lab-1" not in rows.inner_text(), "lab-1 to leave the refusing filter")
        wait_for(lambda: "refusing: 0" in counts.inner_text(), "the fleet's counts to follow")
        assert page.evaluate(STILL_SAME_PAGE)
    finally:
        page.context.close()


def test_audit_search_downloads_a_proof_that_verify_proof_accepts(
    browser: Browser, dashboard_fleet: Fleet, tmp_path: Path
) -> None:
    fleet = dashboard_fleet
    with fleet.http("operator") as http:  # something to find: an operator's refused and accepted requests
        assert http.post("/api/v1/sites", json={"name": "not-allowed"}).status_code == 403
    page = browser.sign_in(fleet.tokens["auditor"], "/ui/audit")
    try:
        page.fill("input[name=actor]", "bob")
        page.fill("input[name=action]", "POST /api/v1/sites")
        page.click("form[role=search] button")
        page.wait_for_url(re.compile(r".*/ui/audit\?.*actor=bob"))
        browser.check(page, "audit-search")
        rows = page.locator("table").last.locator("tbody tr")
        assert rows.count() >= 1
        for text in rows.all_inner_texts():
            assert "bob" in text and "POST /api/v1/sites" in text and "refused" in text

        rows.first.locator("td a").first.click()
        page.wait_for_url(re.compile(r".*/ui/audit/entries/\d+$"))
        index = page.url.rsplit("/", 1)[-1]
        browser.check(page, "audit-entry")
        vkey = re.search(r"--key '([^']+)'", page.locator("main pre code").inner_text()).group(1)  # type: ignore[union-attr]
        with page.expect_download() as proof_download:
            page.get_by_role("button", name="Inclusion proof (tlog-proof)").click()
        with page.expect_download() as entry_download:
            page.get_by_role("button", name="Entry bytes").click()
        proof, entry = tmp_path / f"{index}.tlog-proof", tmp_path / f"{index}.json"
        proof_download.value.save_as(proof)
        entry_download.value.save_as(entry)
    finally:
        page.context.close()

    done = sitewarden("audit", "verify-proof", str(proof), "--key", vkey, "--entry", str(entry))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"entry {index} is in sitewarden/controller/" in done.stdout
    entry.write_bytes(entry.read_bytes().replace(b'"bob"', b'"eve"'))
    tampered = sitewarden("audit", "verify-proof", str(proof), "--key", vkey, "--entry", str(entry))
    assert tampered.returncode == 1, tampered.stdout


def test_a_new_token_is_shown_once_keys_are_managed_and_a_session_ends_when_its_token_is_revoked(
    browser: Browser, dashboard_fleet: Fleet, tmp_path: Path
) -> None:
    fleet = dashboard_fleet
    admin = browser.sign_in(fleet.tokens["admin"], "/ui/people")
    try:
        admin.fill("#token-name", "dave")
        admin.select_option("#token-role", "operator")
        admin.click("text=Create the token")
        secret = admin.locator("#token-secret").inner_text().strip()
        assert secret.startswith("swt_")
        browser.check(admin, "token-created")
        browser.visit(admin, "/ui/people", "people-after-create")
        assert secret not in admin.content()

        # An approver's public key, registered and revoked through the page (the key pair made as the CLI does).
        approval.generate_approver_key(tmp_path / "erin.pem", tmp_path / "erin.pub.pem")
        admin.fill("#key-approver", "erin")
        admin.fill("#key-pem", (tmp_path / "erin.pub.pem").read_text())
        admin.click("text=Register the key")
        admin.wait_for_url(re.compile(r".*/ui/people\?done=key-added"))
        key_row = admin.locator("tr", has_text="erin").last
        assert "active" in key_row.inner_text()
        key_row.get_by_role("link", name=re.compile("Revoke")).click()
        admin.get_by_role("button", name="Revoke the key").click()
        admin.wait_for_url(re.compile(r".*/ui/people\?done=key-revoked"))
        assert "revoked" in admin.locator("tr", has_text="erin").last.inner_text()

        dave = browser.sign_in(secret, "/ui/fleet")
        try:
            dave.evaluate(MARK)
            row = admin.locator("tr", has_text="dave")
            row.get_by_role("link", name=re.compile("Revoke")).click()
            browser.check(admin, "confirm-revoke-token")
            admin.get_by_role("button", name="Revoke the token").click()
            admin.wait_for_url(re.compile(r".*/ui/people\?done=revoked"))
            # Dave's open fleet page polls every two seconds: its next poll is refused and sends him to sign in.
            dave.wait_for_url(re.compile(r".*/ui/login\?next=.*fleet"), timeout=15_000)
            response = dave.goto("/ui/fleet")
            assert response is not None and "/ui/login" in dave.url
        finally:
            dave.context.close()
    finally:
        admin.context.close()
