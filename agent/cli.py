"""`sitewarden agent ...`: enroll a site, run the agent, show its status, manage app keys, export its audit log."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from agent import apps
from agent.errors import AgentError
from agent.identity import DataDir
from sitewarden import logs
from sitewarden.envoptions import EnvironmentCommand
from sitewarden.files import restrict_umask, tighten_dir
from sitewarden.output import print_json

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help="The site agent.")


class RunCommand(EnvironmentCommand):
    """`agent run`: the join token's file is needed on the first start only; its Secret may then be deleted."""

    files_may_be_missing = frozenset({"join_token"})


app_key_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help="Keys of local applications.")
audit_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help="The site's audit log.")
app.add_typer(app_key_app, name="app-key")
app.add_typer(audit_app, name="audit")

DataOption = Annotated[Path, typer.Option("--data", help="The agent's data directory.")]
out = Console(highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def enroll(
    token: Annotated[str, typer.Option("--token", help="The one-time join token from `sitewarden site token`.")],
    data: DataOption,
    ca_cert: Annotated[
        Path | None, typer.Option("--ca-cert", help="CA bundle that verifies the controller's TLS certificate.")
    ] = None,
) -> None:
    """Generate the site key and HMAC secret, enroll, and store the TUF root after checking it against the token."""
    from agent.identity import enroll as do_enroll  # noqa: PLC0415

    restrict_umask()
    try:
        identity = do_enroll(token, DataDir(data), ca_cert)
    except AgentError as exc:
        _fail(str(exc))
    typer.echo(f"enrolled as site {identity.site_name} ({identity.site_id}) with {identity.controller_url}", err=True)
    typer.echo(identity.site_id)


@app.command(cls=RunCommand)
def run(
    data: DataOption,
    config: Annotated[Path | None, typer.Option("--config", help="The site configuration (TOML).")] = None,
    join_token: Annotated[
        str | None,
        typer.Option(
            "--join-token",
            help="Enroll with this one-time join token when the data dir is not enrolled yet; ignored once it is "
            "(give it as a mounted file: SITEWARDEN_JOIN_TOKEN_FILE).",
        ),
    ] = None,
    log_level: logs.LevelOption = "info",
    log_format: logs.FormatOption = "text",
    shutdown_timeout: Annotated[
        float,
        typer.Option(
            "--shutdown-timeout",
            min=0,
            help="On SIGTERM, seconds to let in-flight requests finish before the audit log is flushed and the "
            "agent exits; keep it below the pod's terminationGracePeriodSeconds.",
        ),
    ] = 20.0,
) -> None:
    """Run the agent: sync with the controller, serve local apps, audit every request.

    With --join-token, a data dir that is not enrolled yet is enrolled first (the site key is
    made here), so that a fresh pod enrolls itself; an enrolled data dir never uses the token again.

    It logs at the default level every sync outcome (desired state announced, downloaded, verified, activated,
    refused with its reason, rolled back to last-known-good), witnessing progress and failures, federated job
    participation and app-key changes; --log-format json writes one JSON object per line.
    """
    import uvicorn  # noqa: PLC0415

    from agent import config as config_mod  # noqa: PLC0415
    from agent.daemon import Agent  # noqa: PLC0415
    from agent.serve import create_app  # noqa: PLC0415
    from sitewarden.httpserver import Server  # noqa: PLC0415

    restrict_umask()  # the audit log, state, releases and keys: 0600 files, 0700 directories
    if data.is_dir():
        tighten_dir(data)  # also a data dir an operator or a volume mount made wider
    data_dir = DataDir(data)
    try:
        log_config = logs.log_config(log_level.lower(), log_format.lower())  # type: ignore[arg-type]
    except ValueError as exc:
        _fail(str(exc), 2)
    logs.configure(log_level.lower(), log_format.lower())  # type: ignore[arg-type]
    try:
        site = config_mod.load(config)
        _enroll_if_needed(data_dir, join_token, site.controller_ca)
        agent = Agent(data_dir, site, config)
    except AgentError as exc:
        _fail(f"cannot start: {exc}")
    except Exception as exc:  # the audit log refusing to open, a locked data dir, ...
        _fail(f"cannot start: {exc.__class__.__name__}: {exc}")
    server = Server(
        uvicorn.Config(
            create_app(agent),
            host=site.listen_host,
            port=site.listen_port,
            ssl_certfile=str(site.tls_cert) if site.tls_cert else None,
            ssl_keyfile=str(site.tls_key) if site.tls_key else None,
            log_level=log_level.lower(),
            log_config=log_config,
            server_header=False,
            # SIGTERM: stop accepting, close idle connections, let in-flight requests finish (at most
            # this long), then the lifespan's shutdown stops the loops and flushes the audit log.
            timeout_graceful_shutdown=shutdown_timeout,
        )
    )
    server.run()


@app.command()
def keys(data: DataOption) -> None:
    """Show the site's public keys: its audit log's vkey, its witness vkey (it cosigns the controller's log
    with it: give it to auditors for their witness policy), and the controller keys it pinned."""
    from audit.note import ALG_COSIGNATURE_V1, Signer  # noqa: PLC0415
    from sitewarden.witnessing import site_witness_name  # noqa: PLC0415

    site = DataDir(data)
    try:
        identity = site.identity()
        key = site.site_key()
    except AgentError as exc:
        _fail(str(exc))
    typer.echo(f"site: {identity.site_name} ({identity.site_id})")
    typer.echo(f"audit vkey: {Signer.from_ed25519(identity.origin, key).vkey}")
    witness = Signer.from_ed25519(site_witness_name(identity.site_id), key, ALG_COSIGNATURE_V1)
    typer.echo(f"witness vkey: {witness.vkey}")
    typer.echo(f"controller witness vkey: {identity.witness_vkey}")
    typer.echo(f"controller audit vkey (pinned): {identity.controller_audit_vkey or '(none: enrolled before pinning)'}")


def _enroll_if_needed(data: DataDir, join_token: str | None, ca_cert: Path | None) -> None:
    """Enroll from the mounted join token on a pod's first start; never again once enrolled."""
    from agent.identity import enroll as do_enroll  # noqa: PLC0415

    if data.identity_file.exists():
        if join_token:
            typer.echo("already enrolled: the join token is not used", err=True)
        return
    if not join_token or not join_token.strip():
        return  # Agent() then says that the data dir is not enrolled and how to enroll it
    identity = do_enroll(join_token, data, ca_cert)
    typer.echo(f"enrolled as site {identity.site_name} ({identity.site_id}) with {identity.controller_url}", err=True)


AUDIT_WAIT_S = 10.0


def _report_audit(data: DataDir, generation: int) -> None:
    """Say whether the running agent recorded the change in the site's audit log (it takes effect at once)."""
    if not apps.agent_running(data.root):
        typer.echo("the agent is not running: it records the change in the site's audit log when it starts", err=True)
    elif apps.wait_until_audited(data.root, generation, AUDIT_WAIT_S):
        typer.echo("the running agent recorded the change in the site's audit log", err=True)
    else:
        typer.echo(
            f"warning: the running agent has not recorded the change in its audit log within {AUDIT_WAIT_S:g} s "
            "(it is in force anyway); see the agent's log",
            err=True,
        )


@app.command()
def status(
    data: DataOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status document as JSON.")] = False,
    wait_witnessed: Annotated[
        float | None,
        typer.Option(
            "--wait-witnessed",
            help="Wait up to this many seconds until every audit entry written so far is cosigned by the "
            "controller (exit 1 if it is not by then).",
        ),
    ] = None,
) -> None:
    """What the site's agent runs and why: active release and policy, refusals with reasons, witness lag,
    controller reachability. Reads the data dir; works whether the agent runs or not."""
    from agent import status as status_mod  # noqa: PLC0415

    site = DataDir(data)
    try:
        found = status_mod.read(site)
        if wait_witnessed is not None:
            target = found["audit"]["size"]
            deadline = time.monotonic() + wait_witnessed
            while found["audit"]["witnessed_size"] < target and time.monotonic() < deadline:
                time.sleep(0.5)
                found = status_mod.read(site)
    except AgentError as exc:
        _fail(str(exc), 2)
    if as_json:
        print_json(out, found)
    else:
        status_mod.render(out, found)
    if wait_witnessed is not None and found["audit"]["witnessed_size"] < target:
        _fail(f"{target - found['audit']['witnessed_size']} audit entries are not cosigned after {wait_witnessed:g} s")


@app_key_app.command("create")
def app_key_create(name: str, data: DataOption) -> None:
    """Create a key for a local application; it is printed once. What the app may state is its
    binding in the site configuration ([apps.NAME] purposes and data_classes)."""
    site = DataDir(data)
    if not site.identity_file.is_file():
        _fail(f"{data} is not an enrolled site's data dir", 2)
    try:
        key, generation = apps.create(site.apps_file, name)
    except AgentError as exc:
        _fail(str(exc), 2)
    typer.echo(f"key for app {name} (shown once):", err=True)
    typer.echo(key)
    _report_audit(site, generation)


@app_key_app.command("revoke")
def app_key_revoke(name: str, data: DataOption) -> None:
    """Revoke every key of a local application; the running agent refuses them from its next request on."""
    site = DataDir(data)
    if not site.identity_file.is_file():
        _fail(f"{data} is not an enrolled site's data dir", 2)
    try:
        count, generation = apps.revoke(site.apps_file, name)
    except AgentError as exc:
        _fail(str(exc), 2)
    if not count:
        _fail(f"app {name} has no active key", 1)
    typer.echo(f"revoked {count} key(s) of {name}")
    _report_audit(site, generation)


@audit_app.command("export")
def audit_export(
    data: DataOption,
    out: Annotated[Path, typer.Option("--out", help="New directory, or a .tar, .tar.gz or .tgz file.")],
) -> None:
    """Export the site's audit log up to its last checkpoint (with the controller's cosignature when it has one)."""
    from audit import AuditError, Log  # noqa: PLC0415
    from audit.note import Signer  # noqa: PLC0415

    site = DataDir(data)
    try:
        identity = site.identity()
        site_vkey = Signer.from_ed25519(identity.origin, site.site_key()).vkey
        with Log.open(site.audit_dir, readonly=True) as log:
            dest = log.export(out, extra_keys=[site_vkey, identity.witness_vkey])
            last = log.last_checkpoint()
    except (AgentError, AuditError) as exc:
        _fail(str(exc))
    assert last is not None
    typer.echo(f"exported {last.size} entries of {last.origin} to {dest}", err=True)
    typer.echo(str(dest))
