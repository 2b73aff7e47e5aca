"""The site's side of federated fine-tuning: deciding on a job, running its SuperNode, auditing rounds.

A job arrives in the desired state; the controller, and so everything it says about the job, is
not trusted. For a new pending job, `Trainer.consider`:

1. checks that the job names its Flower App release, has the `Syncer` stage it through TUF, and
   verifies it (`agent.fab`: kind `app`, the FAB's bytes, an approval by an approver this site
   trusts); a job whose app fails is declined with the reason, audited;
2. computes the job's privacy budget itself (`federation.privacy`, the same accountant as the
   controller's) from the job's DP parameters, and asks the `sitewarden/federation` decision with
   that epsilon (the controller's own figure goes along as `epsilon_declared`), the verified app
   and the rest of the job (audited either way);
3. answers: decline with the policy's reasons, or join with this site's SuperNode public key and
   the SHA-256 of the local data set the job names (`[datasets.<name>]`). A site that cannot train
   (the data set is not mapped, or unreadable) declines and says why. Joining first records what
   the site accepted (`<data dir>/federation/<job id>.accepted.json`: the terms, the app's FAB
   SHA-256, the data set): from then on that record, not the desired state, says what the site
   trains and under which terms.

Once the controller has registered the joining sites' keys it marks the job `running`;
`Trainer.reconcile` then starts, for a job this site accepted and whose desired state still
matches what it accepted (else it refuses, audited), `federation.site.start_site_node`: the
SuperNode in process isolation (TLS to the controller's Fleet gateway, verified with the
controller's CA; the site's SuperNode key, ECDSA P-384, created once under `<data dir>/supernode/`)
and the site's runner, which runs only the approved FAB, with the accepted terms in its node
config. The ClientApp reads the local data through `federation.datasource` and never sends it.
When the job ends or leaves the desired state, both are stopped.

The ClientApp appends one JSON line per round it took part in to a spool file
(`<data dir>/federation/<job id>.jsonl`), and one per message it or the runner refused;
`Trainer.drain` moves each line into the site's audit log (`federation.round`: round, phase,
examples, the clipped update's norm, bytes sent; `federation.refused`: what was refused, why).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.config import SiteConfig
from agent.fab import ApprovedApp
from agent.guard import Guard
from agent.identity import DataDir, Identity
from agent.policy_inputs import federation_input
from federation.datasource import DataSource, DataSourceError
from federation.keys import SuperNodeKeys, generate_supernode_keys
from federation.privacy import epsilon
from federation.site import SiteNode, start_site_node
from federation.superlink import flower_env
from federation.terms import Terms, TermsError
from sitewarden import names
from sitewarden.desired import JobRef, ReleaseRef
from sitewarden.files import write_atomically
from sitewarden.wire import JobParticipation

log = logging.getLogger("sitewarden.agent.federation")

KEY_NAME = "supernode"
ACCEPTED = ".accepted.json"
# The job's fields the federation decision sees as they are (policies/schemas/federation.input.schema.json);
# differential_privacy and app are given as the site computed and verified them.
_JOB_POLICY_FIELDS = ("id", "name", "base", "model_family", "dataset", "rounds", "min_sites", "strategy")


@dataclass(frozen=True)
class AcceptedJob:
    """What this site accepted for a job, recorded before it answered: the only source of the terms."""

    job_id: str
    name: str
    dataset: str
    terms: Terms
    app: dict[str, Any]
    differential_privacy: dict[str, Any]
    accepted_at: str

    @property
    def fab_sha256(self) -> str:
        return str(self.app["fab_sha256"])

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "name": self.name,
            "dataset": self.dataset,
            "terms": {
                "rounds": self.terms.rounds,
                "min_sites": self.terms.min_sites,
                "secure_aggregation": self.terms.secure_aggregation,
                "clipping_norm": self.terms.clipping_norm,
            },
            "app": self.app,
            "differential_privacy": self.differential_privacy,
            "accepted_at": self.accepted_at,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> AcceptedJob:
        terms = raw["terms"]
        return cls(
            job_id=raw["job_id"],
            name=raw["name"],
            dataset=raw["dataset"],
            terms=Terms(
                raw["job_id"], terms["rounds"], terms["min_sites"], terms["secure_aggregation"], terms["clipping_norm"]
            ),
            app=raw["app"],
            differential_privacy=raw["differential_privacy"],
            accepted_at=raw["accepted_at"],
        )

    def differences(self, job: JobRef) -> list[str]:
        """How the job as the desired state now describes it differs from what was accepted."""
        now = _terms_of(job)
        out = [
            f"{what} {before!r} -> {after!r}"
            for what, before, after in (
                ("rounds", self.terms.rounds, now.rounds),
                ("min_sites", self.terms.min_sites, now.min_sites),
                ("secure_aggregation", self.terms.secure_aggregation, now.secure_aggregation),
                ("clipping_norm", self.terms.clipping_norm, now.clipping_norm),
                ("dataset", self.dataset, job.dataset),
                ("differential_privacy", _dp_terms(self.differential_privacy), _dp_terms(job.differential_privacy)),
                ("app FAB", self.fab_sha256, _fab_sha256(job.app)),
            )
            if before != after
        ]
        return out


def _dp_terms(dp: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(dp.get(k) for k in ("enabled", "noise_multiplier", "clipping_norm", "delta"))


def _fab_sha256(ref: ReleaseRef | None) -> str | None:
    return ref.files[0].sha256 if ref is not None and len(ref.files) == 1 else None


def _terms_of(job: JobRef) -> Terms:
    """The terms a job's description asks the site to accept (TermsError if they make no sense)."""
    dp = job.differential_privacy
    norm = dp.get("clipping_norm") if dp.get("enabled") is True else None
    if norm is not None and (isinstance(norm, bool) or not isinstance(norm, int | float)):
        raise TermsError(f"the job's clipping norm {norm!r} is not a number")
    return Terms(job.id, job.rounds, job.min_sites, bool(job.secure_aggregation), float(norm) if norm else None)


def site_epsilon(job: JobRef) -> float | None:
    """Epsilon after all the job's rounds, computed here from its DP parameters; None without DP or
    when the parameters give no finite budget."""
    dp = job.differential_privacy
    if dp.get("enabled") is not True:
        return None
    try:
        spent = epsilon(float(dp.get("noise_multiplier", 0.0)), job.rounds, float(dp.get("delta", 0.0)))
    except (TypeError, ValueError):
        return None
    return spent if math.isfinite(spent) else None


def decision_input(site: dict[str, str], job: JobRef, app: ApprovedApp) -> dict[str, Any]:
    """The federation decision's input: the job with the epsilon this site computed and the app it verified."""
    dp = {k: v for k, v in job.differential_privacy.items() if k != "epsilon"}
    declared = job.differential_privacy.get("epsilon")
    computed = site_epsilon(job)
    if computed is not None:
        dp["epsilon"] = computed
    if isinstance(declared, int | float) and not isinstance(declared, bool):
        dp["epsilon_declared"] = declared
    described = job.model_dump(include=set(_JOB_POLICY_FIELDS))
    return federation_input(
        site,
        {
            **described,
            "differential_privacy": dp,
            "secure_aggregation": job.secure_aggregation,
            "app": {k: v for k, v in app.describe().items() if k != "manifest_sha256"},
        },
    )


class Trainer:
    """Decides on jobs and runs at most one SuperNode per running job this site accepted."""

    def __init__(
        self, data: DataDir, config: SiteConfig, identity: Identity, record: Callable[[dict[str, Any]], Any]
    ) -> None:
        self.data = data
        self.config = config
        self.identity = identity
        self.record = record
        self.root = data.root / "federation"
        self.home = data.root / "flower"
        self._lock = threading.Lock()
        self._nodes: dict[str, SiteNode] = {}
        self._jobs: dict[str, JobRef] = {}
        self._spool_offsets: dict[str, int] = {}
        self._rounds: dict[str, int] = {}
        self._failures: dict[str, str] = {}
        self._refusals: dict[str, str] = {}
        self._digests: dict[tuple[str, str, str, int, int], tuple[str, int]] = {}

    # -- the key ------------------------------------------------------------------------------

    def keys(self) -> SuperNodeKeys:
        """The site's SuperNode key pair, created on first use and kept (the controller registers its public half)."""
        directory = self.data.root / "supernode"
        keys = SuperNodeKeys(directory / KEY_NAME, directory / f"{KEY_NAME}.pub")
        if not (keys.private_key.is_file() and keys.public_key.is_file()):
            keys = generate_supernode_keys(directory, KEY_NAME)
            directory.chmod(0o700)
        return keys

    # -- deciding on a job ----------------------------------------------------------------------

    def consider(
        self, job: JobRef, guard: Guard, stage_app: Callable[[ReleaseRef], ApprovedApp]
    ) -> tuple[JobParticipation, dict[str, str]]:
        """Decide on a new pending job (see the module docstring): the answer to send, and the state to report.

        `stage_app` downloads and verifies the job's app release (the `Syncer`'s TUF staging with
        `agent.fab.load_app`); it raises RefusedError, or TUF's and the OS's errors, when it cannot."""
        try:
            names.check_id(job.id, "job id")  # it names files under the data dir
        except names.InvalidName as exc:
            label = {"id": job.id[:100], "name": job.name}
            self.record({"type": "federation.refused", "job": label, "reason": str(exc)})
            return self._decline(job, f"the job cannot be taken part in: {exc}")
        label = {"id": job.id, "name": job.name}
        if job.app is None:
            reason = "the job names no Flower App release: a site runs only an app it approved"
            self.record({"type": "federation.app.refused", "job": label, "app": None, "reason": reason})
            return self._decline(job, reason)
        try:
            app = stage_app(job.app)
        except Exception as exc:  # RefusedError, TUF's errors, OSError: the job is declined with the reason
            reason = f"the job's Flower App {job.app.name} {job.app.version} is refused: {exc}"
            self.record({"type": "federation.app.refused", "job": label, "app": _ref(job.app), "reason": reason})
            return self._decline(job, reason)
        value = decision_input({"id": self.identity.site_id, "name": self.identity.site_name}, job, app)
        decision = guard.federation(value)
        verdict = "allows" if decision.allow else "declines"
        log.info("job %s (%s): the federation policy %s it: %s", job.name, job.id, verdict, "; ".join(decision.reasons))
        self.record(
            {
                "type": "decision",
                "point": "federation",
                "job": label,
                "app": app.describe(),
                "epsilon": value["job"]["differential_privacy"].get("epsilon"),
                "epsilon_declared": value["job"]["differential_privacy"].get("epsilon_declared"),
                "decision": decision.to_json(),
                "policy": guard.policy,
            }
        )
        if not decision.allow:
            return JobParticipation(join=False, reasons=list(decision.reasons)), _state("refused", decision.reasons)
        return self.answer(job, app, list(decision.reasons))

    def _decline(self, job: JobRef, reason: str) -> tuple[JobParticipation, dict[str, str]]:
        return JobParticipation(join=False, reasons=[reason]), _state("refused", [reason])

    def answer(self, job: JobRef, app: ApprovedApp, reasons: list[str]) -> tuple[JobParticipation, dict[str, str]]:
        """Join a job the policy allowed, if this site can train on it: the answer and the state to report."""
        source = self.config.datasets.get(job.dataset)
        if source is None:
            reason = f"data set {job.dataset!r} is not mapped to local data in the site configuration ([datasets])"
            return JobParticipation(join=False, reasons=[reason]), _state("failed", [reason])
        try:
            terms = _terms_of(job)
            digest, examples = self._digest(source)
        except TermsError as exc:
            reason = f"the job's terms cannot be enforced: {exc}"
            return JobParticipation(join=False, reasons=[reason]), _state("refused", [reason])
        except (DataSourceError, OSError) as exc:
            reason = f"data set {job.dataset!r} cannot be read: {exc}"
            return JobParticipation(join=False, reasons=[reason]), _state("failed", [reason])
        accepted = AcceptedJob(
            job_id=job.id,
            name=job.name,
            dataset=job.dataset,
            terms=terms,
            app={**app.describe(), "fab_path": str(app.directory / "files" / app.fab_path)},
            differential_privacy={**job.differential_privacy, "epsilon": site_epsilon(job)},
            accepted_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomically(self._accepted_path(job.id), json.dumps(accepted.to_json(), indent=2).encode(), 0o600)
        public_key = self.keys().public_key.read_text().strip()
        answer = JobParticipation(
            join=True, reasons=reasons, supernode_public_key=public_key, dataset_sha256=digest, examples=examples
        )
        log.info("job %s (%s): joining with data set %s (%d examples)", job.name, job.id, job.dataset, examples)
        self.record(
            {
                "type": "federation.join",
                "job": {"id": job.id, "name": job.name},
                "dataset": {"name": job.dataset, "kind": source.kind, "sha256": digest, "examples": examples},
                "supernode_key_sha256": self.keys().fingerprint(),
                "app": app.describe(),
                "terms": accepted.to_json()["terms"],
            }
        )
        log.info("job %s (%s): SuperNode started, dialling %s", job.name, job.id, job.fleet)
        return answer, {"kind": "job", "state": "pending", "reason": "joined; waiting for the job to start"}

    def _digest(self, source: DataSource) -> tuple[str, int]:
        stat = Path(source.path).stat()
        key = (source.kind, source.path, source.query, stat.st_size, stat.st_mtime_ns)
        if key not in self._digests:
            _, labels = source.load()
            self._digests[key] = (source.sha256(), len(labels))
        return self._digests[key]

    def _accepted_path(self, job_id: str) -> Path:
        return self.root / f"{names.check_id(job_id, 'job id')}{ACCEPTED}"

    def accepted(self, job_id: str) -> AcceptedJob | None:
        """What this site accepted for the job, or None if it never joined it."""
        try:
            return AcceptedJob.from_json(json.loads(self._accepted_path(job_id).read_text()))
        except FileNotFoundError:
            return None

    # -- running SuperNodes ---------------------------------------------------------------------

    def reconcile(self, jobs: list[JobRef]) -> None:
        """Start the SuperNode of each running job this site takes part in; stop the others."""
        wanted = {job.id: job for job in jobs if job.state == "running" and self.identity.site_id in job.participants}
        with self._lock:
            for job_id in list(self._nodes):
                if job_id not in wanted:
                    self._stop(job_id, "the job ended")
            for job_id in list(self._failures):
                if job_id not in wanted:
                    del self._failures[job_id]
            for job_id, job in wanted.items():
                self._jobs[job_id] = job
                if job_id not in self._nodes and job_id not in self._failures:
                    self._start(job)

    def _start(self, job: JobRef) -> None:
        try:
            accepted = self.accepted(job.id)
        except (OSError, ValueError, KeyError, TypeError, names.InvalidName) as exc:
            self._refuse(job.id, f"the site's record of what it accepted for this job is unreadable: {exc}")
            return
        if accepted is None:
            self._refuse(job.id, "this site never accepted this job: it runs no SuperNode for it")
            return
        try:
            changed = accepted.differences(job)
        except TermsError as exc:
            changed = [str(exc)]
        if changed:
            self._refuse(job.id, f"the job changed after this site accepted it ({'; '.join(changed)})")
            return
        source = self.config.datasets.get(accepted.dataset)
        if source is None or job.fleet is None or self.config.controller_ca is None:
            missing = (
                "the data set mapping"
                if source is None
                else "the Fleet address"
                if job.fleet is None
                else "controller.ca_cert (it verifies the Fleet API's certificate)"
            )
            self._fail(job.id, f"cannot start the SuperNode: {missing} is missing")
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        env = flower_env(self.home, Path(sys.executable).parent, {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"})
        self._nodes[job.id] = start_site_node(
            job.id,
            superlink=job.fleet,
            root_certificates=self.config.controller_ca,
            private_key=self.keys().private_key,
            data_config=source.to_node_config(),
            terms=accepted.terms,
            approved_fab_sha256=accepted.fab_sha256,
            report=self.root / f"{job.id}.jsonl",
            apps=self.root / f"{job.id}.apps",
            logs=self.root,
            env=env,
            cwd=self.data.root,
        )
        self.record(
            {
                "type": "federation.supernode.started",
                "job": {"id": job.id, "name": job.name},
                "fleet": job.fleet,
                "fab_sha256": accepted.fab_sha256,
                "terms": accepted.to_json()["terms"],
            }
        )

    def _stop(self, job_id: str, reason: str) -> None:
        node = self._nodes.pop(job_id)
        node.stop()
        self.drain()
        job = self._jobs.get(job_id)
        log.info("job %s: SuperNode stopped (%s) after %d round(s)", job_id, reason, self._rounds.get(job_id, 0))
        self.record(
            {
                "type": "federation.supernode.stopped",
                "job": {"id": job_id, "name": job.name if job else None},
                "rounds": self._rounds.get(job_id, 0),
                "reason": reason,
            }
        )

    def _fail(self, job_id: str, reason: str) -> None:
        self._failures[job_id] = reason
        job = self._jobs.get(job_id)
        name = job.name if job else None
        log.error("job %s (%s): %s", name, job_id, reason)
        self.record({"type": "federation.failed", "job": {"id": job_id, "name": name}, "reason": reason})

    def _refuse(self, job_id: str, reason: str) -> None:
        """A security refusal: audited as such, reported, and the job is not run here."""
        self._failures[job_id] = reason
        self._refusals[job_id] = reason
        job = self._jobs.get(job_id)
        name = job.name if job else None
        log.warning("job %s (%s) refused: %s", name, job_id, reason)
        self.record({"type": "federation.refused", "job": {"id": job_id, "name": name}, "reason": reason})

    def check(self) -> None:
        """A SuperNode (or its runner) that exited while its job still runs is a failure, reported with its log."""
        with self._lock:
            for job_id, node in list(self._nodes.items()):
                if not node.running():
                    reason = node.exit_reason()
                    self._nodes.pop(job_id).stop()
                    self._fail(job_id, f"the SuperNode stopped: {reason}")

    def stop_all(self) -> None:
        with self._lock:
            for job_id in list(self._nodes):
                self._stop(job_id, "the agent is stopping")

    # -- rounds -------------------------------------------------------------------------------

    def drain(self) -> int:
        """Audit the spool lines the ClientApps and the runner wrote since the last call; how many."""
        count = 0
        if not self.root.is_dir():
            return 0
        for spool in sorted(self.root.glob("*.jsonl")):
            job_id = spool.stem
            offset = self._spool_offsets.get(job_id, 0)
            with spool.open("rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written is taken next time
            for line in complete.splitlines():
                try:
                    report = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(report, dict):
                    continue
                job = self._jobs.get(job_id)
                label = {"id": job_id, "name": job.name if job else None}
                fields = {k: v for k, v in report.items() if k not in ("job", "event")}
                if "run_id" in fields:  # Flower's run IDs are unsigned 64-bit: text, beyond JSON's safe integers
                    fields["run_id"] = str(fields["run_id"])
                if report.get("event") == "refused":
                    self._refusals[job_id] = str(report.get("reason", "refused"))
                    log.warning("job %s: refused by the site's ClientApp: %s", job_id, self._refusals[job_id])
                    self.record({"type": "federation.refused", "job": label, **fields})
                else:
                    self.record({"type": "federation.round", "job": label, **fields})
                    if report.get("phase") == "train":
                        self._rounds[job_id] = self._rounds.get(job_id, 0) + 1
                        log.info("job %s: round %d trained here", job_id, self._rounds[job_id])
                count += 1
            self._spool_offsets[job_id] = offset + len(complete)
        return count

    def artifacts(self) -> dict[str, dict[str, str]]:
        """The state of each job this site runs, to report (keys `<job name>@<job id>`)."""
        out = {}
        with self._lock:
            for job_id, job in self._jobs.items():
                key = f"{job.name}@{job_id}"
                rounds = self._rounds.get(job_id, 0)
                if job_id in self._refusals:
                    reason = f"refused: {self._refusals[job_id]} ({rounds} rounds taken part in)"
                    out[key] = {"kind": "job", "state": "refused", "reason": reason[:2000]}
                elif job_id in self._failures:
                    out[key] = {"kind": "job", "state": "failed", "reason": self._failures[job_id][:2000]}
                elif job_id in self._nodes:
                    out[key] = {"kind": "job", "state": "active", "reason": f"training: {rounds} rounds taken part in"}
        return out


def _state(state: str, reasons: Any) -> dict[str, str]:
    return {"kind": "job", "state": state, "reason": "; ".join(reasons)}


def _ref(ref: ReleaseRef) -> dict[str, str]:
    return {"name": ref.name, "version": ref.version}
