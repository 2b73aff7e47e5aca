"""The rules a site applies as a witness of the controller's log (`agent.controller_witness`), one by one.

The controller here is a real `audit.Log` signed with a controller key; the transport hands its checkpoint and
proofs over as the controller's routes would (transport is injected, as python-tuf injects its fetcher), and
an attacker's variants replace them: another key, a replayed older checkpoint, a fork, a malformed proof.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.controller_witness import ControllerWitness
from audit import Log
from audit.note import Verifier, generate_key, open_note
from tests.conftest import make_entries

ORIGIN = "sitewarden/controller/main"


class Controller:
    """What the site sees of a controller: its checkpoint and consistency proofs, and what it receives back."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.checkpoint: str | None = None  # served instead of the log's, when set
        self.proof: bytes | None = None
        self.posted: list[bytes] = []
        self.reports: list[dict[str, Any]] = []
        self.refuse_posts = False

    async def audit_checkpoint(self) -> bytes:
        return (self.checkpoint or self.log.signed_checkpoint or "").encode()

    async def audit_consistency(self, old: int, new: int) -> bytes:
        if self.proof is not None:
            return self.proof
        return "".join(base64.b64encode(h).decode() + "\n" for h in self.log.consistency_proof(old, new)).encode()

    async def post_cosignature(self, body: bytes) -> None:
        if self.refuse_posts:
            raise ConnectionError("the controller is away")
        self.posted.append(body)

    async def report_refusal(self, report: dict[str, Any]) -> None:
        self.reports.append(report)


@pytest.fixture
def controller(tmp_path: Path) -> tuple[Controller, str, str]:
    skey, vkey = generate_key(ORIGIN)
    log = Log.open(tmp_path / "controller-log", skey)
    log.append_many(make_entries(10))
    log.checkpoint()
    return Controller(log), skey, vkey


def _witness(tmp_path: Path, vkey: str, key: Ed25519PrivateKey, recorded: list[dict[str, Any]]) -> ControllerWitness:
    return ControllerWitness(tmp_path / "controller-witness.json", "site-1", key, vkey, recorded.append)


def _run(witness: ControllerWitness, controller: Controller) -> str:
    return asyncio.run(witness.run_once(controller))


def test_a_site_cosigns_each_new_checkpoint_that_extends_what_it_cosigned(
    controller: tuple[Controller, str, str], tmp_path: Path
) -> None:
    ctl, _, vkey = controller
    key, recorded = Ed25519PrivateKey.generate(), []
    witness = _witness(tmp_path, vkey, key, recorded)
    assert _run(witness, ctl) == "cosigned"
    assert _run(witness, ctl) == "unchanged" and len(ctl.posted) == 1
    ctl.log.append_many(make_entries(7, start=10))
    ctl.log.checkpoint()
    assert _run(witness, ctl) == "cosigned" and witness.size == 17
    note = open_note(ctl.posted[-1], [Verifier(witness.vkey)])
    assert note.signatures[0].timestamp is not None and note.text.split("\n")[1] == "17"
    assert recorded == [] and ctl.reports == []


def test_the_cosigned_checkpoint_is_stored_before_the_cosignature_leaves_and_sent_again_after_a_crash(
    controller: tuple[Controller, str, str], tmp_path: Path
) -> None:
    ctl, _, vkey = controller
    key = Ed25519PrivateKey.generate()
    ctl.refuse_posts = True
    with pytest.raises(ConnectionError):
        _run(_witness(tmp_path, vkey, key, []), ctl)
    stored = json.loads((tmp_path / "controller-witness.json").read_text())
    assert (stored["size"], stored["posted"]) == (10, False)
    ctl.refuse_posts = False
    again = _witness(tmp_path, vkey, key, [])  # a new process: the state file is all it has
    assert _run(again, ctl) == "cosigned"
    assert ctl.posted[0].decode().endswith(stored["cosignature"])


def test_a_replayed_older_checkpoint_of_the_same_history_is_stale_not_a_fork(
    controller: tuple[Controller, str, str], tmp_path: Path
) -> None:
    ctl, _, vkey = controller
    witness = _witness(tmp_path, vkey, Ed25519PrivateKey.generate(), recorded := [])
    old = ctl.log.signed_checkpoint
    ctl.log.append_many(make_entries(5, start=10))
    ctl.log.checkpoint()
    assert _run(witness, ctl) == "cosigned"
    ctl.checkpoint = old
    assert _run(witness, ctl) == "stale"
    assert recorded == [] and witness.state.refused is None


@pytest.mark.parametrize("how", ["same size, another root", "larger, not an extension", "smaller, not a prefix"])
def test_a_fork_signed_with_the_controllers_own_key_is_refused_recorded_reported_and_witnessing_stops(
    controller: tuple[Controller, str, str], tmp_path: Path, how: str
) -> None:
    ctl, skey, vkey = controller
    witness = _witness(tmp_path, vkey, Ed25519PrivateKey.generate(), recorded := [])
    ctl.log.append_many(make_entries(5, start=10))
    ctl.log.checkpoint()
    assert _run(witness, ctl) == "cosigned"
    sizes = {"same size, another root": 15, "larger, not an extension": 25, "smaller, not a prefix": 12}
    with Log.open(tmp_path / "forged", skey) as forged:  # the same key, another history
        forged.append_many(make_entries(sizes[how], start=500))
        ctl.checkpoint = forged.checkpoint()
        # The attacker's own proofs: right for its history, wrong for the one the site cosigned.
        low, high = sorted((10 if sizes[how] < 15 else 15, sizes[how]))
        ctl.proof = b"".join(base64.b64encode(h) + b"\n" for h in forged.consistency_proof(low, high))
    assert _run(witness, ctl) == "refused"
    [entry] = recorded
    assert entry["type"] == "controller_witness.refused" and entry["witnessing_stopped"] is True
    assert (entry["cosigned_size"], entry["presented_size"]) == (15, sizes[how])
    assert entry["checkpoint"] == ctl.checkpoint
    assert [r["reason"] for r in ctl.reports] == [entry["reason"]]
    posted = len(ctl.posted)
    ctl.checkpoint, ctl.proof = None, None  # even the honest log: nothing more is cosigned after a fork
    assert _run(witness, ctl) == "refused" and len(ctl.posted) == posted
    reloaded = _witness(tmp_path, vkey, Ed25519PrivateKey.generate(), [])
    assert reloaded.state.refused is not None and reloaded.state.reported is True


def test_a_checkpoint_by_another_key_is_refused_and_reported_once_and_witnessing_goes_on(
    controller: tuple[Controller, str, str], tmp_path: Path
) -> None:
    ctl, _, vkey = controller
    witness = _witness(tmp_path, vkey, Ed25519PrivateKey.generate(), recorded := [])
    other, _ = generate_key(ORIGIN)
    with Log.open(tmp_path / "impostor", other) as impostor:
        impostor.append_many(make_entries(3))
        ctl.checkpoint = impostor.checkpoint()
    assert _run(witness, ctl) == "refused"
    assert _run(witness, ctl) == "refused"
    assert len(recorded) == 1 and len(ctl.reports) == 1 and recorded[0]["witnessing_stopped"] is False
    assert "does not verify" in recorded[0]["reason"]
    ctl.checkpoint = None
    assert _run(witness, ctl) == "cosigned"


def test_a_malformed_consistency_proof_is_refused(controller: tuple[Controller, str, str], tmp_path: Path) -> None:
    ctl, _, vkey = controller
    witness = _witness(tmp_path, vkey, Ed25519PrivateKey.generate(), recorded := [])
    assert _run(witness, ctl) == "cosigned"
    ctl.log.append_many(make_entries(5, start=10))
    ctl.log.checkpoint()
    ctl.proof = b"not base64 !!\n"
    assert _run(witness, ctl) == "refused"
    assert "malformed" in recorded[0]["reason"]


def test_a_site_enrolled_before_pinning_does_not_witness(tmp_path: Path) -> None:
    witness = ControllerWitness(tmp_path / "w.json", "site-1", Ed25519PrivateKey.generate(), "", lambda _: None)
    assert asyncio.run(witness.run_once(None)) == "disabled"  # type: ignore[arg-type]
    assert witness.status()["enabled"] is False
