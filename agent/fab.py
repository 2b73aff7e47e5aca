"""The Flower App a federated job runs, as this site verifies it: a release of kind `app`.

A job in the desired state names its app release (targets, digests, approvals, like any
release). The `Syncer` stages it through TUF into `releases/<name>/<version>/` as it does a model,
and `load_app` decides on it, on the staged bytes:

1. the manifest describes a release of kind `app`, runtime `flower`, with exactly one file, a FAB;
2. that file's bytes on disk hash to the SHA-256 the manifest lists (checked again each time the
   release is used, not only when it was downloaded);
3. an approver this site trusts (its own configuration, never the controller) signed exactly
   this manifest and this file (OpenSSF model-signing, as for models);
4. the FAB is a Flower App Bundle (`federation.fab.inspect`), read without running anything.

The result, `ApprovedApp`, carries the approved FAB's SHA-256: the one FAB this site's SuperNode
will run for the job (`federation.runner`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import RefusedError
from federation.fab import FAB_SUFFIX, MAX_FAB, FabError, inspect
from sitewarden import approval

APP_KIND, APP_RUNTIME = "app", "flower"


@dataclass(frozen=True)
class ApprovedApp:
    """A verified app release: which FAB, approved by whom."""

    name: str
    version: str
    directory: Path
    manifest_sha256: str
    fab_path: str
    fab_sha256: str
    fab_id: str
    fab_version: str
    approvers: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        """The app as the federation decision and the audit log see it."""
        return {
            "name": self.name,
            "version": self.version,
            "manifest_sha256": self.manifest_sha256,
            "fab_sha256": self.fab_sha256,
            "fab_id": self.fab_id,
            "approvers": list(self.approvers),
        }


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_app(directory: Path, trusted_approvers: dict[str, bytes]) -> ApprovedApp:
    """Verify a staged app release (see the module docstring); RefusedError says what is wrong."""
    try:
        manifest_bytes = (directory / "release.json").read_bytes()
        manifest = json.loads(manifest_bytes)
        identity = (manifest["name"], manifest["version"], manifest["kind"], manifest["runtime"])
        files = {f["path"]: f["sha256"] for f in manifest["files"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RefusedError(f"the app release's manifest cannot be read: {exc.__class__.__name__}: {exc}") from exc
    name, version, kind, runtime = identity
    if (kind, runtime) != (APP_KIND, APP_RUNTIME):
        raise RefusedError(f"{name} {version} is a {kind} release for {runtime}, not a Flower App (app, flower)")
    if len(files) != 1 or not next(iter(files)).endswith(FAB_SUFFIX):
        raise RefusedError(f"an app release holds exactly one {FAB_SUFFIX} file; {name} {version} has {sorted(files)}")
    [(fab_path, fab_sha256)] = files.items()
    path = directory / "files" / fab_path
    try:
        on_disk = _sha256_file(path)
    except OSError as exc:
        raise RefusedError(f"the app's FAB {fab_path} cannot be read: {exc.strerror or exc}") from exc
    if on_disk != fab_sha256:
        raise RefusedError(f"the app's FAB {fab_path} hashes to {on_disk}, not the approved {fab_sha256}")
    approvers = _verified_approvers(directory, manifest_bytes, files, trusted_approvers)
    if path.stat().st_size > MAX_FAB:
        raise RefusedError(f"the app's FAB {fab_path} is over {MAX_FAB} bytes, Flower's limit for a FAB")
    try:
        info = inspect(path.read_bytes())
    except FabError as exc:
        raise RefusedError(f"{fab_path} is not a Flower App Bundle: {exc}") from exc
    return ApprovedApp(
        name=name,
        version=version,
        directory=directory,
        manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
        fab_path=fab_path,
        fab_sha256=fab_sha256,
        fab_id=info.fab_id,
        fab_version=info.version,
        approvers=tuple(approvers),
    )


def _verified_approvers(
    directory: Path, manifest_bytes: bytes, files: dict[str, str], trusted: dict[str, bytes]
) -> list[str]:
    """Names of the trusted approvers whose signature covers exactly this manifest and these files."""
    layout = {"release.json": hashlib.sha256(manifest_bytes).hexdigest()}
    layout.update({f"files/{p}": sha for p, sha in files.items()})
    verified, problems = [], []
    approvals = directory / "approvals"
    for bundle in sorted(approvals.glob("*.json")) if approvals.is_dir() else []:
        try:
            verified.append(approval.verify_approval(bundle.read_bytes(), layout, trusted).approver)
        except (approval.ApprovalError, OSError) as exc:
            problems.append(f"{bundle.name}: {exc}")
    if not verified:
        detail = "; ".join(problems) if problems else "the release carries no approval"
        raise RefusedError(f"the app release has no approval by an approver this site trusts ({detail})")
    return sorted(set(verified))
