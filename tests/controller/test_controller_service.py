"""The controller as a service: telemetry, metrics, unexpected errors, schema migrations, its CLI."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from opentelemetry.sdk.trace.export import ConsoleSpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import select

from controller import migrate, sites
from controller.app import create_app
from controller.config import load
from controller.db import Base, Upload, make_engine, make_sessionmaker
from controller.runtime import Runtime
from controller.telemetry import tracing_exporter
from tests.controller_server import ControllerServer, free_port, serve, sitewarden
from tests.tls import make_pki


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    data = tmp_path_factory.mktemp("service") / "controller"
    done = sitewarden("controller", "init", "--data", str(data), "--root-key-out", str(data.parent / "root.pem"))
    assert done.returncode == 0, done.stderr
    return data, done.stdout.strip().splitlines()[-1]


@pytest.fixture
def runtime(data_dir: tuple[Path, str]) -> Iterator[Runtime]:
    opened = Runtime.open(data_dir[0])
    yield opened
    opened.close()


# -- telemetry ---------------------------------------------------------------------------


def test_tracing_is_off_unless_the_standard_variables_ask_for_it() -> None:
    assert tracing_exporter({}) is None
    assert tracing_exporter({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert isinstance(tracing_exporter({"OTEL_TRACES_EXPORTER": "console"}), ConsoleSpanExporter)
    assert tracing_exporter({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}) is not None
    assert tracing_exporter({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}) is None
    with pytest.raises(ValueError, match="zipkin"):
        tracing_exporter({"OTEL_TRACES_EXPORTER": "zipkin"})


def _call(app: object, path: str, token: str) -> httpx.Response:
    """One request to an in-process app (no server)."""

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path, headers={"Authorization": f"Bearer {token}"})

    return asyncio.run(call())


def test_requests_are_traced_when_tracing_is_configured(runtime: Runtime, data_dir: tuple[Path, str]) -> None:
    exporter = InMemorySpanExporter()
    app = create_app(runtime, span_exporter=exporter)
    response = _call(app, "/api/v1/me", data_dir[1])
    assert response.status_code == 200
    app.state.tracer_provider.force_flush()
    routes = {span.attributes.get("http.route") for span in exporter.get_finished_spans()}
    assert "/api/v1/me" in routes


def test_an_unexpected_failure_is_a_500_problem_without_details(
    runtime: Runtime, data_dir: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*_: object) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(sites, "get", explode)
    response = _call(create_app(runtime), "/api/v1/sites/x", data_dir[1])
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "secret" not in response.text and "Traceback" not in response.text


def test_metrics_count_requests_by_route_template(controller: ControllerServer) -> None:
    with controller.http(controller.admin_token) as http:
        http.get("/api/v1/sites/does-not-exist")
        text = http.get("/metrics").text
    assert 'sitewarden_http_requests_total{method="GET",route="/api/v1/sites/{site}",status="404"}' in text
    assert "does-not-exist" not in text


# -- storage -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migrations_build_exactly_the_schema_the_models_declare(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_db_url")
    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.head_revision()
        migrate.upgrade(engine)  # idempotent
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diffs == [], f"models and migrations differ: {diffs}"
    finally:
        engine.dispose()


# -- the CLI -----------------------------------------------------------------------------


def test_init_refuses_an_existing_or_non_empty_data_dir(data_dir: tuple[Path, str], tmp_path: Path) -> None:
    again = sitewarden("controller", "init", "--data", str(data_dir[0]), "--root-key-online")
    assert again.returncode == 2 and "already a controller data dir" in again.stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    done = sitewarden("controller", "init", "--data", str(tmp_path / "busy"), "--root-key-online")
    assert done.returncode == 2 and "not empty" in done.stderr


def test_serve_refuses_a_data_dir_it_cannot_use_and_says_why(data_dir: tuple[Path, str], tmp_path: Path) -> None:
    missing = sitewarden("controller", "serve", "--data", str(tmp_path / "nope"), "--port", str(free_port()))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "controller.json").write_text("{not json")
    done = sitewarden("controller", "serve", "--data", str(broken), "--port", str(free_port()))
    assert done.returncode == 1 and "cannot read" in done.stderr
    unreachable = sitewarden(
        "controller",
        "serve",
        "--data",
        str(data_dir[0]),
        "--port",
        str(free_port()),
        "--database-url",
        f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none",
    )
    assert unreachable.returncode == 1 and "cannot reach the database" in unreachable.stderr
    plain = sitewarden("controller", "serve", "--data", str(data_dir[0]), "--host", "0.0.0.0")
    assert plain.returncode == 2 and "refusing plain HTTP" in plain.stderr


def test_a_second_controller_on_the_same_data_dir_is_refused(controller: ControllerServer) -> None:
    done = sitewarden("controller", "serve", "--data", str(controller.data_dir), "--port", str(free_port()))
    assert done.returncode == 1 and "another controller process" in done.stderr


def test_root_rotation_with_an_offline_root_key(tmp_path: Path) -> None:
    data, root_key = tmp_path / "c", tmp_path / "offline" / "root.pem"
    done = sitewarden("controller", "init", "--data", str(data), "--root-key-out", str(root_key))
    assert done.returncode == 0, done.stderr
    assert root_key.exists() and not (data / "keys" / "tuf-root.pem").exists()
    before = sitewarden("controller", "keys", "--data", str(data)).stdout
    assert "tuf root version: 1" in before
    new_key = tmp_path / "offline" / "root-2.pem"
    rotated = sitewarden(
        "controller",
        "rotate-root",
        "--data",
        str(data),
        "--old-root-key",
        str(root_key),
        "--new-root-key-out",
        str(new_key),
    )
    assert rotated.returncode == 0, rotated.stderr
    after = sitewarden("controller", "keys", "--data", str(data)).stdout
    assert "tuf root version: 2" in after
    refused = sitewarden(
        "controller",
        "rotate-root",
        "--data",
        str(data),
        "--old-root-key",
        str(root_key),
        "--new-root-key-out",
        str(tmp_path / "x.pem"),
    )
    assert refused.returncode == 1 and not (tmp_path / "x.pem").exists()


def test_cli_manages_tokens_sites_and_releases(controller: ControllerServer, tmp_path: Path) -> None:
    env = controller.cli_env()
    site = f"cli-{os.urandom(3).hex()}"
    assert sitewarden("site", "create", site, "--label", "region=eu-west", env=env).returncode == 0
    listed = sitewarden("site", "list", env=env)
    assert site in listed.stdout
    join = sitewarden("site", "token", site, "--ttl", "30m", env=env)
    assert join.returncode == 0 and join.stdout.strip().startswith("swj1.")
    bad = sitewarden("site", "create", "x", "--label", "novalue", env=env)
    assert bad.returncode == 2 and "key=value" in bad.stderr
    created = sitewarden("token", "create", "--role", "auditor", "--name", "ivan", env=env)
    assert created.returncode == 0 and created.stdout.strip().startswith("swt_")
    refused = sitewarden("site", "create", "other", env={**env, "SITEWARDEN_TOKEN": created.stdout.strip()})
    assert refused.returncode == 1 and "403" in refused.stderr


def test_release_push_killed_midway_resumes_from_where_the_bytes_stopped(
    controller: ControllerServer, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    release.mkdir()
    weights = release / "model.onnx"
    with open(weights, "wb") as f:
        for _ in range(48):
            f.write(os.urandom(1 << 20))
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"owner": "cli-test", "intended_purposes": ["fraud"]}))
    name = f"push-{os.urandom(3).hex()}"
    args = [
        sys.executable,
        "-m",
        "sitewarden",
        "release",
        "push",
        str(release),
        "--name",
        name,
        "--version",
        "1.0.0",
        "--metadata",
        str(card),
    ]
    env = {**os.environ, **controller.cli_env(controller.token("operator"))}
    engine = make_engine(load(controller.data_dir).database_url)
    sessions = make_sessionmaker(engine)

    def upload_row() -> Upload | None:
        with sessions() as s:
            return s.scalar(select(Upload).where(Upload.sha256 == sha))

    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    partial = None
    while time.monotonic() < deadline:
        row = upload_row()
        file = controller.data_dir / "uploads" / row.id if row is not None else None
        if row is not None and file is not None and file.exists() and file.stat().st_size > (8 << 20):
            partial = row.id
            break
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert partial is not None, "the upload never started"
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    with sessions() as s:
        rows = s.scalars(select(Upload).where(Upload.sha256 == sha)).all()
    engine.dispose()
    assert [r.id for r in rows] == [partial], "the second run started a new upload instead of resuming"
    assert rows[0].completed_at is not None
    with controller.http(controller.token("operator")) as http:
        shown = http.get(f"/api/v1/releases/{name}/1.0.0").json()
    assert shown["files"] == [{"path": "model.onnx", "sha256": sha, "size": 48 << 20}]


def test_stopped_controller_restarts_with_its_data(tmp_path: Path) -> None:
    """Stop a controller, start it again on the same data dir: nothing is lost."""
    data = tmp_path / "restart" / "controller"
    done = sitewarden("controller", "init", "--data", str(data), "--root-key-online")
    token = done.stdout.strip().splitlines()[-1]
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    first = serve(data, pki, port, token, "sqlite")
    try:
        with first.client(token) as admin:
            admin.post("/api/v1/sites", {"name": "survivor"})
    finally:
        first.stop()
    second = serve(data, pki, port, token, "sqlite")
    try:
        with second.client(token) as admin:
            assert admin.get("/api/v1/sites/survivor")["name"] == "survivor"
    finally:
        second.stop()
