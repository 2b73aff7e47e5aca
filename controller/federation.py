"""The controller's side of federated fine-tuning: a supervised Flower SuperLink and the jobs run on it.

- **SuperLink.** Started when the first job is ready to run (not before: a controller without jobs
  runs no Flower process) under `<data dir>/federation/`: TLS with a certificate the controller
  issues for 127.0.0.1 from its own small CA (`federation/pki/`), `--enable-supernode-auth`, its
  state in `federation/flower/superlink.db` (registrations and runs survive a restart), telemetry
  and update checks off, no runtime dependency installation. It listens on 127.0.0.1 only.
- **Fleet gateway** (`federation.gateway`): the sites reach the SuperLink's Fleet API through it,
  on `--fleet-port` with the controller's own TLS certificate; every other Flower API (Control,
  ServerAppIo) answers 404 there, so only the controller itself can start runs or register nodes.
- **Jobs.** A job is created `pending` and published in its sites' desired state. Each site's
  agent asks its `sitewarden/federation` policy and answers (`participation`): join, with its
  SuperNode public key and its dataset's SHA-256, or decline, with the policy's reasons. Once
  every site has answered, or the consent window has passed, the job starts if at least
  `min_sites` joined (otherwise it fails, naming who declined and why): the controller registers
  the joining sites' SuperNode keys, marks the job `running` with its participants (the agents
  start their SuperNodes on that news), waits until every participant is online and runs the
  job's Flower App: exactly the FAB of its approved app release, byte for byte
  (`federation.run_fab`), the only FAB the sites' runners accept. Rounds are read from the
  ServerApp's progress file as they end and audited one by one. At the end the tuned ONNX model
  becomes a candidate release with its lineage (it needs approval like any other), and the job is
  `finished` (or `failed`, with the reason). Jobs run one at a time. A site's SuperNode key stays
  registered after its first job (Flower never frees a registered key); runs sample only their
  own participants' nodes.
- A controller restart during a run fails that job (`interrupted`); pending jobs carry on.

Every step is written to the controller's audit log: each state change of a job (running,
finished, failed) and each round's aggregate as change records in the transaction that makes them
(`controller.changes`), the SuperLink's starts and stops, node registrations and the candidate
release as entries of their own. Creation, cancellation and each site's answer are recorded by the
requests that make them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller import audit_trail, registry
from controller.changes import JobAnswered, JobRound, JobStateChanged, key_sha256
from controller.db import Job, Release, Site, utcnow
from controller.errors import Conflict, Unprocessable
from federation.gateway import FleetGateway, Traffic
from federation.keys import SuperNodeKeys
from federation.privacy import epsilon
from federation.superlink import Federation, FederationError, free_port
from sitewarden.devpki import make_pki
from sitewarden.files import write_atomically

if TYPE_CHECKING:
    from controller.runtime import Runtime

log = logging.getLogger("sitewarden.controller.federation")

STEP_S = 0.5
NODES_FILE = "nodes.json"
ONLINE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class FederationSettings:
    """Where the Fleet gateway listens and what the agents dial; the controller's TLS certificate serves it."""

    listen_host: str
    fleet_port: int
    public_address: str
    tls_cert: Path
    tls_key: Path
    consent_timeout_s: float = 120.0
    run_timeout_s: float = 3600.0
    # Fine-tuning from approved weights: a few small steps per round (the base is already close).
    local_epochs: int = 5
    learning_rate: float = 0.05


def supernode_public_key_problem(text: str) -> str | None:
    """Why `text` is not an OpenSSH ECDSA public key on a NIST curve (what Flower registers), or None."""
    try:
        key = serialization.load_ssh_public_key(text.encode())
    except (ValueError, TypeError) as exc:
        return f"supernode_public_key is not an OpenSSH public key: {exc}"
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return "supernode_public_key must be an ECDSA key (Flower's SuperNode authentication needs one)"
    return None


class FederationService:
    """Supervises the SuperLink and the Fleet gateway, and moves jobs from pending to finished."""

    def __init__(self, runtime: Runtime, settings: FederationSettings) -> None:
        self.runtime = runtime
        self.settings = settings
        self.root = runtime.config.data_dir / "federation"
        self.lock = threading.Lock()  # every change to a job's progress happens under it
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._flower: Federation | None = None
        self._gateway: FleetGateway | None = None
        self._superlink_port = free_port()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        pki = make_pki(self.root / "pki")  # the SuperLink's certificate, issued afresh at every start
        self._flower = Federation(
            self.root / "flower",
            pki,
            extra_env={"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"},
        )
        self._gateway = FleetGateway(
            f"https://{self._flower.address}",
            str(pki.ca_cert),
            host=self.settings.listen_host,
            port=self.settings.fleet_port,
            certfile=str(self.settings.tls_cert),
            keyfile=str(self.settings.tls_key),
        )
        self._gateway.start()
        self._interrupt_running_jobs()
        self._thread = threading.Thread(target=self._loop, name="federation-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._flower is not None:
            running = self._flower.superlink is not None and self._flower.superlink.running()
            self._flower.stop()
            if running:
                self._record({"type": "federation.superlink_stopped", "address": self._flower.address})
        if self._gateway is not None:
            self._gateway.stop()

    def wake(self) -> None:
        self._wake.set()

    @property
    def traffic(self) -> Traffic:
        return self._gateway.traffic if self._gateway else Traffic(0, 0, 0)

    def _ensure_superlink(self) -> Federation:
        assert self._flower is not None
        if self._flower.superlink is None or not self._flower.superlink.running():
            started = self._flower.start_superlink()
            self._record({"type": "federation.superlink_started", "address": self._flower.address, "pid": started.pid})
        return self._flower

    # -- answers from the sites ------------------------------------------------------------------

    def participation(self, session: Session, job: Job, site_id: str, answer: dict[str, Any]) -> Job:
        """Record a site's answer to a pending job (join with key and dataset digest, or decline)."""
        if site_id not in job.sites:
            raise Conflict(f"this site was not selected for job {job.name}")
        if answer["join"]:
            missing = [k for k in ("supernode_public_key", "dataset_sha256") if not answer.get(k)]
            if missing:
                raise Unprocessable(f"joining needs {' and '.join(missing)}")
            problem = supernode_public_key_problem(answer["supernode_public_key"])
            if problem:
                raise Unprocessable(problem)
        with self.lock:
            session.refresh(job)
            if job.state != "pending":
                raise Conflict(f"job {job.name} is {job.state}; answers are taken while it is pending")
            answers = dict(job.progress.get("answers", {}))
            answers[site_id] = {**answer, "at": utcnow().isoformat()}
            change = JobAnswered(
                job.id,
                job.name,
                site_id,
                bool(answer["join"]),
                list(answer.get("reasons") or []),
                answer.get("dataset_sha256"),
                key_sha256(answer.get("supernode_public_key")),
            )
            audit_trail.record(session, change)
            job.progress = {**job.progress, "answers": answers}
            job.updated_at = utcnow()
            session.commit()
        self.wake()
        return job

    # -- the job loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(STEP_S)
            self._wake.clear()
            try:
                with audit_trail.acting("federation.jobs"):
                    self.step()
            except Exception:  # the loop must survive anything one job does; the job says what happened
                log.exception("federation step failed")

    def step(self) -> None:
        """Start the oldest pending job that is ready; one job runs at a time."""
        with self.runtime.session() as session:
            if session.scalar(select(Job.id).where(Job.state == "running")):
                return
            for job in session.scalars(select(Job).where(Job.state == "pending").order_by(Job.created_at)):
                if self._consent_settled(job):
                    self._start(session, job)
                    return

    def _consent_settled(self, job: Job) -> bool:
        answers = job.progress.get("answers", {})
        if all(site in answers for site in job.sites):
            return True
        created = job.created_at if job.created_at.tzinfo else job.created_at.replace(tzinfo=datetime.UTC)
        return (utcnow() - created).total_seconds() >= self.settings.consent_timeout_s

    def _start(self, session: Session, job: Job) -> None:
        answers = job.progress.get("answers", {})
        joined = [s for s in job.sites if answers.get(s, {}).get("join")]
        names = dict(session.execute(select(Site.id, Site.name).where(Site.id.in_(job.sites))).all())
        if len(joined) < job.spec["min_sites"]:
            declined = [
                f"{names.get(s, s)} declined: {'; '.join(answers[s].get('reasons') or ['no reason'])}"
                for s in job.sites
                if s in answers and not answers[s].get("join")
            ]
            silent = [names.get(s, s) for s in job.sites if s not in answers]
            detail = declined + ([f"no answer from {', '.join(silent)}"] if silent else [])
            self._finish(
                session,
                job,
                "failed",
                f"{len(joined)} of the {len(job.sites)} selected sites joined; the job needs at least "
                f"{job.spec['min_sites']}" + (f" ({'; '.join(detail)})" if detail else ""),
            )
            return
        try:
            flower = self._ensure_superlink()
            nodes = self._register(flower, job, {s: answers[s]["supernode_public_key"] for s in joined})
        except (FederationError, OSError) as exc:
            self._finish(session, job, "failed", f"the SuperLink could not take the job: {exc}")
            return
        with self.lock:
            session.refresh(job)
            if job.state != "pending":  # cancelled meanwhile
                return
            reason = f"{len(joined)} of {len(job.sites)} sites joined"
            audit_trail.record(session, JobStateChanged(job.id, job.name, job.state, "running", reason))
            job.state = "running"
            job.progress = {
                **job.progress,
                "participants": joined,
                "nodes": nodes,
                "fleet": self.settings.public_address,
                "started_at": utcnow().isoformat(),
            }
            job.updated_at = utcnow()
            session.commit()
        try:
            self._audit(
                "job.started",
                job,
                participants=[{"site": s, "site_name": names.get(s), "node_id": nodes[s]} for s in joined],
                declined={s: answers[s].get("reasons", []) for s in job.sites if s in answers and s not in joined},
            )
            self.runtime.republish(session, list(job.sites))  # participants start their SuperNodes now
            threading.Thread(target=self._run, args=(job.id,), name=f"job-{job.name}", daemon=True).start()
        except Exception as exc:
            log.exception("job %s could not start", job.name)
            session.rollback()
            self._finish(session, job, "failed", f"the job could not start: {exc.__class__.__name__}: {exc}")

    def _register(self, flower: Federation, job: Job, keys: dict[str, str]) -> dict[str, str]:
        """Each joining site's SuperNode node ID: registered the first time a key is seen, kept after.

        Flower never frees a registered public key (unregistered nodes keep it), so a site's key is
        registered once and its node ID remembered in `nodes.json`; a site that presents a new key
        has its old node unregistered first. Runs sample only their participants' nodes
        (`node-ids` in the run config), so a registration gives a site nothing outside its jobs.
        """
        directory = self._job_dir(job) / "keys"
        directory.mkdir(parents=True, exist_ok=True)
        known = self._known_nodes()
        nodes: dict[str, str] = {}
        for site_id, public_key in keys.items():
            path = directory / f"{site_id}.pub"
            path.write_text(public_key.strip() + "\n")
            fingerprint = SuperNodeKeys(path, path).fingerprint()
            held = known.get(site_id)
            if held and held["key_sha256"] == fingerprint:
                nodes[site_id] = held["node_id"]
                continue
            if held:  # the site has a new key: its old node must not be let in any more
                self._unregister({site_id: held["node_id"]})
            node_id = str(flower.register_supernode(SuperNodeKeys(path, path), name=f"site-{site_id[:8]}"))
            known[site_id] = {"node_id": node_id, "key_sha256": fingerprint}
            write_atomically(self.root / NODES_FILE, json.dumps(known, indent=2).encode(), 0o600)
            nodes[site_id] = node_id
            self._audit("federation.node_registered", job, site=site_id, node_id=node_id, key_sha256=fingerprint)
        return nodes

    def _known_nodes(self) -> dict[str, dict[str, str]]:
        try:
            return dict(json.loads((self.root / NODES_FILE).read_text()))
        except FileNotFoundError:
            return {}

    def _unregister(self, nodes: dict[str, str]) -> None:
        if self._flower is None:
            return
        for node_id in nodes.values():
            try:
                self._flower.unregister_supernode(int(node_id))
            except FederationError as exc:
                log.warning("could not unregister node %s: %s", node_id, exc)

    # -- a running job ---------------------------------------------------------------------------

    def _run(self, job_id: str) -> None:
        with audit_trail.acting("federation.run"), self.runtime.session() as session:
            job = session.get(Job, job_id)
            assert job is not None
            try:
                self._run_job(session, job)
            except Exception as exc:  # whatever happened, the job ends with a reason and its nodes go
                log.exception("job %s failed", job.name)
                session.rollback()
                self._finish(session, job, "failed", f"{exc.__class__.__name__}: {exc}")
            finally:
                self.wake()

    def _run_job(self, session: Session, job: Job) -> None:
        assert self._flower is not None
        directory = self._job_dir(job)
        progress_path, result_path = directory / "progress.json", directory / "result.onnx"
        nodes: dict[str, str] = job.progress["nodes"]
        self._flower.wait_until_online([int(n) for n in nodes.values()], timeout=ONLINE_TIMEOUT_S)
        before = self.traffic
        fab = self.runtime.blobs.path(_app_fab(job)["sha256"])
        handle = self._flower.start_run(fab, self._run_config(session, job, progress_path, result_path))
        run_id = handle.wait_for_id(60)
        self._update(session, job, run_id=str(run_id) if run_id is not None else None)
        deadline = time.monotonic() + self.settings.run_timeout_s
        seen = 0
        while not handle.done():
            seen = self._rounds(session, job, progress_path, seen, before)
            session.refresh(job)
            if job.state == "cancelled":
                if run_id is not None:
                    self._flower.stop_run(run_id)
                handle.kill()
                self._audit("job.cancelled", job, rounds=seen)
                return
            if time.monotonic() > deadline:
                handle.kill()
                raise FederationError(f"the run did not end within {self.settings.run_timeout_s:.0f} s")
            time.sleep(0.25)
        code = handle.wait()
        seen = self._rounds(session, job, progress_path, seen, before)
        details = self._flower.run_details(run_id) if run_id is not None else {}
        status = str(details.get("status", ""))
        if code != 0 or not status.startswith("finished:completed") or not result_path.is_file():
            tail = "\n".join(handle.lines[-8:])
            raise FederationError(f"the Flower run ended {status or f'with exit code {code}'}: {tail}")
        release = self._register_result(session, job, result_path)
        result = {"name": release.name, "version": release.version}
        self._audit("release.registered", job, release=result, lineage=release.metadata_["lineage"])
        self._finish(session, job, "finished", "", result=result)

    def _run_config(self, session: Session, job: Job, progress: Path, result: Path) -> dict[str, Any]:
        spec = job.spec
        base = registry.get_release(session, spec["base"]["name"], spec["base"]["version"])
        dp = spec["differential_privacy"]
        config: dict[str, Any] = {
            "num-server-rounds": spec["rounds"],
            "job-id": job.id,
            "min-nodes": len(job.progress["participants"]),
            "node-ids": ",".join(job.progress["nodes"].values()),
            "strategy": spec["strategy"],
            "secure-aggregation": bool(spec["secure_aggregation"]),
            "local-epochs": self.settings.local_epochs,
            "learning-rate": self.settings.learning_rate,
            "base-path": str(self.runtime.blobs.path(_model_file(base).sha256)),
            "result-path": str(result),
            "progress-path": str(progress),
        }
        if spec.get("proximal_mu") is not None:
            config["proximal-mu"] = float(spec["proximal_mu"])
        if dp.get("enabled"):
            config.update(
                {
                    "dp-noise-multiplier": float(dp["noise_multiplier"]),
                    "dp-clipping-norm": float(dp["clipping_norm"]),
                    "dp-delta": float(dp["delta"]),
                }
            )
        return config

    def _rounds(self, session: Session, job: Job, progress_path: Path, seen: int, before: Traffic) -> int:
        """Take the rounds the ServerApp finished since `seen` into the job, auditing each; how many now."""
        try:
            progress = json.loads(progress_path.read_text())
        except (OSError, ValueError):
            return seen
        nodes = {int(node): site for site, node in job.progress["nodes"].items()}
        dp = job.spec["differential_privacy"]
        rounds = []
        for entry in progress.get("rounds", []):
            if not entry.get("evaluate") and not progress.get("finished"):
                continue  # a round is done once its evaluation is aggregated
            number = int(entry["round"])
            rounds.append(
                {
                    "round": number,
                    "sites": sorted(nodes.get(int(n), f"node {n}") for n in entry.get("nodes", [])),
                    "train": entry.get("train", {}),
                    "evaluate": entry.get("evaluate", {}),
                    "epsilon": epsilon(dp["noise_multiplier"], number, dp["delta"]) if dp.get("enabled") else None,
                }
            )
        if len(rounds) <= seen:
            return seen
        traffic = self.traffic - before
        changes = [
            JobRound(job.id, job.name, e["round"], e["sites"], e["train"], e["evaluate"], e["epsilon"])
            for e in rounds[seen:]
        ]
        self._update(
            session,
            job,
            changes,
            rounds=rounds,
            epsilon_spent=rounds[-1]["epsilon"],
            bytes={"from_sites": traffic.from_sites, "to_sites": traffic.to_sites, "requests": traffic.requests},
        )
        return len(rounds)

    def _register_result(self, session: Session, job: Job, result_path: Path) -> Release:
        """The tuned model as a candidate release of the base's name, with its lineage in the model card."""
        spec = job.spec
        base = registry.get_release(session, spec["base"]["name"], spec["base"]["version"])
        data = result_path.read_bytes()
        digest = self.runtime.blobs.put_bytes(data)
        registry.record_blob(session, digest, len(data))
        answers = job.progress.get("answers", {})
        names = dict(session.execute(select(Site.id, Site.name).where(Site.id.in_(job.sites))).all())
        lineage_sites = set(job.progress["participants"])
        lineage = {
            "job": {"id": job.id, "name": job.name, "created_by": job.created_by},
            "base": spec["base"],
            "app": {
                "name": spec["app"]["name"],
                "version": spec["app"]["version"],
                "fab_sha256": _app_fab(job)["sha256"],
            },
            "model_family": spec["model_family"],
            "dataset": spec["dataset"],
            "strategy": spec["strategy"],
            "secure_aggregation": spec["secure_aggregation"],
            "rounds": job.progress.get("rounds", []),
            "differential_privacy": {
                **spec["differential_privacy"],
                "epsilon_spent": job.progress.get("epsilon_spent"),
            },
            "sites": [
                {
                    "id": site,
                    "name": names.get(site),
                    "dataset_sha256": answers[site]["dataset_sha256"],
                    "examples": answers[site].get("examples"),
                }
                for site in job.progress["participants"]
            ],
            "bytes": job.progress.get("bytes"),
            "result_sha256": hashlib.sha256(data).hexdigest(),
        }
        output = spec.get("output") or {}
        card = {k: v for k, v in base.metadata_.items() if k != "lineage"}
        card["description"] = f"{spec['base']['name']} {spec['base']['version']} fine-tuned by federated job {job.name}"
        card["lineage"] = lineage
        # The base's evaluation does not describe the tuned model: the last round's federated evaluation
        # (each site scores it on its own data; example-weighted) does.
        final = (job.progress.get("rounds") or [{}])[-1].get("evaluate", {})
        card["evaluation"] = {
            metric: round(float(final[key]), 4)
            for metric, key in (("auc", "eval-auc"), ("accuracy", "eval-accuracy"), ("log_loss", "eval-loss"))
            if key in final
        }
        card["evaluation_source"] = "federated evaluation after the last round on the participating sites' data"
        card["training"] = {
            "algorithm": f"federated fine-tuning ({spec['strategy']}) of {base.name} {base.version}",
            "job": job.name,
            "n_samples": sum(int(a.get("examples") or 0) for s, a in answers.items() if s in lineage_sites),
            "rounds": spec["rounds"],
        }
        model_path = _model_file(base).path
        return registry.create_release(
            session,
            self.runtime.blobs,
            self.runtime.tuf,
            name=output.get("name") or base.name,
            version=output.get("version") or _tuned_version(base.version, job),
            kind="model",
            runtime="onnx",
            files=[registry.FileSpec(model_path, digest, len(data))],
            metadata=card,
            uploaded_by=f"federation:{job.name}",
        )

    # -- bookkeeping -----------------------------------------------------------------------------

    def _update(self, session: Session, job: Job, records: list[JobRound] | None = None, **changes: Any) -> None:
        with self.lock:
            session.refresh(job)
            job.progress = {**job.progress, **changes}
            job.updated_at = utcnow()
            for record in records or []:
                audit_trail.record(session, record)
            session.commit()

    def _finish(self, session: Session, job: Job, state: str, reason: str, **changes: Any) -> None:
        with self.lock:
            session.refresh(job)
            if job.state in ("finished", "failed", "cancelled"):
                return
            audit_trail.record(session, JobStateChanged(job.id, job.name, job.state, state, reason[:2000]))
            job.state, job.reason = state, reason[:2000]
            job.progress = {**job.progress, **changes, "ended_at": utcnow().isoformat()}
            job.updated_at = utcnow()
            session.commit()
        self.runtime.republish(session, list(job.sites))  # the job leaves the sites' desired state

    def _interrupt_running_jobs(self) -> None:
        with self.runtime.session() as session:
            for job in session.scalars(select(Job).where(Job.state == "running")):
                self._finish(session, job, "failed", "interrupted: the controller restarted during the run")

    def _audit(self, event_type: str, job: Job, **fields: Any) -> None:
        self._record({"type": event_type, "job": {"id": job.id, "name": job.name}, **fields})

    def _record(self, event: dict[str, Any]) -> None:
        """An entry of its own for what is not a database change (the SuperLink, Flower's registrations)."""
        trail = self.runtime.audit
        if trail is not None:
            trail.record({**audit_trail.current().fields(), **event})

    def _job_dir(self, job: Job) -> Path:
        path = self.root / "jobs" / job.id
        path.mkdir(parents=True, exist_ok=True)
        return path


def _app_fab(job: Job) -> dict[str, Any]:
    """The FAB file of the job's app release, as its spec names it (path, sha256, size)."""
    files = job.spec["app"]["files"]
    if len(files) != 1:
        raise Unprocessable(f"job {job.name}: its app release must hold exactly one FAB")
    return dict(files[0])


def _model_file(release: Release) -> Any:
    name = release.metadata_.get("model_file")
    graphs = [f for f in release.files if (f.path == name if name else f.path.endswith(".onnx"))]
    if len(graphs) != 1:
        raise Unprocessable(f"base {release.name} {release.version} has no single ONNX file to start from")
    return graphs[0]


def _tuned_version(base_version: str, job: Job) -> str:
    """`1.2.0` fine-tuned by job `fraud-q4` becomes `1.2.0-ft.fraud-q4` (a pre-release of the base's version)."""
    core, _, build = base_version.partition("+")
    label = "".join(c if c.isalnum() or c == "-" else "-" for c in job.name)
    return f"{core}{'.' if '-' in core else '-'}ft.{label}" + (f"+{build}" if build else "")
