"""Exports with witnesses' cosignatures beyond one note: more witnesses than a note carries (100 signatures),
witnesses of later and of earlier checkpoints (`cosigned/`, each with a consistency proof to the export's
checkpoint), the quorum counted over the witnesses that vouch for all of it, and forged evidence refused."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest

from audit import Log, verify_export
from audit.export import CosignedCheckpoint, write_export
from audit.note import ALG_COSIGNATURE_V1, Signer, Verifier, add_signatures, generate_key, note_text, signature_lines
from audit.policy import Policy, from_keys
from tests.conftest import make_entries, run_cli

WITNESSES = 150


@pytest.fixture(scope="module")
def witnesses() -> list[Signer]:
    return [Signer(generate_key(f"site-{i}/witness", ALG_COSIGNATURE_V1)[0]) for i in range(WITNESSES)]


def _cosigned(signed: str, signers: list[Signer]) -> list[str]:
    """Notes of `signed` with the signers' cosignatures, 99 a note (the log's own signature is the 100th)."""
    text = note_text(signed)
    lines = [signature_lines(text, s, timestamp=1_800_000_000) for s in signers]
    return [add_signatures(signed, lines[i : i + 99]) for i in range(0, len(lines), 99)] or [signed]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, witnesses: list[Signer]) -> tuple[Path, str, str]:
    """Checkpoints at 10, 20 (the export's) and 30: 120 witnesses cosigned 20, 20 cosigned 30, 10 cosigned 10."""
    base = tmp_path_factory.mktemp("cosigned")
    skey, vkey = generate_key("sitewarden/controller/main")
    with Log.open(base / "log", skey) as log:
        log.append_many(make_entries(10))
        at_10 = log.checkpoint()
        log.append_many(make_entries(10, start=10))
        at_20 = log.checkpoint()
        log.append_many(make_entries(10, start=20))
        at_30 = log.checkpoint()
        own = _cosigned(at_20, witnesses[:120])
        extra = [CosignedCheckpoint(20, note) for note in own[1:]]
        later, earlier = tuple(log.consistency_proof(20, 30)), tuple(log.consistency_proof(10, 20))
        extra += [CosignedCheckpoint(30, note, later) for note in _cosigned(at_30, witnesses[120:140])]
        extra += [CosignedCheckpoint(10, note, earlier) for note in _cosigned(at_10, witnesses[140:])]
        dest = write_export(log, own[0], base / "export", [vkey], extra)
    return dest, vkey, skey


def _policy(vkey: str, witnesses: list[Signer], quorum: int) -> Policy:
    return from_keys([Verifier(vkey)], [w.verifier() for w in witnesses], quorum)


def test_witnesses_beyond_one_note_and_of_a_later_checkpoint_count_towards_the_quorum(
    exported: tuple[Path, str, str], witnesses: list[Signer]
) -> None:
    dest, vkey, _ = exported
    assert sorted(p.name for p in (dest / "cosigned").iterdir()) == ["10-0", "10.proof", "20-0", "30-0", "30.proof"]
    report = verify_export(dest, [], policy=_policy(vkey, witnesses, 140))
    assert report.valid, report.reason
    assert report.quorum is not None and report.quorum.met and report.quorum_size == 20
    sizes = {c.witness: c.size for c in report.witnesses}
    assert len(sizes) == WITNESSES
    assert sorted(set(sizes.values())) == [10, 20, 30]
    assert sum(1 for s in sizes.values() if s == 20) == 120


def test_a_quorum_that_covers_only_a_prefix_is_not_met_and_the_report_says_how_far_it_reaches(
    exported: tuple[Path, str, str], witnesses: list[Signer]
) -> None:
    dest, vkey, _ = exported
    report = verify_export(dest, [], policy=_policy(vkey, witnesses, 141))
    assert not report.valid
    assert report.quorum_size == 10 and "first 10 entries only" in report.reason
    # The shorthand without a policy: every witness named must vouch for all of it.
    legacy = verify_export(dest, [vkey], witnesses=[w.vkey for w in witnesses[:140]])
    assert legacy.valid, legacy.reason
    assert not verify_export(dest, [vkey], witnesses=[w.vkey for w in witnesses[:141]]).valid


def _copy(dest: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(dest, out)
    return out


def test_a_cosigned_checkpoint_of_another_history_is_refused_as_a_fork(
    exported: tuple[Path, str, str], tmp_path: Path, witnesses: list[Signer]
) -> None:
    dest, vkey, skey = exported
    copy = _copy(dest, tmp_path)
    with Log.open(tmp_path / "other", skey) as forged_log:  # the same log key, another history
        forged_log.append_many(make_entries(30, start=1000))
        forged = forged_log.checkpoint()
        proof = forged_log.consistency_proof(20, 30)
    (copy / "cosigned" / "30-0").write_text(_cosigned(forged, witnesses[120:140])[0])
    (copy / "cosigned" / "30.proof").write_text("".join(base64.b64encode(h).decode() + "\n" for h in proof))
    report = verify_export(copy, [vkey])
    assert not report.valid and report.tile == "cosigned/30-0"
    assert "not consistent with the export's" in report.reason


def test_tampered_proofs_and_bad_cosignatures_in_cosigned_checkpoints_are_refused(
    exported: tuple[Path, str, str], tmp_path: Path, witnesses: list[Signer]
) -> None:
    dest, vkey, _ = exported
    copy = _copy(dest, tmp_path)
    proof = (copy / "cosigned" / "10.proof").read_text().splitlines()
    (copy / "cosigned" / "10.proof").write_text("\n".join([base64.b64encode(b"\x01" * 32).decode(), *proof[1:]]) + "\n")
    report = verify_export(copy, [vkey])
    assert not report.valid and report.tile == "cosigned/10-0"

    copy2 = tmp_path / "copy2"
    shutil.copytree(dest, copy2)
    note = (copy2 / "cosigned" / "30-0").read_text()
    head, _, sigs = note.rpartition("\n\n")
    lines = sigs.splitlines()
    name, b64 = lines[1].removeprefix("— ").split(" ")
    raw = bytearray(base64.b64decode(b64))
    raw[-1] ^= 1
    lines[1] = f"— {name} {base64.b64encode(bytes(raw)).decode()}"
    (copy2 / "cosigned" / "30-0").write_text(head + "\n\n" + "\n".join(lines) + "\n")
    report = verify_export(copy2, [], policy=_policy(vkey, witnesses, 1))
    assert not report.valid and report.tile == "cosigned/30-0" and "invalid signature" in report.reason


def test_audit_verify_says_which_witness_cosigned_which_checkpoint(
    exported: tuple[Path, str, str], tmp_path: Path, witnesses: list[Signer]
) -> None:
    dest, vkey, _ = exported
    policy = tmp_path / "policy"
    policy.write_text(_policy(vkey, witnesses, 140).format())
    done = run_cli("audit", "verify", str(dest), "--policy", str(policy))
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert "witness quorum: group witnesses needs 140 of 150, has 140: met" in out
    assert "checkpoint of size 30" in out and "checkpoint of size 10" in out
    policy.write_text(_policy(vkey, witnesses, 150).format())
    refused = run_cli("audit", "verify", str(dest), "--policy", str(policy))
    assert refused.returncode == 1 and "first 10 entries only" in refused.stdout.decode()
