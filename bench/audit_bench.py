"""Benchmark figures for the audit log in `audit/`: durable `Log.append` throughput with 1, 16 and 64 writer
threads (about 400-byte entries, a fresh log per run) next to a naive SQLite baseline doing the same work (one
INSERT per transaction, WAL, synchronous=FULL, one connection per thread); the build, export and timed
`verify_export` of a 1,000,000-entry log; and single-core SHA-256 throughput over that export's entry bundles as
the physical reference for verification speed. Everything runs on the disk of `--workdir` (by default a temporary
directory under `bench/.tmp`, removed afterwards), prints a table with the targets marked PASS or MISS, and ends
with one JSON line of the figures. Run it from the repository root with
`.venv/bin/python bench/audit_bench.py [--quick] [--workdir DIR]`; `--quick` shrinks every workload about tenfold.
Append figures are the median of three alternating rounds of each system.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import _common
from rich.console import Console
from rich.table import Table

import audit
from audit.note import generate_key

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = REPO / "bench" / ".tmp"
SEED = 20250601
ENTRY_SIZE = 400
THREAD_COUNTS = (1, 16, 64)
BUILD_BATCH = 10_000
HASH_REPEATS = 3
APPEND_ROUNDS = 3
KEY_NAME = "sitewarden-bench"

TARGET_APPENDS_64 = 20_000
TARGET_RATIO_64 = 5.0
TARGET_VERIFY_S = 5.0

EVENTS = ("policy.allow", "policy.deny", "model.query", "model.answer", "data.read", "key.rotate")

stderr = Console(stderr=True, log_path=False)


@dataclass(frozen=True)
class Workload:
    """How many entries each measurement uses."""

    appends: dict[int, int]  # writer threads -> total appends, Sitewarden and SQLite alike
    verify_entries: int


FULL = Workload(appends={1: 10_000, 16: 50_000, 64: 60_000}, verify_entries=1_000_000)
QUICK = Workload(appends={1: 1_000, 16: 5_000, 64: 6_000}, verify_entries=100_000)


@dataclass
class Figures:
    """Everything measured; `summary()` is the JSON line."""

    appends_per_s: dict[int, float]
    sqlite_appends_per_s: dict[int, float]
    build_s: float
    export_s: float
    verify_entries: int
    verify_s: float
    bundle_bytes: int
    bundle_count: int
    sha256_s: float
    leaf_hash_s: float

    def ratio(self, threads: int) -> float:
        """Sitewarden appends/s over SQLite's, with `threads` writers."""
        return self.appends_per_s[threads] / self.sqlite_appends_per_s[threads]

    @property
    def sha256_mb_per_s(self) -> float:
        return self.bundle_bytes / 1e6 / self.sha256_s

    def summary(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {}
        for threads in THREAD_COUNTS:
            out[f"appends_per_s_{threads}"] = round(self.appends_per_s[threads], 1)
        for threads in THREAD_COUNTS:
            out[f"sqlite_appends_per_s_{threads}"] = round(self.sqlite_appends_per_s[threads], 1)
        for threads in THREAD_COUNTS:
            out[f"ratio_{threads}"] = round(self.ratio(threads), 2)
        out |= {
            "verify_1m_s": round(self.verify_s, 3),
            "verify_entries": self.verify_entries,
            "verify_entries_per_s": round(self.verify_entries / self.verify_s, 1),
            "sha256_mb_per_s": round(self.sha256_mb_per_s, 1),
            "sha256_bundles_s": round(self.sha256_s, 3),
            "leaf_hash_s": round(self.leaf_hash_s, 3),
            "build_s": round(self.build_s, 3),
            "export_s": round(self.export_s, 3),
        }
        return out


# -- workload ----------------------------------------------------------------------------------------------------


def make_entry(seq: int, rng: random.Random) -> bytes:
    """An entry of exactly ENTRY_SIZE bytes that looks like a canonical-JSON audit record (sorted keys, no spaces)."""
    head = f'{{"actor":"agent-{rng.randrange(100):02d}","detail":"'
    tail = f'","event":"{rng.choice(EVENTS)}","seq":{seq},"ts":"2025-06-01T12:00:00.{rng.randrange(10**6):06d}Z"}}'
    pad = ENTRY_SIZE - len(head) - len(tail)
    return (head + rng.randbytes(pad // 2 + 1).hex()[:pad] + tail).encode()


def make_entries(count: int, rng: random.Random, first: int = 0) -> list[bytes]:
    return [make_entry(seq, rng) for seq in range(first, first + count)]


def split(entries: Sequence[bytes], parts: int) -> list[Sequence[bytes]]:
    """Deal `entries` round-robin into `parts` lists of (nearly) equal length."""
    return [entries[i::parts] for i in range(parts)]


def timed_threads(jobs: Sequence[Callable[[], object]]) -> float:
    """Run each job on its own thread, all released together; wall-clock seconds until the last one finishes."""
    barrier = threading.Barrier(len(jobs) + 1)
    errors: list[BaseException] = []

    def run(job: Callable[[], object]) -> None:
        barrier.wait()
        try:
            job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


# -- durable appends ---------------------------------------------------------------------------------------------


def append_each(log: audit.Log, entries: Sequence[bytes]) -> None:
    for entry in entries:
        log.append(entry)


def sitewarden_appends_per_s(workdir: Path, skey: str, entries: Sequence[bytes], threads: int) -> float:
    """Durable appends/s of `threads` writers each calling `Log.append` in a loop, on a fresh log."""
    log = audit.Log.open(tempfile.mkdtemp(dir=workdir, prefix=f"log-{threads}-"), skey)
    try:
        elapsed = timed_threads([partial(append_each, log, chunk) for chunk in split(entries, threads)])
        assert log.size == len(entries), f"log holds {log.size} entries, appended {len(entries)}"
    finally:
        log.close()
    return len(entries) / elapsed


def open_sqlite(path: Path) -> sqlite3.Connection:
    """A connection as a naive service would open it: autocommit, WAL, synchronous=FULL."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=60)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def insert_each(conn: sqlite3.Connection, entries: Sequence[bytes]) -> None:
    for entry in entries:
        conn.execute("INSERT INTO entries(body) VALUES (?)", (entry,))


def sqlite_appends_per_s(workdir: Path, entries: Sequence[bytes], threads: int) -> float:
    """Rows/s of `threads` writers, one connection each, one INSERT per transaction, on a fresh database."""
    path = Path(tempfile.mkdtemp(dir=workdir, prefix=f"sqlite-{threads}-")) / "audit.db"
    conns = [open_sqlite(path) for _ in range(threads)]
    try:
        conns[0].execute("CREATE TABLE entries(id INTEGER PRIMARY KEY, body BLOB)")
        chunks = split(entries, threads)
        elapsed = timed_threads([partial(insert_each, conn, chunk) for conn, chunk in zip(conns, chunks, strict=True)])
        (rows,) = conns[0].execute("SELECT count(*) FROM entries").fetchone()
        assert rows == len(entries), f"table holds {rows} rows, inserted {len(entries)}"
    finally:
        for conn in conns:
            conn.close()
    return len(entries) / elapsed


# -- export verification -----------------------------------------------------------------------------------------


def build_log(path: Path, skey: str, count: int, rng: random.Random) -> float:
    """Fill a new log with `count` entries by `append_many` in batches of BUILD_BATCH; seconds taken."""
    start = time.perf_counter()
    with audit.Log.open(path, skey) as log:
        for first in range(0, count, BUILD_BATCH):
            log.append_many(make_entries(min(BUILD_BATCH, count - first), rng, first))
        log.checkpoint()
    return time.perf_counter() - start


def export_log(path: Path, skey: str, dest: Path) -> float:
    """Export the log's last checkpoint into `dest`; seconds taken."""
    start = time.perf_counter()
    with audit.Log.open(path, skey) as log:
        log.export(dest)
    return time.perf_counter() - start


def verify_seconds(export_dir: Path, vkey: str, count: int) -> float:
    """Seconds `verify_export` takes; exits non-zero if the export does not verify.

    Called with no other thread alive, as a command-line auditor would, so the library may hash in worker processes.
    """
    start = time.perf_counter()
    report = audit.verify_export(export_dir, [vkey])
    elapsed = time.perf_counter() - start
    if not report.valid or report.size != count:
        sys.exit(f"verification failed: valid={report.valid} size={report.size} reason={report.reason!r}")
    return elapsed


def read_bundles(export_dir: Path) -> list[bytes]:
    """The bytes of every entry bundle of an export (`tile/entries/...`), in path order."""
    paths = sorted(p for p in (export_dir / "tile" / "entries").rglob("*") if p.is_file())
    return [p.read_bytes() for p in paths]


def hash_bundles(bundles: Sequence[bytes]) -> None:
    """One SHA-256 over each bundle's bytes."""
    for bundle in bundles:
        hashlib.sha256(bundle).digest()


def hash_leaves(bundles: Sequence[bytes]) -> None:
    """The RFC 9162 leaf hash, SHA-256(0x00 || entry), of every entry in the bundles."""
    sha256 = hashlib.sha256
    for bundle in bundles:
        pos = 0
        while pos < len(bundle):
            end = pos + 2 + int.from_bytes(bundle[pos : pos + 2], "big")
            sha256(b"\x00" + bundle[pos + 2 : end]).digest()
            pos = end


def best_seconds(work: Callable[[], object], repeats: int = HASH_REPEATS) -> float:
    """The fastest of `repeats` wall-clock timings of `work()`."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


# -- running -----------------------------------------------------------------------------------------------------


def measure(workdir: Path, workload: Workload) -> Figures:
    rng = random.Random(SEED)
    skey, vkey = generate_key(KEY_NAME)
    appends: dict[int, float] = {}
    sqlite: dict[int, float] = {}
    for threads in THREAD_COUNTS:
        entries = make_entries(workload.appends[threads], rng)
        ours, theirs = [], []
        for round_ in range(APPEND_ROUNDS):
            stderr.log(f"{len(entries):,} durable appends, {writers(threads)}, round {round_ + 1}: Sitewarden, SQLite")
            ours.append(sitewarden_appends_per_s(workdir, skey, entries, threads))
            theirs.append(sqlite_appends_per_s(workdir, entries, threads))
        # This machine's disk and scheduler are noisy: the median of alternating rounds.
        appends[threads] = statistics.median(ours)
        sqlite[threads] = statistics.median(theirs)

    count = workload.verify_entries
    log_dir = workdir / "verify-log"
    export_dir = workdir / "verify-export"
    stderr.log(f"building a {count:,}-entry log")
    build_s = build_log(log_dir, skey, count, rng)
    stderr.log("exporting it")
    export_s = export_log(log_dir, skey, export_dir)
    stderr.log("verifying the export")
    verify_s = verify_seconds(export_dir, vkey, count)
    stderr.log("hashing the entry bundles")
    bundles = read_bundles(export_dir)
    return Figures(
        appends_per_s=appends,
        sqlite_appends_per_s=sqlite,
        build_s=build_s,
        export_s=export_s,
        verify_entries=count,
        verify_s=verify_s,
        bundle_bytes=sum(map(len, bundles)),
        bundle_count=len(bundles),
        sha256_s=best_seconds(partial(hash_bundles, bundles)),
        leaf_hash_s=best_seconds(partial(hash_leaves, bundles)),
    )


def filesystem_of(path: Path) -> str:
    """'<device> <type>' of the mount holding `path`, from /proc/mounts (or 'unknown')."""
    best = ("", "unknown")
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best[1]
    resolved = str(path.resolve())
    for line in mounts:
        device, mount_point, fs_type = line.split()[:3]
        inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best[0]):
            best = (mount_point, f"{device} {fs_type}")
    return best[1]


def status(ok: bool) -> str:
    return "[green]PASS[/]" if ok else "[red]MISS[/]"


def writers(threads: int) -> str:
    return f"{threads} writer{'s' if threads > 1 else ''}"


def render(figures: Figures, workload: Workload, disk: str) -> Table:
    table = Table(title=f"Sitewarden audit log ({os.cpu_count()} cores, {disk})")
    table.add_column("Measure")
    table.add_column("Value", justify="right")
    table.add_column("Target", justify="right")
    table.add_column("", justify="center")

    for threads in THREAD_COUNTS:
        rate = figures.appends_per_s[threads]
        target = (f"≥ {TARGET_APPENDS_64:,}/s", status(rate >= TARGET_APPENDS_64)) if threads == 64 else ()
        table.add_row(f"Sitewarden appends, {writers(threads)}", f"{rate:,.0f}/s", *target)
    table.add_section()
    for threads in THREAD_COUNTS:
        rate = figures.sqlite_appends_per_s[threads]
        table.add_row(f"SQLite appends, {writers(threads)}", f"{rate:,.0f}/s")
    table.add_section()
    for threads in THREAD_COUNTS:
        ratio = figures.ratio(threads)
        target = (f"≥ {TARGET_RATIO_64:g}x", status(ratio >= TARGET_RATIO_64)) if threads == 64 else ()
        table.add_row(f"Sitewarden / SQLite, {writers(threads)}", f"{ratio:.1f}x", *target)
    table.add_section()

    n = figures.verify_entries
    verify_target = TARGET_VERIFY_S * n / FULL.verify_entries  # scaled down with --quick
    table.add_row(f"Build log of {n:,} entries", f"{figures.build_s:.2f} s")
    table.add_row("Checkpoint and export", f"{figures.export_s:.2f} s")
    table.add_row(
        "verify_export",
        f"{figures.verify_s:.2f} s",
        f"≤ {verify_target:g} s",
        status(figures.verify_s <= verify_target),
    )
    table.add_row("Verified entries", f"{n / figures.verify_s:,.0f}/s")
    table.add_section()
    table.add_row(f"Entry bundles ({figures.bundle_count:,} files)", f"{figures.bundle_bytes / 1e6:,.1f} MB")
    table.add_row("SHA-256 over each bundle, 1 core", f"{figures.sha256_mb_per_s:,.0f} MB/s")
    table.add_row("  time to hash the bundle bytes", f"{figures.sha256_s:.2f} s")
    table.add_row("  verify_export / that time", f"{figures.verify_s / figures.sha256_s:.1f}x")
    table.add_row("Leaf hash of each entry, 1 core", f"{figures.leaf_hash_s:.2f} s")
    table.caption = (
        f"Appends per run: {', '.join(f'{workload.appends[t]:,} ({writers(t)})' for t in THREAD_COUNTS)}, "
        f"median of {APPEND_ROUNDS} rounds; "
        f"build by append_many in batches of {BUILD_BATCH:,}."
    )
    return table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return _common.parse_args(
        __doc__,
        argv,
        quick="shrink every workload about tenfold",
        workdir_help="directory (on the disk to measure) for the temporary logs and databases",
        default=DEFAULT_WORKDIR,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workload = QUICK if args.quick else FULL
    with _common.scratch_dir(args.workdir, "audit-bench-") as run_dir:
        disk = filesystem_of(args.workdir)
        figures = measure(run_dir, workload)
    Console().print(render(figures, workload, disk))
    print(json.dumps(figures.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
