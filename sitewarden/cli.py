"""The `sitewarden` command: one entry point, one sub-command group per part of the system."""

from __future__ import annotations

import sys

# Processes that may run a language model load torch before anything loads rego-cpp (agent.lm.runtime.preload).
if sys.argv[1:3] == ["agent", "run"] or sys.argv[1:2] == ["lm"]:
    from agent.lm.runtime import preload

    preload()

from pathlib import Path
from typing import Annotated

import typer

from agent.cli import app as agent_app
from agent.lm.cli import app as lm_app
from audit.cli import app as audit_app
from controller.admin_cli import approver_app, job_app, policy_app, release_app, rollout_app, site_app, token_app
from controller.cli import app as controller_app
from sitewarden import __version__
from sitewarden.demo import run as run_demo
from sitewarden.probe import app as probe_app

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Sitewarden: run AI next to regulated data, under policy, with signed and witnessed audit logs.",
)
app.add_typer(audit_app, name="audit")
app.add_typer(controller_app, name="controller")
app.add_typer(token_app, name="token")
app.add_typer(site_app, name="site")
app.add_typer(release_app, name="release")
app.add_typer(approver_app, name="approver")
app.add_typer(rollout_app, name="rollout")
app.add_typer(policy_app, name="policy")
app.add_typer(job_app, name="job")
app.add_typer(agent_app, name="agent")
app.add_typer(lm_app, name="lm")
app.add_typer(probe_app, name="probe")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sitewarden {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Sitewarden: run AI next to regulated data, under policy, with signed and witnessed audit logs."""


@app.command()
def demo(
    workdir: Annotated[
        Path | None, typer.Option("--workdir", help="Keep the demo's files here (default: a temporary directory).")
    ] = None,
) -> None:
    """Run the whole system on this machine: a controller, two sites, a model from training to audited inference."""
    raise typer.Exit(run_demo(workdir))


def main() -> None:
    app()
