"""The report's inputs: exports (directories or tarballs), grouped by the log they come from,
each verified against the auditor's witness policy, scanned once, and cross-checked with the
other exports of the same log.

Exports of one log (same origin) are checked against each other: the largest is scanned, and
every other export's checkpoint must be the root of the same first entries, or the log forked
between the two exports. Nothing here trusts the export's own manifest or keys file: the
checkpoint's origin names the log, and only the policy's keys vouch for it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from audit import merkle, tiles
from audit.checkpoint import Checkpoint
from audit.checkpoint import parse as parse_checkpoint
from audit.errors import AuditError, FormatError
from audit.export import HISTORY_FILE, Checker, Report, Source, check_checkpoint, finish
from audit.log import read_history
from audit.note import note_text
from audit.policy import Policy
from audit.report.scan import Period, RowFormat, Scanned, scan

CONTROLLER_PREFIX = "sitewarden/controller/"
SITE_PREFIX = "sitewarden/"


@dataclass(frozen=True)
class Finding:
    """Something the auditor must know: a `failure` of verification, a `warning`, or a `note`."""

    severity: str
    log: str
    where: str
    message: str


@dataclass(frozen=True)
class HistoryCheckpoint:
    """A checkpoint from the log's own history (`checkpoints.jsonl` of an export), as verified."""

    size: int
    root: str
    problem: str
    """Empty when the note verifies under the policy and its root is that of the log's first `size` entries."""
    signers: tuple[str, ...]
    cosignatures: tuple[tuple[str, int], ...]
    quorum_met: bool | None


@dataclass
class ExportInput:
    """One export given on the command line."""

    path: Path
    name: str
    digest: str
    """SHA-256 of the tarball, or of the directory's listing (see `digest_of`)."""
    files: int
    size_bytes: int
    origin: str | None = None
    checkpoint: Checkpoint | None = None
    report: Report | None = None


@dataclass
class LogResult:
    """Everything the report knows of one log, from all the exports of it."""

    origin: str
    exports: list[ExportInput]
    primary: ExportInput
    scanned: Scanned | None = None
    findings: list[Finding] = field(default_factory=list)
    source: Source | None = None
    """The primary export's files (for the sampled entries)."""
    history: list[HistoryCheckpoint] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return kind_of(self.origin)

    @property
    def site_id(self) -> str | None:
        return site_id_of(self.origin)

    @property
    def verified(self) -> bool:
        return all(e.report is not None and e.report.valid for e in self.exports) and not any(
            f.severity == "failure" for f in self.findings
        )


def kind_of(origin: str) -> str:
    """controller, site or other: what wrote the log of `origin`."""
    if origin.startswith(CONTROLLER_PREFIX):
        return "controller"
    return "site" if origin.startswith(SITE_PREFIX) else "other"


def site_id_of(origin: str) -> str | None:
    return origin[len(SITE_PREFIX) :] if kind_of(origin) == "site" else None


def log_origin(export: ExportInput) -> str:
    """The log an export is of: its checkpoint's origin (or a name of its own when it has none)."""
    return export.origin or f"(unreadable: {export.name})"


class ExportSource(Source):
    """An export's files, with the hash tiles read when the export was hashed (`digest_of`) kept for the
    check of every tile against the entries, which would otherwise read them all again."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.kept: dict[str, bytes] = {}

    def read(self, rel: str) -> bytes | None:
        data = self.kept.pop(rel, None)
        return data if data is not None else super().read(rel)


def digest_of(path: Path, keep: dict[str, bytes] | None = None) -> tuple[str, int, int]:
    """(SHA-256, files, bytes) of an export as given; with `keep`, a directory's hash tiles go into it.

    A tarball is hashed as a file. A directory's digest is the SHA-256 of the lines
    `<sha256>  <path>` of its files in path order, except the entry bundles (`tile/entries/`):
    the checkpoint's root commits to those, and verification checks every one of them against
    it, so reading them twice would add nothing but time.
    """
    if path.is_file():
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest(), 1, path.stat().st_size
    listing = hashlib.sha256()
    files = 0
    total = 0
    # os.path rather than pathlib: an export of a million entries has thousands of files.
    for root, dirs, names in os.walk(path):
        dirs.sort()
        rel_root = Path(root).relative_to(path).as_posix()
        for name in sorted(names):
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            full = os.path.join(root, name)
            files += 1
            total += os.stat(full).st_size
            if rel.startswith("tile/entries/"):
                continue
            with open(full, "rb") as f:
                data = f.read()
            if keep is not None and rel.startswith("tile/"):
                keep[rel] = data
            listing.update(f"{hashlib.sha256(data).hexdigest()}  {rel}\n".encode())
    return listing.hexdigest(), files, total


def load(paths: Sequence[Path]) -> list[tuple[ExportInput, Source]]:
    """Open every export; FormatError (unusable input) names the first that cannot be read.

    The exports are not hashed yet (`hash_exports`): a report hashes them while it scans the entries.
    """
    opened: list[tuple[ExportInput, Source]] = []
    names: set[str] = set()
    for path in paths:
        src = ExportSource(path)
        name = path.name
        while name in names:
            name = f"{name}'"
        names.add(name)
        export = ExportInput(path, name, "", 0, 0)
        raw = src.read("checkpoint")
        if raw is not None:
            try:
                export.checkpoint = parse_checkpoint(note_text(raw))
                export.origin = export.checkpoint.origin
            except AuditError:
                pass
        if export.origin is None:
            manifest = src.read("manifest.json")
            try:
                origin = json.loads(manifest)["origin"] if manifest else None
                export.origin = origin if isinstance(origin, str) else None
            except (ValueError, KeyError, TypeError):
                export.origin = None
        opened.append((export, src))
    return opened


def hash_exports(opened: Sequence[tuple[ExportInput, Source]]) -> None:
    """Fill in every export's digest, file count and size (`digest_of`), keeping its hash tiles in memory."""
    for export, src in opened:
        if not export.digest:
            keep = src.kept if isinstance(src, ExportSource) and src.is_directory else None
            export.digest, export.files, export.size_bytes = digest_of(export.path, keep)


def verify_logs(
    opened: Sequence[tuple[ExportInput, Source]],
    policy: Policy,
    *,
    period: Period,
    gap_s: float,
    rows: Callable[[LogResult], RowFormat | None] = lambda log: None,
    meanwhile: Callable[[], object] | None = None,
) -> list[LogResult]:
    """Verify every export, scan the largest export of each log, and check the others against it.

    `rows` says, log by log, how the scan is to write the flagged requests' rows (`scan`'s `rows`);
    `meanwhile` is work for this process while a scan's workers hash and tally (`scan`'s).
    """
    groups: dict[str, list[tuple[ExportInput, Source]]] = {}
    for export, src in opened:
        groups.setdefault(log_origin(export), []).append((export, src))
    results = []
    for origin in sorted(groups):
        members = sorted(groups[origin], key=lambda m: (-(m[0].checkpoint.size if m[0].checkpoint else -1), m[0].name))
        primary, primary_src = members[0]
        result = LogResult(origin, [m[0] for m in members], primary, source=primary_src)
        _verify_primary(result, primary_src, policy, period=period, gap_s=gap_s, rows=rows(result), meanwhile=meanwhile)
        for export, src in members[1:]:
            _verify_other(result, export, src, policy)
        results.append(result)
    return results


def _verify_primary(
    result: LogResult,
    src: Source,
    policy: Policy,
    *,
    period: Period,
    gap_s: float,
    rows: RowFormat | None,
    meanwhile: Callable[[], object] | None,
) -> None:
    export = result.primary
    found, cp = check_checkpoint(src.read("checkpoint"), [], policy=policy, src=src)
    size = cp.size if cp is not None else export.checkpoint.size if export.checkpoint is not None else None
    if size is None:
        export.report = found
        result.findings.append(_failure(result, export, found))
        return
    raw_history = src.read(HISTORY_FILE)
    notes = read_history(raw_history, size) if raw_history else []
    wanted = set()
    for note in notes:
        wanted.add(parse_checkpoint(note_text(note)).size - 1)
    vkeys = [v.vkey for v in (*policy.logs, *policy.witness_verifiers())]
    scanned = scan(
        src,
        size,
        period=period,
        gap_s=gap_s,
        keep_all=result.kind == "controller",
        wanted=wanted,
        notes=notes,
        vkeys=vkeys,
        rows=rows,
        meanwhile=meanwhile,
    )
    result.scanned = scanned
    result.history = [_check_history(result, note, policy, scanned, i) for i, note in enumerate(notes)]
    if cp is None:
        export.report = found
        result.findings.append(_failure(result, export, found))
        result.findings.append(
            Finding(
                "warning",
                result.origin,
                "entries",
                "the checkpoint does not verify under the policy: every figure from this log comes from "
                "entries no trusted key vouches for",
            )
        )
        return
    problem = Checker(src, cp).run(scanned.tree, scanned.bundle_problems)
    export.report = finish(found, problem)
    if not export.report.valid:
        result.findings.append(_failure(result, export, export.report))


def _verify_other(result: LogResult, export: ExportInput, src: Source, policy: Policy) -> None:
    """Another export of the same log: verified on its own, and its checkpoint checked against the primary."""
    found, cp = check_checkpoint(src.read("checkpoint"), [], policy=policy, src=src)
    if cp is None:
        export.report = found
        result.findings.append(_failure(result, export, found))
        return
    export.report = finish(found, Checker(src, cp).run())
    if not export.report.valid:
        result.findings.append(_failure(result, export, export.report))
    tree = result.scanned.tree if result.scanned is not None else None
    if tree is None or cp.size > tree.size:
        return
    same = cp.root == merkle.EMPTY_ROOT if cp.size == 0 else tree.root(cp.size) == cp.root
    if not same:
        result.findings.append(
            Finding(
                "failure",
                result.origin,
                f"{export.name}: checkpoint",
                f"the log forked: {export.name}'s checkpoint of size {cp.size} has root {cp.root.hex()}, but the "
                f"first {cp.size} entries of {result.primary.name} hash to {tree.root(cp.size).hex()}",
            )
        )


def _check_history(result: LogResult, signed: str, policy: Policy, scanned: Scanned, number: int) -> HistoryCheckpoint:
    """A checkpoint the log signed earlier: its signature, cosignatures and quorum, and whether the
    entries hash to its root (if not, the log forked, by its own signature)."""
    cp = parse_checkpoint(note_text(signed))
    quorum = None
    problem = ""
    severity = "failure"
    _, signers, cosigned, error = scanned.opened[number]  # opened by the scan's workers
    if error:
        problem = error
        if "no signature by a trusted key" in problem:
            severity = "warning"  # e.g. signed by an earlier key the policy does not name
    else:
        quorum = policy.evaluate(k for k, _ in cosigned).met
        if not signers:
            problem = "no signature by a trusted log key"
    if cp.origin != result.origin:
        problem = f"origin {cp.origin!r} is not the log's"
    elif cp.size > scanned.tree.size:
        problem = f"covers {cp.size} entries, more than the export holds"
    elif not problem:
        root = scanned.tree.root(cp.size) if cp.size else merkle.EMPTY_ROOT
        if root != cp.root:
            problem = f"the log signed root {cp.root.hex()} for its first {cp.size} entries, which hash to {root.hex()}"
    if problem:
        result.findings.append(
            Finding(
                severity,
                result.origin,
                f"checkpoint history, size {cp.size}",
                f"the log forked: {problem}" if "hash to" in problem else problem,
            )
        )
    return HistoryCheckpoint(cp.size, cp.root.hex(), problem, signers, cosigned, quorum)


def _failure(result: LogResult, export: ExportInput, report: Report) -> Finding:
    where = f"entry {report.entry}" if report.entry is not None else report.tile or "export"
    return Finding("failure", result.origin, f"{export.name}: {where}", report.reason or "not valid")


def read_entry(src: Source, index: int, size: int) -> bytes:
    """The exact bytes of entry `index` of an export of `size` entries."""
    n = index // tiles.TILE_WIDTH
    width = min(tiles.TILE_WIDTH, size - n * tiles.TILE_WIDTH)
    found = src.read_tile(tiles.bundle_path(n), width)
    if found is None:
        raise FormatError(f"entry bundle {tiles.bundle_path(n, width)} is missing")
    data = found[1]
    pos = 0
    for _ in range(index % tiles.TILE_WIDTH):
        pos += 2 + (data[pos] << 8 | data[pos + 1])
    return data[pos + 2 : pos + 2 + (data[pos] << 8 | data[pos + 1])]
