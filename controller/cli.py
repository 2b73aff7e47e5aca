"""`sitewarden controller ...`: create a data dir, run the service, migrate, rotate the TUF root."""

from __future__ import annotations

import ipaddress
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Annotated, NoReturn

import click
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
from sitewarden.envoptions import EnvironmentCommand
from sitewarden.files import restrict_umask, tighten_dir, write_new_file
from sitewarden.keys import write_private_key

# The server side (SQLAlchemy, Alembic, python-tuf, FastAPI, uvicorn) is imported inside the
# commands that need it: every `sitewarden` invocation loads this module.

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help="Run and manage the controller.")

DataDir = Annotated[Path, typer.Option("--data", help="The controller's data directory.")]


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# A fresh volume's file system may carry this; it does not make a data dir "not empty".
VOLUME_LEFTOVERS = {"lost+found"}


@app.command(cls=EnvironmentCommand)
def init(
    data: DataDir,
    root_key_out: Annotated[
        Path | None,
        typer.Option(
            "--root-key-out",
            help="Write the TUF root key here, outside the data dir, to move offline "
            "(required unless --root-key-online).",
        ),
    ] = None,
    root_key_online: Annotated[
        bool,
        typer.Option(
            "--root-key-online",
            help="Keep the TUF root key in the data dir's keys/ instead: whoever takes the controller host then "
            "holds the root of trust too. For trials only.",
        ),
    ] = False,
    public_url: Annotated[
        str, typer.Option("--public-url", help="The URL agents and people use to reach this controller.")
    ] = "https://127.0.0.1:8443",
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="SQLAlchemy URL, e.g. postgresql+psycopg://...; default SQLite in --data."),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="This controller's name, in its audit log origin.")] = "main",
    exist_ok: Annotated[
        bool,
        typer.Option(
            "--exist-ok",
            help="Leave an initialised data dir as it is and exit 0 (a pod's first-start init container).",
        ),
    ] = False,
    admin_token_out: Annotated[
        Path | None,
        typer.Option(
            "--admin-token-out",
            help="Write the bootstrap admin token to this new file (mode 0600) instead of standard output.",
        ),
    ] = None,
    keys_from: Annotated[
        Path | None,
        typer.Option(
            "--keys-from",
            help="Take the keys made offline by `controller keygen` from this directory (a mounted Secret) instead "
            "of making new ones; the TUF root key stays offline (its signed root.json is in the directory).",
        ),
    ] = None,
) -> None:
    """Create keys (TUF root, targets, snapshot, timestamp; audit log; witness), the database and a bootstrap
    admin token. The TUF root key goes to --root-key-out, outside the data dir, unless --root-key-online keeps
    it in keys/; with --keys-from the keys come from `controller keygen` instead (the root key stays offline)."""
    from controller import audit_trail, migrate  # noqa: PLC0415
    from controller.auth import issue_token  # noqa: PLC0415
    from controller.db import make_engine, make_sessionmaker  # noqa: PLC0415
    from controller.keyset import KeysetError, load_keyset  # noqa: PLC0415
    from controller.tuf_repo import TufRepository, generate_keys  # noqa: PLC0415
    from controller.witness import create_witness_key, load_witness_key, witness_name  # noqa: PLC0415

    restrict_umask()
    chosen = [
        flag
        for flag, given in (
            ("--keys-from", keys_from is not None),
            ("--root-key-out", root_key_out is not None),
            ("--root-key-online", root_key_online),
        )
        if given
    ]
    if not chosen:
        _fail(
            "say where the TUF root key goes: --root-key-out PATH (outside the data dir, to keep offline), "
            "--keys-from DIR (keys made offline by `controller keygen`: the root key never comes here) or, "
            "for trials, --root-key-online (in the data dir, next to the online keys)"
        )
    if len(chosen) > 1:
        _fail(f"{' and '.join(chosen)} exclude each other: with --keys-from the root key stays offline")
    if (data / config_mod.CONFIG_FILE).exists():
        if exist_ok:
            typer.echo(f"{data} is already a controller data dir: left as it is", err=True)
            return
        _fail(f"{data} is already a controller data dir; refusing to overwrite its keys")
    if data.exists() and any(p.name not in VOLUME_LEFTOVERS for p in data.iterdir()):
        _fail(f"{data} exists and is not empty; give a new or empty directory")
    if admin_token_out is not None and admin_token_out.exists():
        _fail(f"{admin_token_out} already exists; refusing to overwrite it")
    if root_key_out is not None:
        if root_key_out.exists():
            _fail(f"{root_key_out} already exists; refusing to overwrite a key")
        if root_key_out.resolve().is_relative_to(data.resolve()):
            _fail(f"--root-key-out {root_key_out} is inside the data dir {data}; give a path outside it")
    keyset = None
    if keys_from is not None:
        try:
            keyset = load_keyset(keys_from, name)  # checked whole before anything is written
        except KeysetError as exc:
            _fail(f"--keys-from: {exc}")
    created = not data.exists()
    try:
        tighten_dir(data)
        cfg = ControllerConfig(
            data_dir=data.resolve(),
            public_url=public_url.rstrip("/"),
            database_url=database_url or config_mod.default_database_url(data),
            audit_origin=f"sitewarden/controller/{name}",
        )
        cfg.keys_dir.mkdir(mode=0o700)
        for folder in (cfg.tuf_dir, cfg.blobs_dir, cfg.uploads_dir):
            folder.mkdir()
        if keyset is not None:
            keyset.install(cfg.keys_dir)
            repo = TufRepository.create(cfg.tuf_dir, cfg.keys_dir, signed_root=keyset.root_json, expiries=cfg.expiries)
            audit_vkey = keyset.audit_vkey
        else:
            generate_keys(cfg.keys_dir, root_key_out)
            repo = TufRepository.create(cfg.tuf_dir, cfg.keys_dir, root_key_path=root_key_out, expiries=cfg.expiries)
            _, audit_vkey = write_key_pair(cfg.audit_origin, cfg.keys_dir, stem="audit")
            create_witness_key(cfg.keys_dir, witness_name(cfg.audit_origin))
        witness = load_witness_key(cfg.keys_dir, witness_name(cfg.audit_origin))
        engine = make_engine(cfg.database_url)
        try:
            migrate.upgrade(engine)
            # Recorded in the audit outbox: moved into the log when the controller first starts.
            with make_sessionmaker(engine)() as session, audit_trail.acting("controller.init"):
                _, token = issue_token(session, "bootstrap-admin", Role.ADMIN, timedelta(days=30), "controller init")
                session.commit()
        finally:
            engine.dispose()
        # A URL from the environment (a mounted Secret in Kubernetes) stays there: the data dir
        # must not keep a copy of the database password.
        source = click.get_current_context().get_parameter_source("database_url")
        from_environment = source is not None and source.name == "ENVIRONMENT"
        saved = ControllerConfig(
            data_dir=cfg.data_dir,
            public_url=cfg.public_url,
            database_url="" if from_environment else (database_url or ""),
            audit_origin=cfg.audit_origin,
        )
        config_mod.save(saved)
    except (ControllerError, OSError, ValueError) as exc:
        if created:
            shutil.rmtree(data, ignore_errors=True)
        else:
            for leftover in data.iterdir():  # it was empty (but for a volume's own entries): leave it so
                if leftover.name in VOLUME_LEFTOVERS:
                    continue
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
        if root_key_out is not None:
            root_key_out.unlink(missing_ok=True)
        _fail(f"init failed: {exc}", 1)
    typer.echo(f"controller data dir ready: {cfg.data_dir}", err=True)
    typer.echo(f"TUF root sha256: {repo.root_sha256()}", err=True)
    if keyset is not None:
        typer.echo(f"keys taken from {keys_from}; the TUF root key stays offline", err=True)
    elif root_key_out is not None:
        typer.echo(f"TUF root key written to {root_key_out}: move it offline", err=True)
    else:
        typer.echo(f"TUF root key kept online in {cfg.keys_dir} (--root-key-online)", err=True)
    typer.echo(f"audit log vkey: {audit_vkey}", err=True)
    typer.echo(f"witness vkey: {witness.vkey} (back up {cfg.keys_dir}: it is never made again)", err=True)
    if admin_token_out is not None:
        write_new_file(admin_token_out, (token + "\n").encode())
        typer.echo(
            f"bootstrap admin token written to {admin_token_out} (valid 30 days): read it, create named tokens, "
            "revoke it and delete the file",
            err=True,
        )
        return
    typer.echo("bootstrap admin token (shown once, valid 30 days; create named tokens and revoke it):", err=True)
    typer.echo(token)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@app.command(cls=EnvironmentCommand)
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
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=1,
            max=65535,
            envvar="SITEWARDEN_METRICS_PORT",
            help="Also serve Prometheus metrics on this port, plain HTTP without credentials, on --metrics-host "
            "(on the main port /metrics needs an API token).",
        ),
    ] = None,
    metrics_host: Annotated[
        str,
        typer.Option(
            "--metrics-host", envvar="SITEWARDEN_METRICS_HOST", help="Address of the --metrics-port listener."
        ),
    ] = "127.0.0.1",
    shutdown_timeout: Annotated[
        float,
        typer.Option(
            "--shutdown-timeout",
            min=0,
            help="On SIGTERM, seconds to let in-flight requests finish before the audit log is closed and the "
            "controller exits; keep it below the pod's terminationGracePeriodSeconds.",
        ),
    ] = 20.0,
) -> None:
    """Run the controller with uvicorn (HTTPS with --tls-cert/--tls-key).

    On SIGTERM or Ctrl-C it answers the agents' parked long polls at once and stops within its grace period.
    """
    import uvicorn  # noqa: PLC0415

    from controller.app import create_app  # noqa: PLC0415
    from controller.runtime import Runtime  # noqa: PLC0415
    from sitewarden.httpserver import Server  # noqa: PLC0415

    restrict_umask()
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

    server = Server(
        uvicorn.Config(
            create_app(runtime, metrics_listen=(metrics_host, metrics_port) if metrics_port else None),
            host=host,
            port=port,
            ssl_certfile=str(tls_cert) if tls_cert else None,
            ssl_keyfile=str(tls_key) if tls_key else None,
            log_level=log_level.lower(),
            log_config=log_config,
            server_header=False,
            proxy_headers=False,
            # SIGTERM: stop accepting, let in-flight requests finish (at most this long: a client that
            # stopped reading must not hold up a restart), then close the audit log.
            timeout_graceful_shutdown=shutdown_timeout,
        ),
        before_shutdown=runtime.notifier.close,  # the agents' parked long polls are answered at once
    )
    try:
        server.run()
    finally:
        runtime.close()


@app.command("migrate", cls=EnvironmentCommand)
def migrate_command(
    data: Annotated[
        Path | None,
        typer.Option("--data", help="The controller's data directory (not needed with --database-url)."),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="The database to migrate; default: the data dir's database."),
    ] = None,
) -> None:
    """Bring the database schema up to this version of the controller (safe to run again: it does nothing then).

    With --database-url alone it needs no data dir: a Kubernetes pre-install hook migrates
    PostgreSQL before the controller's volume exists.
    """
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415

    from controller import migrate  # noqa: PLC0415
    from controller.db import make_engine  # noqa: PLC0415

    if database_url:
        url = database_url
    elif data is not None:
        try:
            url = config_mod.load(data).database_url
        except ConfigError as exc:
            _fail(str(exc), 1)
    else:
        _fail("give --data or --database-url")
    try:
        engine = make_engine(url)
    except Exception as exc:  # a malformed URL: name the problem, never the URL (it may carry a password)
        _fail(f"cannot use the database URL: {exc.__class__.__name__}")
    try:
        migrate.upgrade(engine)
        typer.echo(f"database at revision {migrate.current_revision(engine)}")
    except SQLAlchemyError as exc:
        _fail(f"cannot migrate the database {engine.url!r}: {exc.__class__.__name__}: {exc.orig or exc}", 1)
    finally:
        engine.dispose()


@app.command()
def keygen(
    out: Annotated[Path, typer.Option("--out", help="New or empty directory for the key set (it becomes a Secret).")],
    root_key_out: Annotated[
        Path, typer.Option("--root-key-out", help="Where to write the TUF root key: keep it offline, never in the set.")
    ],
    name: Annotated[str, typer.Option("--name", help="The controller's name, as `controller init --name`.")] = "main",
) -> None:
    """Make a controller's keys on an offline machine, for `controller init --keys-from` (Helm: keys.existingSecret).

    Writes the online TUF keys, root.json (version 1, signed here with the root key), the audit-log
    key and the witness key into --out, and the root key to --root-key-out. Record the printed root
    hash and vkeys, back the directory up, then: kubectl create secret generic NAME --from-file=OUT/
    """
    from controller.keyset import KeysetError, make_keyset  # noqa: PLC0415
    from controller.tuf_repo import TufError  # noqa: PLC0415

    try:
        facts = make_keyset(out, name, root_key_out)
    except (KeysetError, TufError, AuditError, OSError) as exc:
        _fail(f"keygen failed: {exc}", 1)
    typer.echo(f"key set written to {out}; TUF root key written to {root_key_out}: keep it offline", err=True)
    typer.echo(f"TUF root sha256: {facts['root_sha256']}")
    typer.echo(f"audit vkey: {facts['audit_vkey']}")
    typer.echo(f"witness vkey: {facts['witness_vkey']}")


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
    from controller.witness import load_witness_key, witness_name  # noqa: PLC0415

    try:
        cfg = config_mod.load(data)
        repo = TufRepository.open(cfg.tuf_dir, cfg.keys_dir, expiries=cfg.expiries)
        witness = load_witness_key(cfg.keys_dir, witness_name(cfg.audit_origin))
    except (ControllerError, AuditError) as exc:
        _fail(str(exc), 1)
    vkey_file = cfg.keys_dir / "audit.vkey"
    typer.echo(f"tuf root version: {repo.version('root')}")
    typer.echo(f"tuf root sha256: {repo.root_sha256()}")
    typer.echo(f"audit vkey: {vkey_file.read_text().strip() if vkey_file.exists() else '(missing)'}")
    typer.echo(f"witness vkey: {witness.vkey}")


@app.command("witness-keygen")
def witness_keygen(data: DataDir) -> None:
    """Create the witness key of a data dir that has none (made before the witness existed, or lost for good).

    Sites pin the witness vkey at enrollment and auditors name it in their witness policies:
    give them the new vkey. Refuses when a witness key exists; restore a lost one from backup
    rather than make a new one whenever you can.
    """
    from controller.witness import create_witness_key, witness_name  # noqa: PLC0415

    restrict_umask()
    try:
        cfg = config_mod.load(data)
        if (cfg.keys_dir / "witness.key").exists():
            _fail(f"{cfg.keys_dir / 'witness.key'} exists; refusing to replace the witness key", 1)
        (cfg.keys_dir / "witness.vkey").unlink(missing_ok=True)  # the vkey of a key that is gone
        witness = create_witness_key(cfg.keys_dir, witness_name(cfg.audit_origin))
    except ControllerError as exc:
        _fail(str(exc), 1)
    typer.echo(f"new witness key in {cfg.keys_dir}; give every site and auditor its vkey:", err=True)
    typer.echo(witness.vkey)
