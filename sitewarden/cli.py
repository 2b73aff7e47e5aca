"""The `sitewarden` command: one entry point, one sub-command group per part of the system.

Besides the groups of each part, two for trying Sitewarden out: `dev pki` makes a throwaway CA and a
loopback server certificate, `example fraud-model` trains the demo's fraud scorer and writes its model card.
"""

from __future__ import annotations

import sys

# Processes that may run a language model load torch before anything loads rego-cpp (agent.lm.runtime.preload).
if sys.argv[1:3] == ["agent", "run"] or sys.argv[1:2] == ["lm"]:
    from agent.lm.runtime import preload

    preload()

import json
from pathlib import Path
from typing import Annotated, NoReturn

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

dev_app = typer.Typer(
    no_args_is_help=True, pretty_exceptions_enable=False, help="Throwaway helpers for trials on one machine."
)
example_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help="Example models to try with.")
app.add_typer(dev_app, name="dev")
app.add_typer(example_app, name="example")


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


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
    language_models: Annotated[
        bool,
        typer.Option(
            "--language-models/--no-language-models",
            help="Run the language-model part (SmolLM2, a LoRA adapter, checked sampling, a hot swap): a few minutes.",
        ),
    ] = True,
) -> None:
    """Run the whole system on this machine: a controller, two sites, a model from training to audited inference."""
    raise typer.Exit(run_demo(workdir, language_models=language_models))


@dev_app.command("pki")
def dev_pki(
    out: Annotated[Path, typer.Option("--out", help="Directory for ca.pem, server.pem and server.key (0600).")],
) -> None:
    """FOR TRIALS ONLY: a throwaway CA (valid 2 days) and a server certificate for 127.0.0.1 and localhost
    (valid 1 day), for a controller and agents on one machine. A real deployment uses its own PKI."""
    from sitewarden.devpki import make_pki  # noqa: PLC0415

    existing = [n for n in ("ca.pem", "server.pem", "server.key") if (out / n).exists()]
    if existing:
        _fail(f"{out} already holds {', '.join(existing)}; refusing to overwrite")
    pki = make_pki(out)
    typer.echo(
        "a throwaway CA and a server certificate for 127.0.0.1 and localhost, for trials only (the CA key is "
        "not kept: nothing else can be signed with it)",
        err=True,
    )
    for path in (pki.ca_cert, pki.server_cert, pki.server_key):
        typer.echo(str(path))


@example_app.command("fraud-model")
def example_fraud_model(
    out: Annotated[Path, typer.Option("--out", help="New directory for model/ (the release) and card.json.")],
    seed: Annotated[int, typer.Option("--seed", help="Training seed: the same seed gives the same model.")] = 7,
) -> None:
    """Train the demo's fraud scorer (scikit-learn on synthetic transactions, converted to ONNX) and write it as
    a release directory, `OUT/model/model.onnx`, with its model card `OUT/card.json` beside it (never inside:
    every file in the directory becomes a file of the release)."""
    if out.exists() and any(out.iterdir()):
        _fail(f"{out} exists and is not empty; give a new or empty directory")
    try:
        from sitewarden.fraud_model import build_release  # noqa: PLC0415

        card = build_release(out / "model", seed=seed, card_path=out / "card.json")
    except ImportError as exc:
        _fail(
            f"training the example needs scikit-learn and skl2onnx ({exc.name} is missing): "
            "pip install 'sitewarden[example]'"
        )
    metrics = json.loads(card.read_text())["evaluation"]
    typer.echo(
        f"fraud scorer trained (seed {seed}): AUC {metrics['auc']:.3f} on held-out synthetic data; push it with "
        f"`sitewarden release push {out / 'model'} --name fraud-scorer --version 1.0.0 --metadata {card}`",
        err=True,
    )
    typer.echo(str(out / "model"))
    typer.echo(str(card))


def main() -> None:
    app()
