"""`sitewarden probe ...`: checks a `helm test` pod runs against a controller or an agent.

The image carries no curl: these commands are the test pods' tools. Each exits 0 when the
check passes and 1 with the reason when it does not.

- `probe ready URL`: the URL answers 200 over verified TLS (a controller's or an agent's /readyz).
- `probe checkpoint URL`: the agent's latest audit checkpoint is a well-formed C2SP checkpoint
  whose signature verifies with the site's key (the pinned --vkey when given: the
  `audit_vkey` the controller shows for the site) and whose origin is the site's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import httpx
import typer

from audit.checkpoint import parse as parse_checkpoint
from audit.errors import AuditError
from audit.note import open_note

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help="Checks for helm test pods.")

CaOption = Annotated[
    Path | None, typer.Option("--ca-cert", help="CA bundle that verifies the server (default: the system CAs).")
]
TimeoutOption = Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the answer.")]


def _fail(message: str) -> NoReturn:
    typer.echo(f"FAIL: {message}", err=True)
    raise typer.Exit(1)


def _get(url: str, ca_cert: Path | None, timeout: float) -> httpx.Response:
    verify: str | bool = str(ca_cert) if ca_cert else True
    try:
        with httpx.Client(verify=verify, timeout=timeout) as client:
            return client.get(url)
    except httpx.HTTPError as exc:
        _fail(f"{url}: {exc.__class__.__name__}: {exc}")


@app.command()
def ready(url: str, ca_cert: CaOption = None, timeout: TimeoutOption = 10.0) -> None:
    """Pass when URL answers 200."""
    response = _get(url, ca_cert, timeout)
    if response.status_code != 200:
        _fail(f"{url} answered {response.status_code}: {response.text[:300]}")
    typer.echo(f"ok: {url} answered 200")


@app.command()
def checkpoint(
    url: Annotated[str, typer.Argument(help="The agent's base URL, e.g. https://site-agent.ns.svc:9443.")],
    vkey: Annotated[str | None, typer.Option("--vkey", help="The site's audit vkey to verify against.")] = None,
    ca_cert: CaOption = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Pass when the agent's latest audit checkpoint verifies against the site's key."""
    response = _get(url.rstrip("/") + "/sitewarden/checkpoint", ca_cert, timeout)
    if response.status_code != 200:
        _fail(f"no checkpoint: the agent answered {response.status_code}: {response.text[:300]}")
    try:
        body = response.json()
        signed, served_vkey, origin = body["checkpoint"], body["vkey"], body["origin"]
    except (ValueError, KeyError, TypeError):
        _fail("the agent's checkpoint answer is malformed")
    if vkey and vkey.strip() != served_vkey:
        _fail(f"the agent signs with {served_vkey}, not the pinned site key {vkey.strip()}")
    try:
        note = open_note(signed, [vkey.strip() if vkey else served_vkey])
        parsed = parse_checkpoint(note.text)
    except AuditError as exc:
        _fail(f"the checkpoint does not verify: {exc}")
    if parsed.origin != origin or not served_vkey.startswith(origin + "+"):
        _fail(f"the checkpoint's origin {parsed.origin!r} is not the site's ({origin!r})")
    typer.echo(f"ok: checkpoint of {parsed.origin} at size {parsed.size} verifies")
