"""Sync: bring the site to its desired state, verified at every step, never breaking what serves.

The workflow, for each new desired-state version the controller announces:

1. Refresh TUF metadata with python-tuf's `ngclient.Updater` (rollback, freeze,
   mix-and-match and endless-data attacks are refused there) and download the site's
   desired-state document, a TUF target. It is validated with the registry's naming rules
   (`sitewarden.desired`): names, versions, paths, fingerprints and ids, and every target
   path tied to its release.
2. Check the releases the site holds (active, last-known-good) and each one named against
   the revocations its trusted approvers published (TUF targets
   `releases/<name>/<version>/revocations/<fingerprint>.json`): a revoked release is refused,
   and a revoked active one gives way to the last-known-good.
3. For each release named, fetch its manifest and approval bundles into memory, validate the
   manifest, and verify the approvals: an OpenSSF model-signing signature over the manifest
   and the files by an approver key this site trusts (its own configuration, never the
   controller). Only then is anything written.
4. Download the files as TUF targets into a private staging directory, each created inside
   it with O_NOFOLLOW | O_EXCL (`sitewarden.files.create_inside`): nothing is written
   outside it, through a link, or over another file.
5. Ask the acceptance decision of the active policy bundle (`sitewarden/accept`). A policy
   bundle named by the desired state is handled first: accepted when a trusted approver
   signed it, it compiles and its own Rego tests pass (checked in a child process), then
   swapped in, so that the releases of the same desired state are accepted under it.
6. Load the model and check its inputs and outputs against the manifest.
7. Move the staging directory to `releases/<name>/<version>/` (a rename relative to
   directories opened without following links), then switch `state.json` atomically; the
   previous release stays as last-known-good.

A refusal (a lasting reason: TUF, an approval, a revocation, a malformed document, the
acceptance decision) is audited and reported, and what serves keeps serving; the version is
used up. A transient failure (the network, the controller, the disk, an approver key file
that cannot be read) uses up nothing: `apply` says `retry` and the daemon tries the same
version again with backoff. `state.json` is the only commit point, so a `kill -9` at any
moment leaves either the old or the new release active; staging directories left behind are
removed at start. At start, the active release's files are hashed again against its approved
manifest: a release whose bytes changed is moved aside (`releases/.quarantine-*`), audited,
and the last-known-good serves while the desired state is applied again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import ValidationError
from tuf.api import exceptions as tuf_errors

from agent import policy_inputs
from agent.errors import ConfigError, RefusedError, RetryableError
from agent.fab import ApprovedApp, load_app
from agent.federation import Trainer
from agent.guard import Decision, Guard
from agent.identity import DataDir, Identity
from agent.lm.site import LanguageModels, LMRelease
from agent.onnx_model import ModelLoadError, OnnxModel
from policies import Bundle, BundleError, CompiledPolicy
from policies.check import check as check_bundle
from sitewarden import approval, names, revocation, tufclient
from sitewarden.desired import (
    MANIFEST,
    DesiredState,
    JobRef,
    ReleaseManifest,
    ReleaseRef,
    TargetRef,
    revocation_target,
    target_path,
)
from sitewarden.files import (
    UnsafePathError,
    check_plain_tree,
    create_inside,
    fsync_dir,
    open_dir_inside,
    write_atomically,
)
from sitewarden.wire import JobParticipation

log = logging.getLogger("sitewarden.agent.sync")

STAGING_PREFIX = ".staging-"
QUARANTINE_PREFIX = ".quarantine-"
MAX_DESIRED_BYTES = 16 << 20
MAX_MANIFEST_BYTES = 16 << 20
MAX_APPROVAL_BYTES = 1 << 20
_APPROVAL_FILE = re.compile(r"approvals/([0-9a-f]{64})\.json")
# What the federation decision sees of a job (policies/schemas/federation.input.schema.json).
_JOB_POLICY_FIELDS = (
    "id",
    "name",
    "base",
    "model_family",
    "dataset",
    "rounds",
    "min_sites",
    "strategy",
    "differential_privacy",
    "secure_aggregation",
)
Staged = TypeVar("Staged", "ActiveRelease", "ActivePolicy", ApprovedApp, "LMRelease")


class IntegrityError(RefusedError):
    """A release on disk is not what was approved: its bytes changed, a file is missing or extra,
    or it holds a symbolic link. It is moved aside and fetched again."""


@dataclass(frozen=True)
class ActiveRelease:
    """A verified release, loaded and ready to serve."""

    name: str
    version: str
    kind: str
    runtime: str
    directory: Path
    manifest_sha256: str
    card: dict[str, Any]
    approvers: tuple[str, ...]
    model: OnnxModel

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "runtime": self.runtime,
            "manifest_sha256": self.manifest_sha256,
            "approvers": list(self.approvers),
        }

    @functools.cached_property
    def policy_input(self) -> dict[str, Any]:
        """The `model` of the inference decision's input (policies/schemas/inference.input.schema.json)."""
        return {
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "runtime": self.runtime,
            "digest": self.manifest_sha256,
            "approvers": list(self.approvers),
            "card": self.card,
        }


@dataclass(frozen=True)
class ActivePolicy:
    """A verified policy bundle release, compiled and ready to decide."""

    name: str
    version: str
    directory: Path
    manifest_sha256: str
    approvers: tuple[str, ...]
    compiled: CompiledPolicy
    tests: int | None = None  # how many of its Rego tests passed before it was accepted

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "kind": "policy",
            "manifest_sha256": self.manifest_sha256,
            "revision": self.compiled.bundle.revision,
            "digest": self.compiled.digest,
            "approvers": list(self.approvers),
        }


@dataclass
class LocalState:
    """What `state.json` records: the last desired version handled, what is active, what was before,
    and the revocations seen (so that a revoked release is refused at start, before any network)."""

    desired_version: int = 0
    active: dict[str, Any] | None = None
    last_good: dict[str, Any] | None = None
    artifacts: dict[str, dict[str, str]] = field(default_factory=dict)
    policy: dict[str, Any] | None = None
    policy_last_good: dict[str, Any] | None = None
    revoked: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> LocalState:
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        return cls(
            raw.get("desired_version", 0),
            raw.get("active"),
            raw.get("last_good"),
            raw.get("artifacts", {}),
            raw.get("policy"),
            raw.get("policy_last_good"),
            raw.get("revoked", {}),
        )

    def save(self, path: Path) -> None:
        data = {
            "desired_version": self.desired_version,
            "active": self.active,
            "last_good": self.last_good,
            "artifacts": self.artifacts,
            "policy": self.policy,
            "policy_last_good": self.policy_last_good,
            "revoked": self.revoked,
        }
        write_atomically(path, json.dumps(data, indent=2).encode())


@dataclass(frozen=True)
class Outcome:
    """What became of one desired-state version: `applied`, `refused` (a lasting reason: the version is
    used up), `retry` (a transient failure: try the same version again later) or `unchanged`."""

    result: Literal["applied", "refused", "retry", "unchanged"]
    reason: str = ""
    activated: ActiveRelease | None = None


def model_file(card: dict[str, Any], files: list[str]) -> str:
    """The ONNX graph of a release: the card's `model_file`, else its only `.onnx` file."""
    if card.get("model_file"):
        if card["model_file"] not in files:
            raise RefusedError(f"the model card names model_file {card['model_file']!r}, which the release lacks")
        return str(card["model_file"])
    graphs = [f for f in files if f.endswith(".onnx")]
    if len(graphs) != 1:
        raise RefusedError(f"the release has {len(graphs)} .onnx files; name one in the model card's model_file")
    return graphs[0]


def parse_manifest(data: bytes) -> ReleaseManifest:
    """`release.json`, validated with the registry's rules; RefusedError names the first problem."""
    try:
        return ReleaseManifest.model_validate_json(data)
    except ValidationError as exc:
        raise RefusedError(f"the release manifest is malformed: {_first_error(exc)}") from exc


def read_release(
    directory: Path, trusted_approvers: dict[str, bytes], *, rehash: bool
) -> tuple[ReleaseManifest, str, list[str]]:
    """A release directory checked: (manifest, its SHA-256, the trusted approvers who approved it).

    The tree must hold exactly `release.json`, the manifest's files under `files/` and approval
    bundles `approvals/<fingerprint>.json`, as regular files (a link is refused). With `rehash`,
    every file is hashed again and compared with the manifest (`IntegrityError` otherwise).
    """
    try:
        present = set(check_plain_tree(directory))
    except UnsafePathError as exc:
        raise IntegrityError(str(exc)) from exc
    if MANIFEST not in present:
        raise IntegrityError(f"{directory} has no {MANIFEST}")
    manifest_bytes = (directory / MANIFEST).read_bytes()
    manifest = parse_manifest(manifest_bytes)
    expected = {MANIFEST, *(f"files/{f.path}" for f in manifest.files)}
    missing = sorted(expected - present)
    extra = sorted(p for p in present - expected if not _APPROVAL_FILE.fullmatch(p))
    if missing or extra:
        raise IntegrityError(
            f"the release on disk differs from its manifest: missing {missing[:5]}, not in the manifest {extra[:5]}"
        )
    if rehash:
        for f in manifest.files:
            actual = _hash_file(directory / "files" / f.path)
            if actual != f.sha256:
                raise IntegrityError(
                    f"file {f.path} changed on disk: its bytes hash to {actual}, the approved manifest says {f.sha256}"
                )
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    approvers = _verified_approvers(directory, digest, manifest.digests(), present, trusted_approvers)
    return manifest, digest, approvers


def verified_manifest(
    directory: Path, trusted_approvers: dict[str, bytes], *, rehash: bool = False
) -> tuple[str, dict[str, Any], list[str]]:
    """A release directory checked as `read_release` does (its tree, approvals and, with `rehash`, its
    bytes): its manifest's digest, the manifest as JSON, and the trusted approvers who signed it."""
    _, digest, approvers = read_release(directory, trusted_approvers, rehash=rehash)
    return digest, json.loads((directory / MANIFEST).read_bytes()), approvers


def load_release(directory: Path, trusted_approvers: dict[str, bytes], *, rehash: bool = False) -> ActiveRelease:
    """Load a staged release from disk, checking its tree, approvals and model again (and its bytes, with `rehash`)."""
    manifest, digest, approvers = read_release(directory, trusted_approvers, rehash=rehash)
    card = manifest.metadata
    path = directory / "files" / model_file(card, [f.path for f in manifest.files])
    try:
        model = OnnxModel(path)
        model.check_declared(card.get("inputs", []), card.get("outputs", []))
    except ModelLoadError as exc:
        raise RefusedError(f"the model does not load as declared: {exc}") from exc
    return ActiveRelease(
        name=manifest.name,
        version=manifest.version,
        kind=manifest.kind,
        runtime=manifest.runtime,
        directory=directory,
        manifest_sha256=digest,
        card=card,
        approvers=tuple(approvers),
        model=model,
    )


def load_policy(
    directory: Path, trusted_approvers: dict[str, bytes], *, precheck: bool = False, rehash: bool = False
) -> ActivePolicy:
    """Load a staged policy release: tree and approvals checked again, its bundle read and compiled.

    With `precheck`, the bundle is first compiled and its tests run in a child process
    (`policies.check`): a bundle that crashes the Rego engine or fails its tests is refused
    before the agent's own process compiles it.
    """
    manifest, digest, approvers = read_release(directory, trusted_approvers, rehash=rehash)
    bundles = [f.path for f in manifest.files if f.path.endswith((".tar.gz", ".tgz"))]
    if len(bundles) != 1:
        raise RefusedError(f"a policy release holds one bundle (.tar.gz); this one has {len(bundles)}")
    path = directory / "files" / bundles[0]
    label = f"policy {manifest.name} {manifest.version}"
    try:
        if precheck:
            checked = check_bundle(path, label=label)
            if checked.failed:
                detail = "; ".join(f"{t.package}.{t.rule}: {t.detail}" for t in checked.failed[:5])
                raise RefusedError(
                    f"{len(checked.failed)} of the bundle's {len(checked.tests)} Rego tests fail: {detail}"
                )
        compiled = CompiledPolicy(Bundle.from_tarball(path.read_bytes()), label=label)
    except BundleError as exc:
        raise RefusedError(f"the policy bundle cannot be used: {exc}") from exc
    return ActivePolicy(
        name=manifest.name,
        version=manifest.version,
        directory=directory,
        manifest_sha256=digest,
        approvers=tuple(approvers),
        compiled=compiled,
        tests=len(checked.tests) if precheck else None,
    )


def _layout(manifest_sha256: str, files: dict[str, str]) -> dict[str, str]:
    """What an approval signs: `release.json` and `files/<path>`, with their digests."""
    layout = {MANIFEST: manifest_sha256}
    layout.update({f"files/{p}": sha for p, sha in files.items()})
    return layout


def _verified_approvers(
    directory: Path, manifest_sha256: str, files: dict[str, str], present: set[str], trusted: dict[str, bytes]
) -> list[str]:
    """Names of the trusted approvers whose signature covers exactly this manifest and these files."""
    layout = _layout(manifest_sha256, files)
    verified, problems = [], []
    for relative in sorted(p for p in present if _APPROVAL_FILE.fullmatch(p)):
        claimed = _APPROVAL_FILE.fullmatch(relative)[1]  # type: ignore[index]
        try:
            result = approval.verify_approval((directory / relative).read_bytes(), layout, trusted)
        except approval.ApprovalError as exc:
            problems.append(f"{relative}: {exc}")
            continue
        if result.key_fingerprint != claimed:
            problems.append(f"{relative}: signed by key {result.key_fingerprint}, not the key it is named after")
            continue
        verified.append(result.approver)
    if not verified:
        detail = "; ".join(problems) if problems else "the release carries no approval"
        raise RefusedError(f"no approval by an approver this site trusts ({detail})")
    return sorted(set(verified))


def _hash_file(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


def _classify(exc: BaseException) -> tuple[Literal["retry", "refuse"], str] | None:
    """Whether a failure is transient (retry the version) or a lasting refusal; None if it is neither."""
    name = f"{exc.__class__.__name__}: {exc}"
    if isinstance(exc, RetryableError):
        return "retry", str(exc)
    if isinstance(exc, tuf_errors.DownloadLengthMismatchError):  # more bytes than signed: endless data
        return "refuse", f"TUF refused a target: {name}"
    if isinstance(exc, tuf_errors.DownloadError):  # network, timeouts, HTTP errors, cut transfers
        return "retry", f"the controller could not be reached: {name}"
    if isinstance(exc, tuf_errors.ExpiredMetadataError):  # a controller away long enough, or a freeze
        return "retry", f"TUF metadata expired (the controller re-signs it when it is back): {name}"
    if isinstance(exc, tuf_errors.RepositoryError):
        return "refuse", f"TUF refused a target: {name}"
    if isinstance(exc, (RefusedError, UnsafePathError)):
        return "refuse", str(exc)
    if isinstance(exc, OSError):  # a full or failing disk
        return "retry", f"the site's disk: {name}"
    return None


class Syncer:
    """Applies desired-state versions; called from the daemon's sync loop, one call at a time."""

    def __init__(
        self,
        data: DataDir,
        identity: Identity,
        *,
        trusted_approvers: Callable[[], dict[str, bytes]],
        guard: Callable[[], Guard],
        record: Callable[[dict[str, Any]], Any],
        ca_cert: str | None,
        on_policy: Callable[[ActivePolicy | None], None] = lambda _policy: None,
        trainer: Trainer | None = None,
        fetch_timeout_s: float = 30.0,
        lm: LanguageModels | None = None,
    ) -> None:
        self.data = data
        self.identity = identity
        self.trusted_approvers = trusted_approvers
        self.guard = guard
        self.record = record
        self.ca_cert = ca_cert
        self.on_policy = on_policy
        self.trainer = trainer
        self.lm = lm  # the language-model runtime (agent.lm), when the lm extra is installed
        self.answers: dict[str, JobParticipation] = {}  # job id -> the answer still to send
        self.site = {"id": identity.site_id, "name": identity.site_name}
        self.state = LocalState.load(data.state_file)
        self.active: ActiveRelease | None = None
        self.policy: ActivePolicy | None = None
        # Set when what `state.json` says could not be served as it is (bytes changed, keys unreadable):
        # the daemon applies the handled desired state again, which fetches what is missing.
        self.reapply = False
        self._last_retry_reason = ""
        # The controller serves TUF only to enrolled sites: each request carries a fresh site JWT.
        credential = tufclient.site_credential(data.site_key(), identity.site_id, identity.controller_url)
        self.fetcher = tufclient.HttpxFetcher(
            ca_cert, timeout_s=fetch_timeout_s, credential=credential, origin=identity.controller_url
        )

    # -- start ---------------------------------------------------------------------------

    def start(self) -> ActiveRelease | None:
        """Clean up after a crash and load what `state.json` says is active (or the last-known-good),
        every file hashed again against its approved manifest."""
        releases = self.data.releases
        if releases.is_symlink():
            raise ConfigError(f"{releases} is a symbolic link: the agent keeps its releases in its own data dir")
        releases.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in releases.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        try:
            trusted = self._trusted()
        except RetryableError as exc:
            self.record({"type": "activation.failed", "release": self.state.active, "reason": str(exc)})
            self.reapply = True
            return None
        self._start_policy(trusted)
        if self.lm is not None:  # what lm.json says was active, every byte hashed again
            self.lm.start(lambda directory: verified_manifest(directory, trusted, rehash=True))
        for candidate in (self.state.active, self.state.last_good):
            if candidate is None:
                continue
            try:
                directory = self._held_directory(candidate)
                self._refuse_known_revoked(candidate)
                self.active = load_release(directory, trusted, rehash=True)
            except IntegrityError as exc:
                self._quarantine(candidate, str(exc))
                continue
            except (RefusedError, OSError, ValueError, KeyError) as exc:
                log.error("%s %s does not load at start: %s", candidate.get("name"), candidate.get("version"), exc)
                self.record({"type": "activation.failed", "release": candidate, "reason": str(exc)})
                self.reapply = True
                continue
            if candidate is not self.state.active:
                log.warning("rolled back to last-known-good %s %s", self.active.name, self.active.version)
                self._commit(active=candidate, last_good=None)
            log.info("serving %s %s (from the data dir)", self.active.name, self.active.version)
            self.record({"type": "activation", "release": self.active.describe(), "reason": "restart"})
            return self.active
        if self.state.active is not None:  # nothing could be served
            self._commit(active=None, last_good=None)
        return None

    def _start_policy(self, trusted: dict[str, bytes]) -> None:
        for candidate in (self.state.policy, self.state.policy_last_good):
            if candidate is None:
                continue
            try:
                directory = self._held_directory(candidate)
                self._refuse_known_revoked(candidate)
                policy = load_policy(directory, trusted, rehash=True)
            except IntegrityError as exc:
                self._quarantine(candidate, str(exc))
                continue
            except (RefusedError, OSError, ValueError, KeyError) as exc:
                log.error(
                    "policy %s %s does not load at start: %s", candidate.get("name"), candidate.get("version"), exc
                )
                self.record({"type": "activation.failed", "release": candidate, "reason": str(exc)})
                self.reapply = True
                continue
            if candidate is not self.state.policy:
                log.warning("rolled back to last-known-good policy %s %s", policy.name, policy.version)
                self._commit(policy=candidate, policy_last_good=None)
            log.info("deciding with policy %s %s (from the data dir)", policy.name, policy.version)
            self.policy = policy
            self.on_policy(policy)
            self.record({"type": "activation", "release": policy.describe(), "reason": "restart"})
            return

    def _held_directory(self, held: dict[str, Any]) -> Path:
        """Where a release named in `state.json` lives: derived from its checked name and version."""
        return self.data.releases / names.check_release_name(held["name"]) / names.check_version(held["version"])

    def _refuse_known_revoked(self, held: dict[str, Any]) -> None:
        known = self.state.revoked.get(f"{held['name']}@{held['version']}")
        if known and known.get("manifest_sha256") == held.get("manifest_sha256"):
            who, when = known.get("approver"), known.get("revoked_at")
            raise RefusedError(f"revoked by {who} at {when}: {known.get('reason')}")

    def _quarantine(self, held: dict[str, Any], reason: str, source: Path | None = None) -> None:
        """Move a release whose bytes changed (or a link in its place) out of the way, kept for
        inspection; audit it; and have the desired state applied again, which fetches it afresh."""
        name, version = held["name"], held.get("version")
        source = source or self.data.releases / name / version
        dest = self.data.releases / f"{QUARANTINE_PREFIX}{name}-{version or 'all'}"
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest, ignore_errors=True)
        else:
            dest.unlink(missing_ok=True)
        try:
            os.rename(source, dest)  # a link is renamed itself, never followed
        except OSError:
            if source.is_symlink() or not source.is_dir():
                source.unlink(missing_ok=True)
            else:
                shutil.rmtree(source, ignore_errors=True)
        self.record(
            {
                "type": "release.integrity",
                "release": {k: held.get(k) for k in ("name", "version", "manifest_sha256")},
                "reason": reason,
                "quarantined": dest.name,
            }
        )
        self.reapply = True

    def _commit(self, **changes: Any) -> None:
        """Write `state.json` with `changes`; memory follows only once it is written, so a full disk
        leaves the state as it was (the change is retried), never half in memory."""
        changed = dataclasses.replace(self.state, **changes)
        changed.save(self.data.state_file)
        self.state = changed

    def _trusted(self) -> dict[str, bytes]:
        """The approver keys the site's configuration names, each one usable; RetryableError otherwise
        (an operator replacing a key file: refusing releases for good over it would be wrong)."""
        try:
            keys = self.trusted_approvers()
        except ConfigError as exc:
            raise RetryableError(f"the site's approver keys cannot be read: {exc}") from exc
        for name, pem in keys.items():
            try:
                approval.key_fingerprint(pem)
            except approval.ApprovalError as exc:
                raise RetryableError(f"approver {name}'s key cannot be used: {exc}") from exc
        return keys

    # -- applying a desired state ----------------------------------------------------------

    def apply(self, version: int, *, force: bool = False) -> Outcome:
        """Handle one announced desired-state version (`force`: again, though it was handled)."""
        log.info("desired state %d announced; applying it%s", version, " again" if force else "")
        try:
            trusted = self._trusted()
            updater = self._updater()
            desired = self._desired(updater)
        except Exception as exc:
            kind = _classify(exc)
            if kind is None:
                raise
            reason = f"desired state {version}: {kind[1]}"
            if kind[0] == "retry":
                return self._retry(version, reason, {})
            log.warning("%s", reason)
            self.record({"type": "sync.refused", "desired_version": version, "reason": reason})
            try:
                self._remember(version, {}, refused_reason=reason)
            except OSError as exc:
                return self._retry(version, f"the site's disk: {exc.__class__.__name__}: {exc}", {})
            return Outcome("refused", reason)
        handled = self.state.desired_version
        if desired.version < handled:
            reason = f"desired state {desired.version} is older than the version already handled ({handled})"
            log.warning("%s", reason)
            self.record({"type": "sync.refused", "desired_version": desired.version, "reason": reason})
            return Outcome("refused", reason)
        if desired.version < version:
            # The controller commits a version before it publishes it: TUF catches up in a moment.
            reason = f"the controller announced desired state {version}; TUF still publishes {desired.version}"
            return self._retry(version, reason, dict(self.state.artifacts))
        if desired.version == handled and not force:
            return Outcome("unchanged")
        self.reapply = False
        artifacts: dict[str, dict[str, str]] = {}
        retry: list[str] = []
        activated = None
        try:
            self._check_held(updater, trusted)
        except Exception as exc:
            kind = _classify(exc)
            if kind is None:
                raise
            if kind[0] == "retry":
                retry.append(f"revocations: {kind[1]}")
            else:
                self.record({"type": "revocation.check_failed", "desired_version": desired.version, "reason": kind[1]})
        if desired.policy is not None:  # first, so that the releases below are accepted under it
            key = f"{desired.policy.name}@{desired.policy.version}"
            artifacts[key], why = self._apply_policy(updater, desired.policy, trusted)
            retry += why
        # Base models before adapters: an adapter is checked against the base active when it comes.
        for ref in sorted(desired.releases, key=lambda r: r.kind == "adapter"):
            key = f"{ref.name}@{ref.version}"
            if ref.runtime == "transformers":
                artifacts[key], why = self._apply_lm(updater, ref, trusted)
                retry += why
                continue
            if ref.kind != "model":
                artifacts[key] = {
                    "kind": ref.kind,
                    "state": "refused",
                    "reason": f"{ref.kind} releases are not supported by this agent yet",
                }
                continue
            try:
                if self.active and (self.active.name, self.active.version) == (ref.name, ref.version):
                    artifacts[key] = {"kind": ref.kind, "state": "active", "reason": ""}
                    continue
                release = self._stage(updater, ref, self._accept_model, trusted)
                activated = self._activate(release)
                artifacts[key] = {"kind": ref.kind, "state": "active", "reason": ""}
            except Exception as exc:
                kind = _classify(exc)
                if kind is None:
                    raise
                if kind[0] == "retry":
                    artifacts[key] = {"kind": ref.kind, "state": "pending", "reason": f"will retry: {kind[1]}"}
                    retry.append(f"{key}: {kind[1]}")
                else:
                    log.warning("refused %s: %s", key, kind[1])
                    artifacts[key] = {"kind": ref.kind, "state": "refused", "reason": kind[1]}
                    self.record({"type": "release.refused", "release": key, "reason": kind[1]})
        lm_refs = {(r.name, r.version) for r in desired.releases if r.runtime == "transformers"}
        if lm_refs and self.lm is not None:
            self.lm.retain(lm_refs)
        for job in desired.jobs:
            artifacts[f"{job.name}@{job.id}"] = self._consider_job(updater, job, trusted)
        if self.trainer is not None:
            self.trainer.reconcile(desired.jobs)
        if retry:
            return self._retry(desired.version, "; ".join(retry), artifacts, activated)
        if not [r for r in desired.releases if r.kind == "model"]:
            log.info("desired state %d names no model; the current one keeps serving", desired.version)
            self.record(
                {
                    "type": "sync.note",
                    "desired_version": desired.version,
                    "reason": "the desired state names no model; the current one keeps serving",
                }
            )
        try:
            self._remember(desired.version, artifacts)
        except OSError as exc:
            return self._retry(desired.version, f"the site's disk: {exc.__class__.__name__}: {exc}", artifacts)
        self._last_retry_reason = ""
        return Outcome("applied", activated=activated)

    def _retry(
        self, version: int, reason: str, artifacts: dict[str, dict[str, str]], activated: ActiveRelease | None = None
    ) -> Outcome:
        """A transient failure: report it (audited when the reason changes), keep the version to retry."""
        if reason != self._last_retry_reason:
            self.record({"type": "sync.retry", "desired_version": version, "reason": reason})
            self._last_retry_reason = reason
        if artifacts:
            self.state.artifacts = artifacts
        else:
            self.state.artifacts = {
                **{k: v for k, v in self.state.artifacts.items() if k != "desired-state"},
                "desired-state": {"kind": "desired", "state": "pending", "reason": f"will retry: {reason}"},
            }
        with contextlib.suppress(OSError):  # the disk is what failed, perhaps: memory is reported all the same
            self.state.save(self.data.state_file)
        return Outcome("retry", reason, activated)

    def check_revocations(self) -> bool:
        """Refresh TUF and refuse what the site's approvers revoked among the releases it holds;
        True when that changed what serves. Called by the daemon between desired states."""
        held = [self.state.active, self.state.last_good, self.state.policy, self.state.policy_last_good]
        if not any(held):
            return False
        trusted = self._trusted()
        before = (self.state.active, self.state.policy)
        self._check_held(self._updater(), trusted)
        return (self.state.active, self.state.policy) != before

    def _updater(self) -> Any:
        updater = tufclient.updater(
            self.data.tuf_dir, self.identity.controller_url, ca_cert=self.ca_cert, fetcher=self.fetcher
        )
        updater.refresh()
        return updater

    def _check_held(self, updater: Any, trusted: dict[str, bytes]) -> None:
        """Fall back from an active release (or policy) a trusted approver revoked; forget a revoked last-known-good."""
        for slot, fallback in (("active", "last_good"), ("policy", "policy_last_good")):
            for which in (slot, fallback):
                held = getattr(self.state, which)
                if held is None:
                    continue
                found = self._revocation(updater, trusted, held["name"], held["version"], held["manifest_sha256"])
                if found is None:
                    continue
                reason = f"revoked by {found.approver} at {found.revoked_at}: {found.reason}"
                if which == fallback:
                    self._commit(**{which: None})
                elif slot == "active":
                    self._fall_back(reason, trusted)
                else:
                    self._fall_back_policy(reason, trusted)

    def _revocation(
        self, updater: Any, trusted: dict[str, bytes], name: str, version: str, manifest_sha256: str
    ) -> revocation.Revocation | None:
        """The revocation of these exact bytes by an approver this site trusts, if one is published.

        TUF signs which targets exist, so the controller cannot hide a revocation from a site
        without its online key, and a network attacker cannot at all. A document at a trusted
        approver's path that does not verify, or that revokes other bytes, is not a revocation.
        """
        for approver_name, pem in sorted(trusted.items()):
            target = revocation_target(name, version, approval.key_fingerprint(pem))
            info = updater.get_targetinfo(target)
            if info is None:
                continue
            url = tufclient.target_url(self.identity.controller_url, info)
            data = tufclient.fetch_small(self.fetcher, url, info, revocation.MAX_BYTES)
            try:
                found = revocation.verify_revocation(data, {approver_name: pem})
            except revocation.RevocationError as exc:
                self.record({"type": "revocation.invalid", "target": target, "reason": str(exc)})
                continue
            if (found.name, found.version, found.manifest_sha256) != (name, version, manifest_sha256):
                self.record(
                    {
                        "type": "revocation.invalid",
                        "target": target,
                        "reason": f"it revokes {found.name} {found.version} {found.manifest_sha256}",
                    }
                )
                continue
            key = f"{name}@{version}"
            if self.state.revoked.get(key, {}).get("manifest_sha256") != manifest_sha256:
                self._commit(revoked={**self.state.revoked, key: found.describe()})
                self.record({"type": "release.revoked", "revocation": found.describe()})
            return found
        return None

    def _fall_back(self, reason: str, trusted: dict[str, bytes]) -> None:
        """Stop serving the active release; serve the last-known-good instead, if it still verifies."""
        previous, candidate = self.state.active, self.state.last_good
        replacement = None
        if candidate is not None:
            try:
                self._refuse_known_revoked(candidate)
                replacement = load_release(self._held_directory(candidate), trusted, rehash=True)
            except (RefusedError, OSError, ValueError, KeyError) as exc:
                self.record({"type": "activation.failed", "release": candidate, "reason": str(exc)})
        self._commit(
            active={**replacement.describe(), "directory": str(replacement.directory)} if replacement else None,
            last_good=None,
        )
        self.active = replacement
        self.record(
            {
                "type": "activation" if replacement else "serving.stopped",
                "release": replacement.describe() if replacement else None,
                "previous": previous and {k: previous[k] for k in ("name", "version")},
                "reason": reason,
            }
        )

    def _fall_back_policy(self, reason: str, trusted: dict[str, bytes]) -> None:
        previous, candidate = self.state.policy, self.state.policy_last_good
        replacement = None
        if candidate is not None:
            try:
                self._refuse_known_revoked(candidate)
                replacement = load_policy(self._held_directory(candidate), trusted, rehash=True)
            except (RefusedError, OSError, ValueError, KeyError) as exc:
                self.record({"type": "activation.failed", "release": candidate, "reason": str(exc)})
        self._commit(
            policy={**replacement.describe(), "directory": str(replacement.directory)} if replacement else None,
            policy_last_good=None,
        )
        self.policy = replacement
        self.on_policy(replacement)
        self.record(
            {
                "type": "activation" if replacement else "policy.removed",
                "release": replacement.describe() if replacement else None,
                "previous": previous and {k: previous[k] for k in ("name", "version")},
                "reason": reason,
            }
        )

    def _apply_lm(self, updater: Any, ref: ReleaseRef, trusted: dict[str, bytes]) -> tuple[dict[str, str], list[str]]:
        """A base model, adapter or embedding model for the language-model runtime (agent.lm.site); the
        artifact and, for a transient failure, what to retry."""
        key = f"{ref.name}@{ref.version}"
        if self.lm is None:
            reason = "this agent has no language-model runtime (the lm extra is not installed)"
            self.record({"type": "release.refused", "release": key, "reason": reason})
            return {"kind": ref.kind, "state": "refused", "reason": reason}, []
        if self.lm.is_active(ref.name, ref.version):
            return {"kind": ref.kind, "state": "active", "reason": ""}, []
        try:
            release = self._stage(updater, ref, self._accept_lm, trusted)
            previous = self.lm.describe()
            self.lm.activate(release)
        except Exception as exc:
            kind = _classify(exc)
            if kind is None:
                raise
            if kind[0] == "retry":
                return {"kind": ref.kind, "state": "pending", "reason": f"will retry: {kind[1]}"}, [f"{key}: {kind[1]}"]
            log.warning("refused %s: %s", key, kind[1])
            self.record({"type": "release.refused", "release": key, "reason": kind[1]})
            return {"kind": ref.kind, "state": "refused", "reason": kind[1]}, []
        log.info("activated %s %s (%s) for the language-model runtime", ref.name, ref.version, ref.kind)
        self.record({"type": "activation", "release": release.describe(), "previous": previous})
        return {"kind": ref.kind, "state": "active", "reason": ""}, []

    def _accept_lm(self, staging: Path, ref: ReleaseRef, trusted: dict[str, bytes], rehash: bool) -> LMRelease:
        """Approvals, the release's files and base (agent.lm), then the accept decision, as for a model."""
        assert self.lm is not None
        release = self.lm.load(staging, lambda d: verified_manifest(d, trusted, rehash=rehash))
        self.lm.check(release)
        self._decide_accept(ref, release.manifest_sha256, release.card, list(release.approvers))
        return release

    def _apply_policy(
        self, updater: Any, ref: ReleaseRef, trusted: dict[str, bytes]
    ) -> tuple[dict[str, str], list[str]]:
        key = f"{ref.name}@{ref.version}"
        try:
            if self.policy and (self.policy.name, self.policy.version) == (ref.name, ref.version):
                return {"kind": "policy", "state": "active", "reason": ""}, []
            self._activate_policy(self._stage(updater, ref, self._accept_policy, trusted))
            return {"kind": "policy", "state": "active", "reason": ""}, []
        except Exception as exc:
            kind = _classify(exc)
            if kind is None:
                raise
            if kind[0] == "retry":
                return {"kind": "policy", "state": "pending", "reason": f"will retry: {kind[1]}"}, [f"{key}: {kind[1]}"]
            log.warning("refused policy %s: %s", key, kind[1])
            self.record({"type": "release.refused", "release": key, "reason": kind[1]})
            return {"kind": "policy", "state": "refused", "reason": kind[1]}, []

    def _accept_policy(self, staging: Path, ref: ReleaseRef, trusted: dict[str, bytes], rehash: bool) -> ActivePolicy:
        """A policy bundle is accepted when a trusted approver signed it, it compiles and its own tests pass."""
        key = f"{ref.name}@{ref.version}"
        try:
            policy = load_policy(staging, trusted, precheck=True, rehash=rehash)
        except IntegrityError:
            raise
        except RefusedError as exc:
            decision = Decision.deny(str(exc))
        else:
            approvers = ", ".join(policy.approvers)
            decision = Decision(True, (f"approved by {approvers}", "compiles", f"its {policy.tests} Rego tests pass"))
        self.record(
            {
                "type": "decision",
                "point": "accept",
                "release": key,
                "decision": decision.to_json(),
                "policy": {"central": None, "local": None, "rule": "builtin: approval, compiles, own tests pass"},
            }
        )
        if not decision.allow:
            raise RefusedError("acceptance refused: " + "; ".join(decision.reasons))
        log.info("verified policy %s: %s", key, "; ".join(decision.reasons))
        return policy

    def _activate_policy(self, policy: ActivePolicy) -> None:
        previous = self.state.policy
        changes: dict[str, Any] = {"policy": {**policy.describe(), "directory": str(policy.directory)}}
        if previous and previous.get("directory") != str(policy.directory):
            changes["policy_last_good"] = previous
        self._commit(**changes)
        self.policy = policy
        self.on_policy(policy)
        log.info("activated policy %s %s (before: %s)", policy.name, policy.version, _named(previous))
        self.record(
            {
                "type": "activation",
                "release": policy.describe(),
                "previous": previous and {k: previous[k] for k in ("name", "version")},
            }
        )

    def _consider_job(self, updater: Any, job: JobRef, trusted: dict[str, bytes]) -> dict[str, str]:
        """Have the trainer decide on a new job the desired state names (its app staged and verified here,
        through TUF, like a release) and queue the site's answer; a job decided on before keeps its state."""
        key = f"{job.name}@{job.id}"
        if key in self.state.artifacts:
            return self.state.artifacts[key]
        if job.state != "pending":
            reason = "the job started before this site answered"
            return {"kind": "job", "state": "refused", "reason": reason}
        if self.trainer is None:
            return {"kind": "job", "state": "refused", "reason": "this agent does not train"}
        stage_app = functools.partial(self._stage, updater, accept=self._accept_app, trusted=trusted)
        answer, artifact = self.trainer.consider(job, self.guard(), stage_app)
        self.answers[job.id] = answer
        return artifact

    def _accept_app(self, staging: Path, _ref: ReleaseRef, trusted: dict[str, bytes], _rehash: bool) -> ApprovedApp:
        return load_app(staging, trusted)  # the FAB is hashed again every time

    def _remember(self, version: int, artifacts: dict[str, dict[str, str]], refused_reason: str = "") -> None:
        if refused_reason:
            artifacts = {"desired-state": {"kind": "desired", "state": "refused", "reason": refused_reason}}
        self._commit(desired_version=max(self.state.desired_version, version), artifacts=artifacts)

    def _desired(self, updater: Any) -> DesiredState:
        """The site's own desired-state target (its path is the site's, whatever a pointer said)."""
        target = target_path(self.identity.site_id)
        info = updater.get_targetinfo(target)
        if info is None:
            raise RefusedError(f"{target} is not a TUF target of the controller's repository")
        url = tufclient.target_url(self.identity.controller_url, info)
        raw = tufclient.fetch_small(self.fetcher, url, info, MAX_DESIRED_BYTES)
        try:
            desired = DesiredState.model_validate_json(raw)
        except ValidationError as exc:
            raise RefusedError(f"the desired-state document is malformed: {_first_error(exc)}") from exc
        if desired.site_id != self.identity.site_id:
            raise RefusedError(f"the desired-state document is for site {desired.site_id}, not this one")
        return desired

    def _stage(
        self,
        updater: Any,
        ref: ReleaseRef,
        accept: Callable[[Path, ReleaseRef, dict[str, bytes], bool], Staged],
        trusted: dict[str, bytes],
    ) -> Staged:
        """Download a release into a private staging directory, have `accept` load and decide on it, and
        move it to `releases/<name>/<version>/`. A release staged before is checked again where it is
        (every byte): one that changed on disk is moved aside and fetched again."""
        # A revocation seen once stands, even if the controller stops publishing it.
        self._refuse_known_revoked({"name": ref.name, "version": ref.version, "manifest_sha256": ref.manifest.sha256})
        found = self._revocation(updater, trusted, ref.name, ref.version, ref.manifest.sha256)
        if found is not None:
            raise RefusedError(f"revoked by {found.approver} at {found.revoked_at}: {found.reason}")
        final = self._final_directory(ref)
        if final is not None:
            try:
                return accept(final, ref, trusted, True)
            except IntegrityError as exc:
                self._quarantine({"name": ref.name, "version": ref.version}, str(exc))
                self.reapply = False  # being fetched again right now
        staging = Path(tempfile.mkdtemp(dir=self.data.releases, prefix=f"{STAGING_PREFIX}{ref.name}-{ref.version}-"))
        try:
            self._download(updater, ref, staging, trusted)
            log.info(
                "downloaded %s %s: %d file(s), each checked against the TUF metadata",
                ref.name,
                ref.version,
                len(ref.files),
            )
            accepted = accept(staging, ref, trusted, False)
            self._move_into_place(staging, ref)
            # The files are verified and loaded already: the rename only moves them.
            return dataclasses.replace(accepted, directory=self.data.releases / ref.name / ref.version)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _final_directory(self, ref: ReleaseRef) -> Path | None:
        """`releases/<name>/<version>` if it exists as a plain directory. A link in its place (or in
        place of `releases/<name>`), which the agent never makes, is moved aside and audited."""
        name_dir = self.data.releases / ref.name
        for path, version in ((name_dir, None), (name_dir / ref.version, ref.version)):
            if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
                reason = f"{path} is a symbolic link or not a directory; the agent never makes one there"
                self._quarantine({"name": ref.name, "version": version}, reason, source=path)
                self.reapply = False  # being fetched again right now
                return None
        final = self.data.releases / ref.name / ref.version
        return final if final.is_dir() else None

    def _move_into_place(self, staging: Path, ref: ReleaseRef) -> None:
        """Rename the staging directory to `releases/<name>/<version>`, relative to directories opened
        without following links (a link swapped in meanwhile cannot redirect it)."""
        releases_fd = open_dir_inside(self.data.releases, create=False)
        try:
            name_fd = open_dir_inside(self.data.releases, ref.name)
            try:
                os.rename(staging.name, ref.version, src_dir_fd=releases_fd, dst_dir_fd=name_fd)
                os.fsync(name_fd)
            finally:
                os.close(name_fd)
        finally:
            os.close(releases_fd)
        fsync_dir(self.data.releases)

    def _accept_model(self, staging: Path, ref: ReleaseRef, trusted: dict[str, bytes], rehash: bool) -> ActiveRelease:
        """Load a model release (approvals, files, inputs and outputs checked) and ask the accept decision."""
        release = load_release(staging, trusted, rehash=rehash)
        self._decide_accept(ref, release.manifest_sha256, release.card, list(release.approvers))
        return release

    def _decide_accept(self, ref: ReleaseRef, digest: str, card: dict[str, Any], approvers: list[str]) -> None:
        """Ask the accept decision (audited); RefusedError when it denies."""
        guard = self.guard()
        decision = guard.accept(
            policy_inputs.accept_input(
                self.site,
                name=ref.name,
                version=ref.version,
                kind=ref.kind,
                runtime=ref.runtime,
                digest=digest,
                card=card,
                approvers=approvers,
            )
        )
        self.record(
            {
                "type": "decision",
                "point": "accept",
                "release": f"{ref.name}@{ref.version}",
                "decision": decision.to_json(),
                "policy": guard.policy,
            }
        )
        if not decision.allow:
            raise RefusedError("acceptance refused: " + "; ".join(decision.reasons))
        log.info(
            "verified %s %s: approved by %s; accepted by the site's policy", ref.name, ref.version, ", ".join(approvers)
        )

    def _target(self, updater: Any, ref: TargetRef) -> Any:
        """The TUF metadata of a target the desired state names, which must agree with it."""
        info = updater.get_targetinfo(ref.target)
        if info is None:
            raise RefusedError(f"{ref.target} is not a TUF target")
        if info.hashes.get("sha256") != ref.sha256 or info.length != ref.size:
            raise RefusedError(f"{ref.target}: the desired state and the TUF metadata disagree on its SHA-256 or size")
        return info

    def _fetch_small(self, updater: Any, ref: TargetRef, limit: int) -> bytes:
        info = self._target(updater, ref)
        url = tufclient.target_url(self.identity.controller_url, info)
        return tufclient.fetch_small(self.fetcher, url, info, limit)

    def _download(self, updater: Any, ref: ReleaseRef, staging: Path, trusted: dict[str, bytes]) -> None:
        """Check first, then write: the manifest and the approvals are fetched into memory and verified
        (a trusted approver signed exactly this manifest and these files) before the first byte is
        written; then each file is created inside `staging` and streamed in, hashed on the way."""
        manifest_bytes = self._fetch_small(updater, ref.manifest, MAX_MANIFEST_BYTES)
        manifest = parse_manifest(manifest_bytes)
        identity = (manifest.name, manifest.version, manifest.kind, manifest.runtime)
        if identity != (ref.name, ref.version, ref.kind, ref.runtime):
            raise RefusedError(f"the manifest describes {identity}, not {ref.name} {ref.version}")
        if {(f.path, f.sha256, f.size) for f in manifest.files} != {(f.path, f.sha256, f.size) for f in ref.files}:
            raise RefusedError("the manifest's file list differs from the desired state's")
        layout = _layout(hashlib.sha256(manifest_bytes).hexdigest(), manifest.digests())
        approvals, problems = {}, []
        for a in ref.approvals:
            bundle = self._fetch_small(updater, a, MAX_APPROVAL_BYTES)
            try:
                verified = approval.verify_approval(bundle, layout, trusted)
            except approval.ApprovalError as exc:
                problems.append(f"{a.approver}: {exc}")
                continue
            if verified.key_fingerprint != a.key_fingerprint:
                problems.append(f"{a.approver}: signed by key {verified.key_fingerprint}, not {a.key_fingerprint}")
                continue
            approvals[a.key_fingerprint] = bundle
        if not approvals:
            detail = "; ".join(problems) if problems else "the release carries no approval"
            raise RefusedError(f"no approval by an approver this site trusts ({detail})")
        with create_inside(staging, MANIFEST) as f:
            f.write(manifest_bytes)
            f.flush()
            os.fsync(f.fileno())
        for fingerprint, bundle in approvals.items():
            with create_inside(staging, f"approvals/{fingerprint}.json") as f:
                f.write(bundle)
                f.flush()
                os.fsync(f.fileno())
        for file in ref.files:
            info = self._target(updater, file)
            url = tufclient.target_url(self.identity.controller_url, info)
            with create_inside(staging, f"files/{file.path}") as f:
                tufclient.download_to(self.fetcher, url, info, f)

    def _activate(self, release: ActiveRelease) -> ActiveRelease:
        previous = self.state.active
        changes: dict[str, Any] = {"active": {**release.describe(), "directory": str(release.directory)}}
        if previous and (previous.get("name"), previous.get("version")) != (release.name, release.version):
            changes["last_good"] = previous
        self._commit(**changes)
        self.active = release
        log.info("activated %s %s (before: %s)", release.name, release.version, _named(previous))
        self.record(
            {
                "type": "activation",
                "release": release.describe(),
                "previous": previous and {k: previous[k] for k in ("name", "version")},
            }
        )
        return release


def _named(release: dict[str, Any] | None) -> str:
    return f"{release.get('name')} {release.get('version')}" if release else "nothing"
