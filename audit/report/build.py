"""Making the report: verify and scan every log, build the sections, draw the sampled proofs, and
write the report directory atomically (nothing appears at `--out` until every file is written).

The workflow:

1. Open every export and group the exports by the log they come from (the checkpoint's origin).
2. Verify each log against the witness policy (signatures, quorum, every entry and tile), scanning
   its entries once for the tallies; check the other exports of a log against the scanned one.
3. Build the sections from the verified logs (`audit.report.sections`).
4. Draw the sampled entries with the seed, and write each with its tlog-proof.
5. Write `data/`, `proofs/`, `report.html`, `report.pdf` and `manifest.json` (signed when asked).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit import merkle
from audit.errors import FormatError
from audit.export import Source
from audit.note import Signer, sign
from audit.policy import Policy
from audit.proof import TlogProof
from audit.report import datafiles, render, sections
from audit.report.inputs import (
    ExportInput,
    ExportSource,
    Finding,
    LogResult,
    hash_exports,
    kind_of,
    load,
    log_origin,
    read_entry,
    verify_logs,
)
from audit.report.scan import Period, RowFormat

REPORT_FORMAT = "sitewarden-audit-report/1"
_DEFAULT_SAMPLE = 20


@dataclass(frozen=True)
class EntryRef:
    """An entry the auditor names: `LOG:INDEX`, LOG an origin, a site id or name, or an export's file name."""

    log: str
    index: int

    @classmethod
    def parse(cls, text: str) -> EntryRef:
        log, sep, index = text.rpartition(":")
        if not sep or not log or not index.isdigit():
            raise FormatError(f"--entry {text!r}: want LOG:INDEX, e.g. sitewarden/<site-id>:42")
        return cls(log, int(index))


@dataclass(frozen=True)
class ReportOptions:
    exports: Sequence[Path]
    policy: Policy
    policy_text: bytes
    out: Path
    period_from: str | None = None
    period_to: str | None = None
    sample: int = _DEFAULT_SAMPLE
    seed: int = 0
    retention_months: int = 6
    gap_hours: float = 24.0
    entries: Sequence[EntryRef] = ()
    sign_key: Signer | None = None
    pdf: bool = True
    command: str = ""
    tool_version: str = ""


@dataclass
class Outcome:
    """What `make_report` did: the report directory, whether every log verified, the findings."""

    out: Path
    verified: bool
    findings: list[Finding] = field(default_factory=list)
    files: int = 0


def make_report(options: ReportOptions) -> Outcome:
    """Verify the exports and write the report to `options.out`.

    Raises FormatError for unusable input (an export that cannot be read, a malformed entry
    reference, an output directory that exists): exit code 2. Verification failures are not
    exceptions: they are the report's first finding, and `Outcome.verified` is False.
    """
    if options.out.exists() and (not options.out.is_dir() or any(options.out.iterdir())):
        raise FormatError(f"--out {options.out} exists and is not empty; refusing to overwrite a report")
    if options.sample < 0:
        raise FormatError("--sample must be 0 or more")
    opened = load(options.exports)
    period = Period(options.period_from, options.period_to)
    logs, names = _verify(opened, options.policy, period=period, gap_s=options.gap_hours * 3600)
    policy_digest = hashlib.sha256(options.policy_text).hexdigest()
    opts = sections.Options(
        period_from=options.period_from,
        period_to=options.period_to,
        gap_hours=options.gap_hours,
        retention_months=options.retention_months,
        sample=options.sample,
        seed=options.seed,
        tool_version=options.tool_version,
        command=options.command,
        policy_sha256=policy_digest,
        policy_summary=_summary(options.policy),
    )
    proof_rows, proof_files = _sample(logs, options, names)
    built = [
        sections.scope(logs, opts, names),
        sections.integrity(logs, names),
        sections.coverage(logs, opts, names),
        sections.activity(logs, names),
        sections.oversight(logs, names),
        sections.configuration(logs, opts, names),
        sections.retention(logs, opts, names),
        sections.proofs_section(proof_rows, opts),
    ]
    built.append(sections.mapping_section(built))
    findings = [f for log in logs for f in log.findings]
    failures = [f for f in findings if f.severity == "failure"]
    verified = not failures and all(log.verified for log in logs)
    latest = (
        max((log.scanned.tally.max_time or "" for log in logs if log.scanned), default="") or "1970-01-01T00:00:00Z"
    )
    verdict = built[1].facts[0][1]
    files = _render(built, options, proof_files, verified=verified, verdict=verdict, latest=latest, logs=logs)
    _write_atomically(options.out, files)
    return Outcome(options.out, verified, findings, len(files))


def _verify(
    opened: Sequence[tuple[ExportInput, Source]], policy: Policy, *, period: Period, gap_s: float
) -> tuple[list[LogResult], dict[str, str]]:
    """Verify and scan every log (`verify_logs`): the controller's first, for the site names it gives,
    so that the other logs' scans can write the oversight table's rows as they go (the table is
    sorted by log label, then entry, so this needs every log's label to be its own). Returns the
    logs in origin order and the site names."""
    controller = [m for m in opened if kind_of(log_origin(m[0])) == "controller"]
    others = [m for m in opened if kind_of(log_origin(m[0])) != "controller"]
    hashed: list[bool] = []

    def hash_inputs() -> None:  # once, while the first parallel scan runs (or after the last scan)
        if not hashed:
            hashed.append(True)
            hash_exports(opened)

    logs = verify_logs(controller, policy, period=period, gap_s=gap_s, meanwhile=hash_inputs)
    names = sections.site_names(logs)
    labels = [sections.origin_label(origin, names) for origin in {log_origin(e) for e, _ in others}]
    written = len(labels) == len(set(labels))
    logs += verify_logs(
        others,
        policy,
        period=period,
        gap_s=gap_s,
        rows=lambda log: RowFormat(sections._label(log, names), names) if written else None,
        meanwhile=hash_inputs,
    )
    hash_inputs()
    for _, src in opened:  # the hash tiles kept when hashing that no check has read (nothing should need them)
        if isinstance(src, ExportSource):
            src.kept.clear()
    logs.sort(key=lambda log: log.origin)
    return logs, names


def _summary(policy: Policy) -> str:
    logs = f"{len(policy.logs)} trusted log key{'s' if len(policy.logs) != 1 else ''}"
    witnesses = f"{len(policy.witnesses)} witness{'es' if len(policy.witnesses) != 1 else ''}"
    return f"{logs}, {witnesses}, quorum {policy.quorum}"


def _slug(log: LogResult) -> str:
    if log.site_id is not None:
        return f"site-{log.site_id}"
    return log.origin.replace("/", "-").strip("-")


def _matches(ref: EntryRef, log: LogResult, names: dict[str, str]) -> bool:
    candidates = {log.origin, _slug(log), *(e.name for e in log.exports)}
    if log.site_id is not None:
        candidates |= {log.site_id, names.get(log.site_id, "")}
    return ref.log in candidates - {""}


def _sample(
    logs: Sequence[LogResult], options: ReportOptions, names: dict[str, str]
) -> tuple[list[tuple[Any, ...]], list[tuple[str, bytes]]]:
    """Entries drawn with the seed (uniformly over every verified entry of every log) and those named."""
    usable = [
        log for log in logs if log.scanned is not None and log.primary.report is not None and log.primary.report.valid
    ]
    sizes = [log.primary.report.size or 0 for log in usable]  # type: ignore[union-attr]
    total = sum(sizes)
    # Reproducibility, not secrecy, is what the seed is for: the auditor records it.
    rng = random.Random(options.seed)  # noqa: S311
    picks: list[tuple[LogResult, int, str]] = []
    for drawn in sorted(rng.sample(range(total), min(options.sample, total))):
        offset = drawn
        for log, size in zip(usable, sizes, strict=True):
            if offset < size:
                picks.append((log, offset, f"drawn (seed {options.seed})"))
                break
            offset -= size
    for ref in options.entries:
        match = [log for log in logs if _matches(ref, log, names)]
        if not match:
            raise FormatError(f"--entry {ref.log}:{ref.index}: no log given is called {ref.log!r}")
        log = match[0]
        if log not in usable:
            raise FormatError(f"--entry {ref.log}:{ref.index}: that log did not verify, so no proof can be made")
        size = log.primary.report.size or 0  # type: ignore[union-attr]
        if not 0 <= ref.index < size:
            raise FormatError(f"--entry {ref.log}:{ref.index}: the log's verified checkpoint covers 0..{size - 1}")
        picks.append((log, ref.index, "named by the auditor"))
    rows = []
    files = []
    seen: set[tuple[str, int]] = set()
    for log, index, why in picks:
        if (log.origin, index) in seen:
            continue
        seen.add((log.origin, index))
        assert log.scanned is not None and log.primary.report is not None
        src = log.source
        assert src is not None
        size = log.primary.report.size or 0
        entry = read_entry(src, index, size)
        raw = src.read("checkpoint")
        assert raw is not None
        proof = TlogProof(index, tuple(merkle.inclusion_proof(index, size, log.scanned.tree)), raw.decode())
        stem = f"{_slug(log)}-{index}"
        files.append((f"proofs/{stem}.tlog-proof", proof.format().encode()))
        files.append((f"proofs/{stem}.entry", entry))
        try:
            parsed = json.loads(entry)
        except ValueError:
            parsed = {}
        parsed = parsed if isinstance(parsed, dict) else {}
        rows.append(
            (
                sections._label(log, names),
                index,
                why,
                hashlib.sha256(entry).hexdigest(),
                sections._text(parsed.get("type")),
                sections._text(parsed.get("time")),
                f"proofs/{stem}.tlog-proof",
                f"proofs/{stem}.entry",
                size,
            )
        )
    return rows, files


def _csv(table: sections.Table) -> bytes:
    return datafiles.csv_file(table.columns, table.rows)


def _json(table: sections.Table) -> bytes:
    return datafiles.json_file(table.title, table.columns, table.rows)


def _render(
    built: Sequence[sections.Section],
    options: ReportOptions,
    proof_files: Sequence[tuple[str, bytes]],
    *,
    verified: bool,
    verdict: str,
    latest: str,
    logs: Sequence[LogResult],
) -> list[tuple[str, bytes, int | None]]:
    """Every file of the report as (path, bytes, row count or None)."""
    files: list[tuple[str, bytes, int | None]] = []
    data_files: list[tuple[str, bytes]] = []
    for section in built:
        for table in section.tables:
            for suffix, content in ((".csv", _csv(table)), (".json", _json(table))):
                files.append((f"data/{table.name}{suffix}", content, len(table.rows)))
                data_files.append((f"{table.name}{suffix}", content))
    files += [(path, data, None) for path, data in proof_files]
    page = render.html(
        built,
        title="Audit evidence report",
        verdict=verdict,
        failed=not verified,
        generated_from=latest,
    )
    files.append(("report.html", page.encode(), None))
    if options.pdf:
        with tempfile.TemporaryDirectory() as tmp:
            dest = Path(tmp) / "report.pdf"
            render.pdf(page, data_files, when=latest, dest=dest)
            files.append(("report.pdf", dest.read_bytes(), None))
    manifest = {
        "format": REPORT_FORMAT,
        "verified": verified,
        "verdict": verdict,
        "command": options.command,
        "tool": f"sitewarden {options.tool_version}",
        "inputs": sorted(
            ({"export": e.name, "origin": log.origin, "sha256": e.digest} for log in logs for e in log.exports),
            key=lambda d: (d["origin"], d["export"]),
        ),
        "files": [
            {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            | ({"rows": rows} if rows is not None else {})
            for path, data, rows in sorted(files)
        ],
    }
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    files.append(("manifest.json", text.encode(), None))
    if options.sign_key is not None:
        files.append(("manifest.json.note", sign(text, options.sign_key).encode(), None))
    return files


def _write_atomically(out: Path, files: Sequence[tuple[str, bytes, int | None]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        for path, data, _ in files:
            target = tmp / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
