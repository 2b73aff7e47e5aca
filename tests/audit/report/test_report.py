"""The auditor's evidence report over exports built here: counts checked against an independent
reading of the exports, tampered and forked exports reported where they break (exit 1), the PDF
read back (PDF/A-3b identification, attachments, tags) and rendered to PNG pages, byte-identical
reruns, a signed manifest, and sampled proofs that `audit verify-proof` accepts."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from audit import Log
from audit.entry import canonicalize
from audit.note import ALG_COSIGNATURE_V1, Signer, generate_key, note_text, signature_lines, write_key_pair
from audit.report.scan import entry_time
from audit.tiles import TILE_WIDTH, bundle_path
from sitewarden import witnessing
from tests.conftest import run_cli
from tests.system import require

SITE_A = "5d2f3c1e-1111-4a1a-9a1a-000000000001"
SITE_B = "5d2f3c1e-2222-4b2b-9b2b-000000000002"
ARTIFACTS_ENV = "SITEWARDEN_TEST_ARTIFACTS"
"""Where the PDF's pages (PNG) and the HTML go to be looked at: `$SITEWARDEN_TEST_ARTIFACTS/report/` when
set, else the test's temporary directory (a test never writes into the repository)."""
PURPOSES = ("fraud-detection", "credit-scoring", "marketing")
MODEL_DIGESTS = {"1.0.0": "a" * 64, "1.1.0": "b" * 64}


@dataclass
class Fleet:
    exports: dict[str, Path]
    policy: Path
    site_keys: dict[str, Signer]
    controller_key: Signer
    vkeys: dict[str, str]
    base: Path
    witnesses: dict[str, Signer]


def _stamp(day: int, second: int) -> str:
    hours, rest = divmod(second, 3600)
    return f"2026-05-{day:02d}T{hours:02d}:{rest // 60:02d}:{rest % 60:02d}.{second % 1000:03d}Z"


def _site_entries(site: str, rng: random.Random) -> list[dict[str, Any]]:
    """What an agent records over four days: activations, requests (allowed, denied, flagged for
    review, refused), a restart, an audit-write failure recorded on recovery, and a quiet stretch."""
    release = {"name": "fraud", "kind": "model", "runtime": "onnx", "approvers": ["alice"]}
    policy = {"central": {"name": "bank", "version": "1.0.0", "revision": "r1", "digest": "c" * 64}, "local": None}
    entries: list[dict[str, Any]] = []
    version = "1.0.0"
    for day in (1, 2, 4, 5):  # nothing on day 3: a gap of more than 24 hours
        if day == 1:
            entries.append(
                {
                    "time": _stamp(day, 5),
                    "type": "activation",
                    "reason": "desired state 1",
                    "release": {**release, "version": "1.0.0", "manifest_sha256": MODEL_DIGESTS["1.0.0"]},
                }
            )
        if day == 4:
            version = "1.1.0"
            entries.append(
                {
                    "time": _stamp(day, 10),
                    "type": "activation",
                    "reason": "desired state 2",
                    "release": {**release, "version": "1.1.0", "manifest_sha256": MODEL_DIGESTS["1.1.0"]},
                }
            )
            entries.append(
                {
                    "time": _stamp(day, 20),
                    "type": "release.refused",
                    "release": "fraud@9.9.9",
                    "reason": "no approval by a key this site trusts",
                }
            )
        if day == 5:
            entries.append(
                {
                    "time": _stamp(day, 30),
                    "type": "activation",
                    "reason": "restart",
                    "release": {**release, "version": version, "manifest_sha256": MODEL_DIGESTS[version]},
                }
            )
            entries.append(
                {
                    "time": _stamp(day, 40),
                    "type": "audit.write_failed",
                    "reason": "No space left on device",
                    "since": _stamp(day, 35),
                }
            )
        for i in range(120):
            purpose = PURPOSES[i % 3]
            deny = purpose == "marketing"
            review = not deny and rng.random() < 0.2
            refused = not deny and rng.random() < 0.05
            entry: dict[str, Any] = {
                "time": _stamp(day, 60 + i * 13),
                "site": site,
                "type": "inference",
                "caller": "teller",
                "purpose": purpose,
                "data_class": "confidential" if i % 2 else "internal",
                "model": {"name": "fraud", "version": version, "digest": MODEL_DIGESTS[version]},
                "input_digest": f"{rng.getrandbits(256):064x}",
                "trace_id": f"{rng.getrandbits(128):032x}",
            }
            if refused:
                entry.update(status=400, refusal="input amount: expected float32")
            else:
                entry.update(
                    status=403 if deny else 200,
                    policy=policy,
                    decision={
                        "allow": not deny,
                        "reasons": ["purpose marketing is not among the model's intended purposes"] if deny else [],
                        "obligations": {"human_review": True} if review else {},
                    },
                )
            entries.append(entry)
    return entries


def _controller_entries() -> list[dict[str, Any]]:
    def request(  # noqa: PLR0917
        time: str, actor: str, role: str, action: str, resource: dict[str, str], change: Any = None
    ) -> dict:
        entry = {
            "time": time,
            "type": "request",
            "actor": actor,
            "kind": "person",
            "role": role,
            "action": action,
            "resource": resource,
            "result": 201,
            "outcome": "ok",
        }
        if change is not None:
            entry["change"] = change
        return entry

    return [
        request(_stamp(1, 1), "root", "admin", "POST /api/v1/sites", {}, {"site": {"id": SITE_A, "name": "branch-a"}}),
        request(_stamp(1, 2), "root", "admin", "POST /api/v1/sites", {}, {"site": {"id": SITE_B, "name": "branch-b"}}),
        request(
            _stamp(1, 3),
            "alice",
            "approver",
            "POST /api/v1/releases/{name}/{version}/approvals",
            {"name": "fraud", "version": "1.0.0"},
            {"approver": "alice"},
        ),
        request(_stamp(1, 4), "olga", "operator", "POST /api/v1/rollouts", {}, {"rollout": {"name": "v1"}}),
        request(
            _stamp(4, 1),
            "alice",
            "approver",
            "POST /api/v1/releases/{name}/{version}/approvals",
            {"name": "fraud", "version": "1.1.0"},
            {"approver": "alice"},
        ),
        request(_stamp(4, 2), "olga", "operator", "POST /api/v1/rollouts", {}, {"rollout": {"name": "v2"}}),
        {
            "time": _stamp(4, 500),
            "type": "job.started",
            "job": {"id": "j1", "name": "fraud-ft"},
            "participants": [{"site": SITE_A, "site_name": "branch-a", "node_id": "1"}],
            "declined": {},
        },
        {
            "time": _stamp(4, 600),
            "type": "job.round",
            "job": {"id": "j1", "name": "fraud-ft"},
            "round": 1,
            "epsilon": 3.2,
        },
        {
            "time": _stamp(4, 700),
            "type": "job.finished",
            "job": {"id": "j1", "name": "fraud-ft"},
            "reason": "",
            "rounds": 1,
        },
    ]


def _log(path: Path, signer: Signer, entries: list[dict[str, Any]], cosigners: list[Signer], lag: int) -> Path:
    """The log of `entries`, with a checkpoint after each day's entries, cosigned `lag` seconds after
    its last entry by every cosigner (what the agent's witnessing loop does, day by day)."""
    with Log.open(path / "log", signer) as log:
        days = sorted({e["time"][:10] for e in entries})
        for day in days:
            batch = [e for e in entries if e["time"][:10] == day]
            log.append_many([canonicalize(e) for e in batch])
            log.checkpoint()
            stamp = int(entry_time(batch[-1]["time"]) or 0) + lag
            witnessed = 0
            for w in cosigners:
                sent = witnessing.submission(log, witnessed)
                lines = signature_lines(note_text(sent.checkpoint), w, timestamp=stamp)
                witnessing.store_cosignatures(log, sent, lines, w.vkey)
        return log.export(path / "export")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    base = tmp_path_factory.mktemp("fleet")
    rng = random.Random(7)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415

    site_keys = {s: Signer.from_ed25519(f"sitewarden/{s}", Ed25519PrivateKey.generate()) for s in (SITE_A, SITE_B)}
    site_witness = {
        s: Signer.from_ed25519(f"sitewarden/{s}", Ed25519PrivateKey.generate(), ALG_COSIGNATURE_V1)
        for s in (SITE_A, SITE_B)
    }
    controller_key = Signer(generate_key("sitewarden/controller/main")[0])
    controller_witness = Signer(generate_key("sitewarden/witness/main", ALG_COSIGNATURE_V1)[0])
    witnesses = {"controller": controller_witness, **site_witness}
    exports = {
        s: _log(base / s, site_keys[s], _site_entries(s, rng), [controller_witness], 60) for s in (SITE_A, SITE_B)
    }
    exports["controller"] = _log(
        base / "controller", controller_key, _controller_entries(), list(site_witness.values()), 5
    )
    policy = base / "auditor.policy"
    policy.write_text(
        "# the auditor trusts these logs and wants two witnesses of three\n"
        + "".join(f"log {k.vkey}\n" for k in (*site_keys.values(), controller_key))
        + f"witness controller {controller_witness.vkey}\n"
        + "".join(f"witness site-{i} {w.vkey}\n" for i, w in enumerate(site_witness.values()))
        + "group one-witness any controller site-0 site-1\nquorum one-witness\n"
    )
    vkeys = {s: site_keys[s].vkey for s in site_keys} | {"controller": controller_key.vkey}
    return Fleet(exports, policy, site_keys, controller_key, vkeys, base, witnesses)


def _report(fleet: Fleet, out: Path, *extra: str, exports: list[Path] | None = None) -> subprocess.CompletedProcess:
    given = exports if exports is not None else list(fleet.exports.values())
    return run_cli(
        "audit", "report", *map(str, given), "--policy", str(fleet.policy), "--out", str(out), *extra, timeout=300
    )


def _table(report: Path, name: str) -> list[dict[str, Any]]:
    doc = json.loads((report / "data" / f"{name}.json").read_text())
    assert doc["row_count"] == len(doc["rows"])
    return [dict(zip(doc["columns"], row, strict=True)) for row in doc["rows"]]


def _entries(export: Path) -> list[dict[str, Any]]:
    """Read an export's entries without the report's code: the tlog-tiles bundles, in order."""
    size = int(note_text((export / "checkpoint").read_text()).split("\n")[1])
    out = []
    for n in range((size + TILE_WIDTH - 1) // TILE_WIDTH):
        width = min(TILE_WIDTH, size - n * TILE_WIDTH)
        path = export / bundle_path(n, width)
        data = path.read_bytes() if path.exists() else (export / bundle_path(n)).read_bytes()
        pos = 0
        for _ in range(width):
            length = int.from_bytes(data[pos : pos + 2], "big")
            out.append(json.loads(data[pos + 2 : pos + 2 + length]))
            pos += 2 + length
    return out


@pytest.fixture(scope="module")
def report(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reports") / "report"
    done = _report(fleet, out, "--sample", "6", "--seed", "11", "--entry", f"{SITE_A}:3", "--retention-months", "6")
    assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
    assert b"all logs verified" in done.stdout
    return out


def test_every_count_equals_an_independent_count_of_the_entries(fleet: Fleet, report: Path) -> None:
    requests = [e for s in (SITE_A, SITE_B) for e in _entries(fleet.exports[s]) if e["type"] == "inference"]
    outcome = Counter(
        "denied" if e.get("decision", {}).get("allow") is False else "allowed" if e["status"] == 200 else "refused"
        for e in requests
    )
    assert {r["outcome"]: r["requests"] for r in _table(report, "activity_by_outcome")} == dict(outcome)
    by_purpose = Counter(
        (e["purpose"], "denied" if e["status"] == 403 else "allowed" if e["status"] == 200 else "refused")
        for e in requests
    )
    assert {(r["purpose"], r["outcome"]): r["requests"] for r in _table(report, "activity_by_purpose")} == by_purpose
    assert sum(r["requests"] for r in _table(report, "activity")) == len(requests)
    by_version = Counter((e["model"]["version"]) for e in requests)
    got = Counter()
    for r in _table(report, "activity_by_model"):
        got[r["version"]] += r["requests"]
    assert got == by_version
    # Human oversight: every flagged request, and the share per site and purpose.
    flagged = [e for e in requests if e.get("decision", {}).get("obligations", {}).get("human_review")]
    listed = _table(report, "human_review_requests")
    assert sorted(r["trace id"] for r in listed) == sorted(e["trace_id"] for e in flagged)
    share = {(r["site"], r["purpose"]): (r["decisions"], r["flagged"]) for r in _table(report, "human_review_share")}
    names = {SITE_A: "branch-a", SITE_B: "branch-b"}
    for site in (SITE_A, SITE_B):
        for purpose in PURPOSES:
            decided = [e for e in requests if e["site"] == site and e["purpose"] == purpose and "decision" in e]
            n = sum(1 for e in decided if e["decision"]["obligations"].get("human_review"))
            assert share[(names[site], purpose)] == (len(decided), n)
    denials = _table(report, "denial_reasons")
    assert denials[0]["denials"] == outcome["denied"]
    assert denials[0]["reason"] == "purpose marketing is not among the model's intended purposes"
    # Coverage: entries per day, the quiet day 3, the restart, the audit-write failure.
    for site in (SITE_A, SITE_B):
        days = Counter(e["time"][:10] for e in _entries(fleet.exports[site]))
        rows = {
            r["day"]: (r["entries"], r["checkpoints signed"], r["cosignatures"])
            for r in _table(report, "coverage_days")
            if r["log"].endswith(f"({site})")
        }
        assert rows == {day: (n, 1, 1) for day, n in days.items()}  # one checkpoint a day, cosigned that day
    lags = [r for r in _table(report, "coverage_witness_lag") if "branch" in r["log"]]
    # Cosigned 60 s after the second in which the day's last entry was made (entries carry milliseconds).
    assert {(r["witness"].split("+")[0], r["cosignatures"]) for r in lags} == {("sitewarden/witness/main", 4)}
    assert all(59 < r["max seconds"] <= 60 for r in lags)
    history = [r for r in _table(report, "integrity_checkpoint_history") if "branch-a" in r["log"]]
    assert [r["matches the entries"] for r in history] == ["yes"] * 4
    gaps = _table(report, "coverage_gaps")  # day 3 at both sites; the controller was quiet from day 1 to day 4
    assert sorted(r["log"][:8] for r in gaps) == ["branch-a", "branch-b", "siteward"]
    assert all(r["hours"] > 24 for r in gaps)
    assert len(_table(report, "coverage_restarts")) == 2
    assert {r["type"] for r in _table(report, "coverage_audit_failures")} == {"audit.write_failed"}


def test_configuration_timeline_and_approvals_follow_what_happened(report: Path) -> None:
    rows = [r for r in _table(report, "configuration_timeline") if r["site"].startswith("branch-a")]
    assert [(r["version"], r["until"][:10]) for r in rows] == [("1.0.0", "2026-05-04"), ("1.1.0", "still in f")]
    assert rows[0]["approvals (controller)"].startswith("alice at 2026-05-01")
    assert rows[1]["manifest sha256"] == MODEL_DIGESTS["1.1.0"]
    refused = _table(report, "configuration_refusals")
    assert {r["reason"] for r in refused} == {"no approval by a key this site trusts"}
    actions = [r["action"] for r in _table(report, "controller_actions")]
    assert actions.count("POST /api/v1/rollouts") == 2
    jobs = _table(report, "federated_jobs")
    assert [j["event"] for j in jobs] == ["job.started", "job.round", "job.finished"]
    assert jobs[0]["participants"] == "branch-a" and jobs[1]["epsilon"] == "3.2"


def test_integrity_names_each_witness_and_the_quorum(report: Path) -> None:
    logs = _table(report, "integrity_logs")
    assert len(logs) == 3 and {r["result"] for r in logs} == {"verified"}
    assert all("group one-witness needs 1 of 3" in r["quorum"] for r in logs)
    cosigned = {r["witness"].split("+")[0] for r in _table(report, "integrity_cosignatures")}
    assert cosigned == {"sitewarden/witness/main", f"sitewarden/{SITE_A}", f"sitewarden/{SITE_B}"}
    retention = _table(report, "retention")
    assert all(r["verdict"].startswith("met") for r in retention)
    mapping = {r["reference"] for r in _table(report, "mapping")}
    assert {
        "Annex A, A.6.2.6",
        "Annex A, A.6.2.8",
        "Annex A, A.7.5",
        "Art. 12(1), (2)",
        "Art. 19(1)",
        "Art. 26(6)",
    } <= mapping


def test_sampled_proofs_verify_with_audit_verify_proof(fleet: Fleet, report: Path) -> None:
    rows = _table(report, "sampled_proofs")
    assert len(rows) == 7 and sum(r["why"] == "named by the auditor" for r in rows) == 1
    for row in rows:
        key = next(
            v for k, v in fleet.vkeys.items() if k in row["log"] or (k == "controller" and "controller" in row["log"])
        )
        done = run_cli(
            "audit",
            "verify-proof",
            str(report / row["proof file"]),
            "--key",
            key,
            "--entry",
            str(report / row["entry file"]),
        )
        assert done.returncode == 0, done.stderr


def test_the_same_inputs_and_seed_give_the_same_bytes(fleet: Fleet, report: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    done = _report(fleet, again, "--sample", "6", "--seed", "11", "--entry", f"{SITE_A}:3", "--retention-months", "6")
    assert done.returncode == 0
    assert (again / "manifest.json").read_bytes() == (report / "manifest.json").read_bytes()
    for path in sorted((report / "data").iterdir()):
        assert (again / "data" / path.name).read_bytes() == path.read_bytes(), path.name
    manifest = json.loads((report / "manifest.json").read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    assert listed["data/activity.csv"]["rows"] == len(_table(report, "activity"))
    assert {"report.html", "report.pdf"} <= set(listed)


def test_the_pdf_is_pdfa3b_tagged_with_the_data_attached_and_reads_well(report: Path, tmp_path: Path) -> None:
    require("pdftoppm")
    import pikepdf  # noqa: PLC0415

    with pikepdf.open(report / "report.pdf") as pdf:
        meta = pdf.open_metadata()
        assert meta.pdfa_status == "3B"
        assert bool(pdf.Root.MarkInfo.Marked) and "/StructTreeRoot" in pdf.Root
        attached = set(pdf.attachments)
        pages = len(pdf.pages)
    assert {"activity.csv", "human_review_requests.json", "integrity_logs.csv"} <= attached
    pages_dir = Path(os.environ[ARTIFACTS_ENV]) / "report" if os.environ.get(ARTIFACTS_ENV) else tmp_path / "pages"
    shutil.rmtree(pages_dir, ignore_errors=True)
    pages_dir.mkdir(parents=True)
    subprocess.run(["pdftoppm", "-r", "50", "-png", str(report / "report.pdf"), str(pages_dir / "page")], check=True)
    assert len(list(pages_dir.glob("page-*.png"))) == pages
    assert all(p.stat().st_size > 0 for p in pages_dir.glob("page-*.png"))
    shutil.copy(report / "report.html", pages_dir / "report.html")


def test_a_signed_manifest_opens_with_the_signers_key(fleet: Fleet, tmp_path: Path) -> None:
    key_path, vkey = write_key_pair("auditor.example/reports", tmp_path, stem="auditor")
    out = tmp_path / "signed"
    assert _report(fleet, out, "--no-pdf", "--sign-key", str(key_path)).returncode == 0
    from audit.note import open_note  # noqa: PLC0415

    note = open_note((out / "manifest.json.note").read_text(), [vkey])
    assert note.text == (out / "manifest.json").read_text()


# -- tampering -------------------------------------------------------------------------------------------------------


def _copy(fleet: Fleet, tmp_path: Path, which: str) -> Path:
    dest = tmp_path / f"{which}-copy"
    shutil.copytree(fleet.exports[which], dest)
    return dest


def _run_tampered(fleet: Fleet, tmp_path: Path, which: str, tampered: Path) -> tuple[int, list[dict[str, Any]], str]:
    given = [tampered if k == which else v for k, v in fleet.exports.items()]
    out = tmp_path / "report"
    done = _report(fleet, out, "--no-pdf", exports=given)
    findings = _table(out, "integrity_findings") if out.exists() else []
    return done.returncode, findings, done.stdout.decode()


def test_a_flipped_entry_is_reported_at_that_entry(fleet: Fleet, tmp_path: Path) -> None:
    copy = _copy(fleet, tmp_path, SITE_A)
    bundle = copy / bundle_path(0)
    data = bytearray(bundle.read_bytes())
    data[data.index(b'"purpose":"credit-scoring"') + 12] ^= 0x01  # one byte of one entry
    bundle.write_bytes(bytes(data))
    code, findings, stdout = _run_tampered(fleet, tmp_path, SITE_A, copy)
    assert code == 1 and "INVALID" in stdout
    failure = next(f for f in findings if f["severity"] == "failure")
    assert failure["where"].startswith(f"{copy.name}: entry ") and "does not match the checkpoint" in failure["finding"]


def test_a_flipped_hash_tile_is_reported_at_that_tile(fleet: Fleet, tmp_path: Path) -> None:
    copy = _copy(fleet, tmp_path, SITE_B)
    tile = next(p for p in sorted((copy / "tile" / "0").rglob("*")) if p.is_file())
    data = bytearray(tile.read_bytes())
    data[5] ^= 0xFF
    tile.write_bytes(bytes(data))
    code, findings, _ = _run_tampered(fleet, tmp_path, SITE_B, copy)
    assert code == 1
    failure = next(f for f in findings if f["severity"] == "failure")
    assert "hash tile" in failure["finding"] and "tile/0/" in failure["where"] + failure["finding"]


def test_a_missing_cosignature_fails_the_quorum(fleet: Fleet, tmp_path: Path) -> None:
    copy = _copy(fleet, tmp_path, "controller")
    checkpoint = (copy / "checkpoint").read_text()
    text, _, sigs = checkpoint.partition("\n\n")
    kept = [line for line in sigs.splitlines() if line.startswith("\u2014 sitewarden/controller/")]
    (copy / "checkpoint").write_text(text + "\n\n" + "\n".join(kept) + "\n")
    code, findings, _ = _run_tampered(fleet, tmp_path, "controller", copy)
    assert code == 1
    failure = next(f for f in findings if f["severity"] == "failure")
    assert failure["where"].endswith("checkpoint") and "witness quorum not met" in failure["finding"]


def test_a_quorum_the_witnesses_do_not_meet_is_a_failure(fleet: Fleet, tmp_path: Path) -> None:
    strict = tmp_path / "strict.policy"
    strict.write_text(fleet.policy.read_text().replace("group one-witness any", "group one-witness all"))
    out = tmp_path / "report"
    done = run_cli(
        "audit", "report", *map(str, fleet.exports.values()), "--policy", str(strict), "--out", str(out), "--no-pdf"
    )
    assert done.returncode == 1
    failures = [f for f in _table(out, "integrity_findings") if f["severity"] == "failure"]
    assert len(failures) == 3 and all("needs 3 of 3, has" in f["finding"] for f in failures)


def test_two_exports_of_one_log_with_different_histories_are_a_fork(fleet: Fleet, tmp_path: Path) -> None:
    # The same site key signs a second history, cosigned by a witness that was fooled or whose key
    # was stolen: what an operator could hand an auditor instead of the real log.
    site = fleet.site_keys[SITE_A]
    forged = tmp_path / "forged"
    entries = [{"time": _stamp(1, 9), "type": "inference", "site": SITE_A, "purpose": "fraud-detection", "status": 200}]
    export = _log(forged, site, entries, [fleet.witnesses["controller"]], 60)
    given = [*fleet.exports.values(), export]
    out = tmp_path / "report"
    done = _report(fleet, out, "--no-pdf", exports=given)
    assert done.returncode == 1
    messages = [f["finding"] for f in _table(out, "integrity_findings") if f["severity"] == "failure"]
    assert any("the log forked" in m and "forked" in m for m in messages), messages


def test_unusable_input_exits_2_and_writes_nothing(fleet: Fleet, tmp_path: Path) -> None:
    out = tmp_path / "report"
    missing = run_cli("audit", "report", str(tmp_path / "nope"), "--policy", str(fleet.policy), "--out", str(out))
    assert missing.returncode == 2 and not out.exists()
    bad_entry = _report(fleet, out, "--entry", "nobody:1")
    assert bad_entry.returncode == 2 and b"no log given is called 'nobody'" in bad_entry.stderr and not out.exists()
    out.mkdir()
    (out / "old").write_text("keep me")
    again = _report(fleet, out)
    assert again.returncode == 2 and (out / "old").read_text() == "keep me"
    assert base64  # the module's imports stay used when a test is deselected


def test_a_checkpoint_the_log_signed_for_other_entries_is_a_fork_in_its_history(fleet: Fleet, tmp_path: Path) -> None:
    # The operator holding the site key signed a checkpoint over a rewritten history once; the
    # export's checkpoint history still carries it.
    other = _log(tmp_path / "rewritten", fleet.site_keys[SITE_B], [{"time": _stamp(1, 9), "type": "x"}], [], 0)
    copy = _copy(fleet, tmp_path, SITE_B)
    with (copy / "checkpoints.jsonl").open("a") as f:
        f.write(json.dumps({"note": (other / "checkpoint").read_text()}) + "\n")
    code, findings, _ = _run_tampered(fleet, tmp_path, SITE_B, copy)
    assert code == 1
    failure = next(f for f in findings if f["severity"] == "failure")
    assert failure["where"] == "checkpoint history, size 1" and failure["finding"].startswith("the log forked")
