"""The report's sections, built from verified logs as tables (and a few facts and charts).

Each table becomes `data/<name>.csv` and `data/<name>.json` and a table in the HTML and PDF,
so that every figure the report shows can be reproduced from a data file. Rows are sorted, and
nothing depends on the clock or the order inputs were given in: the same inputs give the same
bytes.
"""

from __future__ import annotations

import calendar
import datetime as dt
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from audit.report import datafiles, mapping
from audit.report.datafiles import EncodedRows
from audit.report.inputs import Finding, LogResult, site_id_of
from audit.report.scan import Tally, entry_time

_TIME_FMT = "%Y-%m-%dT%H:%M:%SZ"


@dataclass
class Table:
    name: str
    """File stem of the table's data files: `data/<name>.csv` and `.json`."""
    title: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    note: str = ""
    show: int | None = 50
    """How many rows the HTML and PDF show (the data files hold them all); None for all."""


@dataclass
class Bars:
    """A bar chart: one bar per label, drawn as inline SVG."""

    title: str
    labels: list[str]
    values: list[float]
    unit: str = ""


@dataclass
class Section:
    number: int
    key: str
    title: str
    intro: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    charts: list[Bars] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


@dataclass(frozen=True)
class Options:
    period_from: str | None
    period_to: str | None
    gap_hours: float
    retention_months: int
    sample: int
    seed: int
    tool_version: str
    command: str
    policy_sha256: str
    policy_summary: str


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime(_TIME_FMT)


def _label(log: LogResult, names: dict[str, str]) -> str:
    """How tables name a log: the site's name and id, or the controller's origin."""
    return origin_label(log.origin, names)


def origin_label(origin: str, names: dict[str, str]) -> str:
    """How tables name the log of `origin` (`_label`)."""
    site_id = site_id_of(origin)
    if site_id is not None:
        name = names.get(site_id)
        return f"{name} ({site_id})" if name else site_id
    return origin


_text = datafiles.cell_text


def site_names(logs: Sequence[LogResult]) -> dict[str, str]:
    """Site id -> name, from what the controller's log says of its sites."""
    names: dict[str, str] = {}
    for log in logs:
        if log.kind != "controller" or log.scanned is None:
            continue
        for _, entry in log.scanned.tally.events:
            _collect_names(entry, names)
    return names


def _collect_names(entry: dict[str, Any], names: dict[str, str]) -> None:
    for holder in (entry, entry.get("change") if isinstance(entry.get("change"), dict) else None):
        if not isinstance(holder, dict):
            continue
        site = holder.get("site")
        if isinstance(site, dict) and isinstance(site.get("id"), str) and isinstance(site.get("name"), str):
            names[site["id"]] = site["name"]
        for p in holder.get("participants") or []:
            if isinstance(p, dict) and isinstance(p.get("site"), str) and isinstance(p.get("site_name"), str):
                names[p["site"]] = p["site_name"]


# -- 1. scope ----------------------------------------------------------------------------------------------------------


def scope(logs: Sequence[LogResult], options: Options, names: dict[str, str]) -> Section:
    inputs = []
    found = []
    for log in logs:
        for export in log.exports:
            cp = export.checkpoint
            inputs.append(
                (
                    export.name,
                    log.origin,
                    log.kind,
                    export.digest,
                    export.files,
                    export.size_bytes,
                    cp.size if cp is not None else "",
                )
            )
        tally = log.scanned.tally if log.scanned else Tally()
        found.append(
            (
                _label(log, names),
                log.origin,
                log.kind,
                tally.count,
                _time_of(tally.first),
                _time_of(tally.last),
                tally.in_period,
                _time_of(tally.period_first),
                _time_of(tally.period_last),
            )
        )
    requested = f"{options.period_from or 'the first entry'} to {options.period_to or 'the last entry'}"
    return Section(
        1,
        "scope",
        "Scope",
        "What was examined: the exported logs given, the period asked about and the period each log covers, "
        "the inputs' digests, the tool that made this report and the command that makes it again.",
        facts=[
            ("Period requested (UTC, end exclusive)", requested),
            (
                "Logs",
                f"{len(logs)} ({sum(1 for x in logs if x.kind == 'site')} sites, "
                f"{sum(1 for x in logs if x.kind == 'controller')} controller)",
            ),
            ("Witness policy", f"{options.policy_summary}; SHA-256 {options.policy_sha256}"),
            ("Tool", f"sitewarden {options.tool_version}"),
            ("Command that reproduces this report", options.command),
        ],
        tables=[
            Table(
                "scope_inputs",
                "Inputs",
                ("export", "origin", "log", "sha256", "files", "bytes", "checkpoint size"),
                sorted(inputs),
                "A tarball's SHA-256 is the file's; a directory's is the SHA-256 of its files' digests, entry "
                "bundles excepted (the verified checkpoint root commits to every entry).",
                show=None,
            ),
            Table(
                "scope_periods",
                "Period found in each log",
                (
                    "log",
                    "origin",
                    "kind",
                    "entries",
                    "first entry",
                    "last entry",
                    "entries in period",
                    "first in period",
                    "last in period",
                ),
                sorted(found, key=lambda r: (r[2] != "controller", r[0])),
                show=None,
            ),
        ],
    )


def _time_of(pair: tuple[int, str] | None) -> str:
    return pair[1] if pair is not None else ""


# -- 2. integrity ------------------------------------------------------------------------------------------------------


def integrity(logs: Sequence[LogResult], names: dict[str, str]) -> Section:
    per_log = []
    cosignatures = []
    findings = []
    for log in logs:
        findings += log.findings
        tally = log.scanned.tally if log.scanned else Tally()
        for export in log.exports:
            report = export.report
            verdict = report.quorum.explanation if report is not None and report.quorum is not None else ""
            per_log.append(
                (
                    _label(log, names),
                    export.name,
                    "verified" if report is not None and report.valid else "FAILED",
                    report.size if report is not None and report.size is not None else "",
                    report.root.hex() if report is not None and report.root is not None else "",
                    ", ".join(report.signers) if report is not None else "",
                    len(report.witnesses) if report is not None else 0,
                    verdict,
                    tally.count - tally.unparsable if export is log.primary else "",
                    tally.unparsable if export is log.primary else "",
                )
            )
            if report is not None:
                for c in report.witnesses:
                    cosignatures.append((_label(log, names), export.name, report.size, c.witness, c.time))
        for index, message in tally.unparsable_examples:
            findings.append(Finding("warning", log.origin, f"entry {index}", f"entry is not a JSON object: {message}"))
    history = []
    for log in logs:
        for h in log.history:
            history.append(
                (
                    _label(log, names),
                    h.size,
                    h.root,
                    "no" if "hash to" in h.problem else "yes",
                    ", ".join(h.signers),
                    len(h.cosignatures),
                    _text(h.quorum_met),
                    h.problem,
                )
            )
    history.sort(key=lambda r: (r[0], r[1]))
    failures = [f for f in findings if f.severity == "failure"]
    verdict = (
        f"{len(failures)} verification failure(s): the first is {failures[0].log} at {failures[0].where}: "
        f"{failures[0].message}"
        if failures
        else "every export verified: signatures, witness quorum, every entry and every hash tile"
    )
    return Section(
        2,
        "integrity",
        "Integrity",
        "Each export checked offline against the witness policy alone: the log's signature on its checkpoint, "
        "the witnesses' cosignatures and the quorum, every entry against the checkpoint's Merkle root, every hash "
        "tile, and exports of the same log against each other.",
        facts=[("Verdict", verdict)],
        tables=[
            Table(
                "integrity_logs",
                "Checkpoints verified",
                (
                    "log",
                    "export",
                    "result",
                    "entries",
                    "root",
                    "signed by",
                    "cosignatures",
                    "quorum",
                    "entries parsed",
                    "entries unparsable",
                ),
                sorted(per_log, key=lambda r: (r[2] != "FAILED", r[0], r[1])),
                show=None,
            ),
            Table(
                "integrity_cosignatures",
                "Cosignatures by witness",
                ("log", "export", "checkpoint size", "witness", "cosigned at"),
                sorted(cosignatures),
                show=100,
            ),
            Table(
                "integrity_checkpoint_history",
                "Every checkpoint each log signed (its checkpoints.jsonl), checked against the entries",
                (
                    "log",
                    "checkpoint size",
                    "root",
                    "matches the entries",
                    "signed by",
                    "cosignatures",
                    "quorum met",
                    "problem",
                ),
                history,
                "A checkpoint whose root is not that of the log's first entries is a fork the log itself signed.",
                show=40,
            ),
            Table(
                "integrity_findings",
                "Findings",
                ("severity", "log", "where", "finding"),
                sorted(
                    ((f.severity, f.log, f.where, f.message) for f in findings),
                    key=lambda r: ({"failure": 0, "warning": 1}.get(r[0], 2), r[1], r[2]),
                ),
                show=100,
            ),
        ],
        findings=findings,
    )


# -- 3. coverage and gaps ----------------------------------------------------------------------------------------------


def coverage(logs: Sequence[LogResult], options: Options, names: dict[str, str]) -> Section:
    days = []
    gaps = []
    restarts = []
    witness = []
    failures = []
    clock = []
    charts = []
    for log in logs:
        if log.scanned is None:
            continue
        label = _label(log, names)
        tally = log.scanned.tally
        signed_days: Counter[str] = Counter()
        cosigned_days: Counter[str] = Counter()
        checkpoints = [(h.size, h.cosignatures) for h in log.history if not h.problem]
        if not checkpoints:  # an export without history: its own checkpoint
            for export in log.exports:
                report = export.report
                if report is not None and report.size is not None and report.valid:
                    checkpoints.append((report.size, tuple((c.witness, c.timestamp) for c in report.witnesses)))
        for size, cosignatures in checkpoints:
            last_time = _last_entry_time(log, size)
            if last_time is not None:
                signed_days[_fmt(last_time)[:10]] += 1
            for witness_key, stamp in cosignatures:
                cosigned_days[_fmt(stamp)[:10]] += 1
                lag = stamp - last_time if last_time is not None else None
                witness.append(
                    (label, size, witness_key, _fmt(stamp), _fmt(last_time), round(lag, 1) if lag is not None else "")
                )
                if lag is not None and lag < -options_clock_tolerance():
                    clock.append(
                        (
                            label,
                            size - 1,
                            _fmt(last_time),
                            f"cosigned by {witness_key} at {_fmt(stamp)}",
                            round(-lag, 1),
                            "entry stamped after the witness cosigned it",
                        )
                    )
        for day in sorted(set(tally.days) | set(cosigned_days) | set(signed_days)):
            if _in_period_day(day, options):
                days.append((label, day, tally.days.get(day, 0), signed_days.get(day, 0), cosigned_days.get(day, 0)))
        for i, t, j, u in tally.gaps:
            span = (entry_time(u) or 0) - (entry_time(t) or 0)
            gaps.append((label, i, t, j, u, round(span / 3600, 2)))
        for index, entry in tally.events:
            kind = entry.get("type")
            if (kind == "activation" and entry.get("reason") == "restart") or kind in {"agent.started", "agent.start"}:
                restarts.append((label, index, _text(entry.get("time")), _text(kind)))
            if isinstance(kind, str) and kind.startswith("audit."):
                detail = entry.get("reason") or entry.get("error") or entry.get("detail") or ""
                failures.append((label, index, _text(entry.get("time")), kind, _text(detail)[:500]))
        for index, t, before in tally.regression_examples:
            back = (entry_time(before) or 0) - (entry_time(t) or 0)
            clock.append(
                (
                    label,
                    index,
                    t,
                    f"previous entry at {before}",
                    round(back, 1),
                    "entry stamped earlier than the entry before it",
                )
            )
        if tally.regressions > len(tally.regression_examples):
            clock.append(
                (
                    label,
                    "",
                    "",
                    f"{tally.regressions - len(tally.regression_examples)} more",
                    "",
                    "further clock regressions not listed",
                )
            )
        daily = sorted((d, c) for d, c in tally.days.items() if _in_period_day(d, options))
        if daily:
            charts.append(Bars(f"Entries per day: {label}", [d for d, _ in daily], [c for _, c in daily], "entries"))
    return Section(
        3,
        "coverage",
        "Coverage and gaps",
        f"Entries and checkpoints per log and day; stretches longer than {options.gap_hours:g} hours without an "
        "entry; agent restarts; witness lag (from the last entry a checkpoint covers to each cosignature); "
        "audit-write failures the agent recorded once it could write again; and clocks: entries stamped earlier "
        "than the entry before them, or after the witness cosigned them.",
        tables=[
            Table(
                "coverage_days",
                "Entries and checkpoints per day",
                ("log", "day", "entries", "checkpoints signed", "cosignatures"),
                days,
                "A checkpoint counts on the day of the last entry it covers, a cosignature on the day the witness "
                "made it.",
                show=60,
            ),
            Table(
                "coverage_gaps",
                f"Gaps over {options.gap_hours:g} hours",
                ("log", "last entry before", "at", "next entry", "at", "hours"),
                sorted(gaps),
                show=100,
            ),
            Table("coverage_restarts", "Agent restarts", ("log", "entry", "time", "recorded as"), sorted(restarts)),
            Table(
                "coverage_witness_lag",
                "Witness lag per log and witness",
                ("log", "witness", "cosignatures", "median seconds", "95th percentile seconds", "max seconds"),
                _lag_summary(witness),
                show=None,
            ),
            Table(
                "coverage_witness",
                "Witness lag per checkpoint",
                ("log", "checkpoint size", "witness", "cosigned at", "last entry at", "lag seconds"),
                sorted(witness, key=lambda r: (r[0], r[1], r[2])),
                show=50,
            ),
            Table(
                "coverage_audit_failures",
                "Audit-write failures",
                ("log", "entry", "time", "type", "detail"),
                sorted(failures),
            ),
            Table(
                "coverage_clock",
                "Clock findings",
                ("log", "entry", "time", "compared with", "seconds", "finding"),
                sorted(clock, key=lambda r: (r[0], str(r[1]))),
            ),
        ],
        charts=charts,
    )


def _lag_summary(rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    lags: dict[tuple[str, str], list[float]] = defaultdict(list)
    for label, _size, witness, _at, _last, lag in rows:
        if lag != "":
            lags[(label, witness)].append(float(lag))
    out = []
    for (label, witness), values in sorted(lags.items()):
        values.sort()
        out.append(
            (
                label,
                witness,
                len(values),
                values[len(values) // 2],
                values[min(len(values) - 1, int(0.95 * len(values)))],
                values[-1],
            )
        )
    return out


def options_clock_tolerance() -> float:
    from audit.report.scan import CLOCK_TOLERANCE_S  # noqa: PLC0415

    return CLOCK_TOLERANCE_S


def _last_entry_time(log: LogResult, size: int) -> float | None:
    if log.scanned is None or size == 0:
        return None
    tally = log.scanned.tally
    text = tally.times_at.get(size - 1)
    if text is None and tally.last is not None and tally.last[0] == size - 1:
        text = tally.last[1]
    return entry_time(text) if text else None


def _in_period_day(day: str, options: Options) -> bool:
    return (options.period_from is None or day >= options.period_from[:10]) and (
        options.period_to is None
        or day < options.period_to[:10]
        or (day == options.period_to[:10] and options.period_to[10:] not in ("", "T00:00:00"))
    )


# -- 4. activity -------------------------------------------------------------------------------------------------------

_ACTIVITY_COLUMNS = (
    "site",
    "month",
    "api",
    "outcome",
    "status",
    "purpose",
    "data class",
    "model",
    "model version",
    "adapter",
    "adapter version",
    "policy",
    "requests",
)


def _outcome(status: Any, allow: Any) -> str:
    if allow is False:
        return "denied"
    if status == 200:
        return "allowed"
    if isinstance(status, int) and not isinstance(status, bool) and 400 <= status < 500:
        return "refused"
    return "failed"


def _policy(name: Any, version: Any, revision: Any, local: bool) -> str:
    text = f"{_text(name)} {_text(version)}".strip() or _text(revision)
    if local:
        text = f"{text} + site policy" if text else "site policy"
    return text


def activity_rows(logs: Sequence[LogResult], names: dict[str, str]) -> list[tuple[Any, ...]]:
    rows: Counter[tuple[Any, ...]] = Counter()
    for log in logs:
        if log.scanned is None or log.kind == "controller":
            continue
        for key, count in log.scanned.tally.activity.items():
            site, month, kind, status, allow, purpose, data_class, model, version, a_name, a_version, *pol = key
            row = (
                names.get(_text(site), _text(site)) if site else _label(log, names),
                _text(month),
                _api(_text(kind)),
                _outcome(status, allow),
                _text(status),
                _text(purpose),
                _text(data_class),
                _text(model),
                _text(version),
                _text(a_name),
                _text(a_version),
                _policy(*pol),
            )
            rows[row] += count
    return sorted((*k, v) for k, v in rows.items())


def _api(kind: str) -> str:
    return {"inference": "OIP v2"}.get(kind, kind)


def activity(logs: Sequence[LogResult], names: dict[str, str]) -> Section:
    rows = activity_rows(logs, names)
    by_outcome: Counter[str] = Counter()
    by_purpose: Counter[tuple[str, str]] = Counter()
    by_site_month: Counter[tuple[str, str]] = Counter()
    by_model: Counter[tuple[str, str, str, str]] = Counter()
    by_policy: Counter[str] = Counter()
    for row in rows:
        site, month, _api, outcome, _status, purpose, _class, model, version, adapter, a_version, policy, n = row
        by_outcome[outcome] += n
        by_purpose[(purpose, outcome)] += n
        by_site_month[(site, month)] += n
        by_model[(model, version, f"{adapter} {a_version}".strip(), outcome)] += n
        by_policy[policy] += n
    denials: Counter[tuple[str, str]] = Counter()
    sampling: Counter[tuple[str, ...]] = Counter()
    candidates = 0
    for log in logs:
        if log.scanned is None or log.kind == "controller":
            continue
        tally = log.scanned.tally
        for (site, reason), n in tally.denials.items():
            denials[(_text(reason) or "(no reason given)", names.get(_text(site), _text(site)))] += n
        for (site, model, a_name, a_version, strategy, passed), n in tally.sampling.items():
            sampling[
                (
                    names.get(_text(site), _text(site)),
                    _text(model),
                    f"{_text(a_name)} {_text(a_version)}".strip(),
                    _text(strategy),
                    "passed" if passed else "no candidate passed",
                )
            ] += n
        candidates += tally.sampling_candidates
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    for (reason, site), n in denials.items():
        reasons[reason][site] += n
    ranked = sorted(
        (
            (reason, sum(c.values()), ", ".join(f"{s} {n}" for s, n in sorted(c.items())))
            for reason, c in reasons.items()
        ),
        key=lambda r: (-r[1], r[0]),
    )
    total = sum(by_outcome.values())
    months = sorted({m for _, m in by_site_month})
    return Section(
        4,
        "activity",
        "Activity",
        "Every inference request the sites recorded in the period, counted (no content): by outcome, purpose, "
        "data class, model and adapter version, policy version, site and month. 'denied' means the policy decided "
        "against the request; 'refused' means it was turned away before a decision (credentials, input, limits).",
        facts=[
            ("Requests in the period", f"{total:,}"),
            *((f"  {outcome}", f"{n:,}") for outcome, n in sorted(by_outcome.items())),
            ("Candidates drawn for requirement-checked sampling", f"{candidates:,}"),
        ],
        tables=[
            Table(
                "activity",
                "Requests by site, month, outcome, purpose, data class, model, adapter and policy",
                _ACTIVITY_COLUMNS,
                rows,
                show=40,
            ),
            Table(
                "activity_by_outcome",
                "By outcome",
                ("outcome", "requests", "share %"),
                [(o, n, _share(n, total)) for o, n in sorted(by_outcome.items())],
                show=None,
            ),
            Table(
                "activity_by_purpose",
                "By purpose and outcome",
                ("purpose", "outcome", "requests"),
                [(*k, n) for k, n in sorted(by_purpose.items())],
                show=None,
            ),
            Table(
                "activity_by_model",
                "By model, version, adapter and outcome",
                ("model", "version", "adapter", "outcome", "requests"),
                [(*k, n) for k, n in sorted(by_model.items())],
                show=None,
            ),
            Table(
                "activity_by_policy", "By policy version", ("policy", "requests"), sorted(by_policy.items()), show=None
            ),
            Table(
                "activity_by_site_month",
                "By site and month",
                ("site", "month", "requests"),
                [(*k, n) for k, n in sorted(by_site_month.items())],
                show=None,
            ),
            Table(
                "denial_reasons",
                "Denials by reason, most frequent first",
                ("reason", "denials", "by site"),
                ranked,
                show=30,
            ),
            Table(
                "sampling_outcomes",
                "Requirement-checked sampling (language models)",
                ("site", "model", "adapter", "strategy", "outcome", "requests"),
                [(*k, n) for k, n in sorted(sampling.items())],
                show=None,
            ),
        ],
        charts=[
            Bars(
                "Requests per month",
                months,
                [sum(n for (_, m), n in by_site_month.items() if m == month) for month in months],
                "requests",
            )
        ]
        if months
        else [],
    )


def _share(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 2) if whole else 0.0


# -- 5. human oversight ------------------------------------------------------------------------------------------------


def oversight(logs: Sequence[LogResult], names: dict[str, str]) -> Section:
    share = []
    flagged = []
    written: list[tuple[str, EncodedRows]] = []
    for log in logs:
        if log.scanned is None or log.kind == "controller":
            continue
        tally = log.scanned.tally
        label = _label(log, names)
        for (site, purpose), total in tally.review_total.items():
            n = tally.review_flagged.get((site, purpose), 0)
            share.append((names.get(_text(site), _text(site)) or label, _text(purpose), total, n, _share(n, total)))
        if tally.flagged_rows is not None:
            written.append((label, tally.flagged_rows))
        else:
            flagged += datafiles.flagged_rows(label, names, tally.flagged)
    requests: Sequence[tuple[Any, ...]] = sorted(flagged)
    if written:
        # Rows the scan wrote (`build` has them written only when no two logs share a label): each log's
        # are in entry order, so the logs in label order give the sorted rows.
        assert not flagged, "every log's flagged requests are written by the scan, or none"
        requests = EncodedRows()
        for _, rows in sorted(written, key=lambda w: w[0]):
            requests.extend(rows)
    total = sum(r[2] for r in share)
    count = sum(r[3] for r in share)
    return Section(
        5,
        "oversight",
        "Human oversight",
        "Every request the policy flagged for human review (its `human_review` obligation), and the share flagged "
        "per site and purpose. Each flagged request is listed with its log and entry index, so that the review "
        "records can be matched to it.",
        facts=[
            ("Decisions in the period", f"{total:,}"),
            ("Flagged for human review", f"{count:,} ({_share(count, total)} %)"),
        ],
        tables=[
            Table(
                "human_review_share",
                "Share flagged per site and purpose",
                ("site", "purpose", "decisions", "flagged", "share %"),
                sorted(share),
                show=None,
            ),
            Table(
                "human_review_requests",
                "Requests flagged for human review",
                ("log", "entry", "time", "site", "purpose", "data class", "model", "version", "trace id"),
                requests,
                show=datafiles.KEPT_ROWS,
            ),
        ],
    )


# -- 6. configuration in force -----------------------------------------------------------------------------------------


def configuration(logs: Sequence[LogResult], options: Options, names: dict[str, str]) -> Section:
    approvals = _approvals(logs)
    timeline = []
    refusals = []
    for log in logs:
        if log.scanned is None or log.kind != "site":
            continue
        label = _label(log, names)
        open_: dict[tuple[str, str], tuple[Any, ...]] = {}
        for index, entry in log.scanned.tally.events:
            kind = entry.get("type")
            time = _text(entry.get("time"))
            if kind == "activation":
                release = entry.get("release") if isinstance(entry.get("release"), dict) else {}
                artifact = _text(release.get("kind")) or "model"
                slot = (artifact, _text(release.get("name")) if artifact == "adapter" else "")
                name, version = _text(release.get("name")), _text(release.get("version"))
                if slot in open_ and open_[slot][3] == version and open_[slot][2] == name:
                    continue  # the same release again (a restart): still in force
                if slot in open_:
                    timeline.append((*open_.pop(slot), time))
                approvers = ", ".join(_text(a) for a in release.get("approvers") or [])
                open_[slot] = (
                    label,
                    artifact,
                    name,
                    version,
                    _text(release.get("manifest_sha256")),
                    time,
                    index,
                    approvers or "",
                    "; ".join(approvals.get((name, version), [])),
                )
            elif kind in {"release.refused", "sync.refused", "activation.failed", "release.failed"}:
                refusals.append(
                    (
                        label,
                        index,
                        time,
                        _text(kind),
                        _text(entry.get("release") or entry.get("desired_version")),
                        _text(entry.get("reason"))[:500],
                    )
                )
        for row in open_.values():
            timeline.append((*row, "still in force at the end of the log"))
    # (label, kind, name, version, digest, from, index, approvers, approved by, until): reorder for reading.
    rows = sorted((r[0], r[1], r[2], r[3], r[5], r[9], r[4], r[7], r[8], r[6]) for r in timeline)
    actions, jobs = _controller_actions(logs, options, names)
    return Section(
        6,
        "configuration",
        "Configuration in force",
        "Which model, adapter and policy versions each site ran, from when to when (from the sites' own activation "
        "entries), who approved them (the approver keys the site checked, and the approvals the controller "
        "recorded), what the sites refused, what changed at the controller (rollouts, rollbacks, approvals, "
        "sites, keys), and the federated jobs with their participants, rounds and privacy budget.",
        tables=[
            Table(
                "configuration_timeline",
                "Versions in force per site",
                (
                    "site",
                    "artifact",
                    "name",
                    "version",
                    "from",
                    "until",
                    "manifest sha256",
                    "approver keys (site)",
                    "approvals (controller)",
                    "activation entry",
                ),
                rows,
                show=None,
            ),
            Table(
                "configuration_refusals",
                "What sites refused to activate",
                ("site", "entry", "time", "event", "release", "reason"),
                sorted(refusals),
                show=50,
            ),
            Table(
                "controller_actions",
                "Changes recorded by the controller",
                ("time", "entry", "actor", "role", "action", "resource", "result", "change"),
                actions,
                show=80,
            ),
            Table(
                "federated_jobs",
                "Federated jobs",
                ("job", "name", "event", "time", "participants", "round", "epsilon", "detail"),
                jobs,
                show=None,
            ),
        ],
    )


def _approvals(logs: Sequence[LogResult]) -> dict[tuple[str, str], list[str]]:
    """(release name, version) -> 'approver at time' from the controller's log."""
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for log in logs:
        if log.kind != "controller" or log.scanned is None:
            continue
        for _, entry in log.scanned.tally.events:
            change = entry.get("change") if isinstance(entry.get("change"), dict) else {}
            if entry.get("type") == "change":  # the controller's change record (controller.changes.ApprovalAdded)
                if change.get("kind") == "approval.added":
                    found[(_text(change.get("release")), _text(change.get("version")))].append(
                        f"{_text(change.get('approver'))} at {_text(entry.get('time'))}"
                    )
                continue
            action = _text(entry.get("action"))
            if not action.endswith("/approvals") or entry.get("outcome", "ok") != "ok":
                continue
            resource = entry.get("resource") if isinstance(entry.get("resource"), dict) else {}
            signer = change.get("approver") or change.get("signer") or entry.get("actor")
            found[(_text(resource.get("name")), _text(resource.get("version")))].append(
                f"{_text(signer)} at {_text(entry.get('time'))}"
            )
    return found


def _controller_actions(
    logs: Sequence[LogResult], options: Options, names: dict[str, str]
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    actions = []
    jobs = []
    for log in logs:
        if log.kind != "controller" or log.scanned is None:
            continue
        for index, entry in log.scanned.tally.events:
            time = _text(entry.get("time"))
            if not _in_period_time(time, options):
                continue
            kind = _text(entry.get("type"))
            if kind == "change" and isinstance(entry.get("change"), dict):
                row = _change_row(entry, index, time)
                (jobs if row[0] == "job" else actions).append(row[1])
                continue
            if kind.startswith("job.") or kind in {"release.registered", "federation.node_registered"}:
                job = entry.get("job") if isinstance(entry.get("job"), dict) else {}
                participants = entry.get("participants")
                who = (
                    ", ".join(_text(p.get("site_name") or p.get("site")) for p in participants if isinstance(p, dict))
                    if isinstance(participants, list)
                    else ""
                )
                detail = entry.get("reason") or entry.get("release") or ""
                jobs.append(
                    (
                        _text(job.get("id")),
                        _text(job.get("name")),
                        kind,
                        time,
                        who,
                        _text(entry.get("round")),
                        _text(entry.get("epsilon")),
                        _text(detail)[:300],
                    )
                )
                continue
            if kind != "request" and not kind.startswith(("rollout.", "release.", "approval", "site.", "witness.")):
                actions.append(
                    (
                        time,
                        index,
                        _text(entry.get("actor") or "controller"),
                        _text(entry.get("role")),
                        kind,
                        "",
                        "",
                        _compact(entry.get("change")),
                    )
                )
                continue
            if kind == "request" and entry.get("outcome") not in (None, "ok"):
                continue  # refusals are in the controller's log; the configuration is what changed
            resource = entry.get("resource")
            actions.append(
                (
                    time,
                    index,
                    _text(entry.get("actor")),
                    _text(entry.get("role")),
                    _text(entry.get("action")) or kind,
                    ", ".join(f"{k}={_text(v)}" for k, v in sorted(resource.items()))
                    if isinstance(resource, dict)
                    else "",
                    _text(entry.get("result")),
                    _compact(entry.get("change")),
                )
            )
    return sorted(actions, key=lambda r: (r[0], r[1])), sorted(jobs, key=lambda r: (r[3], r[0], r[2]))


def _change_row(entry: dict[str, Any], index: int, time: str) -> tuple[str, tuple[Any, ...]]:
    """A change record of the controller (`controller.changes`) as a row of the jobs table or of the actions."""
    change = entry["change"]
    kind = _text(change.get("kind"))
    if kind.startswith("job."):
        sites = change.get("sites")
        who = ", ".join(_text(s) for s in sites) if isinstance(sites, list) else _text(change.get("site_id"))
        if kind == "job.answered":
            detail: Any = (
                "joins" if change.get("join") else "declines: " + "; ".join(map(_text, change.get("reasons") or []))
            )
        elif kind == "job.state_changed":
            detail = (
                f"{_text(change.get('before'))} -> {_text(change.get('after'))} {_text(change.get('reason'))}".strip()
            )
        else:
            detail = ""
        row = (
            _text(change.get("job_id")),
            _text(change.get("name")),
            kind,
            time,
            who,
            _text(change.get("round")),
            _text(change.get("epsilon")),
            _text(detail)[:300],
        )
        return "job", row
    named = [f"{k}={_text(v)}" for k, v in change.items() if k.endswith(("_id", "name", "version")) or k == "release"]
    action = _text(entry.get("action")) or kind
    via = f" (via {_text(entry.get('via'))})" if entry.get("via") else ""
    return "action", (
        time,
        index,
        _text(entry.get("actor") or "controller"),
        _text(entry.get("role")),
        f"{kind}: {action}{via}" if action != kind else kind,
        ", ".join(named),
        _text(entry.get("outcome") or "ok"),
        _compact({k: v for k, v in change.items() if k != "kind"}),
    )


def _compact(value: Any) -> str:
    if value is None:
        return ""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= 300 else text[:297] + "..."


def _in_period_time(time: str, options: Options) -> bool:
    second = time[:19]
    return (options.period_from is None or second >= options.period_from) and (
        options.period_to is None or second < options.period_to
    )


# -- 7. retention ------------------------------------------------------------------------------------------------------


def _months_before(text: str, months: int) -> str:
    """The UTC time `months` calendar months before `text` ('YYYY-MM-DDTHH:MM:SS...')."""
    year, month, day = int(text[:4]), int(text[5:7]), int(text[8:10])
    month -= months
    while month < 1:
        month += 12
        year -= 1
    day = min(day, calendar.monthrange(year, month)[1])
    return f"{year:04d}-{month:02d}-{day:02d}{text[10:19]}"


def retention(logs: Sequence[LogResult], options: Options, names: dict[str, str]) -> Section:
    rows = []
    for log in logs:
        tally = log.scanned.tally if log.scanned else Tally()
        first, last = _time_of(tally.first), tally.max_time or ""
        if not first:
            rows.append((_label(log, names), log.origin, "", "", "", options.retention_months, "", "no timed entries"))
            continue
        end = options.period_to if options.period_to else last[:19]
        required_from = _months_before(end, options.retention_months)
        covered = round(((entry_time(last) or 0) - (entry_time(first) or 0)) / (86400 * 30.44), 1)
        starts_at_zero = tally.first is not None and tally.first[0] == 0
        if first[:19] <= required_from:
            verdict = "met: the log reaches back to " + required_from
        elif starts_at_zero and log.verified:
            verdict = (
                f"met: the log is complete from its first entry ({first}), which is younger than the "
                f"{options.retention_months}-month period (nothing was removed)"
            )
        else:
            verdict = f"NOT met: entries before {first} are missing from a period that begins {required_from}"
        rows.append(
            (_label(log, names), log.origin, first, last, covered, options.retention_months, required_from, verdict)
        )
    return Section(
        7,
        "retention",
        "Retention",
        "Earliest and latest entry of each log against the retention period (EU AI Act Art. 19(1) and 26(6): at "
        "least six months, unless other law says otherwise). An export always starts at the log's first entry, so a "
        "verified log younger than the period has kept everything it ever recorded.",
        facts=[("Retention period", f"{options.retention_months} months")],
        tables=[
            Table(
                "retention",
                "Retention per log",
                (
                    "log",
                    "origin",
                    "earliest entry",
                    "latest entry",
                    "months covered",
                    "months required",
                    "required from",
                    "verdict",
                ),
                sorted(rows),
                show=None,
            )
        ],
    )


# -- 8. sampled proofs and 9. mapping ----------------------------------------------------------------------------------


def proofs_section(rows: Iterable[tuple[Any, ...]], options: Options) -> Section:
    listed = sorted(rows)
    return Section(
        8,
        "proofs",
        "Sampled proofs",
        f"{options.sample} entries drawn at random with seed {options.seed} across all logs (and any entries named "
        "on the command line), each with its exact bytes and a C2SP tlog-proof against the verified checkpoint. "
        "Check one with: sitewarden audit verify-proof proofs/<file>.tlog-proof --entry proofs/<file>.entry "
        "--key <the log's vkey>.",
        tables=[
            Table(
                "sampled_proofs",
                "Sampled entries and their proofs",
                ("log", "entry", "why", "entry sha256", "type", "time", "proof file", "entry file", "checkpoint size"),
                listed,
                show=None,
            )
        ],
    )


def mapping_section(sections: Sequence[Section]) -> Section:
    titles = {s.key: f"{s.number}. {s.title}" for s in sections}
    rows = [
        (framework, ref, requirement, ", ".join(titles[k] for k in keys), evidence)
        for framework, ref, requirement, keys, evidence in mapping.REQUIREMENTS
    ]
    return Section(
        9,
        "mapping",
        "Mapping to requirements",
        "Which section answers which requirement. The mapping says where the evidence is; whether it suffices is "
        "the auditor's judgement.",
        tables=[
            Table(
                "mapping",
                "Requirements and the sections that answer them",
                ("framework", "reference", "requirement", "sections", "evidence in this report"),
                rows,
                show=None,
            )
        ],
    )
