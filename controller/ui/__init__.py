"""The admin dashboard: the fleet, releases, approvals, rollouts, jobs and the audit trail in a browser.

Server-rendered by the controller itself (Jinja2 templates in `templates/`, htmx for live updates,
uPlot for charts, Pico's classless CSS; all vendored from npm at pinned versions in `static/vendor/`,
see `vendor.py`), under the REST API's own rules: the same access table (`controller.access`,
each page or action with the rule of its REST twin), the same route functions and service
functions, the same audit entries. People sign in with an API token exchanged for a short-lived
session cookie (`sessions`); responses carry a strict nonce-based Content-Security-Policy
(`dashboard`). `fleet`, `audit_index` and `history` are the queries that keep the pages fast at
thousands of sites and hundreds of thousands of audit entries.
"""
