"""Who may call what: one table for every route of the controller.

A rule is a set of roles (people with bearer API tokens), `SITE` (an enrolled agent with
its site JWT), `JOIN` (the caller presents a one-time join token in the body) or
`PUBLIC`. A route without a rule is refused (fail closed), and a test walks the
application's routes to make sure none lacks one.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    APPROVER = "approver"
    AUDITOR = "auditor"


class Special(StrEnum):
    PUBLIC = "public"
    SITE = "site"
    JOIN = "join"


Rule = frozenset[Role] | Special

PUBLIC, SITE, JOIN = Special.PUBLIC, Special.SITE, Special.JOIN
ANYONE = frozenset(Role)
ADMIN = frozenset({Role.ADMIN})
STAFF = frozenset({Role.ADMIN, Role.OPERATOR})
READERS = frozenset({Role.ADMIN, Role.OPERATOR, Role.AUDITOR})
REVIEWERS = frozenset({Role.ADMIN, Role.OPERATOR, Role.APPROVER})
APPROVERS = frozenset({Role.APPROVER})
AUDITORS = frozenset({Role.ADMIN, Role.AUDITOR})
AUDIT_EXPORT = frozenset({Role.AUDITOR})

# Site routes whose own writes are one short transaction that takes no other lock: the site
# token's jti is recorded in that transaction (one commit instead of two). Other site routes
# commit it at once, before they take locks of their own.
JTI_IN_ROUTE_TRANSACTION = frozenset({("POST", "/api/v1/agent/status")})

RULES: dict[tuple[str, str], Rule] = {
    # Service
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    # TUF: signed metadata and targets are public by design; their signatures protect them.
    ("GET", "/tuf/metadata/{name}"): PUBLIC,
    ("GET", "/tuf/targets/{path:path}"): PUBLIC,
    # People and tokens
    ("GET", "/api/v1/me"): ANYONE,
    ("POST", "/api/v1/tokens"): ADMIN,
    ("GET", "/api/v1/tokens"): ADMIN,
    ("POST", "/api/v1/tokens/{token_id}/revoke"): ADMIN,
    # Sites and enrollment
    ("POST", "/api/v1/sites"): ADMIN,
    ("GET", "/api/v1/sites"): READERS,
    ("GET", "/api/v1/sites/{site}"): READERS,
    ("POST", "/api/v1/sites/{site}/disable"): ADMIN,
    ("POST", "/api/v1/sites/{site}/join-tokens"): ADMIN,
    ("POST", "/api/v1/enroll"): JOIN,
    ("GET", "/api/v1/agent/whoami"): SITE,
    ("POST", "/api/v1/agent/rotate-key"): SITE,
    # Approver keys
    ("POST", "/api/v1/approvers"): ADMIN,
    ("GET", "/api/v1/approvers"): ANYONE,
    ("POST", "/api/v1/approvers/{key_id}/revoke"): ADMIN,
    # Uploads and releases
    ("POST", "/api/v1/uploads"): STAFF,
    ("GET", "/api/v1/uploads/{upload_id}"): STAFF,
    ("PATCH", "/api/v1/uploads/{upload_id}"): STAFF,
    ("POST", "/api/v1/releases"): STAFF,
    ("GET", "/api/v1/releases"): ANYONE,
    ("GET", "/api/v1/releases/{name}/{version}"): ANYONE,
    ("GET", "/api/v1/releases/{name}/{version}/files/{path:path}"): REVIEWERS,
    ("POST", "/api/v1/releases/{name}/{version}/approvals"): APPROVERS,
    # Rollouts of desired state
    ("POST", "/api/v1/rollouts"): STAFF,
    ("GET", "/api/v1/rollouts"): READERS,
    ("GET", "/api/v1/rollouts/{rollout}"): READERS,
    ("POST", "/api/v1/rollouts/{rollout}/promote"): STAFF,
    ("POST", "/api/v1/rollouts/{rollout}/pause"): STAFF,
    ("POST", "/api/v1/rollouts/{rollout}/resume"): STAFF,
    ("POST", "/api/v1/rollouts/{rollout}/rollback"): STAFF,
    # Federated fine-tuning jobs
    ("POST", "/api/v1/jobs"): STAFF,
    ("GET", "/api/v1/jobs"): READERS,
    ("GET", "/api/v1/jobs/{job}"): READERS,
    ("POST", "/api/v1/jobs/{job}/cancel"): STAFF,
    ("GET", "/api/v1/sites/{site}/desired"): READERS,
    # The agent channel
    ("GET", "/api/v1/agent/desired"): SITE,
    ("POST", "/api/v1/agent/status"): SITE,
    ("POST", "/api/v1/agent/jobs/{job_id}/participation"): SITE,
    # Witness and audit
    ("POST", "/api/v1/witness/add-checkpoint"): SITE,
    ("GET", "/api/v1/sites/{site}/checkpoint"): AUDITORS,
    ("GET", "/api/v1/audit/export"): AUDIT_EXPORT,
}


# The dashboard (controller/ui). Each page or action has the rule of the REST route it shows or
# calls (`UI_SAME_AS`), so that the two can never drift; an action is also recorded in the audit
# log as that REST call (with `"via": "dashboard"`). Pages without a REST twin have their own rule.
UI_SAME_AS: dict[tuple[str, str], tuple[str, str]] = {
    ("GET", "/ui/fleet"): ("GET", "/api/v1/sites"),
    ("GET", "/ui/sites/{site}"): ("GET", "/api/v1/sites/{site}"),
    ("GET", "/ui/sites/{site}/disable"): ("POST", "/api/v1/sites/{site}/disable"),
    ("POST", "/ui/sites/{site}/disable"): ("POST", "/api/v1/sites/{site}/disable"),
    ("GET", "/ui/releases"): ("GET", "/api/v1/releases"),
    ("GET", "/ui/releases/{name}/{version}"): ("GET", "/api/v1/releases/{name}/{version}"),
    ("GET", "/ui/releases/{name}/{version}/approve"): ("POST", "/api/v1/releases/{name}/{version}/approvals"),
    ("GET", "/ui/rollouts"): ("GET", "/api/v1/rollouts"),
    ("POST", "/ui/rollouts"): ("POST", "/api/v1/rollouts"),
    ("GET", "/ui/rollouts/{rollout}"): ("GET", "/api/v1/rollouts/{rollout}"),
    **{
        (method, f"/ui/rollouts/{{rollout}}/{action}"): ("POST", f"/api/v1/rollouts/{{rollout}}/{action}")
        for action in ("promote", "pause", "resume", "rollback")
        for method in ("GET", "POST")
    },
    ("GET", "/ui/jobs"): ("GET", "/api/v1/jobs"),
    ("GET", "/ui/jobs/{job}"): ("GET", "/api/v1/jobs/{job}"),
    ("GET", "/ui/jobs/{job}/cancel"): ("POST", "/api/v1/jobs/{job}/cancel"),
    ("POST", "/ui/jobs/{job}/cancel"): ("POST", "/api/v1/jobs/{job}/cancel"),
    ("GET", "/ui/audit/export"): ("GET", "/api/v1/audit/export"),
    ("GET", "/ui/people"): ("GET", "/api/v1/tokens"),
    ("POST", "/ui/tokens"): ("POST", "/api/v1/tokens"),
    ("GET", "/ui/tokens/{token_id}/revoke"): ("POST", "/api/v1/tokens/{token_id}/revoke"),
    ("POST", "/ui/tokens/{token_id}/revoke"): ("POST", "/api/v1/tokens/{token_id}/revoke"),
    ("POST", "/ui/approvers"): ("POST", "/api/v1/approvers"),
    ("GET", "/ui/approvers/{key_id}/revoke"): ("POST", "/api/v1/approvers/{key_id}/revoke"),
    ("POST", "/ui/approvers/{key_id}/revoke"): ("POST", "/api/v1/approvers/{key_id}/revoke"),
}
RULES.update({ui: RULES[api] for ui, api in UI_SAME_AS.items()})
RULES.update(
    {
        ("GET", "/"): PUBLIC,  # a redirect to the dashboard
        ("GET", "/ui"): ANYONE,  # a redirect to the home page of the caller's role
        ("GET", "/ui/login"): PUBLIC,
        ("POST", "/ui/login"): PUBLIC,  # exchanges an API token for a session (login CSRF token checked)
        ("POST", "/ui/logout"): ANYONE,
        ("GET", "/ui/static/{path:path}"): PUBLIC,  # vendored and own assets, from a fixed list
        # The controller's own audit log: searched and proven by those who read audit evidence (the
        # roles of a site's witnessed checkpoint); exported by auditors only, as over REST.
        ("GET", "/ui/audit"): AUDITORS,
        ("GET", "/ui/audit/entries/{index}"): AUDITORS,
        ("GET", "/ui/audit/entries/{index}/proof"): AUDITORS,
        ("GET", "/ui/audit/entries/{index}/entry"): AUDITORS,
    }
)


ACCESS_MARK = "Access: "


def describe(rule: Rule) -> str:
    """The sentence the OpenAPI description of a route carries."""
    if rule is PUBLIC:
        return ACCESS_MARK + "public, no credentials."
    if rule is SITE:
        return ACCESS_MARK + "enrolled sites, with a site JWT (EdDSA, at most five minutes, single use)."
    if rule is JOIN:
        return ACCESS_MARK + "anyone holding a valid one-time join token, given in the body."
    return ACCESS_MARK + "roles " + ", ".join(sorted(r.value for r in rule)) + "."


def rule_for(method: str, path: str) -> Rule | None:
    return RULES.get((method, path))


def allows(role: Role | None, method: str, path: str) -> bool:
    """Whether a person of `role` may call the route: what the dashboard asks before it shows a link or button."""
    rule = rule_for(method, path)
    if rule is None or role is None:
        return False
    return rule is PUBLIC or (isinstance(rule, frozenset) and role in rule)
