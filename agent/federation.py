"""The site's side of federated fine-tuning: answering a job, running its Flower SuperNode, auditing rounds.

A job arrives in the desired state. The `Syncer` asks the `sitewarden/federation` decision
(audited either way); then `Trainer.answer` turns the decision into the site's answer to the
controller: decline with the policy's reasons, or join with this site's SuperNode public key and
the SHA-256 of the local data set the job names (`[datasets.<name>]` in the site configuration).
A site that cannot train (the data set is not mapped, or unreadable) declines and says why.

Once the controller has registered the joining sites' keys it marks the job `running` with its
participants; `Trainer.reconcile` then starts `flower-supernode` for it: TLS to the controller's
Fleet gateway, verified with the controller's CA; authenticated with the site's SuperNode key
(ECDSA P-384, created once under `<data dir>/supernode/` and kept); the ClientApp reads the local
data through `federation.datasource` and never sends it. When the job ends or leaves the desired
state, the SuperNode is stopped.

The ClientApp appends one JSON line per round it took part in to a spool file
(`<data dir>/federation/<job id>.jsonl`); `Trainer.drain` moves each line into the site's audit
log (`federation.round`: round, phase, examples, the clipped update's norm, bytes sent).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import SiteConfig
from agent.identity import DataDir, Identity
from federation.datasource import DataSource, DataSourceError
from federation.keys import SuperNodeKeys, generate_supernode_keys
from federation.superlink import ManagedProcess, flower_env, free_port, supernode_argv
from sitewarden.desired import JobRef
from sitewarden.wire import JobParticipation

log = logging.getLogger("sitewarden.agent.federation")

KEY_NAME = "supernode"


class Trainer:
    """Runs at most one SuperNode per running job this site takes part in."""

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
        self._processes: dict[str, ManagedProcess] = {}
        self._jobs: dict[str, JobRef] = {}
        self._spool_offsets: dict[str, int] = {}
        self._rounds: dict[str, int] = {}
        self._failures: dict[str, str] = {}
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

    # -- answering a job ----------------------------------------------------------------------

    def answer(self, job: JobRef, allowed: bool, reasons: list[str]) -> tuple[JobParticipation, dict[str, str]]:
        """The site's answer to a pending job, and the artifact state to report for it."""
        if not allowed:
            return (
                JobParticipation(join=False, reasons=reasons),
                {"kind": "job", "state": "refused", "reason": "; ".join(reasons)},
            )
        source = self.config.datasets.get(job.dataset)
        if source is None:
            reason = f"data set {job.dataset!r} is not mapped to local data in the site configuration ([datasets])"
            return JobParticipation(join=False, reasons=[reason]), {"kind": "job", "state": "failed", "reason": reason}
        try:
            digest, examples = self._digest(source)
        except (DataSourceError, OSError) as exc:
            reason = f"data set {job.dataset!r} cannot be read: {exc}"
            return JobParticipation(join=False, reasons=[reason]), {"kind": "job", "state": "failed", "reason": reason}
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
            }
        )
        return answer, {"kind": "job", "state": "pending", "reason": "joined; waiting for the job to start"}

    def _digest(self, source: DataSource) -> tuple[str, int]:
        stat = Path(source.path).stat()
        key = (source.kind, source.path, source.query, stat.st_size, stat.st_mtime_ns)
        if key not in self._digests:
            _, labels = source.load()
            self._digests[key] = (source.sha256(), len(labels))
        return self._digests[key]

    # -- running SuperNodes ---------------------------------------------------------------------

    def reconcile(self, jobs: list[JobRef]) -> None:
        """Start the SuperNode of each running job this site takes part in; stop the others."""
        wanted = {job.id: job for job in jobs if job.state == "running" and self.identity.site_id in job.participants}
        with self._lock:
            for job_id in list(self._processes):
                if job_id not in wanted:
                    self._stop(job_id, "the job ended")
            for job_id in list(self._failures):
                if job_id not in wanted:
                    del self._failures[job_id]
            for job_id, job in wanted.items():
                self._jobs[job_id] = job
                if job_id not in self._processes and job_id not in self._failures:
                    self._start(job)

    def _start(self, job: JobRef) -> None:
        source = self.config.datasets.get(job.dataset)
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
        spool = self.root / f"{job.id}.jsonl"
        node_config = {**source.to_node_config(), "report-path": str(spool)}
        argv = supernode_argv(
            Path(sys.executable).parent,
            superlink=job.fleet,
            root_certificates=self.config.controller_ca,
            private_key=self.keys().private_key,
            node_config=node_config,
            runtime_port=free_port(),
            max_retries=30,
        )
        env = flower_env(self.home, Path(sys.executable).parent, {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"})
        self.home.mkdir(parents=True, exist_ok=True)
        process = ManagedProcess.start(
            f"supernode-{job.id}", argv, env, self.root / f"{job.id}.supernode.log", self.data.root
        )
        self._processes[job.id] = process
        log.info("job %s (%s): SuperNode started, dialling %s", job.name, job.id, job.fleet)
        self.record(
            {"type": "federation.supernode.started", "job": {"id": job.id, "name": job.name}, "fleet": job.fleet}
        )

    def _stop(self, job_id: str, reason: str) -> None:
        process = self._processes.pop(job_id)
        process.stop()
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

    def check(self) -> None:
        """A SuperNode that exited while its job still runs is a failure, reported with its log's tail."""
        with self._lock:
            for job_id, process in list(self._processes.items()):
                if not process.running():
                    self._processes.pop(job_id)
                    self._fail(job_id, f"the SuperNode exited ({process.popen.returncode}): {process.log_tail(5)}")

    def stop_all(self) -> None:
        with self._lock:
            for job_id in list(self._processes):
                self._stop(job_id, "the agent is stopping")

    # -- rounds -------------------------------------------------------------------------------

    def drain(self) -> int:
        """Audit the spool lines the ClientApps wrote since the last call; how many."""
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
                job = self._jobs.get(job_id)
                fields = {k: v for k, v in report.items() if k != "job"}
                if "run_id" in fields:  # Flower's run IDs are unsigned 64-bit: text, beyond JSON's safe integers
                    fields["run_id"] = str(fields["run_id"])
                self.record(
                    {"type": "federation.round", "job": {"id": job_id, "name": job.name if job else None}, **fields}
                )
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
                if job_id in self._failures:
                    out[key] = {"kind": "job", "state": "failed", "reason": self._failures[job_id][:2000]}
                elif job_id in self._processes:
                    rounds = self._rounds.get(job_id, 0)
                    out[key] = {"kind": "job", "state": "active", "reason": f"training: {rounds} rounds taken part in"}
        return out
