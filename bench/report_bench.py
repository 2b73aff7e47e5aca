"""Benchmark of the auditor's evidence report (`sitewarden audit report`) on a 1,000,000-entry site log of
realistic inference entries (about 750 bytes of canonical JSON each: caller, purpose, data class, model and
policy with digests, decision with reasons and obligations, HMAC digests, trace id; one in twenty denied, one in
ten flagged for human review; a checkpoint every 1,000 entries, each cosigned by the controller's witness).

It measures, in one run on the same export: `verify_export` (what `sitewarden audit verify` runs) as the baseline;
the report without its PDF (verification, the one-pass tally, every section, data files, sampled proofs); the
PDF alone; the report process's peak resident memory, its worker processes included (sampled every 20 ms); and,
as the physical floor, one core's SHA-256 leaf hashing of every entry. Verification and the report run
alternately, three times each; the table shows medians. Run it from the repository root with
`.venv/bin/python bench/report_bench.py [--quick] [--workdir DIR]`; `--quick` uses 100,000 entries.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import _common
import psutil
from rich.console import Console
from rich.table import Table

from audit import Log, verify_export
from audit.entry import canonicalize
from audit.note import ALG_COSIGNATURE_V1, Signer, generate_key, note_text, signature_lines
from audit.tiles import TILE_WIDTH, bundle_path
from sitewarden import witnessing

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = REPO / "bench" / ".tmp"
SEED = 20261206
SITE = "3f0c2a9e-5b1d-4c7e-9a2f-6d8b1e4c0a57"
CHECKPOINT_EVERY = 1_000
ROUNDS = 3
TARGET_VERIFY_S = 1.5
TARGET_RATIO = 2.5
TARGET_RSS_MB = 1_024

stderr = Console(stderr=True, log_path=False)


@dataclass
class Figures:
    entries: int
    bundle_bytes: int
    verify_runs: list[float]
    report_runs: list[float]
    pdf_s: float
    peak_rss_mb: float
    leaf_hash_s: float
    build_s: float

    @property
    def verify_s(self) -> float:
        return statistics.median(self.verify_runs)

    @property
    def report_s(self) -> float:
        return statistics.median(self.report_runs)

    def summary(self) -> dict[str, float | int]:
        return {
            "verify_1m_s": round(self.verify_s, 3),
            "report_1m_s": round(self.report_s, 3),
            "report_ratio": round(self.report_s / self.verify_s, 2),
            "pdf_s": round(self.pdf_s, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "leaf_hash_1core_s": round(self.leaf_hash_s, 3),
            "entries": self.entries,
            "bundle_mb": round(self.bundle_bytes / 1e6, 1),
            "verify_runs_s": [round(v, 3) for v in self.verify_runs],
            "report_runs_s": [round(v, 3) for v in self.report_runs],
        }


def _entries(count: int, rng: random.Random) -> list[bytes]:
    """Realistic site entries: mostly inference requests, an activation now and then."""
    start = 1_777_593_600  # 2026-05-01
    central = {"name": "bank", "version": "1.2.0", "revision": "bank-1.2.0", "digest": f"{rng.getrandbits(256):064x}"}
    model_digest = {v: f"{rng.getrandbits(256):064x}" for v in ("1.0.0", "1.1.0")}
    out = []
    for i in range(count):
        t = start + i * 16 + rng.random() * 8
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"
        version = "1.0.0" if i < count // 2 else "1.1.0"
        if i % 50_000 == 0:
            event = {
                "time": stamp,
                "site": SITE,
                "type": "activation",
                "reason": "desired state",
                "release": {
                    "name": "fraud",
                    "version": version,
                    "kind": "model",
                    "runtime": "onnx",
                    "manifest_sha256": model_digest[version],
                    "approvers": ["alice"],
                },
            }
        else:
            purpose = rng.choice(("fraud-detection", "credit-scoring", "aml-screening"))
            allow = rng.random() > 0.05
            event = {
                "time": stamp,
                "site": SITE,
                "type": "inference",
                "caller": rng.choice(("teller-app", "loans-app", "kyc-batch")),
                "purpose": purpose,
                "data_class": rng.choice(("confidential", "internal")),
                "model": {"name": "fraud", "version": version, "digest": model_digest[version]},
                "input_digest": f"{rng.getrandbits(256):064x}",
                "trace_id": f"{rng.getrandbits(128):032x}",
                "request_id": f"{rng.getrandbits(64):016x}",
                "policy": {"central": central, "local": None},
                "decision": {
                    "allow": allow,
                    "reasons": [] if allow else [f"purpose {purpose} needs data class internal"],
                    "obligations": {"human_review": True} if rng.random() < 0.1 else {"max_batch": 64},
                },
                "status": 200 if allow else 403,
                "latency_ms": round(rng.random() * 3, 3),
            }
            if allow:
                event["output_digest"] = f"{rng.getrandbits(256):064x}"
        out.append(canonicalize(event))
    return out


def build(workdir: Path, count: int) -> tuple[Path, Path, int]:
    """The site's log with its witnessed checkpoints, exported; returns (export, policy file, bundle bytes)."""
    rng = random.Random(SEED)
    site_key = Signer(generate_key(f"sitewarden/{SITE}")[0])
    witness = Signer(generate_key("sitewarden/witness/main", ALG_COSIGNATURE_V1)[0])
    entries = _entries(count, rng)
    with Log.open(workdir / "log", site_key) as log:
        witnessed = 0
        for first in range(0, count, CHECKPOINT_EVERY):
            log.append_many(entries[first : first + CHECKPOINT_EVERY])
            log.checkpoint()
            sent = witnessing.submission(log, witnessed)
            last_time = json.loads(entries[min(first + CHECKPOINT_EVERY, count) - 1])["time"]
            stamp = int(time.mktime(time.strptime(last_time[:19], "%Y-%m-%dT%H:%M:%S"))) + 5
            witnessing.store_cosignatures(
                log, sent, signature_lines(note_text(sent.checkpoint), witness, timestamp=stamp), witness.vkey
            )
            witnessed = sent.size
        export = log.export(workdir / "export")
    policy = workdir / "auditor.policy"
    policy.write_text(f"log {site_key.vkey}\nwitness controller {witness.vkey}\nquorum controller\n")
    return export, policy, sum(len(e) for e in entries) + 2 * count


def leaf_hash_seconds(export: Path, count: int) -> float:
    """One core's RFC 9162 leaf hashing of every entry (the floor of verification)."""
    bundles = []
    for n in range((count + TILE_WIDTH - 1) // TILE_WIDTH):
        width = min(TILE_WIDTH, count - n * TILE_WIDTH)
        path = export / bundle_path(n, width)
        bundles.append(path.read_bytes() if path.exists() else (export / bundle_path(n)).read_bytes())
    sha = hashlib.sha256
    started = time.perf_counter()
    for data in bundles:
        pos = 0
        while pos < len(data):
            end = pos + 2 + (data[pos] << 8 | data[pos + 1])
            sha(b"\x00" + data[pos + 2 : end]).digest()
            pos = end
    return time.perf_counter() - started


def _report_cmd(export: Path, policy: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sitewarden",
        "audit",
        "report",
        str(export),
        "--policy",
        str(policy),
        "--out",
        str(out),
        "--sample",
        "20",
        "--seed",
        "1",
        *extra,
    ]


def timed_report(export: Path, policy: Path, out: Path) -> tuple[float, float]:
    """Seconds of the report without PDF, in-process as the command runs it, and the peak RSS (MB) of a
    separate run of the command with its workers (sampled)."""
    from audit.policy import parse  # noqa: PLC0415
    from audit.report import ReportOptions, make_report  # noqa: PLC0415

    options = ReportOptions(
        exports=[export],
        policy=parse(policy.read_bytes()),
        policy_text=policy.read_bytes(),
        out=out,
        sample=20,
        seed=1,
        pdf=False,
        command="bench",
        tool_version="bench",
    )
    started = time.perf_counter()
    outcome = make_report(options)
    elapsed = time.perf_counter() - started
    if not outcome.verified:
        sys.exit(f"the report did not verify the export: {outcome.findings[:1]}")
    return elapsed, 0.0


def peak_rss(cmd: list[str]) -> float:
    """Peak resident memory (MB) of a command and its children together, sampled every 20 ms."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    root = psutil.Process(proc.pid)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                total = root.memory_info().rss + sum(c.memory_info().rss for c in root.children(recursive=True))
                peak = max(peak, total)
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"report command failed ({proc.returncode}): {err.decode()[-2000:]}")
    return peak / 1e6


def pdf_seconds(report_dir: Path) -> float:
    """Rendering the report's PDF from its HTML with the data files attached."""
    from audit.report import render  # noqa: PLC0415

    page = (report_dir / "report.html").read_text()
    attachments = [(p.name, p.read_bytes()) for p in sorted((report_dir / "data").iterdir())]
    started = time.perf_counter()
    render.pdf(page, attachments, when="2026-11-01T00:00:00Z", dest=report_dir / "bench.pdf")
    return time.perf_counter() - started


def measure(workdir: Path, count: int) -> Figures:
    stderr.log(f"building a {count:,}-entry site log with a witnessed checkpoint every {CHECKPOINT_EVERY:,} entries")
    started = time.perf_counter()
    export, policy, bundle_bytes = build(workdir, count)
    build_s = time.perf_counter() - started
    verify_runs, report_runs = [], []
    vkey = policy.read_text().split()[1]
    for round_ in range(ROUNDS):
        stderr.log(f"round {round_ + 1}: verify_export, then the report without its PDF")
        started = time.perf_counter()
        result = verify_export(export, [vkey])
        verify_runs.append(time.perf_counter() - started)
        if not result.valid:
            sys.exit(f"verification failed: {result.reason}")
        out = workdir / f"report-{round_}"
        report_runs.append(timed_report(export, policy, out)[0])
    stderr.log("the report command's peak memory, workers included")
    rss = peak_rss(_report_cmd(export, policy, workdir / "report-rss", "--no-pdf"))
    stderr.log("rendering the PDF")
    pdf_s = pdf_seconds(workdir / "report-0")
    stderr.log("one core's leaf hashing")
    leaf = min(leaf_hash_seconds(export, count) for _ in range(2))
    return Figures(count, bundle_bytes, verify_runs, report_runs, pdf_s, rss, leaf, build_s)


def _status(ok: bool) -> str:
    return "[green]PASS[/]" if ok else "[red]MISS[/]"


def render_table(f: Figures) -> Table:
    table = Table(
        title=f"Auditor's report on a {f.entries:,}-entry site log ({f.bundle_bytes / 1e6:,.0f} MB of entries)"
    )
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_column("runs", justify="right")
    table.add_column("target", justify="right")
    table.add_column("", justify="center")
    scale = f.entries / 1_000_000
    runs = ", ".join(f"{v:.2f}" for v in f.verify_runs)
    table.add_row(
        "verify_export (audit verify)",
        f"{f.verify_s:.2f} s",
        runs,
        f"≤ {TARGET_VERIFY_S * scale:g} s",
        _status(f.verify_s <= TARGET_VERIFY_S * scale),
    )
    table.add_row("  one core's leaf hashing (floor)", f"{f.leaf_hash_s:.2f} s")
    runs = ", ".join(f"{v:.2f}" for v in f.report_runs)
    table.add_row("report without PDF", f"{f.report_s:.2f} s", runs)
    ratio = f.report_s / f.verify_s
    table.add_row("report / verify", f"{ratio:.2f}x", "", f"≤ {TARGET_RATIO:g}x", _status(ratio <= TARGET_RATIO))
    table.add_row("PDF (PDF/A-3b, data attached)", f"{f.pdf_s:.2f} s")
    table.add_row(
        "peak RSS, report with workers",
        f"{f.peak_rss_mb:,.0f} MB",
        "",
        f"≤ {TARGET_RSS_MB:,} MB",
        _status(f.peak_rss_mb <= TARGET_RSS_MB),
    )
    table.caption = (
        f"Medians of {ROUNDS} alternating runs on the same export; {psutil.cpu_count()} cores, "
        f"load average {psutil.getloadavg()[0]:.1f} at the end; build took {f.build_s:.0f} s."
    )
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = _common.parse_args(
        __doc__,
        argv,
        quick="100,000 entries instead of 1,000,000",
        workdir_help="directory for the log, export and reports",
        default=DEFAULT_WORKDIR,
    )
    count = 100_000 if args.quick else 1_000_000
    with _common.scratch_dir(args.workdir, "report-bench-") as run_dir:
        figures = measure(run_dir, count)
    Console().print(render_table(figures))
    print(json.dumps(figures.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
