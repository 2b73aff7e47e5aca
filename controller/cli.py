"""`sitewarden controller ...`: create a data dir, run the service, migrate, rotate the TUF root."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
from datetime import timedelta
from pathlib import Path
from typing import Annotated, NoReturn

import httpx
import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audit import AuditError
from audit.note import write_key_pair
from controller import config as config_mod
from controller.access import Role
from controller.config import ConfigError, ControllerConfig
from controller.errors import ControllerError
from sitewarden import logs
from sitewarden.keys import write_private_key

# The server side (SQLAlchemy, Alembic, python-tuf, FastAPI, uvicorn) is imported inside the
# commands that need it: every `sitewarden` invocation loads this module.

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help="Run and manage the controller.")

DataDir = Annotated[Path, typer.Option("--data", help="The controller's data directory.")]


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def init(
    data: DataDir,
    root_key_out: Annotated[
        Path | None,
        typer.Option("--root-key-out", help="Write the TUF root key here (to keep offline) instead of the data dir."),
    ] = None,
    public_url: Annotated[
        str, typer.Option("--public-url", help="The URL agents and people use to reach this controller.")
    ] = "https://127.0.0.1:8443",
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="SQLAlchemy URL, e.g. postgresql+psycopg://...; default SQLite in --data."),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="This controller's name, in its audit log origin.")] = "main",
) -> None:
    """Create keys (TUF root, targets, snapshot, timestamp; audit log), the database and a bootstrap admin token."""
    from controller import migrate  # noqa: PLC0415
    from controller.auth import issue_token  # noqa: PLC0415
    from controller.db import make_engine, make_sessionmaker  # noqa: PLC0415
    from controller.tuf_repo import TufRepository, generate_keys  # noqa: PLC0415

    if (data / config_mod.CONFIG_FILE).exists():
        _fail(f"{data} is already a controller data dir; refusing to overwrite its keys")
    if data.exists() and any(data.iterdir()):
        _fail(f"{data} exists and is not empty; give a new or empty directory")
    if root_key_out is not None and root_key_out.exists():
        _fail(f"{root_key_out} already exists; refusing to overwrite a key")
    created = not data.exists()
    try:
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        cfg = ControllerConfig(
            data_dir=data.resolve(),
            public_url=public_url.rstrip("/"),
            database_url=database_url or config_mod.default_database_url(data),
            audit_origin=f"sitewarden/controller/{name}",
        )
        cfg.keys_dir.mkdir(mode=0o700)
        for folder in (cfg.tuf_dir, cfg.blobs_dir, cfg.uploads_dir):
            folder.mkdir()
        generate_keys(cfg.keys_dir, root_key_out)
        repo = TufRepository.create(cfg.tuf_dir, cfg.keys_dir, root_key_path=root_key_out, expiries=cfg.expiries)
        _, audit_vkey = write_key_pair(cfg.audit_origin, cfg.keys_dir, stem="audit")
        engine = make_engine(cfg.database_url)
        try:
            migrate.upgrade(engine)
            with make_sessionmaker(engine)() as session:
                _, token = issue_token(session, "bootstrap-admin", Role.ADMIN, timedelta(days=30), "controller init")
                session.commit()
        finally:
            engine.dispose()
        saved = ControllerConfig(
            data_dir=cfg.data_dir,
            public_url=cfg.public_url,
            database_url=database_url or "",
            audit_origin=cfg.audit_origin,
        )
        config_mod.save(saved)
    except (ControllerError, OSError, ValueError) as exc:
        if created:
            shutil.rmtree(data, ignore_errors=True)
        _fail(f"init failed: {exc}", 1)
    typer.echo(f"controller data dir ready: {cfg.data_dir}", err=True)
    typer.echo(f"TUF root sha256: {repo.root_sha256()}", err=True)
    if root_key_out is not None:
        typer.echo(f"TUF root key written to {root_key_out}: move it offline", err=True)
    typer.echo(f"audit log vkey: {audit_vkey}", err=True)
    typer.echo("bootstrap admin token (shown once, valid 30 days; create named tokens and revoke it):", err=True)
    typer.echo(token)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@app.command()
def serve(
    data: DataDir,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8443,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="PEM certificate chain.")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="PEM private key.")] = None,
    database_url: Annotated[
        str | None, typer.Option("--database-url", help="Override the data dir's database URL.")
    ] = None,
    log_level: logs.LevelOption = "info",
    log_format: logs.FormatOption = "text",
    fleet_port: Annotated[
        int | None,
        typer.Option(
            "--fleet-port",
            min=1,
            max=65535,
            help="Enable federated fine-tuning: serve the Flower Fleet API to the sites on this port "
            "(with the controller's TLS certificate); the SuperLink itself listens on 127.0.0.1 only.",
        ),
    ] = None,
    fleet_address: Annotated[
        str | None,
        typer.Option(
            "--fleet-address",
            envvar="SITEWARDEN_FLEET_ADDRESS",
            help="host:port the sites dial for the Fleet API (default: the public URL's host and --fleet-port).",
        ),
    ] = None,
    consent_timeout: Annotated[
        float,
        typer.Option("--consent-timeout", min=1, help="Seconds a job waits for every selected site to answer."),
    ] = 120.0,
) -> None:
    """Run the controller with uvicorn (HTTPS with --tls-cert/--tls-key).

    On SIGTERM or Ctrl-C it answers the agents' parked long polls at once and stops within its grace period.
    """
    import uvicorn  # noqa: PLC0415

    from controller.app import create_app  # noqa: PLC0415
    from controller.runtime import Runtime  # noqa: PLC0415

    try:
        log_config = logs.log_config(log_level.lower(), log_format.lower())  # type: ignore[arg-type]
    except ValueError as exc:
        _fail(str(exc))
    logs.configure(log_level.lower(), log_format.lower())  # type: ignore[arg-type]

    if (tls_cert is None) != (tls_key is None):
        _fail("--tls-cert and --tls-key go together")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            _fail(f"{path} does not exist")
    if tls_cert is None and not _is_loopback(host):
        _fail(f"refusing plain HTTP on {host}: pass --tls-cert and --tls-key (plain HTTP only on loopback)")
    env = {"SITEWARDEN_DATABASE_URL": database_url} if database_url else {}
    try:
        runtime = Runtime.open(data, {**os.environ, **env})
    except ControllerError as exc:
        _fail(f"cannot start: {exc}", 1)
    if tls_cert is None:
        typer.echo("warning: serving plain HTTP on loopback; use TLS anywhere else", err=True)
    if fleet_port is not None:
        from controller.federation import FederationService, FederationSettings  # noqa: PLC0415

        if tls_cert is None or tls_key is None:
            runtime.close()
            _fail("--fleet-port needs --tls-cert and --tls-key: SuperNodes only connect over TLS")
        public_host = httpx.URL(runtime.config.public_url).host
        runtime.federation = FederationService(
            runtime,
            FederationSettings(
                listen_host=host,
                fleet_port=fleet_port,
                public_address=fleet_address or f"{public_host}:{fleet_port}",
                tls_cert=tls_cert,
                tls_key=tls_key,
                consent_timeout_s=consent_timeout,
            ),
        )

    class Server(uvicorn.Server):
        """uvicorn's server, answering the agents' parked long polls first when it shuts down: uvicorn waits for
        running requests before the app's lifespan shutdown runs, so the app cannot release them itself."""

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            runtime.notifier.close()
            await super().shutdown(sockets)

    server = Server(
        uvicorn.Config(
            create_app(runtime),
            host=host,
            port=port,
            ssl_certfile=str(tls_cert) if tls_cert else None,
            ssl_keyfile=str(tls_key) if tls_key else None,
            log_level=log_level.lower(),
            log_config=log_config,
            server_header=False,
            proxy_headers=False,
            # A client that stopped reading must not hold up a restart for long.
            timeout_graceful_shutdown=5,
        )
    )
    try:
        server.run()
    finally:
        runtime.close()


@app.command("migrate")
def migrate_command(
    data: DataDir,
    database_url: Annotated[str | None, typer.Option("--database-url")] = None,
) -> None:
    """Bring the database schema up to this version of the controller."""
    from controller import migrate  # noqa: PLC0415
    from controller.db import make_engine  # noqa: PLC0415

    try:
        cfg = config_mod.load(data, {"SITEWARDEN_DATABASE_URL": database_url} if database_url else None)
    except ConfigError as exc:
        _fail(str(exc), 1)
    engine = make_engine(cfg.database_url)
    try:
        migrate.upgrade(engine)
        typer.echo(f"database at revision {migrate.current_revision(engine)}")
    finally:
        engine.dispose()


@app.command("rotate-root")
def rotate_root(
    data: DataDir,
    old_root_key: Annotated[Path, typer.Option("--old-root-key", help="The current (offline) TUF root key.")],
    new_root_key_out: Annotated[Path, typer.Option("--new-root-key-out", help="Where to write the new root key.")],
) -> None:
    """Rotate the TUF root key: the new root version is signed by the old and the new key."""
    from controller.tuf_repo import TufRepository  # noqa: PLC0415

    try:
        cfg = config_mod.load(data)
    except ConfigError as exc:
        _fail(str(exc), 1)
    if new_root_key_out.exists():
        _fail(f"{new_root_key_out} already exists; refusing to overwrite a key")
    if not old_root_key.is_file():
        _fail(f"{old_root_key} does not exist")
    write_private_key(new_root_key_out, Ed25519PrivateKey.generate())
    try:
        repo = TufRepository.open(cfg.tuf_dir, cfg.keys_dir, expiries=cfg.expiries)
        version = repo.rotate_root(new_root_key_out, old_root_key)
    except ControllerError as exc:
        new_root_key_out.unlink(missing_ok=True)
        _fail(f"root rotation failed: {exc}", 1)
    typer.echo(f"TUF root is now version {version}, sha256 {repo.root_sha256()}; keep {new_root_key_out} offline")


@app.command()
def keys(data: DataDir) -> None:
    """Show the controller's public keys: TUF root hash, the audit log's vkey and the witness's vkey."""
    from controller.tuf_repo import TufRepository  # noqa: PLC0415
    from controller.witness import load_or_create_witness_key, witness_name  # noqa: PLC0415

    try:
        cfg = config_mod.load(data)
        repo = TufRepository.open(cfg.tuf_dir, cfg.keys_dir, expiries=cfg.expiries)
        witness = load_or_create_witness_key(cfg.keys_dir, witness_name(cfg.audit_origin))
    except (ControllerError, AuditError) as exc:
        _fail(str(exc), 1)
    vkey_file = cfg.keys_dir / "audit.vkey"
    typer.echo(f"tuf root version: {repo.version('root')}")
    typer.echo(f"tuf root sha256: {repo.root_sha256()}")
    typer.echo(f"audit vkey: {vkey_file.read_text().strip() if vkey_file.exists() else '(missing)'}")
    typer.echo(f"witness vkey: {witness.vkey}")
