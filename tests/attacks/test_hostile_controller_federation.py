"""A hostile controller against a site's federated training: it runs what it likes on its SuperLink.

Whoever holds the controller host holds its SuperLink (its Control API answers on loopback), so it
can start any run on the sites' SuperNodes: another app package (FAB) than the one the sites
approved, or the approved one with a run configuration that skips SecAgg+ or asks for more rounds
than the sites accepted. Here the attacker does exactly that, with `flwr run`'s own means
(`Federation.run`), against two sites whose side is the agent's own code: each site's `Trainer`
decides on the job under the bank policy pack (verifying the app release's approval, computing
epsilon itself), records what it accepted, and starts its real SuperNode in process isolation with
the site's runner, as `sitewarden agent run` does; refusals reach each site's real audit log
(`SiteAudit`). The SuperNodes reach the SuperLink through a recording TLS proxy, so what left the
sites is on record.

Every hostile run is refused at both sites before any update leaves: audited with its reason, the
ServerApp aggregates nothing it should not have (its progress file), the bytes of the update a site
would have sent appear in nothing the sites sent, and the unapproved FAB's code never runs. The
legitimate first round of the extra-round run does go through, so the refusals are not a site that
simply does not work. A running job that differs from what the site accepted, or that it never
accepted, starts no SuperNode (refused, audited).
"""

from __future__ import annotations

import csv
import hashlib
import json
import secrets
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import AuditSettings, SiteConfig
from agent.fab import load_app
from agent.federation import Trainer
from agent.guard import PolicyGuard
from agent.identity import DataDir, Identity
from agent.site_audit import SiteAudit
from audit import Log
from federation import APP_DIR, fab
from federation.datasource import DataSource
from federation.privacy import epsilon
from federation.superlink import Federation
from policies import Bundle, CompiledPolicy
from sitewarden import approval
from sitewarden.desired import JobRef, ReleaseRef
from sitewarden.files import write_new_file
from sitewarden.fraud_model import FEATURES, generate
from sitewarden.keys import generate_key
from tests.agent.test_fab import app_release
from tests.agent_harness import BANK_PACK, Network, wait_for
from tests.tls import TestPKI

pytestmark = pytest.mark.timeout(600)

ROWS = {"bank-a": 1_200, "bank-b": 1_800}
DP = {"enabled": True, "noise_multiplier": 1.5, "clipping_norm": 0.1, "delta": 1e-5}
ACCEPTED_ROUNDS = 1
EPOCHS, LEARNING_RATE = 5, 0.5


@dataclass
class Site:
    name: str
    data: DataDir
    identity: Identity
    audit: SiteAudit
    trainer: Trainer
    source: DataSource
    release: Path

    def entries(self) -> list[dict[str, Any]]:
        self.trainer.drain()
        with Log.open(self.data.audit_dir, readonly=True) as log:
            return [json.loads(entry) for entry in log.iter_entries()]

    def refusals(self, run_id: int) -> list[dict[str, Any]]:
        return [e for e in self.entries() if e["type"] == "federation.refused" and e.get("run_id") == str(run_id)]

    def rounds(self, run_id: int) -> list[dict[str, Any]]:
        return [e for e in self.entries() if e["type"] == "federation.round" and e.get("run_id") == str(run_id)]


@dataclass
class World:
    federation: Federation
    network: Network
    sites: dict[str, Site]
    job: JobRef
    node_ids: list[int]
    approved_fab: Path
    evil_fab: Path
    marker: Path
    root: Path
    guard: PolicyGuard
    trusted: dict[str, bytes]

    def run(self, fab_path: Path, name: str, **config: Any) -> tuple[int, dict[str, Any]]:
        """A run the attacker starts on the SuperLink; its id and the ServerApp's progress file."""
        progress = self.root / f"progress-{name}.json"
        run_config = {
            "job-id": self.job.id,
            "node-ids": ",".join(str(n) for n in self.node_ids),
            "min-nodes": 2,
            "local-epochs": EPOCHS,
            "learning-rate": LEARNING_RATE,
            "progress-path": str(progress),
            **config,
        }
        outcome = self.federation.run(fab_path, run_config, timeout=400)
        return outcome.run_id, json.loads(progress.read_text())


def _write_csv(path: Path, rows: int, seed: int) -> DataSource:
    x, y = generate(rows, seed)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*FEATURES, "label"])
        writer.writerows([*(repr(float(v)) for v in row), int(label)] for row, label in zip(x, y, strict=True))
    return DataSource("csv", str(path))


def _release_ref(directory: Path) -> ReleaseRef:
    """The app release as a desired state names it."""
    manifest = json.loads((directory / "release.json").read_bytes())
    prefix = "releases/fedapp/0.1.0"
    [bundle] = sorted((directory / "approvals").glob("*.json"))

    def target(path: Path) -> dict[str, Any]:
        data = path.read_bytes()
        return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    return ReleaseRef.model_validate(
        {
            "name": "fedapp",
            "version": "0.1.0",
            "kind": "app",
            "runtime": "flower",
            "manifest": {"target": f"{prefix}/release.json", **target(directory / "release.json")},
            "files": [
                {"target": f"{prefix}/files/{f['path']}", "path": f["path"], "sha256": f["sha256"], "size": f["size"]}
                for f in manifest["files"]
            ],
            "approvals": [
                {
                    "target": f"{prefix}/approvals/{bundle.name}",
                    **target(bundle),
                    "approver": "alice",
                    "key_fingerprint": bundle.stem,
                }
            ],
        }
    )


def _site(root: Path, name: str, pki: TestPKI, source: DataSource, *, release: Path, approver_pub: Path) -> Site:
    data = DataDir(root / name / "data")
    data.root.mkdir(parents=True, mode=0o700)
    generate_key(data.site_key_file)
    write_new_file(data.hmac_file, secrets.token_hex(32).encode())
    identity = Identity(str(uuid.uuid4()), name, "https://127.0.0.1:1", "0" * 64, "2026-01-01T00:00:00Z", "")
    config = SiteConfig(controller_ca=pki.ca_cert, approvers={"alice": approver_pub}, datasets={"transactions": source})
    audit = SiteAudit(data, identity, AuditSettings())
    staged = data.releases / "fedapp" / "0.1.0"
    shutil.copytree(release, staged)  # what the Syncer's TUF staging leaves
    return Site(name, data, identity, audit, Trainer(data, config, identity, audit.record), source, staged)


def _evil_fab(root: Path, marker: Path) -> Path:
    """The approved app with one line more: its ClientApp writes `marker` the moment it is imported."""
    directory = root / "evil-app"
    shutil.copytree(APP_DIR, directory, ignore=shutil.ignore_patterns("__pycache__"))
    client = directory / "sitewarden_fedapp" / "client_app.py"
    client.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n" + client.read_text())
    return fab.write(directory, root / "evil-fab")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[World]:
    root = tmp_path_factory.mktemp("hostile-fl")
    key = root / "alice.pem"
    approval.generate_approver_key(key, root / "alice.pub.pem")
    approved_fab = fab.write(APP_DIR, root / "app")
    release = app_release(root / "app-release", approved_fab, key)
    marker = root / "EVIL-CODE-RAN"
    evil_fab = _evil_fab(root, marker)
    federation = Federation(root / "flower", pki, extra_env={"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"})
    network = Network(pki)
    sites: dict[str, Site] = {}
    try:
        federation.start_superlink()
        network.start(f"https://{federation.address}")
        for seed, name in enumerate(ROWS, start=41):
            source = _write_csv(root / f"{name}.csv", ROWS[name], seed)
            sites[name] = _site(root, name, pki, source, release=release, approver_pub=root / "alice.pub.pem")
        guard = PolicyGuard(CompiledPolicy(Bundle.load(BANK_PACK)))
        job = JobRef(
            id=str(uuid.uuid4()),
            name="fraud-ft",
            base={"name": "fraud", "version": "1.0.0"},
            model_family="tabular-logreg",
            dataset="transactions",
            rounds=ACCEPTED_ROUNDS,
            min_sites=2,
            strategy="FedAvg",
            differential_privacy={**DP, "epsilon": epsilon(DP["noise_multiplier"], ACCEPTED_ROUNDS, DP["delta"])},
            secure_aggregation=True,
            app=_release_ref(release),
        )
        node_ids = []
        for site in sites.values():
            answer, _state = site.trainer.consider(job, guard, lambda _ref, s=site: load_app(s.release, _trusted(root)))
            if not answer.join:
                pytest.fail(f"{site.name} declined: {answer.reasons}")
            node_ids.append(federation.register_supernode(site.trainer.keys(), name=site.name))
        participants = [s.identity.site_id for s in sites.values()]
        running = job.model_copy(update={"state": "running", "participants": participants, "fleet": network.url[8:]})
        for site in sites.values():
            site.trainer.reconcile([running])
        federation.wait_until_online(node_ids, timeout=120)
        yield World(
            federation, network, sites, running, node_ids, approved_fab, evil_fab, marker, root, guard, _trusted(root)
        )
    finally:
        for site in sites.values():
            site.trainer.stop_all()
            site.audit.close()
        network.stop()
        federation.stop()


@dataclass(frozen=True)
class HostileRun:
    run_id: int
    progress: dict[str, Any]


@pytest.fixture(scope="module")
def hostile(world: World) -> dict[str, HostileRun]:
    """The attacker's three runs, started together (Flower's polling makes each mostly wait): the
    unapproved FAB, the approved FAB without SecAgg+, the approved FAB asking one round more than
    accepted (with SecAgg+ and DP as accepted)."""
    plans: dict[str, tuple[Path, dict[str, Any]]] = {
        "evil": (world.evil_fab, {"secure-aggregation": True, "num-server-rounds": 1}),
        "no-secagg": (world.approved_fab, {"secure-aggregation": False, "num-server-rounds": 1}),
        "extra-round": (
            world.approved_fab,
            {
                "secure-aggregation": True,
                "num-server-rounds": ACCEPTED_ROUNDS + 1,
                "dp-noise-multiplier": DP["noise_multiplier"],
                "dp-clipping-norm": DP["clipping_norm"],
            },
        ),
    }
    with ThreadPoolExecutor(max_workers=len(plans), thread_name_prefix="hostile-run") as pool:
        futures = {name: pool.submit(world.run, app, name, **config) for name, (app, config) in plans.items()}
        return {name: HostileRun(*future.result(timeout=500)) for name, future in futures.items()}


def _trusted(root: Path) -> dict[str, bytes]:
    return {"alice": (root / "alice.pub.pem").read_bytes()}


def _would_be_update(site: Site) -> list[bytes]:
    """The bytes a site's plain update would carry on the wire in the no-SecAgg+ run (from the zero
    model, before and after clipping to the accepted norm): weights as float64, as Flower sends them."""
    sys_path = str(APP_DIR)
    import sys  # noqa: PLC0415

    sys.path.insert(0, sys_path)
    try:
        from sitewarden_fedapp import task  # noqa: PLC0415
    finally:
        sys.path.remove(sys_path)
    x, y = site.source.load()
    coef, intercept = task.train(
        *task.initial_weights(), task.transform(x), y, epochs=EPOCHS, learning_rate=LEARNING_RATE
    )
    update = np.concatenate([coef, intercept])
    clipped = update * min(1.0, DP["clipping_norm"] / float(np.linalg.norm(update)))
    return [coef.tobytes(), clipped[:8].tobytes()]


def _aggregated(progress: dict[str, Any]) -> dict[int, list[int]]:
    return {entry["round"]: entry["nodes"] for entry in progress["rounds"] if entry["nodes"]}


def test_the_sites_joined_on_their_own_reckoning_of_the_job(world: World) -> None:
    """The decision saw the epsilon each site computed and the app it verified; what each accepted is
    recorded for its SuperNode's terms. A job whose declared epsilon understates what its parameters
    spend is declined (the bank pack compares the controller's figure with the site's)."""
    for site in world.sites.values():
        [decision] = [e for e in site.entries() if e.get("point") == "federation"]
        assert decision["decision"]["allow"] is True
        assert decision["epsilon"] == pytest.approx(epsilon(DP["noise_multiplier"], ACCEPTED_ROUNDS, DP["delta"]))
        assert decision["app"]["fab_sha256"] == hashlib.sha256(world.approved_fab.read_bytes()).hexdigest()
        accepted = site.trainer.accepted(world.job.id)
        assert accepted is not None
        assert (accepted.terms.rounds, accepted.terms.secure_aggregation) == (ACCEPTED_ROUNDS, True)
        assert accepted.terms.clipping_norm == DP["clipping_norm"]
    site = world.sites["bank-a"]
    understated = world.job.model_copy(
        update={"id": str(uuid.uuid4()), "state": "pending", "differential_privacy": {**DP, "epsilon": 0.5}}
    )
    answer, state = site.trainer.consider(understated, world.guard, lambda _ref: load_app(site.release, world.trusted))
    assert not answer.join and state["state"] == "refused"
    assert "declares epsilon 0.5 but its parameters spend" in answer.reasons[0]
    assert site.trainer.accepted(understated.id) is None


def test_an_unapproved_fab_is_refused_before_any_of_its_code_runs(world: World, hostile: dict[str, HostileRun]) -> None:
    evil_sha = hashlib.sha256(world.evil_fab.read_bytes()).hexdigest()
    run = hostile["evil"]
    assert not world.marker.exists(), "the unapproved FAB's ClientApp code ran at a site"
    assert _aggregated(run.progress) == {}
    for site in world.sites.values():
        refusals = wait_for(lambda s=site: s.refusals(run.run_id), 30, f"{site.name} to audit the refusal")
        assert "train" in {e["message_type"] for e in refusals}
        for entry in refusals:
            assert entry["fab_sha256"] == evil_sha and "not the approved app release's" in entry["reason"]
        assert site.rounds(run.run_id) == []
        installed = site.data.root / "federation" / f"{world.job.id}.apps"
        assert not (installed / evil_sha).exists()  # not even unpacked
        state = site.trainer.artifacts()[f"{world.job.name}@{world.job.id}"]
        assert state["state"] == "refused"


def test_a_serverapp_that_skips_secagg_gets_no_update(world: World, hostile: dict[str, HostileRun]) -> None:
    run = hostile["no-secagg"]
    assert _aggregated(run.progress) == {}
    sent = world.network.sent  # everything the sites sent, for all three runs
    assert sum(len(body) for body in sent) > 10_000
    for site in world.sites.values():
        refusals = wait_for(lambda s=site: s.refusals(run.run_id), 30, f"{site.name} to audit the refusal")
        train = [e for e in refusals if e["message_type"] == "train"]
        assert train and "was accepted with SecAgg+" in train[0]["reason"]
        assert [e for e in site.rounds(run.run_id) if e["phase"] == "train"] == []
        # The update this site would have sent in the clear, before or after clipping, is in nothing it sent
        # (the SecAgg+ run trained the same first round from the same zero model: masked, it is absent too).
        for pattern in _would_be_update(site):
            assert not any(pattern in body for body in sent), f"{site.name}'s update left the site"


def test_a_round_beyond_the_accepted_count_is_refused(world: World, hostile: dict[str, HostileRun]) -> None:
    """The approved app, SecAgg+ and DP as accepted, but two rounds: the first goes through, the second
    is refused by both sites, so the ServerApp aggregates round 1 only."""
    run = hostile["extra-round"]
    assert _aggregated(run.progress) == {1: sorted(world.node_ids)}
    for site in world.sites.values():
        wait_for(lambda s=site: s.refusals(run.run_id), 30, f"{site.name} to audit the refusal")
        trained = [e for e in site.rounds(run.run_id) if e["phase"] == "train"]
        assert [e["round"] for e in trained] == [1]
        assert trained[0]["update_norm"] <= DP["clipping_norm"] + 1e-9
        beyond = [e for e in site.refusals(run.run_id) if e["message_type"] == "train"]
        assert beyond and beyond[0]["reason"] == f"a training round beyond the 1 accepted for job {world.job.id}"
        # Across every run, the site sent one update: what it accepted.
        updates = [e for e in site.entries() if e["type"] == "federation.round" and e["phase"] == "train"]
        assert len(updates) == ACCEPTED_ROUNDS


def test_a_running_job_that_differs_from_what_was_accepted_starts_no_supernode(world: World) -> None:
    site = world.sites["bank-a"]
    more = world.job.model_copy(update={"rounds": 50})
    never = world.job.model_copy(update={"id": str(uuid.uuid4()), "name": "never-asked"})
    site.trainer.reconcile([world.job, more.model_copy(update={"id": str(uuid.uuid4())}), never])
    refused = [e for e in site.entries() if e["type"] == "federation.refused" and "run_id" not in e]
    reasons = {e["job"]["name"]: e["reason"] for e in refused}
    assert reasons["never-asked"] == "this site never accepted this job: it runs no SuperNode for it"
    changed = [r for name, r in reasons.items() if name == world.job.name]
    assert changed == ["this site never accepted this job: it runs no SuperNode for it"]  # a new id is a new job
    # The accepted job itself, described with more rounds than accepted, is refused too.
    second = world.sites["bank-b"]
    second.trainer.reconcile([])  # the job left the desired state: its SuperNode stops
    second.trainer.reconcile([more])
    [entry] = [e for e in second.entries() if e["type"] == "federation.refused" and "changed after" in e["reason"]]
    assert "rounds 1 -> 50" in entry["reason"]
    assert f"{world.job.name}@{world.job.id}" in second.trainer.artifacts()
