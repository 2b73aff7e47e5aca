"""Sync: bring the site to its desired state, verified at every step, never breaking what serves.

The workflow, for each new desired-state version the controller announces:

1. Refresh TUF metadata with python-tuf's `ngclient.Updater` (rollback, freeze,
   mix-and-match and endless-data attacks are refused there) and download the site's
   desired-state document, a TUF target.
2. For each release it names, download manifest, files and approval bundles as TUF
   targets into a private staging directory.
3. Verify the approvals: an OpenSSF model-signing signature over the manifest and the
   files by an approver key this site trusts (its own configuration, never the controller).
4. Ask the acceptance decision of the active policy bundle (`sitewarden/accept`). A policy
   bundle named by the desired state is handled first: accepted when a trusted approver
   signed it, it compiles and its own Rego tests pass (checked in a child process), then
   swapped in, so that the releases of the same desired state are accepted under it.
5. Load the model and check its inputs and outputs against the manifest.
6. Move the staging directory to `releases/<name>/<version>/` (a rename), then switch
   `state.json` atomically; the previous release stays as last-known-good.

Any failure is refused with its reason, audited and reported, and what serves keeps
serving. `state.json` is the only commit point, so a `kill -9` at any moment leaves either
the old or the new release active; staging directories left behind are removed at start.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from tuf.api import exceptions as tuf_errors

from agent import policy_inputs
from agent.errors import RefusedError
from agent.federation import Trainer
from agent.guard import Decision, Guard
from agent.identity import DataDir, Identity
from agent.lm.site import LanguageModels, LMRelease
from agent.onnx_model import ModelLoadError, OnnxModel
from policies import Bundle, BundleError, CompiledPolicy
from policies.check import check as check_bundle
from sitewarden import approval, tufclient
from sitewarden.desired import DesiredState, JobRef, ReleaseRef
from sitewarden.files import fsync_dir, write_atomically
from sitewarden.wire import JobParticipation

STAGING_PREFIX = ".staging-"
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
Staged = TypeVar("Staged", "ActiveRelease", "ActivePolicy", "LMRelease")


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
    """What `state.json` records: the last desired version handled, what is active, what was before."""

    desired_version: int = 0
    active: dict[str, Any] | None = None
    last_good: dict[str, Any] | None = None
    artifacts: dict[str, dict[str, str]] = field(default_factory=dict)
    policy: dict[str, Any] | None = None
    policy_last_good: dict[str, Any] | None = None

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
        )

    def save(self, path: Path) -> None:
        data = {
            "desired_version": self.desired_version,
            "active": self.active,
            "last_good": self.last_good,
            "artifacts": self.artifacts,
            "policy": self.policy,
            "policy_last_good": self.policy_last_good,
        }
        write_atomically(path, json.dumps(data, indent=2).encode())


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


def verified_manifest(directory: Path, trusted_approvers: dict[str, bytes]) -> tuple[str, dict[str, Any], list[str]]:
    """A staged release's manifest digest, manifest and the trusted approvers whose signatures cover it."""
    manifest_bytes = (directory / "release.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    files = {f["path"]: f["sha256"] for f in manifest["files"]}
    approvers = _verified_approvers(directory, manifest_bytes, files, trusted_approvers)
    return hashlib.sha256(manifest_bytes).hexdigest(), manifest, approvers


def load_release(directory: Path, trusted_approvers: dict[str, bytes]) -> ActiveRelease:
    """Load a staged release from disk, checking its files, approvals and model again."""
    manifest_bytes = (directory / "release.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    files = {f["path"]: f["sha256"] for f in manifest["files"]}
    approvers = _verified_approvers(directory, manifest_bytes, files, trusted_approvers)
    card = manifest.get("metadata", {})
    path = directory / "files" / model_file(card, list(files))
    try:
        model = OnnxModel(path)
        model.check_declared(card.get("inputs", []), card.get("outputs", []))
    except ModelLoadError as exc:
        raise RefusedError(f"the model does not load as declared: {exc}") from exc
    return ActiveRelease(
        name=manifest["name"],
        version=manifest["version"],
        kind=manifest["kind"],
        runtime=manifest["runtime"],
        directory=directory,
        manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
        card=card,
        approvers=tuple(approvers),
        model=model,
    )


def load_policy(directory: Path, trusted_approvers: dict[str, bytes], *, precheck: bool = False) -> ActivePolicy:
    """Load a staged policy release: approvals checked again, its bundle read and compiled.

    With `precheck`, the bundle is first compiled and its tests run in a child process
    (`policies.check`): a bundle that crashes the Rego engine or fails its tests is refused
    before the agent's own process compiles it.
    """
    manifest_bytes = (directory / "release.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    files = {f["path"]: f["sha256"] for f in manifest["files"]}
    approvers = _verified_approvers(directory, manifest_bytes, files, trusted_approvers)
    bundles = [p for p in files if p.endswith((".tar.gz", ".tgz"))]
    if len(bundles) != 1:
        raise RefusedError(f"a policy release holds one bundle (.tar.gz); this one has {len(bundles)}")
    path = directory / "files" / bundles[0]
    label = f"policy {manifest['name']} {manifest['version']}"
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
        name=manifest["name"],
        version=manifest["version"],
        directory=directory,
        manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
        approvers=tuple(approvers),
        compiled=compiled,
        tests=len(checked.tests) if precheck else None,
    )


def _verified_approvers(
    directory: Path, manifest_bytes: bytes, files: dict[str, str], trusted: dict[str, bytes]
) -> list[str]:
    """Names of the trusted approvers whose signature covers exactly this manifest and these files."""
    layout = {"release.json": hashlib.sha256(manifest_bytes).hexdigest()}
    layout.update({f"files/{p}": sha for p, sha in files.items()})
    verified, problems = [], []
    for bundle in sorted((directory / "approvals").glob("*.json")) if (directory / "approvals").is_dir() else []:
        try:
            result = approval.verify_approval(bundle.read_bytes(), layout, trusted)
        except approval.ApprovalError as exc:
            problems.append(f"{bundle.name}: {exc}")
            continue
        verified.append(result.approver)
    if not verified:
        detail = "; ".join(problems) if problems else "the release carries no approval"
        raise RefusedError(f"no approval by an approver this site trusts ({detail})")
    return sorted(set(verified))


class Syncer:
    """Applies desired-state versions; called from a worker thread, one version at a time."""

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
        self.fetcher = tufclient.HttpxFetcher(ca_cert)

    # -- start ---------------------------------------------------------------------------

    def start(self) -> ActiveRelease | None:
        """Clean up after a crash and load what `state.json` says is active (or the last-known-good)."""
        self.data.releases.mkdir(parents=True, exist_ok=True)
        for leftover in self.data.releases.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        self._start_policy()
        if self.lm is not None:
            self.lm.start(lambda directory: verified_manifest(directory, self.trusted_approvers()))
        for candidate in (self.state.active, self.state.last_good):
            if candidate is None:
                continue
            try:
                self.active = load_release(Path(candidate["directory"]), self.trusted_approvers())
            except (RefusedError, OSError, ValueError, KeyError) as exc:
                self.record({"type": "activation.failed", "release": candidate, "reason": str(exc)})
                continue
            if candidate is not self.state.active:
                self.state.active, self.state.last_good = candidate, None
                self.state.save(self.data.state_file)
            self.record({"type": "activation", "release": self.active.describe(), "reason": "restart"})
            return self.active
        return None

    def _start_policy(self) -> None:
        for candidate in (self.state.policy, self.state.policy_last_good):
            if candidate is None:
                continue
            try:
                policy = load_policy(Path(candidate["directory"]), self.trusted_approvers())
            except (RefusedError, OSError, ValueError, KeyError) as exc:
                self.record({"type": "activation.failed", "release": candidate, "reason": str(exc)})
                continue
            if candidate is not self.state.policy:
                self.state.policy, self.state.policy_last_good = candidate, None
                self.state.save(self.data.state_file)
            self.policy = policy
            self.on_policy(policy)
            self.record({"type": "activation", "release": policy.describe(), "reason": "restart"})
            return

    # -- applying a desired state ----------------------------------------------------------

    def apply(self, version: int, target: str) -> ActiveRelease | None:
        """Handle one announced desired-state version; returns the newly active release, if any."""
        try:
            updater = tufclient.updater(
                self.data.tuf_dir, self.identity.controller_url, ca_cert=self.ca_cert, fetcher=self.fetcher
            )
            updater.refresh()
            desired = self._desired(updater, target)
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError, RefusedError) as exc:
            reason = f"desired state {version} refused: {exc.__class__.__name__}: {exc}"
            self.record({"type": "sync.refused", "desired_version": version, "reason": reason})
            self._remember(version, {}, refused_reason=reason)
            return None
        if desired.version < self.state.desired_version:
            self.record(
                {
                    "type": "sync.refused",
                    "desired_version": desired.version,
                    "reason": f"older than the version already handled ({self.state.desired_version})",
                }
            )
            return None
        models = [r for r in desired.releases if r.kind == "model"]
        artifacts: dict[str, dict[str, str]] = {}
        activated = None
        if desired.policy is not None:  # first, so that the releases below are accepted under it
            artifacts[f"{desired.policy.name}@{desired.policy.version}"] = self._apply_policy(updater, desired.policy)
        # Base models before adapters: an adapter is checked against the base active when it comes.
        for ref in sorted(desired.releases, key=lambda r: r.kind == "adapter"):
            key = f"{ref.name}@{ref.version}"
            if ref.runtime == "transformers":
                artifacts[key] = self._apply_lm(updater, ref)
                continue
            if ref.kind != "model":
                artifacts[key] = {
                    "kind": ref.kind,
                    "state": "refused",
                    "reason": f"{ref.kind} releases are not supported by this agent yet",
                }
                continue
            if self.active and (self.active.name, self.active.version) == (ref.name, ref.version):
                artifacts[key] = {"kind": ref.kind, "state": "active", "reason": ""}
                continue
            try:
                release = self._stage(updater, ref, self._accept_model)
                activated = self._activate(release)
                artifacts[key] = {"kind": ref.kind, "state": "active", "reason": ""}
            except RefusedError as exc:
                artifacts[key] = {"kind": ref.kind, "state": "refused", "reason": str(exc)}
                self.record({"type": "release.refused", "release": key, "reason": str(exc)})
            except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as exc:
                reason = f"TUF refused a target: {exc.__class__.__name__}: {exc}"
                artifacts[key] = {"kind": ref.kind, "state": "refused", "reason": reason}
                self.record({"type": "release.refused", "release": key, "reason": reason})
            except OSError as exc:
                artifacts[key] = {"kind": ref.kind, "state": "failed", "reason": f"{exc.__class__.__name__}: {exc}"}
                self.record({"type": "release.failed", "release": key, "reason": str(exc)})
        lm_refs = {(r.name, r.version) for r in desired.releases if r.runtime == "transformers"}
        if lm_refs and self.lm is not None:
            self.lm.retain(lm_refs)
        for job in desired.jobs:
            artifacts[f"{job.name}@{job.id}"] = self._consider_job(job)
        if self.trainer is not None:
            self.trainer.reconcile(desired.jobs)
        if not models:
            self.record(
                {
                    "type": "sync.note",
                    "desired_version": desired.version,
                    "reason": "the desired state names no model; the current one keeps serving",
                }
            )
        self._remember(desired.version, artifacts)
        return activated

    def _apply_lm(self, updater: Any, ref: ReleaseRef) -> dict[str, str]:
        """A base model, adapter or embedding model for the language-model runtime (agent.lm.site)."""
        key = f"{ref.name}@{ref.version}"
        if self.lm is None:
            reason = "this agent has no language-model runtime (the lm extra is not installed)"
            self.record({"type": "release.refused", "release": key, "reason": reason})
            return {"kind": ref.kind, "state": "refused", "reason": reason}
        if self.lm.is_active(ref.name, ref.version):
            return {"kind": ref.kind, "state": "active", "reason": ""}
        try:
            release = self._stage(updater, ref, self._accept_lm)
            previous = self.lm.describe()
            self.lm.activate(release)
        except RefusedError as exc:
            self.record({"type": "release.refused", "release": key, "reason": str(exc)})
            return {"kind": ref.kind, "state": "refused", "reason": str(exc)}
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as exc:
            reason = f"TUF refused a target: {exc.__class__.__name__}: {exc}"
            self.record({"type": "release.refused", "release": key, "reason": reason})
            return {"kind": ref.kind, "state": "refused", "reason": reason}
        except OSError as exc:
            self.record({"type": "release.failed", "release": key, "reason": str(exc)})
            return {"kind": ref.kind, "state": "failed", "reason": f"{exc.__class__.__name__}: {exc}"}
        self.record({"type": "activation", "release": release.describe(), "previous": previous})
        return {"kind": ref.kind, "state": "active", "reason": ""}

    def _accept_lm(self, staging: Path, ref: ReleaseRef) -> LMRelease:
        """Approvals, the release's files and base (agent.lm), then the accept decision, as for a model."""
        assert self.lm is not None
        release = self.lm.load(staging, lambda d: verified_manifest(d, self.trusted_approvers()))
        self.lm.check(release)
        self._decide_accept(ref, release.manifest_sha256, release.card, list(release.approvers))
        return release

    def _apply_policy(self, updater: Any, ref: ReleaseRef) -> dict[str, str]:
        key = f"{ref.name}@{ref.version}"
        if self.policy and (self.policy.name, self.policy.version) == (ref.name, ref.version):
            return {"kind": "policy", "state": "active", "reason": ""}
        try:
            self._activate_policy(self._stage(updater, ref, self._accept_policy))
            return {"kind": "policy", "state": "active", "reason": ""}
        except RefusedError as exc:
            self.record({"type": "release.refused", "release": key, "reason": str(exc)})
            return {"kind": "policy", "state": "refused", "reason": str(exc)}
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as exc:
            reason = f"TUF refused a target: {exc.__class__.__name__}: {exc}"
            self.record({"type": "release.refused", "release": key, "reason": reason})
            return {"kind": "policy", "state": "refused", "reason": reason}
        except OSError as exc:
            self.record({"type": "release.failed", "release": key, "reason": str(exc)})
            return {"kind": "policy", "state": "failed", "reason": f"{exc.__class__.__name__}: {exc}"}

    def _accept_policy(self, staging: Path, ref: ReleaseRef) -> ActivePolicy:
        """A policy bundle is accepted when a trusted approver signed it, it compiles and its own tests pass."""
        key = f"{ref.name}@{ref.version}"
        try:
            policy = load_policy(staging, self.trusted_approvers(), precheck=True)
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
        return policy

    def _activate_policy(self, policy: ActivePolicy) -> None:
        previous = self.state.policy
        self.state.policy = {**policy.describe(), "directory": str(policy.directory)}
        if previous and previous.get("directory") != str(policy.directory):
            self.state.policy_last_good = previous
        self.state.save(self.data.state_file)
        self.policy = policy
        self.on_policy(policy)
        self.record(
            {
                "type": "activation",
                "release": policy.describe(),
                "previous": previous and {k: previous[k] for k in ("name", "version")},
            }
        )

    def _consider_job(self, job: JobRef) -> dict[str, str]:
        """Ask the federation decision about a new job the desired state names (audited either way) and
        queue the site's answer; a job decided on before keeps its state."""
        key = f"{job.name}@{job.id}"
        if key in self.state.artifacts:
            return self.state.artifacts[key]
        if job.state != "pending":
            reason = "the job started before this site answered"
            return {"kind": "job", "state": "refused", "reason": reason}
        guard = self.guard()
        value = policy_inputs.federation_input(self.site, job.model_dump(include=set(_JOB_POLICY_FIELDS)))
        decision = guard.federation(value)
        self.record(
            {
                "type": "decision",
                "point": "federation",
                "job": {"id": job.id, "name": job.name},
                "decision": decision.to_json(),
                "policy": guard.policy,
            }
        )
        if self.trainer is None:
            reason = "this agent does not train" if decision.allow else "; ".join(decision.reasons)
            return {"kind": "job", "state": "refused", "reason": reason}
        answer, artifact = self.trainer.answer(job, decision.allow, list(decision.reasons))
        self.answers[job.id] = answer
        return artifact

    def _remember(self, version: int, artifacts: dict[str, dict[str, str]], refused_reason: str = "") -> None:
        self.state.desired_version = max(self.state.desired_version, version)
        if refused_reason:
            artifacts = {"desired-state": {"kind": "desired", "state": "refused", "reason": refused_reason}}
        self.state.artifacts = artifacts
        self.state.save(self.data.state_file)

    def _desired(self, updater: Any, target: str) -> DesiredState:
        info = updater.get_targetinfo(target)
        if info is None:
            raise RefusedError(f"{target} is not a TUF target of the controller's repository")
        with tempfile.TemporaryDirectory(dir=self.data.root) as tmp:
            path = updater.download_target(info, str(Path(tmp) / "desired.json"))
            raw = Path(path).read_bytes()
        try:
            desired = DesiredState.model_validate_json(raw)
        except ValidationError as exc:
            raise RefusedError(f"the desired-state document is malformed: {exc.errors()[0]['msg']}") from exc
        if desired.site_id != self.identity.site_id:
            raise RefusedError(f"the desired-state document is for site {desired.site_id}, not this one")
        return desired

    def _stage(self, updater: Any, ref: ReleaseRef, accept: Callable[[Path, ReleaseRef], Staged]) -> Staged:
        """Download a release into a private staging directory, have `accept` load and decide on it, and
        move it to `releases/<name>/<version>/`. A release staged before is decided on again where it is."""
        final = self.data.releases / ref.name / ref.version
        if final.is_dir():
            return accept(final, ref)
        staging = Path(tempfile.mkdtemp(dir=self.data.releases, prefix=f"{STAGING_PREFIX}{ref.name}-{ref.version}-"))
        try:
            self._download(updater, ref, staging)
            accepted = accept(staging, ref)
            final.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(final)
            fsync_dir(final.parent)
            # The files are verified and loaded already: the rename only moves them.
            return dataclasses.replace(accepted, directory=final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _accept_model(self, staging: Path, ref: ReleaseRef) -> ActiveRelease:
        """Load a model release (approvals, files, inputs and outputs checked) and ask the accept decision."""
        release = load_release(staging, self.trusted_approvers())
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

    def _download(self, updater: Any, ref: ReleaseRef, staging: Path) -> None:
        wanted = [(ref.manifest.target, staging / "release.json", ref.manifest.sha256)]
        wanted += [(f.target, staging / "files" / f.path, f.sha256) for f in ref.files]
        wanted += [(a.target, staging / "approvals" / f"{a.key_fingerprint}.json", a.sha256) for a in ref.approvals]
        for target, dest, sha256 in wanted:
            info = updater.get_targetinfo(target)
            if info is None:
                raise RefusedError(f"{target} is not a TUF target")
            if info.hashes.get("sha256") != sha256:
                raise RefusedError(f"{target}: the desired state and the TUF metadata disagree on its SHA-256")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tufclient.download_verified(
                self.fetcher, tufclient.target_url(self.identity.controller_url, info), info, dest
            )
        manifest = json.loads((staging / "release.json").read_bytes())
        identity = (manifest.get("name"), manifest.get("version"), manifest.get("kind"), manifest.get("runtime"))
        if identity != (ref.name, ref.version, ref.kind, ref.runtime):
            raise RefusedError(f"the manifest describes {identity}, not {ref.name} {ref.version}")
        listed = {(f["path"], f["sha256"]) for f in manifest.get("files", [])}
        if listed != {(f.path, f.sha256) for f in ref.files}:
            raise RefusedError("the manifest's file list differs from the desired state's")

    def _activate(self, release: ActiveRelease) -> ActiveRelease:
        previous = self.state.active
        self.state.active = {**release.describe(), "directory": str(release.directory)}
        if previous and previous.get("directory") != str(release.directory):
            self.state.last_good = previous
        self.state.save(self.data.state_file)
        self.active = release
        self.record(
            {
                "type": "activation",
                "release": release.describe(),
                "previous": previous and {k: previous[k] for k in ("name", "version")},
            }
        )
        return release
