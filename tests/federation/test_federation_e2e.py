"""Federated fine-tuning end to end, with every part real: a controller (`sitewarden controller serve
--fleet-port`) supervising its Flower SuperLink behind the Fleet gateway, three agents
(`sitewarden agent run`) under the bank policy pack, and the sites' SuperNodes started by the agents.

- bank-a trains on a read-only SQLite query, bank-b on a CSV file; both tables carry a free-text
  column and planted canary rows. bank-c's own local policy declines every job.
- A 3-round job with differential privacy and SecAgg+ runs to the end; its rounds, sites, epsilon
  and bytes are reported, both sides audit it, and its result is a candidate release whose lineage
  names each site's dataset SHA-256. Approved and rolled out, the sites serve it.
- The job runs the Flower App as a release of kind `app` (its FAB) that alice approved; each site
  verifies that approval, computes epsilon itself, and its SuperNode runs only that FAB. A job whose
  app only mallory (an approver the controller knows, the sites do not) approved is declined by
  every site, audited.
- A job that needs three sites fails with a reason naming bank-c's refusal.
- Residency: every request the agents and their SuperNodes send passes a TLS-terminating recording
  proxy on loopback (TLS stays on: the proxy holds a certificate of the test CA the agents trust);
  no canary string, canary row bytes or canary value appears in any of them.
- The Fleet port serves the Fleet API only: Flower's Control API answers 404 there; a SuperNode
  whose key the controller did not register is refused.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from audit import Log
from federation.datasource import DataSource
from federation.keys import generate_supernode_keys
from federation.privacy import epsilon
from federation.superlink import ManagedProcess, flower_env, free_port, supernode_argv
from sitewarden import approval
from sitewarden.fraud_model import FEATURES, build_release, generate
from tests.agent_harness import BANK_PACK, AgentProcess, Network, enroll_agent, push_app, push_policy, wait_for
from tests.agent_harness import FED_APP as APP
from tests.controller_server import sitewarden, start_controller
from tests.tls import TestPKI

pytestmark = pytest.mark.timeout(900)

MODEL = "fraud"
ROWS = {"bank-a": 1_500, "bank-b": 2_500}
# Epsilon about 6.2 after 3 rounds (the bank pack allows 8); a small clipping norm keeps the noise small
# against the updates of a few fine-tuning steps.
DP = {"noise_multiplier": 1.5, "clipping_norm": 0.1, "delta": 1e-5}
DECLINE = """package sitewarden.federation
import rego.v1

decision := {"allow": false, "reasons": ["bank-c keeps its data out of federated training"], "obligations": {}}
"""


def _canaries(site: str) -> tuple[list[str], np.ndarray]:
    """Unique strings for the text column, and rows of unmistakable feature values (eight decimals: the
    SuperNodes' signed ISO timestamps, six decimals, cannot collide with their text)."""
    strings = [f"CANARY-{site}-{uuid.uuid4().hex}" for _ in range(20)]
    rows = np.array(
        [[4321.8765 + i, 13.0, 0.42424242 + i / 1000, 777.125 + i, 3.0, 99.5, 1.0, 0.0] for i in range(10)],
        dtype=np.float64,
    )
    return strings, rows


def _site_table(site: str, seed: int) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    x, y = generate(ROWS[site], seed)
    strings, canary_rows = _canaries(site)
    x = np.vstack([np.asarray(x, dtype=np.float64)[: ROWS[site] - len(canary_rows)], canary_rows])
    notes = [strings[i % len(strings)] + ", said the customer" for i in range(len(x))]
    return x, np.asarray(y, dtype=np.float64)[: len(x)], notes, canary_rows


def _write_sqlite(path: Path, x: np.ndarray, y: np.ndarray, notes: list[str]) -> None:
    with sqlite3.connect(path) as db:
        columns = ", ".join(f'"{c}" REAL' for c in FEATURES)  # quoted: `foreign` is an SQL keyword
        db.execute(f"CREATE TABLE tx (id INTEGER PRIMARY KEY, note TEXT, {columns}, label INTEGER)")
        marks = ", ".join("?" * (len(FEATURES) + 2))
        names = ", ".join(f'"{c}"' for c in FEATURES)
        db.executemany(
            f"INSERT INTO tx (note, {names}, label) VALUES ({marks})",
            [(n, *map(float, row), int(label)) for n, row, label in zip(notes, x, y, strict=True)],
        )


def _write_csv(path: Path, x: np.ndarray, y: np.ndarray, notes: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["note", *FEATURES, "label"])
        for note, row, label in zip(notes, x, y, strict=True):
            writer.writerow([note, *(repr(float(v)) for v in row), int(label)])


def _patterns(strings: list[str], rows: np.ndarray) -> list[bytes]:
    """What must never leave a site: its strings, its canary rows' bytes (float64 and float32, whole
    rows and single distinctive values) and their decimal text."""
    out = [s.encode() for s in strings]
    for row in rows:
        out += [row.tobytes(), row.astype(np.float32).tobytes()]
        for value in (row[0], row[2], row[3]):
            out += [np.float64(value).tobytes(), np.float32(value).tobytes(), repr(float(value)).encode()]
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("fl-e2e")
    api_net, fleet_net = Network(pki), Network(pki)
    fleet_port = free_port()
    controller = start_controller(
        base,
        pki,
        public_url=api_net.url,
        fleet_port=fleet_port,
        fleet_address=f"127.0.0.1:{fleet_net.port}",
        consent_timeout=90,
    )
    api_net.start(controller.url)
    fleet_net.start(f"https://127.0.0.1:{fleet_port}")
    agents: list[AgentProcess] = []
    try:
        keys = base / "approvers"
        approval.generate_approver_key(keys / "alice.pem", keys / "alice.pub.pem")
        add = ["approver", "add", "alice", "--public-key", str(keys / "alice.pub.pem")]
        assert sitewarden(*add, env=controller.cli_env()).returncode == 0
        operator, alice = controller.token("operator", "olga"), controller.token("approver", "alice")
        world: dict[str, Any] = {
            "base": base,
            "controller": controller,
            "operator": operator,
            "alice": alice,
            "key": keys / "alice.pem",
            "api_net": api_net,
            "fleet_net": fleet_net,
            "fleet_port": fleet_port,
            "sources": {},
            "patterns": {},
        }
        card = build_release(base / "fraud-1.0.0", seed=7, n_samples=3_000)
        push_model(world, base / "fraud-1.0.0", "1.0.0", card)
        push_policy(controller, BANK_PACK, "1.0.0", operator=operator, approver=alice, approver_key=keys / "alice.pem")
        world["fab"] = push_app(
            controller, base / "fedapp", "0.1.0", operator=operator, approver=alice, approver_key=keys / "alice.pem"
        )
        approval.generate_approver_key(keys / "mallory.pem", keys / "mallory.pub.pem")
        add = ["approver", "add", "mallory", "--public-key", str(keys / "mallory.pub.pem")]
        assert sitewarden(*add, env=controller.cli_env()).returncode == 0
        mallory = controller.token("approver", "mallory")
        push_app(
            controller,
            base / "fedapp-2",
            "0.2.0",
            operator=operator,
            approver=mallory,
            approver_key=keys / "mallory.pem",
        )
        for seed, site in enumerate(("bank-a", "bank-b"), start=11):
            x, y, notes, canary_rows = _site_table(site, seed)
            folder = base / f"{site}-data"
            folder.mkdir()
            if site == "bank-a":
                path = folder / "core.db"
                _write_sqlite(path, x, y, notes)
                source = DataSource("sqlite", str(path), "SELECT * FROM tx ORDER BY id")
                mapping = f'kind = "sqlite"\npath = "{path}"\nquery = "{source.query}"\n'
            else:
                path = folder / "transactions.csv"
                _write_csv(path, x, y, notes)
                source = DataSource("csv", str(path))
                mapping = f'kind = "csv"\npath = "{path}"\n'
            world["sources"][site] = source
            world["patterns"][site] = _patterns(sorted(set(notes)), canary_rows)
            agents.append(
                enroll_agent(
                    controller,
                    base,
                    site,
                    {"region": "eu", "fl": "yes"},
                    {"alice": keys / "alice.pub.pem"},
                    extra_config=f"[datasets.transactions]\n{mapping}",
                )
            )
        local = base / "bank-c-policy"
        local.mkdir()
        (local / "federation.rego").write_text(DECLINE)
        agents.append(
            enroll_agent(
                controller,
                base,
                "bank-c",
                {"region": "eu", "fl": "no"},
                {"alice": keys / "alice.pub.pem"},
                extra_config=f'[policy]\nlocal = "{local}"\n',
            )
        )
        world["agents"] = {a.name: a for a in agents}
        for agent in agents:
            agent.start()
        rollout(world, "1.0.0")
        for agent in agents:
            wait_for(lambda a=agent: a.active() == (MODEL, "1.0.0"), what=f"{agent.name} to serve fraud 1.0.0")
        yield world
    finally:
        for agent in agents:
            agent.stop()
        controller.stop()
        api_net.stop()
        fleet_net.stop()


def push_model(world: dict[str, Any], directory: Path, version: str, card: Path) -> None:
    env = world["controller"].cli_env(world["operator"])
    args = ["release", "push", str(directory), "--name", MODEL, "--version", version, "--metadata", str(card)]
    assert (done := sitewarden(*args, env=env)).returncode == 0, done.stderr
    approve(world, version)


def approve(world: dict[str, Any], version: str) -> None:
    args = ["release", "approve", MODEL, version, "--key", str(world["key"])]
    assert (done := sitewarden(*args, env=world["controller"].cli_env(world["alice"]))).returncode == 0, done.stderr


def rollout(world: dict[str, Any], version: str) -> None:
    args = ["rollout", "create", f"fraud-{uuid.uuid4().hex[:8]}", "--release", f"{MODEL}@{version}"]
    args += ["--policy", "bank-policy@1.0.0", "--selector", "region=eu"]
    assert (done := sitewarden(*args, env=world["controller"].cli_env(world["operator"]))).returncode == 0, done.stderr


def start_job(world: dict[str, Any], **changes: Any) -> dict[str, Any]:
    body = {
        "name": f"fraud-ft-{uuid.uuid4().hex[:6]}",
        "base": {"name": MODEL, "version": "1.0.0"},
        "app": {"name": APP, "version": "0.1.0"},
        "dataset": "transactions",
        "selector": {"fl": "yes"},
        "rounds": 3,
        "min_sites": 2,
        "differential_privacy": DP,
        "secure_aggregation": True,
        **changes,
    }
    with world["controller"].http(world["operator"]) as http:
        created = http.post("/api/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    return created.json()


def job_state(world: dict[str, Any], job_id: str) -> dict[str, Any]:
    with world["controller"].http(world["controller"].token("auditor")) as http:
        return http.get(f"/api/v1/jobs/{job_id}").json()


def ended(world: dict[str, Any], job_id: str, timeout: float = 400) -> dict[str, Any]:
    return wait_for(
        lambda: (j := job_state(world, job_id))["state"] in ("finished", "failed", "cancelled") and j,
        timeout,
        f"job {job_id} to end",
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def audit_entries(path: Path) -> list[dict[str, Any]]:
    with Log.open(path, readonly=True) as log:
        return [json.loads(e) for e in log.iter_entries()]


@pytest.fixture(scope="module")
def finished(world: dict[str, Any]) -> dict[str, Any]:
    job = start_job(world)
    done = ended(world, job["id"])
    assert done["state"] == "finished", done
    return done


def test_a_dp_secagg_job_finishes_with_rounds_sites_epsilon_and_bytes(
    world: dict[str, Any], finished: dict[str, Any]
) -> None:
    sites = {name: agent.site_id for name, agent in world["agents"].items()}
    assert sorted(finished["participants"]) == sorted([sites["bank-a"], sites["bank-b"]])
    assert [r["round"] for r in finished["rounds"]] == [1, 2, 3]
    for entry in finished["rounds"]:
        assert entry["sites"] == sorted(finished["participants"])
        assert entry["train"]["num-examples"] == sum(ROWS.values())
        assert 0 < entry["evaluate"]["eval-loss"] < 1.0
    assert finished["epsilon_spent"] == pytest.approx(epsilon(DP["noise_multiplier"], 3, DP["delta"]))
    assert finished["epsilon_spent"] == pytest.approx(finished["epsilon_planned"])
    assert finished["bytes_exchanged"]["from_sites"] > 0 and finished["bytes_exchanged"]["to_sites"] > 0


def test_the_result_is_a_candidate_release_with_lineage(world: dict[str, Any], finished: dict[str, Any]) -> None:
    result = finished["result"]
    assert result["name"] == MODEL and result["version"].startswith("1.0.0-ft.")
    with world["controller"].http(world["operator"]) as http:
        release = http.get(f"/api/v1/releases/{MODEL}/{result['version']}").json()
    assert release["approvals"] == []  # a candidate: it needs approval like any release
    lineage = release["metadata"]["lineage"]
    assert lineage["job"]["id"] == finished["id"]
    assert lineage["app"] == {"name": APP, "version": "0.1.0", "fab_sha256": _sha256(world["fab"])}
    assert lineage["base"] == {"name": MODEL, "version": "1.0.0"}
    assert lineage["differential_privacy"]["epsilon_spent"] == pytest.approx(finished["epsilon_spent"])
    assert len(lineage["rounds"]) == 3
    by_name = {s["name"]: s for s in lineage["sites"]}
    for site, source in world["sources"].items():  # the digest each site reported: a hash, never data
        assert by_name[site]["dataset_sha256"] == source.sha256()
        assert by_name[site]["examples"] == ROWS[site]


def test_both_sides_audit_the_job(world: dict[str, Any], finished: dict[str, Any]) -> None:
    controller_log = audit_entries(world["controller"].data_dir / "audit")
    # Entries of their own (the SuperLink's registrations, the lineage) and change records (state, rounds).
    mine = [
        e["change"]["kind"] if e["type"] == "change" else e["type"]
        for e in controller_log
        if finished["id"] in (e.get("job", {}).get("id"), e.get("change", {}).get("job_id"))
    ]
    expected = ["job.created"]  # the operator's request, as its change record
    expected += ["federation.node_registered"] * 2  # the sites' first job: their SuperNode keys, once
    expected += ["job.state_changed", "job.started", "job.round", "job.round", "job.round", "release.registered"]
    expected += ["job.state_changed"]
    assert [kind for kind in mine if kind != "job.answered"] == expected
    assert any(e.get("action") == "POST /api/v1/jobs" for e in controller_log)
    for site in ("bank-a", "bank-b"):
        entries = audit_entries(world["agents"][site].data / "audit")
        decisions = [e for e in entries if e.get("point") == "federation" and e["job"]["id"] == finished["id"]]
        assert decisions and decisions[0]["decision"]["allow"] is True
        # The site decided on the epsilon it computed itself and the app it verified (alice's approval).
        assert decisions[0]["epsilon"] == pytest.approx(epsilon(DP["noise_multiplier"], 3, DP["delta"]))
        assert decisions[0]["app"]["fab_sha256"] == _sha256(world["fab"])
        assert decisions[0]["app"]["approvers"] == ["alice"]
        [started] = [
            e for e in entries if e["type"] == "federation.supernode.started" and e["job"]["id"] == finished["id"]
        ]
        assert started["fab_sha256"] == _sha256(world["fab"])
        assert started["terms"] == {"rounds": 3, "min_sites": 2, "secure_aggregation": True, "clipping_norm": 0.1}
        assert not [e for e in entries if e["type"] == "federation.refused" and e["job"]["id"] == finished["id"]]
        rounds = [e for e in entries if e["type"] == "federation.round" and e["job"]["id"] == finished["id"]]
        train = [e for e in rounds if e["phase"] == "train"]
        assert [e["round"] for e in train] == [1, 2, 3]
        for entry in train:
            assert entry["examples"] == ROWS[site]
            assert entry["update_norm"] <= DP["clipping_norm"] + 1e-6  # clipped to it when it was larger
            assert entry["bytes_sent"] > 0
            assert entry["dataset_sha256"] == world["sources"][site].sha256()


def test_the_approved_result_is_rolled_out_and_served(world: dict[str, Any], finished: dict[str, Any]) -> None:
    version = finished["result"]["version"]
    approve(world, version)
    rollout(world, version)
    rows = np.asarray(generate(4, 99)[0], dtype=np.float32).tolist()
    for name in ("bank-a", "bank-b"):
        agent = world["agents"][name]
        wait_for(lambda a=agent: a.active() == (MODEL, version), what=f"{name} to serve {version}")
        answer = agent.infer(MODEL, rows)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == version


def test_no_row_of_local_data_leaves_a_site(world: dict[str, Any], finished: dict[str, Any]) -> None:
    sent = world["api_net"].sent + world["fleet_net"].sent
    fleet_bytes = sum(len(b) for b in world["fleet_net"].sent)
    assert fleet_bytes > 10_000  # the capture saw the training traffic ...
    reported = {world["sources"][s].sha256().encode() for s in ("bank-a", "bank-b")}
    assert all(any(d in b for b in world["api_net"].sent) for d in reported)  # ... and the digests sent
    for site, patterns in world["patterns"].items():
        leaks = [p for p in patterns if any(p in body for body in sent)]
        assert not leaks, f"{site}: {len(leaks)} canary patterns left the site, e.g. {leaks[0][:60]!r}"


def test_a_job_whose_app_no_trusted_approver_signed_is_declined_by_every_site(world: dict[str, Any]) -> None:
    """fedapp 0.2.0 carries mallory's approval: good enough for the controller, which knows mallory's
    key, but not for the sites, which trust alice only. Both decline, saying why; the job fails."""
    job = start_job(world, app={"name": APP, "version": "0.2.0"}, rounds=1)
    done = ended(world, job["id"])
    assert done["state"] == "failed" and "0 of the 2 selected sites joined" in done["reason"]
    for site in ("bank-a", "bank-b"):
        agent = world["agents"][site]
        [reason] = done["declined"][agent.site_id]
        assert "fedapp 0.2.0 is refused" in reason and "no approval by an approver this site trusts" in reason
        entries = audit_entries(agent.data / "audit")
        refused = [e for e in entries if e["type"] == "federation.app.refused" and e["job"]["id"] == job["id"]]
        assert refused and refused[0]["app"] == {"name": APP, "version": "0.2.0"}
        assert not [e for e in entries if e.get("point") == "federation" and e["job"]["id"] == job["id"]]


def test_a_job_short_of_sites_fails_naming_the_site_that_declined(world: dict[str, Any]) -> None:
    job = start_job(world, selector={"region": "eu"}, min_sites=3)
    done = ended(world, job["id"])
    assert done["state"] == "failed"
    assert "2 of the 3 selected sites joined" in done["reason"]
    assert "bank-c declined" in done["reason"] and "keeps its data out" in done["reason"]
    bank_c = world["agents"]["bank-c"]
    assert list(done["declined"]) == [bank_c.site_id]  # the site's own modules tightened the bank pack's allow
    assert "site: bank-c keeps its data out of federated training" in done["declined"][bank_c.site_id]
    state = bank_c.status()["artifacts"][f"{job['name']}@{job['id']}"]
    assert state["state"] == "refused"


def test_the_fleet_port_serves_the_fleet_api_only(world: dict[str, Any]) -> None:
    ca = str(world["controller"].pki.ca_cert)
    url = f"https://127.0.0.1:{world['fleet_port']}"
    with httpx.Client(verify=ca, timeout=10) as http:
        assert http.get(f"{url}/health").status_code == 200
        for path in ("/v1/control/list-runs", "/v1/control/register-node", "/docs"):
            refused = http.post(f"{url}{path}", content=b"")
            assert refused.status_code == 404 and "Fleet API only" in refused.text, path


def test_a_supernode_the_controller_did_not_register_is_refused(
    world: dict[str, Any], finished: dict[str, Any], tmp_path: Path
) -> None:
    """After a job (the SuperLink starts with the first job and keeps running), through the Fleet port."""
    rogue = generate_supernode_keys(tmp_path / "keys", "rogue")
    bin_dir = Path(sys.executable).parent
    argv = supernode_argv(
        bin_dir,
        superlink=f"127.0.0.1:{world['fleet_port']}",
        root_certificates=world["controller"].pki.ca_cert,
        private_key=rogue.private_key,
        node_config={},
        runtime_port=free_port(),
        max_retries=0,
    )
    # A log file, not a pipe: the SuperNode's detached SuperExec would hold a pipe open after it exits.
    env = flower_env(tmp_path / "home", bin_dir)
    process = ManagedProcess.start("rogue", argv, env, tmp_path / "rogue.log", tmp_path)
    try:
        exit_code = process.wait(timeout=120)
    finally:
        process.stop()
    assert exit_code != 0
    assert "Failed to activate SuperNode" in process.log(), process.log_tail()


def test_a_site_that_declines_stays_out_while_the_others_train_again_with_their_kept_keys(
    world: dict[str, Any], finished: dict[str, Any]
) -> None:
    """A second job: bank-c declines, bank-a and bank-b join with the SuperNode keys registered for the
    first job (Flower never frees a registered key: they are kept, not registered again)."""
    job = start_job(world, selector={"region": "eu"}, rounds=1)
    done = ended(world, job["id"])
    assert done["state"] == "finished", done
    agents = world["agents"]
    assert sorted(done["participants"]) == sorted([agents["bank-a"].site_id, agents["bank-b"].site_id])
    assert list(done["declined"]) == [agents["bank-c"].site_id]
    assert done["rounds"][0]["sites"] == sorted(done["participants"])
    controller_log = audit_entries(world["controller"].data_dir / "audit")
    registered = [e for e in controller_log if e["type"] == "federation.node_registered"]
    assert sorted(e["site"] for e in registered) == sorted(done["participants"])  # once each, for the first job
    bank_c = audit_entries(agents["bank-c"].data / "audit")
    assert not [e for e in bank_c if e["type"].startswith("federation.supernode")]


def _keys(*command: str) -> dict[str, str]:
    """`audit vkey` and `witness vkey` as `sitewarden ... keys` prints them."""
    done = sitewarden(*command)
    assert done.returncode == 0, done.stderr
    return dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)


def test_an_auditor_reports_on_this_run_from_its_exports_alone(
    world: dict[str, Any], finished: dict[str, Any], tmp_path: Path
) -> None:
    """Issue 18 on a real run: the controller and three sites of this module, its rollouts, policy denials,
    human review and the federated job, exported as the auditor receives them; every count of the report
    equals a count made here from the exported entries, without the report's code."""
    from tests.audit.report.test_report import _entries, _table  # noqa: PLC0415 - the export reader of those tests

    controller, agents = world["controller"], world["agents"]
    # A version whose card also serves credit decisions, where the bank's policy has a person review each one.
    card = json.loads((world["base"] / "fraud-1.0.0.card.json").read_text())
    card["intended_purposes"] = ["fraud", "credit"]
    credit_card = world["base"] / "fraud-1.2.0.card.json"
    credit_card.write_text(json.dumps(card))
    push_model(world, world["base"] / "fraud-1.0.0", "1.2.0", credit_card)
    rollout(world, "1.2.0")
    rows = np.asarray(generate(2, 5)[0], dtype=np.float32).tolist()
    for name in ("bank-a", "bank-b"):
        agent = agents[name]
        wait_for(lambda a=agent: a.active() == (MODEL, "1.2.0"), what=f"{name} to serve 1.2.0")
        for purpose, data_class, status in [("fraud", "confidential", 200)] * 3 + [
            ("marketing", "confidential", 403),
            ("credit", "internal", 200),
            ("credit", "internal", 200),
        ]:
            answer = agent.infer(MODEL, rows, purpose=purpose, data_class=data_class)
            assert answer.status_code == status, answer.text

    exports, vkeys, witnesses = [], [], {}
    for name, agent in sorted(agents.items()):
        done = sitewarden("agent", "status", "--data", str(agent.data), "--wait-witnessed", "120", timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        out = tmp_path / name
        done = sitewarden("agent", "audit", "export", "--data", str(agent.data), "--out", str(out))
        assert done.returncode == 0, done.stderr
        keys = _keys("agent", "keys", "--data", str(agent.data))
        exports.append(out)
        vkeys.append(keys["audit vkey"])
        witnesses[name] = keys["witness vkey"]
    ctl = _keys("controller", "keys", "--data", str(controller.data_dir))
    tarball = tmp_path / "controller.tar.gz"

    def cosigned_export() -> bool:
        with controller.http(controller.token("auditor", "audrey")) as http:
            answer = http.get("/api/v1/audit/export", params={"witnesses": 2})
        if answer.status_code != 200:
            return False
        tarball.write_bytes(answer.content)
        return True

    wait_for(cosigned_export, 120, "a controller checkpoint two sites cosigned")
    policy = tmp_path / "auditor.policy"
    policy.write_text(
        "".join(f"log {v}\n" for v in (*vkeys, ctl["audit vkey"]))
        + f"witness controller {ctl['witness vkey']}\n"
        + "".join(f"witness {name} {vkey}\n" for name, vkey in witnesses.items())
        + f"group any-witness any controller {' '.join(witnesses)}\nquorum any-witness\n"
    )
    report = tmp_path / "report"
    command = ["audit", "report", *map(str, exports), str(tarball), "--policy", str(policy), "--out", str(report)]
    done = sitewarden(*command, "--sample", "4", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all logs verified" in done.stdout

    requests = [e for out in exports for e in _entries(out) if e["type"] == "inference"]
    outcome = Counter(
        "denied" if e.get("decision", {}).get("allow") is False else "allowed" if e["status"] == 200 else "refused"
        for e in requests
    )
    assert outcome["denied"] >= 2 and outcome["allowed"] >= 10
    assert {r["outcome"]: r["requests"] for r in _table(report, "activity_by_outcome")} == dict(outcome)
    flagged = [e for e in requests if e.get("decision", {}).get("obligations", {}).get("human_review")]
    assert len(flagged) >= 4
    assert len(_table(report, "human_review_requests")) == len(flagged)
    by_version = Counter(e["model"]["version"] for e in requests)
    got: Counter[str] = Counter()
    for r in _table(report, "activity_by_model"):
        got[r["version"]] += r["requests"]
    assert got == by_version
    job = [r for r in _table(report, "federated_jobs") if r["job"] == finished["id"]]
    assert {r["event"] for r in job} >= {"job.created", "job.round"}
    assert sum(1 for r in job if r["event"] == "job.round") == len(finished["rounds"])
    timeline = {r["version"] for r in _table(report, "configuration_timeline") if r["site"].startswith("bank-a")}
    assert {"1.0.0", "1.2.0"} <= timeline
