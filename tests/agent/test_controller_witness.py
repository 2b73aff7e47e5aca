"""The sites witness the controller's own audit log: each cosigns its checkpoints (a real agent, woken by its
long poll, and two sites running the agent's witnessing code over its channel), the controller's export carries
their cosignatures and passes a witness quorum; a rewritten controller log (same key, forked history) is
refused by every site, recorded in each site's log and reported, the sites keep serving, and the forged
export fails the quorum."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.channel import ControllerChannel
from agent.controller_witness import ControllerWitness
from agent.identity import Identity
from audit import Log
from audit.entry import canonicalize
from audit.note import Signer, Verifier, open_note
from audit.policy import from_keys
from tests.agent_harness import AgentProcess, enroll_agent, wait_for
from tests.controller_server import ControllerServer, serve, sitewarden, start_controller
from tests.sim_agent import SimulatedAgent
from tests.tls import TestPKI


@dataclass
class SimulatedWitness:
    """A simulated site running the agent's own witnessing code, with an audit log of its own."""

    site: SimulatedAgent
    witness: ControllerWitness
    log: Log

    @classmethod
    def enroll(cls, controller: ControllerServer, name: str, workdir: Path) -> SimulatedWitness:
        site = SimulatedAgent.enroll(controller, name, {"witness": "yes"}, workdir)
        log = Log.open(workdir / name / "audit", Signer.from_ed25519(f"sitewarden/{site.site_id}", site.key))
        state = workdir / name / "controller-witness.json"
        witness = ControllerWitness(
            state, site.site_id, site.key, site.audit_vkey, lambda e: log.append(canonicalize(e))
        )
        return cls(site, witness, log)

    def run_once(self) -> str:
        identity = Identity(
            self.site.site_id, self.site.name, self.site.controller.url, "", "", "", self.site.audit_vkey
        )

        async def run() -> str:
            channel = ControllerChannel(identity, self.site.key, str(self.site.controller.pki.ca_cert))
            try:
                return await self.witness.run_once(channel)
            finally:
                await channel.close()

        return asyncio.run(run())

    def refusals(self) -> list[dict[str, Any]]:
        return [e for e in map(json.loads, self.log.iter_entries()) if e["type"] == "controller_witness.refused"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("controller-witness")
    controller = start_controller(workdir, pki)
    agent = enroll_agent(controller, workdir, "witness-agent", {"witness": "yes"}, {})
    text = agent.config.read_text()  # witness the controller's log every second besides each long-poll answer
    agent.config.write_text(text.replace("[controller]\n", "[controller]\nwitness_seconds = 1\n", 1))
    agent.start()
    sims = [SimulatedWitness.enroll(controller, f"witness-sim-{i}", workdir) for i in range(2)]
    state: dict[str, Any] = {"controller": controller, "agent": agent, "sims": sims, "workdir": workdir, "pki": pki}
    yield state
    agent.stop()
    for sim in sims:
        sim.log.close()
    state["controller"].stop()


def _witness_vkeys(world: dict[str, Any]) -> list[str]:
    agent: AgentProcess = world["agent"]
    keys = sitewarden("agent", "keys", "--data", str(agent.data)).stdout
    agent_vkey = next(line.split(": ", 1)[1] for line in keys.splitlines() if line.startswith("witness vkey: "))
    return [agent_vkey, *(sim.witness.vkey for sim in world["sims"])]


def _controller_vkey(controller: ControllerServer) -> str:
    out = sitewarden("controller", "keys", "--data", str(controller.data_dir)).stdout
    return next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("audit vkey: "))


def _export(controller: ControllerServer, path: Path, witnesses: int) -> Path:
    with controller.http(controller.token("auditor")) as http:
        response = http.get("/api/v1/audit/export", params={"witnesses": witnesses})
    assert response.status_code == 200, response.text
    path.write_bytes(response.content)
    return path


def _policy(world: dict[str, Any], quorum: int) -> Path:
    controller: ControllerServer = world["controller"]
    policy = from_keys([Verifier(_controller_vkey(controller))], [Verifier(v) for v in _witness_vkeys(world)], quorum)
    path = world["workdir"] / f"policy-{quorum}"
    path.write_text(policy.format())
    return path


def test_every_site_cosigns_the_controllers_checkpoints_and_the_export_meets_the_quorum(
    world: dict[str, Any],
) -> None:
    controller: ControllerServer = world["controller"]
    with controller.client(controller.admin_token) as admin:
        for i in range(5):
            admin.post("/api/v1/sites", {"name": f"witnessed-{i}"})
    _export(controller, world["workdir"] / "first.tar.gz", 0)  # signs a checkpoint now
    with controller.http() as http:
        checkpoint = http.get("/api/v1/audit/checkpoint").text
    size = int(checkpoint.split("\n")[1])
    agent: AgentProcess = world["agent"]
    # The agent's long poll answers on the new checkpoint: it cosigns within moments, without being asked.
    wait_for(lambda: agent.status()["controller_witness"]["cosigned_size"] >= size, 30, "the agent to cosign")
    assert agent.status()["controller_witness"]["posted"] is True
    for sim in world["sims"]:
        assert sim.run_once() in ("cosigned", "unchanged")
    with controller.http() as http:  # public: anyone can read it and check consistency with an earlier copy
        latest = http.get("/api/v1/audit/checkpoint").text
    opened = open_note(latest, [_controller_vkey(controller), *_witness_vkeys(world)])
    cosigners = {s.key for s in opened.signatures if s.timestamp is not None}
    assert len(cosigners) == 3 and all(name.endswith("/witness") for name in (k.split("+")[0] for k in cosigners))
    with controller.http(controller.admin_token) as http:
        shown = http.get(f"/api/v1/sites/{agent.site_id}").json()
    assert shown["witness_vkey"] == _witness_vkeys(world)[0]

    honest = _export(controller, world["workdir"] / "honest.tar.gz", 3)
    done = sitewarden("audit", "verify", str(honest), "--policy", str(_policy(world, 2)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "witness quorum: group witnesses needs 2 of 3, has 3: met" in done.stdout
    world["honest"] = honest


def _forge(data_dir: Path) -> None:
    """Rewrite the controller's audit log with its own key: entry 1 altered, everything re-signed (a fork)."""
    audit = data_dir / "audit"
    with Log.open(audit, readonly=True) as log:
        entries = list(log.iter_entries())
    entry = json.loads(entries[1])
    entry["actor"] = "nobody-did-this"
    entries[1] = canonicalize(entry)
    forged = data_dir / "audit-forged"
    with Log.open(forged, Signer.from_file(data_dir / "keys" / "audit.key")) as log:
        log.append_many([*entries, canonicalize({"type": "cover", "note": "more entries after the rewrite"})])
        log.checkpoint()
    shutil.rmtree(audit)
    forged.rename(audit)


def test_a_rewritten_controller_log_is_refused_by_every_site_which_keeps_serving_and_the_forgery_fails_the_quorum(
    world: dict[str, Any],
) -> None:
    controller: ControllerServer = world["controller"]
    assert "honest" in world, "the cosigning test runs first"
    cosigned = world["agent"].status()["controller_witness"]["cosigned_size"]
    controller.stop()
    _forge(controller.data_dir)
    port = int(controller.url.rsplit(":", 1)[1])
    restarted = serve(controller.data_dir, world["pki"], port, controller.admin_token, "sqlite")
    world["controller"] = restarted
    agent: AgentProcess = world["agent"]

    refused = wait_for(lambda: agent.status()["controller_witness"]["refused"], 60, "the agent to refuse the fork")
    assert refused["cosigned_size"] == cosigned and "consistency proof" in refused["reason"]
    assert httpx.get(f"{agent.url}/v2/health/live", timeout=5).status_code == 200  # serving goes on
    assert agent.status()["controller_witness"]["cosigned_size"] == cosigned  # nothing of the fork cosigned
    with Log.open(agent.data / "audit", readonly=True) as site_log:
        entries = [json.loads(e) for e in site_log.iter_entries()]
    assert [e["reason"] for e in entries if e["type"] == "controller_witness.refused"] == [refused["reason"]]
    for sim in world["sims"]:
        assert sim.run_once() == "refused"
        [entry] = sim.refusals()
        assert entry["witnessing_stopped"] is True and entry["presented_size"] > entry["cosigned_size"]
        assert sim.run_once() == "refused"  # and stays so: nothing after a fork is cosigned
    # Reported: the (forged) controller's own log names every site that refused it.
    with restarted.http() as http:
        assert http.get("/healthz").status_code == 200
    with Log.open(restarted.data_dir / "audit", readonly=True) as log:
        reports = [json.loads(e) for e in log.iter_entries()]
    reporters = {e["change"]["site_id"] for e in reports if e.get("change", {}).get("kind") == "audit.refused_by_site"}
    assert reporters == {agent.site_id, *(sim.site.site_id for sim in world["sims"])}

    policy = _policy(world, 2)
    # Cut now: the sites' cosignatures are of the honest history, which the forged log cannot be proven to extend.
    # Cut where the sites cosigned: their checkpoint is honest, the forged entries do not hash to it.
    for witnesses, why in ((0, "is not consistent with the export's"), (3, "does not match the checkpoint")):
        forged = _export(restarted, world["workdir"] / f"forged-{witnesses}.tar.gz", witnesses)
        done = sitewarden("audit", "verify", str(forged), "--policy", str(policy))
        assert done.returncode == 1, done.stdout + done.stderr
        assert "INVALID" in done.stdout and why in done.stdout
    assert sitewarden("audit", "verify", str(world["honest"]), "--policy", str(policy)).returncode == 0
