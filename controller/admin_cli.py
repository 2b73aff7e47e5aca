"""`sitewarden token|site|release|approver ...`: the admin API from the command line.

Every command reaches the controller at `--url` (or `SITEWARDEN_URL`) with the API token
`--token` (or `SITEWARDEN_TOKEN`), verifying its TLS certificate against `--ca-cert` (or
`SITEWARDEN_CA_CERT`, else the system's CAs). Exit codes: 0 done, 1 the controller
refused (the problem's detail is printed), 2 bad local input. Every list and status
command prints whole tables when its output is not a terminal and takes `--json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from controller.client import ApiError, Client, LocalFile, release_files, sha256_file
from policies.bundle import BUNDLE_FILE
from sitewarden.envoptions import read_secret_file
from sitewarden.output import print_json, print_table

console = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

Url = Annotated[str | None, typer.Option("--url", envvar="SITEWARDEN_URL", help="Controller URL.")]
Token = Annotated[str | None, typer.Option("--token", envvar="SITEWARDEN_TOKEN", help="API token.", show_default=False)]
CaCert = Annotated[
    str | None, typer.Option("--ca-cert", envvar="SITEWARDEN_CA_CERT", help="CA bundle for the controller's TLS.")
]


def _fail(message: str, code: int) -> NoReturn:
    console.print(f"error: {message}", markup=False, soft_wrap=True)  # never wrapped: digests are copied whole
    raise typer.Exit(code)


@contextmanager
def _client(url: str | None, token: str | None, ca_cert: str | None) -> Iterator[Client]:
    try:
        with Client.from_env(url, token, ca_cert) as client:
            yield client
    except ApiError as exc:
        _fail(str(exc), 1)


AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _json(data: Any) -> None:
    print_json(out, data)


token_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help="People's API tokens.")
site_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help="Sites and join tokens.")
release_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help="The release registry.")
approver_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help="Approver keys.")


# -- tokens ---------------------------------------------------------------------------


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option("--role", help="admin, operator, approver or auditor.")],
    name: Annotated[str, typer.Option("--name", help="Whom the token is for.")],
    ttl_days: Annotated[int, typer.Option("--ttl-days", min=1, max=3650)] = 90,
    url: Url = None,
    token: Token = None,
    ca_cert: CaCert = None,
) -> None:
    """Create an API token; the secret is printed once."""
    with _client(url, token, ca_cert) as client:
        created = client.post("/api/v1/tokens", {"name": name, "role": role, "ttl_days": ttl_days})
    console.print(f"token {created['id']} for {name} ({role}), expires {created['expires_at']}; shown once:")
    out.print(created["token"])


@token_app.command("list")
def token_list(as_json: AsJson = False, url: Url = None, token: Token = None, ca_cert: CaCert = None) -> None:
    """List tokens (never their secrets)."""
    with _client(url, token, ca_cert) as client:
        rows = list(client.paginate("/api/v1/tokens"))
    if as_json:
        return _json(rows)
    table = Table("id", "name", "role", "expires", "revoked", "last used")
    for r in rows:
        table.add_row(
            r["id"],
            r["name"],
            r["role"],
            str(r["expires_at"]),
            str(r["revoked_at"] or ""),
            str(r["last_used_at"] or ""),
        )
    print_table(out, table)


@token_app.command("revoke")
def token_revoke(token_id: str, url: Url = None, token: Token = None, ca_cert: CaCert = None) -> None:
    """Revoke a token at once."""
    with _client(url, token, ca_cert) as client:
        client.post(f"/api/v1/tokens/{token_id}/revoke")
    console.print(f"token {token_id} revoked")


# -- sites ----------------------------------------------------------------------------


def _labels(values: list[str]) -> dict[str, str]:
    labels = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            _fail(f"--label {value!r} must be key=value", 2)
        labels[key] = val
    return labels


@site_app.command("create")
def site_create(
    name: str,
    label: Annotated[list[str] | None, typer.Option("--label", help="key=value; repeatable.")] = None,
    url: Url = None,
    token: Token = None,
    ca_cert: CaCert = None,
) -> None:
    """Create a site with labels (region=eu-west, tier=prod)."""
    with _client(url, token, ca_cert) as client:
        site = client.post("/api/v1/sites", {"name": name, "labels": _labels(label or [])})
    console.print(f"site {site['name']} created with id {site['id']}")
    out.print(site["id"])


@site_app.command("list")
def site_list(as_json: AsJson = False, url: Url = None, token: Token = None, ca_cert: CaCert = None) -> None:
    """List sites."""
    with _client(url, token, ca_cert) as client:
        rows = list(client.paginate("/api/v1/sites"))
    if as_json:
        return _json(rows)
    table = Table("name", "id", "status", "labels", "enrolled")
    for r in rows:
        labels = ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items()))
        table.add_row(r["name"], r["id"], r["status"], labels, str(r["enrolled_at"] or ""))
    print_table(out, table)


@site_app.command("show")
def site_show(site: str, url: Url = None, token: Token = None, ca_cert: CaCert = None) -> None:
    """Show one site."""
    with _client(url, token, ca_cert) as client:
        _json(client.get(f"/api/v1/sites/{site}"))


@site_app.command("disable")
def site_disable(site: str, url: Url = None, token: Token = None, ca_cert: CaCert = None) -> None:
    """Disable a site: its agent is refused from its next request on."""
    with _client(url, token, ca_cert) as client:
        client.post(f"/api/v1/sites/{site}/disable")
    console.print(f"site {site} disabled")


def _seconds(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (ValueError, IndexError):
        _fail(f"--ttl {text!r}: use seconds or a number with s, m, h or d (e.g. 1h)", 2)


@site_app.command("token")
def site_token(
    site: str,
    ttl: Annotated[str, typer.Option("--ttl", help="Lifetime: 30m, 1h, 2d (at most 7d).")] = "1h",
    url: Url = None,
    token: Token = None,
    ca_cert: CaCert = None,
) -> None:
    """Issue a one-time join token for `sitewarden agent enroll`."""
    with _client(url, token, ca_cert) as client:
        created = client.post(f"/api/v1/sites/{site}/join-tokens", {"ttl_seconds": _seconds(ttl)})
    console.print(f"join token for {created['site']}, single use, expires {created['expires_at']}:")
    out.print(created["token"])


# -- releases -------------------------------------------------------------------------


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console
    )


@release_app.command("push")
def release_push(
    directory: Annotated[Path, typer.Argument(help="Directory with the release's files.")],
    name: Annotated[str, typer.Option("--name")],
    version: Annotated[str, typer.Option("--version", help="Semantic version.")],
    kind: Annotated[
        str, typer.Option("--kind", help="model, adapter, policy or app (a Flower App: DIR holds its one .fab).")
    ] = "model",
    runtime: Annotated[str, typer.Option("--runtime", help="onnx, transformers, rego or flower (apps).")] = "onnx",
    metadata: Annotated[
        Path | None, typer.Option("--metadata", help="JSON model card: owner, intended_purposes, risk_tier, ...")
    ] = None,
    url: Url = None,
    token: Token = None,
    ca_cert: CaCert = None,
) -> None:
    """Upload a directory as a new release (resumable: run it again after an interruption)."""
    if not directory.is_dir():
        _fail(f"{directory} is not a directory", 2)
    card: dict[str, Any] = {"owner": "unknown"}
    if metadata is not None:
        try:
            card = json.loads(metadata.read_text())
        except (OSError, ValueError) as exc:
            _fail(f"--metadata {metadata}: {exc}", 2)
    try:
        paths = release_files(directory)
    except ValueError as exc:
        _fail(str(exc), 2)
    if not paths:
        _fail(f"{directory} holds no files", 2)
    _push(directory, paths, name, version, kind, runtime, card, url, token, ca_cert)


def _push(
    directory: Path,
    paths: list[Path],
    name: str,
    version: str,
    kind: str,
    runtime: str,
    card: dict[str, Any],
    url: str | None,
    token: str | None,
    ca_cert: str | None,
) -> None:
    """Upload files (resumably) and register them as a release."""
    total = sum(p.stat().st_size for p in paths)
    with _client(url, token, ca_cert) as client, _progress() as progress:
        hashing = progress.add_task("hashing", total=total)
        files = [
            LocalFile(
                p.relative_to(directory).as_posix(),
                p,
                sha256_file(p, lambda n: progress.advance(hashing, n)),
                p.stat().st_size,
            )
            for p in paths
        ]
        sending = progress.add_task("uploading", total=total)
        for f in files:
            client.upload(f, lambda n: progress.advance(sending, n))
        release = client.post(
            "/api/v1/releases",
            {
                "name": name,
                "version": version,
                "kind": kind,
                "runtime": runtime,
                "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in files],
                "metadata": card,
            },
        )
    console.print(f"release {release['name']} {release['version']} registered: {len(files)} files, {total:,} bytes")


@release_app.command("list")
def release_list(
    name: Annotated[str | None, typer.Option("--name")] = None,
    as_json: AsJson = False,
    url: Url = None,
    token: Token = None,
    ca_cert: CaCert = None,
) -> None:
    """List releases and their approvals."""
    with _client(url, token, ca_cert) as client:
        rows = list(client.paginate("/api/v1/releases", **({"name": name} if name else {})))
    if as_json:
        return _json(rows)
    table = Table("name", "version", "kind", "runtime", "uploaded by", "approved by")
    for r in rows:
        approvers = ", ".join(a["approver"] for a in r["approvals"]) or "-"
        table.add_row(r["name"], r["version"], r["kind"], r["runtime"], r["uploaded_by"], approvers)
    print_table(out, table)


@release_app.command("show")
def release_show(name: str, version: str, url: Url = None, token: Token = None, ca_cert: CaCert = None) -> None:
    """Show a release: files, model card, approvals."""
    with _client(url, token, ca_cert) as client:
        _json(client.get(f"/api/v1/releases/{name}/{version}"))


MAX_MANIFEST_BYTES = 16 << 20
PASSPHRASE_ENV = "SITEWARDEN_APPROVER_PASSPHRASE"  # noqa: S105 - the variable's name, not a secret


class _NotWhatWasAsked(Exception):
    """The controller sent something other than the release asked for: nothing is signed or kept."""


def _listed_files(release: dict[str, Any], name: str, version: str) -> list[tuple[str, str, int]]:
    """(path, sha256, size) of each file the controller lists for `name` `version`, every one checked.

    By the registry's own naming rules (`sitewarden.names`): a path that could leave the download
    directory, a digest that is not one, or a listing for another release is refused before
    anything is written.
    """
    from sitewarden import names  # noqa: PLC0415

    if not isinstance(release, dict):
        raise _NotWhatWasAsked(f"the controller's answer for {name} {version} is not a release")
    if release.get("name") != name or release.get("version") != version:
        raise _NotWhatWasAsked(
            f"the controller answered with release {release.get('name')!r} {release.get('version')!r}, "
            f"not {name} {version}"
        )
    try:
        names.check_sha256(release.get("manifest_sha256"), "manifest digest")  # type: ignore[arg-type]
        listed = []
        for entry in release.get("files") or []:
            path = names.check_release_path(entry.get("path"))
            sha256 = names.check_sha256(entry.get("sha256"), f"digest of {path}")
            size = entry.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise names.InvalidName(f"size of {path} is {size!r}, not a byte count")
            listed.append((path, sha256, size))
    except (names.InvalidName, AttributeError) as exc:
        raise _NotWhatWasAsked(f"the controller's listing of {name} {version} is unusable: {exc}") from exc
    paths = [p for p, _, _ in listed]
    if not paths:
        raise _NotWhatWasAsked(f"the controller lists no files for {name} {version}")
    if len(set(paths)) != len(paths):
        raise _NotWhatWasAsked(f"the controller lists a file of {name} {version} twice")
    parents = {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)}
    if clash := sorted(parents & set(paths)):
        raise _NotWhatWasAsked(f"the controller lists {clash[0]!r} both as a file and as a directory")
    return listed


def _confined(root: Path, relative: str) -> Path:
    """`root / relative`, its missing directories made (0700) one by one; never a path outside `root`."""
    parts = relative.split("/")
    current = root
    for part in parts[:-1]:
        current = current / part
        try:
            os.mkdir(current, 0o700)
        except FileExistsError:
            if current.is_symlink() or not current.is_dir():
                raise _NotWhatWasAsked(f"{relative}: {part} is not a directory") from None
    target = current / parts[-1]
    if not target.resolve().is_relative_to(root.resolve()):
        raise _NotWhatWasAsked(f"{relative} would be written outside {root}")
    return target


def _fetch_checked(client: Client, url: str, target: Path, sha256: str, size: int | None, label: str) -> None:
    """Stream `url` into the new file `target` (0600, O_EXCL, O_NOFOLLOW) and check its digest and size.

    A file whose bytes are not the listed ones is deleted at once: it is never left where a
    signature (or a person) could pick it up.
    """
    from sitewarden.files import open_new  # noqa: PLC0415

    limit = size if size is not None else MAX_MANIFEST_BYTES
    fd = open_new(target)
    try:
        digest, received = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as f, client.http.stream("GET", url) as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError(response.status_code, f"download of {label} failed: {response.text[:200]}")
            for chunk in response.iter_bytes(1 << 20):
                received += len(chunk)
                if received > limit:
                    raise _NotWhatWasAsked(f"{label}: more than the {limit:,} bytes listed; deleted")
                f.write(chunk)
                digest.update(chunk)
        if size is not None and received != size:
            raise _NotWhatWasAsked(f"{label}: {received:,} bytes, not the {size:,} listed; deleted")
        if digest.hexdigest() != sha256:
            raise _NotWhatWasAsked(f"{label}: the bytes do not match the registered SHA-256 {sha256}; deleted")
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def _download(client: Client, release: dict[str, Any], name: str, version: str, dest: Path) -> dict[str, Any]:
    """Fetch `release.json` and `files/<path>` into the empty directory `dest`, checked; returns the manifest.

    Paths are checked before anything is written, every file is checked against its listed
    digest and size as it arrives, and `release.json` must describe exactly the release asked
    for, with exactly the files listed.
    """
    listed = _listed_files(release, name, version)
    base = f"/api/v1/releases/{name}/{version}/files"
    manifest_path = dest / "release.json"
    _fetch_checked(client, f"{base}/release.json", manifest_path, release["manifest_sha256"], None, "release.json")
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except ValueError as exc:
        raise _NotWhatWasAsked(f"release.json is not JSON: {exc}") from exc
    if not isinstance(manifest, dict) or (manifest.get("name"), manifest.get("version")) != (name, version):
        described = (manifest.get("name"), manifest.get("version")) if isinstance(manifest, dict) else "something"
        raise _NotWhatWasAsked(f"release.json describes {described}, not {name} {version}")
    in_manifest = sorted(
        (f.get("path"), f.get("sha256"), f.get("size")) for f in manifest.get("files") or [] if isinstance(f, dict)
    )
    if in_manifest != sorted(listed):
        raise _NotWhatWasAsked(f"release.json lists other files than the controller's listing of {name} {version}")
    for path, sha256, size in listed:
        _fetch_checked(client, f"{base}/{path}", _confined(dest, f"files/{path}"), sha256, size, path)
    return manifest


@release_app.command("download")
def release_download(
    name: str,
    version: str,
    out_dir: Annotated[Path, typer.Option("--out", help="New directory for release.json and files/.")],
    url: Url = None,
    token: Token = None,
    ca_cert: CaCert = None,
) -> None:
    """Download a release's manifest and files, verifying each path, digest and size."""
    if out_dir.exists():
        _fail(f"--out {out_dir} exists; give a new directory", 2)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _client(url, token, ca_cert) as client:
        staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
        try:
            _download(client, client.get(f"/api/v1/releases/{name}/{version}"), name, version, staging)
        except (_NotWhatWasAsked, ValueError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            _fail(f"{exc}; nothing was kept", 1)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        staging.rename(out_dir)
    console.print(f"downloaded {name} {version} to {out_dir}")


def _passphrase(confirm: bool = False) -> bytes:
    """The approver key's passphrase: SITEWARDEN_APPROVER_PASSPHRASE (or _FILE), else asked for on a terminal."""
    value = os.environ.get(PASSPHRASE_ENV)
    if value is None and (path := os.environ.get(f"{PASSPHRASE_ENV}_FILE")):
        try:  # read by the *_FILE rules (a regular UTF-8 file, small, not a symlink out of its directory)
            value = read_secret_file(f"{PASSPHRASE_ENV}_FILE", path)
        except click.UsageError as exc:
            _fail(exc.format_message(), 2)
    if value is None:
        if not sys.stdin.isatty():
            _fail(f"the key's passphrase: set {PASSPHRASE_ENV} (or {PASSPHRASE_ENV}_FILE), or run in a terminal", 2)
        value = typer.prompt("approver key passphrase", hide_input=True, confirmation_prompt=confirm, err=True)
    return value.encode()


def _approver_key(path: Path) -> Any:
    """The approver's private key, decrypted with a passphrase when it is encrypted (exit 2 on failure)."""
    from sitewarden import approval  # noqa: PLC0415

    if not path.is_file():
        _fail(f"--key {path} does not exist", 2)
    try:
        return approval.load_approver_key(path, _passphrase() if approval.is_encrypted(path) else None)
    except approval.ApprovalError as exc:
        _fail(str(exc), 2)


def _show(manifest: dict[str, Any], manifest_sha256: str) -> None:
    """What is about to be signed: the release, its manifest digest, its files and its model card.

    Never wrapped, whatever the terminal's width: a digest is read (and copied) whole.
    """

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    what = f"{manifest.get('name')} {manifest.get('version')} ({manifest.get('kind')}, {manifest.get('runtime')})"
    say(f"release {what}, uploaded by {manifest.get('uploaded_by')} at {manifest.get('created_at')}")
    say(f"manifest sha256: {manifest_sha256}")
    say("files:")
    for f in manifest.get("files", []):
        say(f"  {f.get('path')}  sha256 {f.get('sha256')}  {f.get('size'):,} bytes")
    say("model card:")
    say(json.dumps(manifest.get("metadata", {}), indent=2, sort_keys=True, default=str))


@release_app.command("approve")
def release_approve(
    name: str,
    version: str,
    key: Annotated[
        Path,
        typer.Option(
            "--key",
            help=f"Your approver private key (P-256 PEM; an encrypted one's passphrase from {PASSPHRASE_ENV} "
            "or a prompt).",
        ),
    ],
    expect_manifest_sha256: Annotated[
        str | None,
        typer.Option(
            "--expect-manifest-sha256",
            help="Sign only if the release's manifest (release.json) has this SHA-256: the release you reviewed.",
        ),
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask before signing (without --expect-manifest-sha256).")
    ] = False,
    url: Url = None,
    token: Token = None,
    ca_cert: CaCert = None,
) -> None:
    """Download a release, show its model card and manifest digest, sign it locally with model-signing,
    and upload the signature as your approval.

    Every path, digest and size the controller sends is checked before anything is written, and
    the manifest must describe the release asked for. With --expect-manifest-sha256 only the
    release you reviewed is signed; otherwise, on a terminal, you are asked first.
    """
    from sitewarden import approval, names  # noqa: PLC0415 - model-signing is slow to import; only this needs it

    try:
        names.check_release_name(name)
        names.check_version(version)
        if expect_manifest_sha256 is not None:
            names.check_sha256(expect_manifest_sha256.lower(), "--expect-manifest-sha256")
    except names.InvalidName as exc:
        _fail(str(exc), 2)
    signing_key = _approver_key(key)
    with _client(url, token, ca_cert) as client, tempfile.TemporaryDirectory(prefix="sitewarden-approve-") as tmp:
        try:
            release = client.get(f"/api/v1/releases/{name}/{version}")
            manifest = _download(client, release, name, version, Path(tmp))
        except (_NotWhatWasAsked, ValueError) as exc:  # ValueError: an answer that is not JSON
            _fail(f"{exc}; nothing was signed", 1)
        digest = release["manifest_sha256"]
        _show(manifest, digest)
        if expect_manifest_sha256 is not None:
            if digest != expect_manifest_sha256.lower():
                _fail(
                    f"the manifest of {name} {version} has SHA-256 {digest}, not the {expect_manifest_sha256} "
                    "you reviewed; nothing was signed",
                    1,
                )
        elif not yes and sys.stdin.isatty() and not typer.confirm(f"Sign {name} {version}?", err=True):
            _fail("not signed", 1)
        try:
            bundle = approval.sign_release(Path(tmp), signing_key)
        except approval.ApprovalError as exc:
            _fail(str(exc), 2)
        recorded = client.request(
            "POST",
            f"/api/v1/releases/{name}/{version}/approvals",
            content=bundle,
            headers={"Content-Type": "application/json"},
        ).json()
    console.print(f"{name} {version} approved by {recorded['approver']} (key {recorded['key_fingerprint'][:16]}…)")


@release_app.command("revoke")
def release_revoke(
    name: str,
    version: str,
    key: Annotated[Path, typer.Option("--key", help="Your approver private key (P-256 PEM).")],
    reason: Annotated[str, typer.Option("--reason", help="Why the release must no longer run (recorded, signed).")],
    manifest_sha256: Annotated[
        str | None,
        typer.Option(
            "--manifest-sha256",
            help="The manifest digest to revoke (from your review records); default: the SHA-256 of the "
            "release.json the controller serves, shown before signing.",
        ),
    ] = None,
    url: Url = None,
    token: Token = None,
    ca_cert: CaCert = None,
) -> None:
    """Sign a revocation of a release on this machine and upload it: every site refuses the release."""
    import hashlib  # noqa: PLC0415

    from sitewarden import names, revocation  # noqa: PLC0415 - cryptography only where needed

    try:
        names.check_release_name(name)
        names.check_version(version)
        if manifest_sha256 is not None:
            names.check_sha256(manifest_sha256, "--manifest-sha256")
    except names.InvalidName as exc:
        _fail(str(exc), 2)
    private_key = _approver_key(key)  # the loader `release approve` signs with (an encrypted key asks)
    with _client(url, token, ca_cert) as client:
        response = client.request("GET", f"/api/v1/releases/{name}/{version}/files/release.json")
        try:
            served = json.loads(response.content)
        except ValueError:
            _fail("the controller's release.json is not JSON", 1)
        if not isinstance(served, dict) or (served.get("name"), served.get("version")) != (name, version):
            _fail(f"the controller's release.json does not describe {name} {version}", 1)
        digest = hashlib.sha256(response.content).hexdigest()
        if manifest_sha256 is not None and manifest_sha256 != digest:
            console.print(f"note: the controller's release.json hashes to {digest}; revoking {manifest_sha256}")
        target = manifest_sha256 or digest
        console.print(f"revoking {name} {version} (manifest sha256 {target}): {reason}")
        try:
            document = revocation.sign_revocation(
                private_key, name=name, version=version, manifest_sha256=target, reason=reason
            )
        except revocation.RevocationError as exc:
            _fail(str(exc), 2)
        recorded = client.request(
            "POST",
            f"/api/v1/releases/{name}/{version}/revocations",
            content=document,
            headers={"Content-Type": "application/json"},
        ).json()
    console.print(f"{name} {version} revoked by {recorded['approver']} (key {recorded['key_fingerprint'][:16]}…)")


# -- approver keys --------------------------------------------------------------------


@approver_app.command("keygen")
def approver_keygen(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for approver.pem (0600) and approver.pub.pem.")],
    encrypt: Annotated[
        bool,
        typer.Option(
            "--encrypt/--no-encrypt",
            help=f"Encrypt the private key with a passphrase (from {PASSPHRASE_ENV}, or asked for twice).",
        ),
    ] = False,
) -> None:
    """Create an approver key pair (P-256) on this machine; give the public key to an admin."""
    from sitewarden import approval  # noqa: PLC0415 - model-signing is slow to import; only this needs it

    passphrase = _passphrase(confirm=True) if encrypt else None
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fingerprint = approval.generate_approver_key(out_dir / "approver.pem", out_dir / "approver.pub.pem", passphrase)
    except approval.ApprovalError as exc:
        _fail(str(exc), 2)
    state = "encrypted with your passphrase" if encrypt else "unencrypted: consider --encrypt"
    console.print(f"approver key written to {out_dir / 'approver.pem'} ({state}; keep it private)")
    out.print(fingerprint)


@approver_app.command("add")
def approver_add(
    approver: Annotated[str, typer.Argument(help="The approver's name, as on their API token.")],
    public_key: Annotated[Path, typer.Option("--public-key", help="The approver's public key (PEM).")],
    url: Url = None,
    token: Token = None,
    ca_cert: CaCert = None,
) -> None:
    """Register an approver's public key."""
    try:
        pem = public_key.read_text()
    except OSError as exc:
        _fail(f"--public-key {public_key}: {exc.strerror}", 2)
    with _client(url, token, ca_cert) as client:
        key = client.post("/api/v1/approvers", {"approver": approver, "public_key_pem": pem})
    console.print(f"approver key {key['fingerprint']} registered for {approver}")


@approver_app.command("list")
def approver_list(as_json: AsJson = False, url: Url = None, token: Token = None, ca_cert: CaCert = None) -> None:
    """List approver keys."""
    with _client(url, token, ca_cert) as client:
        rows = list(client.paginate("/api/v1/approvers"))
    if as_json:
        return _json(rows)
    table = Table("approver", "fingerprint", "registered", "revoked")
    for r in rows:
        table.add_row(r["approver"], r["fingerprint"], str(r["created_at"]), str(r["revoked_at"] or ""))
    print_table(out, table)


# -- rollouts -------------------------------------------------------------------------

rollout_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help="Rollouts of desired state.")


def _release_ref(text: str) -> dict[str, str]:
    name, sep, version = text.partition("@")
    if not sep or not name or not version:
        _fail(f"{text!r} must be name@version", 2)
    return {"name": name, "version": version}


def rollout_phase(rollout: dict[str, Any]) -> str:
    """One word for where a rollout stands, read from its conditions (the stored state says only whether it
    is being promoted, paused, rolled back or superseded): rolled back, superseded, paused, degraded,
    complete or progressing."""
    true = {c["type"] for c in rollout["conditions"] if c["status"] == "True"}
    for condition, phase in (
        ("RolledBack", "rolled back"),
        ("Paused", "paused"),
        ("Degraded", "degraded"),
        ("Complete", "complete"),
        ("Progressing", "progressing"),
    ):
        if condition in true:
            return phase
    if rollout["state"] == "superseded":
        return "superseded"
    return rollout["state"]


def _print_rollout(rollout: dict[str, Any]) -> None:
    released = f"wave {rollout['waves_released']} of {rollout['waves']} released"
    out.print(f"rollout {rollout['name']}: {rollout_phase(rollout)}, {released}", markup=False)
    for c in rollout["conditions"]:
        message = f" — {c['message']}" if c["message"] else ""
        out.print(f"  {c['type']}={c['status']} ({c['reason']}){message}", markup=False)
    table = Table("site", "wave", "released", "desired", "observed", "artifacts", "heartbeat", "healthy")
    for s in rollout["sites"]:
        artifacts = ", ".join(
            f"{key}: {state.get('state', '-')}" + (f" ({state['reason']})" if state.get("reason") else "")
            for key, state in s["artifacts"].items()
        )
        table.add_row(
            s["site"] + (" (superseded)" if s["superseded"] else ""),
            str(s["wave"]),
            "yes" if s["released"] else "no",
            str(s["desired_version"] or "-"),
            str(s["observed_version"] if s["observed_version"] is not None else "-"),
            artifacts or "-",
            ("fresh" if s["heartbeat_fresh"] else "stale") if s["heartbeat_at"] else "never",
            "yes" if s["healthy"] else "no",
        )
    print_table(out, table)


@rollout_app.command("create")
def rollout_create(
    name: str,
    release: Annotated[
        list[str] | None, typer.Option("--release", help="name@version; repeatable (base + adapters).")
    ] = None,
    policy: Annotated[str | None, typer.Option("--policy", help="A policy bundle release, name@version.")] = None,
    selector: Annotated[
        list[str] | None, typer.Option("--selector", help="key=value a site must have; repeatable.")
    ] = None,
    canary: Annotated[
        list[str] | None, typer.Option("--canary", help="A first-wave site, by name; repeatable.")
    ] = None,
    canary_percent: Annotated[int | None, typer.Option("--canary-percent", min=1, max=99)] = None,
    auto_promote_after: Annotated[
        str | None, typer.Option("--auto-promote-after", help="Promote once the canaries are active this long (10m).")
    ] = None,
    url: Url = None,
    token: Token = None,
    ca_cert: CaCert = None,
) -> None:
    """Create a rollout; its first wave gets the new desired state at once."""
    body = {
        "name": name,
        "releases": [_release_ref(r) for r in release or []],
        "policy": _release_ref(policy) if policy else None,
        "selector": _labels(selector or []),
        "canary": canary or [],
        "canary_percent": canary_percent,
        "auto_promote_after_s": _seconds(auto_promote_after) if auto_promote_after else None,
    }
    with _client(url, token, ca_cert) as client:
        _print_rollout(client.post("/api/v1/rollouts", body))


@rollout_app.command("list")
def rollout_list(as_json: AsJson = False, url: Url = None, token: Token = None, ca_cert: CaCert = None) -> None:
    """List rollouts; `state` is where each stands by its conditions (complete, progressing, degraded, ...)."""
    with _client(url, token, ca_cert) as client:
        rows = list(client.paginate("/api/v1/rollouts"))
    if as_json:
        return _json(rows)
    table = Table("name", "state", "waves", "releases", "sites", "created by")
    for r in rows:
        releases = ", ".join(f"{x['name']}@{x['version']}" for x in r["spec"]["releases"])
        table.add_row(
            r["name"],
            rollout_phase(r),
            f"{r['waves_released']}/{r['waves']}",
            releases,
            str(len(r["sites"])),
            r["created_by"],
        )
    print_table(out, table)


ROLLOUT_SETTLED = ("complete", "degraded", "rolled back", "superseded", "paused")


@rollout_app.command("status")
def rollout_status(
    name: str,
    wait: Annotated[
        float | None,
        typer.Option(
            "--wait", help="Wait up to this many seconds for the rollout to be complete (exit 1 if it is not)."
        ),
    ] = None,
    as_json: AsJson = False,
    url: Url = None,
    token: Token = None,
    ca_cert: CaCert = None,
) -> None:
    """Where the rollout stands (from its conditions), the conditions, and a per-site table."""
    with _client(url, token, ca_cert) as client:
        found = client.get(f"/api/v1/rollouts/{name}")
        deadline = time.monotonic() + (wait or 0)
        while wait is not None and rollout_phase(found) not in ROLLOUT_SETTLED and time.monotonic() < deadline:
            time.sleep(1.0)
            found = client.get(f"/api/v1/rollouts/{name}")
    if as_json:
        _json({**found, "phase": rollout_phase(found)})
    else:
        _print_rollout(found)
    if wait is not None and rollout_phase(found) != "complete":
        raise typer.Exit(1)


def _rollout_action(action: str, name: str, url: str | None, token: str | None, ca_cert: str | None) -> None:
    with _client(url, token, ca_cert) as client:
        _print_rollout(client.post(f"/api/v1/rollouts/{name}/{action}"))


@rollout_app.command("promote")
def rollout_promote(name: str, url: Url = None, token: Token = None, ca_cert: CaCert = None) -> None:
    """Release the next wave."""
    _rollout_action("promote", name, url, token, ca_cert)


@rollout_app.command("pause")
def rollout_pause(name: str, url: Url = None, token: Token = None, ca_cert: CaCert = None) -> None:
    """Stop promoting waves."""
    _rollout_action("pause", name, url, token, ca_cert)


@rollout_app.command("resume")
def rollout_resume(name: str, url: Url = None, token: Token = None, ca_cert: CaCert = None) -> None:
    """Resume promoting waves."""
    _rollout_action("resume", name, url, token, ca_cert)


@rollout_app.command("rollback")
def rollout_rollback(name: str, url: Url = None, token: Token = None, ca_cert: CaCert = None) -> None:
    """Re-point the rollout's sites to the desired state they had before it."""
    _rollout_action("rollback", name, url, token, ca_cert)


# -- policy bundles -------------------------------------------------------------------------

policy_app = typer.Typer(
    no_args_is_help=True, pretty_exceptions_enable=False, help="Rego policy bundles: build, test, push."
)
BundlePath = Annotated[
    Path | None, typer.Argument(help="Bundle directory (OPA layout) or a built .tar.gz; or name a shipped --pack.")
]
PackOption = Annotated[
    str | None,
    typer.Option("--pack", help="A policy pack shipped with Sitewarden, by name (bank), instead of a PATH."),
]


def shipped_packs() -> dict[str, Path]:
    """The policy packs installed with the `policies` package: name -> directory."""
    import policies  # noqa: PLC0415  (regopy loads a shared library)

    root = Path(policies.__file__).parent / "packs"
    return {p.name: p for p in sorted(root.iterdir()) if (p / ".manifest").is_file()} if root.is_dir() else {}


def _source(path: Path | None, pack: str | None) -> Path:
    """The bundle a policy command works on: PATH, or the shipped pack named by --pack (one of them)."""
    if (path is None) == (pack is None):
        _fail("give a bundle PATH or --pack NAME (one of them)", 2)
    if pack is None:
        assert path is not None
        return path
    packs = shipped_packs()
    if pack not in packs:
        _fail(f"--pack {pack!r}: the shipped packs are {', '.join(packs) or 'none'}", 2)
    return packs[pack]


def _bundle(path: Path) -> Any:
    from policies import Bundle, BundleError  # noqa: PLC0415  (regopy loads a shared library)

    try:
        return Bundle.load(path)
    except BundleError as exc:
        _fail(str(exc), 2)


def _checked(path: Path, *, run_tests: bool = True, label: str | None = None) -> Any:
    """Compile (and test) in a child process: rego-cpp can crash on some Rego, and then we say so."""
    from policies import BundleError  # noqa: PLC0415
    from policies.check import check  # noqa: PLC0415

    try:
        return check(path, label=label or str(path), run_tests=run_tests)
    except BundleError as exc:
        _fail(str(exc), 2)


@policy_app.command("build")
def policy_build(
    directory: Annotated[Path, typer.Argument(help="Bundle directory: .manifest, data.json, .rego modules.")],
    out_file: Annotated[Path, typer.Option("--out", help="The bundle tarball to write (.tar.gz).")],
    revision: Annotated[str | None, typer.Option("--revision", help="Overrides the manifest's revision.")] = None,
) -> None:
    """Check that a bundle compiles and write it as a deterministic tarball."""
    if not directory.is_dir():
        _fail(f"{directory} is not a directory", 2)
    bundle = _bundle(directory)
    if revision is not None:
        bundle = dataclasses.replace(bundle, revision=revision)
    # Checked before it takes its name: a bundle that does not compile leaves no file behind.
    pending = out_file.with_name(f".{out_file.name}.pending")
    pending.write_bytes(bundle.tarball())
    try:
        checked = _checked(pending, run_tests=False, label=str(directory))
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    pending.replace(out_file)
    console.print(
        f"{out_file}: revision {bundle.revision or '(none)'}, {len(bundle.policy_modules)} modules, "
        f"{len(bundle.test_modules)} test modules, decisions {', '.join(checked.points) or 'none'}, "
        f"sha256 {checked.digest}"
    )


@policy_app.command("test")
def policy_test(path: BundlePath = None, pack: PackOption = None) -> None:
    """Run the bundle's Rego unit tests (rules named test_* in *_test.rego modules). Exit 1 if any fails."""
    path = _source(path, pack)
    _bundle(path)
    results = _checked(path).tests
    table = Table("result", "test", "detail")
    for r in results:
        table.add_row("PASS" if r.passed else "FAIL", f"{r.package}.{r.rule}", r.detail)
    print_table(out, table)
    failed = sum(not r.passed for r in results)
    out.print(f"{len(results) - failed}/{len(results)} passed")
    if failed:
        raise typer.Exit(1)


@policy_app.command("push")
def policy_push(
    path: BundlePath = None,
    pack: PackOption = None,
    *,
    name: Annotated[str, typer.Option("--name")],
    version: Annotated[str, typer.Option("--version", help="Semantic version.")],
    owner: Annotated[str, typer.Option("--owner", help="The team that owns the policy.")] = "compliance",
    url: Url = None,
    token: Token = None,
    ca_cert: CaCert = None,
) -> None:
    """Register a bundle as a release of kind policy (its tests must pass); approve it like any release."""
    path = _source(path, pack)
    bundle = _bundle(path)
    checked = _checked(path)
    results, failed = checked.tests, checked.failed
    if failed:
        _fail(f"{len(failed)} of the bundle's {len(results)} tests fail (see `sitewarden policy test {path}`)", 2)
    card = {
        "owner": owner,
        "description": f"Rego policy bundle, revision {bundle.revision or '(none)'}",
        "revision": bundle.revision,
        "roots": list(bundle.roots),
        "digest": checked.digest,
        "decisions": list(checked.points),
        "tests": len(results),
    }
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / BUNDLE_FILE).write_bytes(bundle.tarball())
        _push(directory, [directory / BUNDLE_FILE], name, version, "policy", "rego", card, url, token, ca_cert)


# -- federated fine-tuning jobs -----------------------------------------------------------------

job_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help="Federated fine-tuning jobs.")


@job_app.command("start")
def job_start(
    name: str,
    base: Annotated[str, typer.Option("--base", help="The approved ONNX model to start from, name@version.")],
    app: Annotated[
        str, typer.Option("--app", help="The approved Flower App release (kind app) the sites run, name@version.")
    ],
    dataset: Annotated[str, typer.Option("--dataset", help="The data set name each site maps to local data.")],
    rounds: Annotated[int, typer.Option("--rounds", min=1, max=1000)] = 3,
    min_sites: Annotated[int, typer.Option("--min-sites", min=1)] = 2,
    selector: Annotated[
        list[str] | None, typer.Option("--selector", help="key=value a site must have; repeatable.")
    ] = None,
    strategy: Annotated[str, typer.Option("--strategy", help="FedAvg or FedProx.")] = "FedAvg",
    noise_multiplier: Annotated[
        float | None, typer.Option("--noise-multiplier", help="Turns differential privacy on.")
    ] = None,
    clipping_norm: Annotated[float, typer.Option("--clipping-norm")] = 1.0,
    delta: Annotated[float, typer.Option("--delta")] = 1e-5,
    secure_aggregation: Annotated[bool, typer.Option("--secure-aggregation/--no-secure-aggregation")] = False,
    proximal_mu: Annotated[float | None, typer.Option("--proximal-mu", help="FedProx's proximal term weight.")] = None,
    output: Annotated[
        str | None, typer.Option("--output", help="name@version of the resulting release (default: base, -ft.<job>).")
    ] = None,
    url: Url = None,
    token: Token = None,
    ca_cert: CaCert = None,
) -> None:
    """Create a federated fine-tuning job; prints it, with its planned privacy budget."""
    body = {
        "name": name,
        "base": _release_ref(base),
        "app": _release_ref(app),
        "dataset": dataset,
        "selector": _labels(selector or []),
        "rounds": rounds,
        "min_sites": min_sites,
        "strategy": strategy,
        "differential_privacy": (
            {"noise_multiplier": noise_multiplier, "clipping_norm": clipping_norm, "delta": delta}
            if noise_multiplier is not None
            else None
        ),
        "secure_aggregation": secure_aggregation,
        "proximal_mu": proximal_mu,
        "output": _release_ref(output) if output else None,
    }
    with _client(url, token, ca_cert) as client:
        _json(client.post("/api/v1/jobs", body))


JOB_ENDED = ("finished", "failed", "cancelled")


@job_app.command("status")
def job_status(
    job: str,
    wait: Annotated[
        float | None, typer.Option("--wait", help="Wait up to this many seconds for the job to end.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job as JSON.")] = False,
    url: Url = None,
    token: Token = None,
    ca_cert: CaCert = None,
) -> None:
    """A job's state, sites, rounds (metrics, sites, epsilon) and bytes; exit 1 when it failed or was cancelled."""
    with _client(url, token, ca_cert) as client:
        found = client.get(f"/api/v1/jobs/{job}")
        deadline = time.monotonic() + (wait or 0)
        while found["state"] not in JOB_ENDED and time.monotonic() < deadline:
            time.sleep(1.0)
            found = client.get(f"/api/v1/jobs/{job}")
    if as_json:
        _json(found)
    else:
        _print_job(found)
    if found["state"] in ("failed", "cancelled"):
        raise typer.Exit(1)


def _print_job(job: dict[str, Any]) -> None:
    spec = job["spec"]
    dp = spec["differential_privacy"]
    out.print(f"job {job['name']} ({job['id']}): {job['state']}" + (f" — {job['reason']}" if job["reason"] else ""))
    out.print(
        f"  base {spec['base']['name']} {spec['base']['version']}, app {spec['app']['name']} "
        f"{spec['app']['version']}, data set {spec['dataset']}, {spec['strategy']}, "
        f"{spec['rounds']} rounds, at least {spec['min_sites']} sites, "
        f"secure aggregation {'on' if spec['secure_aggregation'] else 'off'}"
    )
    if dp.get("enabled"):
        spent = job["epsilon_spent"]
        out.print(
            f"  differential privacy: noise {dp['noise_multiplier']}, clipping {dp['clipping_norm']}, "
            f"delta {dp['delta']}; epsilon spent {spent if spent is not None else 0:.3f} of {dp['epsilon']:.3f}"
        )
    out.print(f"  participants: {', '.join(job['participants']) or '-'}")
    for site, reasons in job["declined"].items():
        out.print(f"  declined: {site}: {'; '.join(reasons)}")
    if job["bytes_exchanged"]:
        b = job["bytes_exchanged"]
        out.print(f"  Fleet API bytes: {b['from_sites']:,} from sites, {b['to_sites']:,} to sites")
    if job["result"]:
        result = job["result"]
        out.print(f"  result: {result['name']} {result['version']} (a candidate: approve it to roll it out)")
    table = Table("round", "sites", "train loss", "eval loss", "eval accuracy", "eval AUC", "epsilon")
    for r in job["rounds"]:
        ev, tr = r.get("evaluate", {}), r.get("train", {})
        table.add_row(
            str(r["round"]),
            str(len(r["sites"])),
            _metric(tr.get("train-loss")),
            _metric(ev.get("eval-loss")),
            _metric(ev.get("eval-accuracy")),
            _metric(ev.get("eval-auc")),
            _metric(r.get("epsilon")),
        )
    if job["rounds"]:
        print_table(out, table)


def _metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


@job_app.command("cancel")
def job_cancel(job: str, url: Url = None, token: Token = None, ca_cert: CaCert = None) -> None:
    """Cancel a job that has not ended."""
    with _client(url, token, ca_cert) as client:
        _json(client.post(f"/api/v1/jobs/{job}/cancel", None))
