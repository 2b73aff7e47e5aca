"""Who may call what: every route has a rule, and the live server enforces each rule."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.routing import iter_route_contexts

from controller import access, auth
from controller.access import JOIN, PUBLIC, SITE, SITE_OR_PERSON, Role
from controller.app import create_app
from controller.config import load
from controller.db import make_engine, make_sessionmaker, utcnow
from controller.runtime import Runtime
from tests.controller_server import ControllerServer, sitewarden

CREDENTIALS = ["none", "expired", "revoked", *[r.value for r in Role]]


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[str, str]]]:
    """(method, path template) of every route of the application, read from its route table."""
    data = tmp_path_factory.mktemp("routes") / "controller"
    assert sitewarden("controller", "init", "--data", str(data), "--root-key-online").returncode == 0
    runtime = Runtime.open(data)
    try:
        app = create_app(runtime)
        found = []
        for route in iter_route_contexts(app.routes):
            found += [(m, route.path or "") for m in sorted(route.methods or ()) if m != "HEAD"]
        yield found
    finally:
        runtime.close()


def test_every_route_has_an_access_rule_and_every_rule_a_route(routes: list[tuple[str, str]]) -> None:
    missing = [r for r in routes if access.rule_for(*r) is None]
    assert not missing, f"routes without an access rule in controller/access.py: {missing}"
    stale = set(access.RULES) - set(routes)
    assert not stale, f"access rules for routes that do not exist: {stale}"


def test_openapi_tags_every_operation_and_states_who_may_call_it(controller: ControllerServer) -> None:
    with controller.http() as http:
        spec = http.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            assert op.get("tags"), f"{method.upper()} {path} has no tag"
            assert access.ACCESS_MARK in op.get("description", ""), f"{method.upper()} {path}: who may call it?"


def _credential(controller: ControllerServer, kind: str) -> str | None:
    if kind == "none":
        return None
    if kind in {r.value for r in Role}:
        return controller.token(kind)
    # Expired and revoked tokens are made in the controller's own database.
    cfg = load(controller.data_dir)
    engine = make_engine(cfg.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            record, token = auth.issue_token(session, f"test-{kind}", Role.ADMIN, timedelta(days=1), "test")
            if kind == "expired":
                record.expires_at = utcnow() - timedelta(seconds=1)
            else:
                record.revoked_at = utcnow()
            session.commit()
    finally:
        engine.dispose()
    return token


def _expected(rule: access.Rule, credential: str) -> str:
    if rule is PUBLIC or rule is JOIN:
        return "allowed"
    if credential == "none":
        return "401"
    if rule is SITE:
        return "403"  # a person's token, valid or not, is never a site credential
    if credential in ("expired", "revoked"):
        return "401"
    if rule is SITE_OR_PERSON:
        return "allowed"  # any role (what it reads is narrowed per target: tests/attacks/test_hostile_network_tuf.py)
    return "allowed" if Role(credential) in rule else "403"


def test_role_matrix_on_the_live_server(controller: ControllerServer, routes: list[tuple[str, str]]) -> None:
    """Every route, with no token, an expired and a revoked token, and a token of each role."""
    tokens = {kind: _credential(controller, kind) for kind in CREDENTIALS}
    failures = []
    for method, template in routes:
        rule = access.rule_for(method, template)
        assert rule is not None
        path = re.sub(r"\{[^}]+\}", "x", template)
        for kind, token in tokens.items():
            with controller.http(token) as http:
                response = http.request(method, path, json={} if method in {"POST", "PATCH"} else None)
            want = _expected(rule, kind)
            got = response.status_code
            ok = got not in (401, 403) if want == "allowed" else got == int(want)
            if not ok or got >= 500:
                failures.append(f"{method} {template} with {kind}: {got}, want {want}")
            if got >= 400:
                assert response.headers["content-type"].startswith("application/problem+json"), (method, path)
    assert not failures, "\n".join(failures)
