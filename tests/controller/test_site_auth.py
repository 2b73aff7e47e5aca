"""Site JWT authentication on SQLite and PostgreSQL: single use, the per-process site hints, and
the routes that authenticate their site in their own transaction.

The hints spare the read of a site's row; the jti insert re-checks the row in the database.
These tests change sites behind the hints' back, as another controller process sharing the
database would, and through `controller.sites` in this process, and expect the refusal at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker
from starlette.requests import Request

from controller import access, auth, migrate, sites
from controller.db import SeenJti, Site, make_engine, make_sessionmaker, utcnow
from controller.errors import Forbidden, Unauthenticated
from sitewarden import sitejwt
from sitewarden.keys import encode_public_key
from tests.conftest import BACKENDS

AUDIENCE = "https://controller.example"


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'c.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_db_url")
    made = make_engine(url)
    migrate.upgrade(made)
    auth.site_hints.forget()
    yield made
    auth.site_hints.forget()
    made.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker:
    return make_sessionmaker(engine)


def _enrolled(sessions: sessionmaker, name: str = "branch-1") -> tuple[str, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    with sessions() as db:
        site = Site(name=name, labels={}, status="active", public_key=encode_public_key(key), enrolled_at=utcnow())
        db.add(site)
        db.commit()
        return site.id, key


def _authenticate(sessions: sessionmaker, token: str, *, commit: bool = True) -> auth.Principal:
    with sessions() as db:
        principal = auth.site(db, token, AUDIENCE, commit=commit)
        if not commit:
            db.commit()
        return principal


def _seen(sessions: sessionmaker) -> int:
    with sessions() as db:
        return int(db.scalar(select(func.count()).select_from(SeenJti)) or 0)


def _behind_our_back(engine: Engine, site_id: str, **values: object) -> None:
    """Change a site's row on a connection of its own, as another controller process would."""
    with engine.begin() as conn:
        conn.execute(update(Site).where(Site.id == site_id).values(**values))


@pytest.mark.parametrize("commit", [True, False], ids=["own-commit", "route-commit"])
def test_a_site_token_is_accepted_once_with_or_without_a_hint(sessions: sessionmaker, commit: bool) -> None:
    site_id, key = _enrolled(sessions)
    first = sitejwt.sign(key, site_id, AUDIENCE)
    assert auth.site_hints.get(site_id) is None
    assert _authenticate(sessions, first, commit=commit) == auth.Principal("site", "branch-1", site_id=site_id)
    assert auth.site_hints.get(site_id) is not None  # the next token skips the read of the row
    with pytest.raises(Unauthenticated, match="replayed"):
        _authenticate(sessions, first, commit=commit)
    second = sitejwt.sign(key, site_id, AUDIENCE)
    assert _authenticate(sessions, second, commit=commit).site_id == site_id
    with pytest.raises(Unauthenticated, match="replayed"):
        _authenticate(sessions, second, commit=commit)
    assert _seen(sessions) == 2


def test_a_site_disabled_by_another_process_is_refused_at_its_next_request(
    sessions: sessionmaker, engine: Engine
) -> None:
    site_id, key = _enrolled(sessions)
    _authenticate(sessions, sitejwt.sign(key, site_id, AUDIENCE))
    assert auth.site_hints.get(site_id) is not None
    _behind_our_back(engine, site_id, status="disabled", disabled_at=utcnow())
    with pytest.raises(Forbidden, match="branch-1 is disabled"):
        _authenticate(sessions, sitejwt.sign(key, site_id, AUDIENCE))
    assert auth.site_hints.get(site_id) is None
    assert _seen(sessions) == 1  # the refused token's jti was not recorded


def test_a_site_disabled_here_is_refused_at_its_next_request(sessions: sessionmaker) -> None:
    site_id, key = _enrolled(sessions)
    _authenticate(sessions, sitejwt.sign(key, site_id, AUDIENCE))
    with sessions() as db:
        sites.disable(db, site_id)
    with pytest.raises(Forbidden, match="disabled"):
        _authenticate(sessions, sitejwt.sign(key, site_id, AUDIENCE))


def test_a_forged_token_for_a_disabled_site_is_refused_as_disabled(sessions: sessionmaker, engine: Engine) -> None:
    # As without hints: a disabled site's tokens are refused before their signature is looked at.
    site_id, key = _enrolled(sessions)
    _authenticate(sessions, sitejwt.sign(key, site_id, AUDIENCE))
    _behind_our_back(engine, site_id, status="disabled")
    with pytest.raises(Forbidden, match="disabled"):
        _authenticate(sessions, sitejwt.sign(Ed25519PrivateKey.generate(), site_id, AUDIENCE))


def test_a_key_rotated_by_another_process_takes_effect_at_once(sessions: sessionmaker, engine: Engine) -> None:
    site_id, old = _enrolled(sessions)
    _authenticate(sessions, sitejwt.sign(old, site_id, AUDIENCE))
    new = Ed25519PrivateKey.generate()
    _behind_our_back(engine, site_id, public_key=encode_public_key(new), key_rotated_at=utcnow())
    with pytest.raises(Unauthenticated, match="rejected"):
        _authenticate(sessions, sitejwt.sign(old, site_id, AUDIENCE))  # the hint still holds the old key
    assert _authenticate(sessions, sitejwt.sign(new, site_id, AUDIENCE)).site_id == site_id
    with pytest.raises(Unauthenticated, match="rejected"):
        _authenticate(sessions, sitejwt.sign(old, site_id, AUDIENCE))  # nor once the hint has the new key
    assert _seen(sessions) == 2


def test_a_key_rotated_here_takes_effect_at_once(sessions: sessionmaker) -> None:
    site_id, old = _enrolled(sessions)
    _authenticate(sessions, sitejwt.sign(old, site_id, AUDIENCE))
    new = Ed25519PrivateKey.generate()
    with sessions() as db:
        sites.rotate_key(db, site_id, encode_public_key(new), sitejwt.sign(new, site_id, AUDIENCE), AUDIENCE)
    with pytest.raises(Unauthenticated):
        _authenticate(sessions, sitejwt.sign(old, site_id, AUDIENCE))
    assert _authenticate(sessions, sitejwt.sign(new, site_id, AUDIENCE)).site_id == site_id


def test_a_renamed_site_is_named_by_its_current_name(sessions: sessionmaker, engine: Engine) -> None:
    # Audit records name the site: a hint must not keep an old name alive.
    site_id, key = _enrolled(sessions)
    _authenticate(sessions, sitejwt.sign(key, site_id, AUDIENCE))
    _behind_our_back(engine, site_id, name="branch-renamed")
    assert _authenticate(sessions, sitejwt.sign(key, site_id, AUDIENCE)).name == "branch-renamed"


def test_a_deleted_or_unknown_site_is_refused(sessions: sessionmaker, engine: Engine) -> None:
    site_id, key = _enrolled(sessions)
    _authenticate(sessions, sitejwt.sign(key, site_id, AUDIENCE))
    _behind_our_back(engine, site_id, public_key=None)
    with pytest.raises(Unauthenticated, match="unknown or unenrolled"):
        _authenticate(sessions, sitejwt.sign(key, site_id, AUDIENCE))
    with pytest.raises(Unauthenticated, match="unknown or unenrolled"):
        _authenticate(sessions, sitejwt.sign(key, "no-such-site", AUDIENCE))


def test_expired_and_malformed_tokens_are_refused_with_a_hint(sessions: sessionmaker) -> None:
    site_id, key = _enrolled(sessions)
    _authenticate(sessions, sitejwt.sign(key, site_id, AUDIENCE))
    expired = sitejwt.sign(key, site_id, AUDIENCE, ttl_s=60, now=utcnow().timestamp() - 600)
    with pytest.raises(Unauthenticated, match="expired"):
        _authenticate(sessions, expired)
    with pytest.raises(Unauthenticated, match="malformed"):
        _authenticate(sessions, "not.a-token")
    other_audience = sitejwt.sign(key, site_id, "https://elsewhere.example")
    with pytest.raises(Unauthenticated):
        _authenticate(sessions, other_audience)
    assert _seen(sessions) == 1


def test_site_hints_are_bounded() -> None:
    hints = auth.SiteHints(limit=3)
    key = Ed25519PrivateKey.generate().public_key()
    for i in range(5):
        hints.remember(f"site-{i}", auth.SiteHint(f"s{i}", "k", key))
    assert [hints.get(f"site-{i}") is not None for i in range(5)] == [False, False, True, True, True]
    hints.forget("site-4")
    assert hints.get("site-4") is None
    hints.forget()
    assert hints.get("site-3") is None


def _request(method: str, path: str, token: str | None) -> Request:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    route = SimpleNamespace(path=path)
    return Request({"type": "http", "method": method, "path": path, "headers": headers, "route": route, "state": {}})


def test_routes_that_authenticate_in_their_own_transaction_are_site_routes() -> None:
    assert auth.SITE_AUTH_IN_ROUTE
    assert all(access.rule_for(*route) is access.SITE for route in auth.SITE_AUTH_IN_ROUTE)


def test_a_route_authenticates_its_site_itself_only_when_listed(engine: Engine, sessions: sessionmaker) -> None:
    # Fail closed: any other route (a site route `principal` checks, a person's route) is refused outright.
    site_id, key = _enrolled(sessions)
    for method, path in [("GET", "/api/v1/agent/desired"), ("GET", "/api/v1/sites"), ("POST", "/api/v1/nowhere")]:
        request = _request(method, path, sitejwt.sign(key, site_id, AUDIENCE))
        assert not auth.authenticates_in_route(request)
        with engine.begin() as conn, pytest.raises(Forbidden):
            auth.authorize_site_on(request, conn, AUDIENCE)
    assert _seen(sessions) == 0
    status = _request("POST", "/api/v1/agent/status", sitejwt.sign(key, site_id, AUDIENCE))
    assert auth.authenticates_in_route(status)
    with engine.begin() as conn:
        assert auth.authorize_site_on(status, conn, AUDIENCE).site_id == site_id
    assert status.state.principal.site_id == site_id  # the audit record names the site
    with engine.begin() as conn, pytest.raises(Unauthenticated, match="replayed"):
        auth.authorize_site_on(status, conn, AUDIENCE)
    for token, refusal in [(None, Unauthenticated), ("swt_0123_secret", Forbidden), ("garbage", Unauthenticated)]:
        with engine.begin() as conn, pytest.raises(refusal):
            auth.authorize_site_on(_request("POST", "/api/v1/agent/status", token), conn, AUDIENCE)
