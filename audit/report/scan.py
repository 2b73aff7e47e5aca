"""One pass over an export's entries: the Merkle leaves that verification needs and the tallies
the report is made of, computed together so that every entry is read once.

Large exports are split into runs of entry bundles, each scanned in a worker process (as
`audit.export` hashes them): a run returns the lower levels of its Merkle subtree and a `Tally`
of what its entries say. Tallies merge in index order (`Tally.merge`), so that what spans two
runs (a gap between entries, a clock that went backwards) is seen as in one sequential pass.
Nothing is kept per entry except what a section lists entry by entry (human-review flags,
configuration events); counts are kept as counts, so memory does not grow with the log.
"""

from __future__ import annotations

import bisect
import calendar
import itertools
import mmap
import multiprocessing
import operator
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from audit import merkle, tiles
from audit.errors import AuditError
from audit.export import Source, gc_paused, leaf_hashes, split_bundle
from audit.merkle import HASH_SIZE
from audit.note import Verifier, open_note
from audit.report.datafiles import EncodedRows, flagged_rows

_JOB_LEVELS = tiles.TILE_HEIGHT + 1
_JOB_BUNDLES = 64  # 16,384 entries: small runs, so that the last one keeps a core idle only briefly
_PARALLEL_MIN_ENTRIES = 1 << 15
MAX_EXAMPLES = 20
"""How many examples of a kind of problem (unparsable entries, clock regressions) are kept."""
CLOCK_TOLERANCE_S = 2.0
"""An entry stamped earlier than the entry before it by more than this is a clock regression (concurrent
requests are stamped before they are appended, so small inversions are normal)."""

# Entry types whose whole entry the report keeps: what changed the configuration in force, and the
# controller's own actions. Inference entries are only counted.
_KEPT_PREFIXES = ("activation", "release.", "sync.", "decision", "federation.", "witness.", "audit.", "revocation")


@dataclass(frozen=True)
class Period:
    """The period the auditor asked about: UTC bounds as 'YYYY-MM-DDTHH:MM:SS' (start inclusive, end
    exclusive), compared with the first 19 characters of an entry's RFC 3339 time."""

    start: str | None = None
    end: str | None = None

    def __contains__(self, text: str) -> bool:
        second = text[:19]
        return (self.start is None or second >= self.start) and (self.end is None or second < self.end)


@dataclass(frozen=True)
class RowFormat:
    """How the report lists a log's requests flagged for human review (`datafiles.flagged_rows`): given
    to `scan`, its workers write the rows (`Tally.flagged_rows`) instead of returning them as tuples."""

    label: str
    names: dict[str, str]


@dataclass
class Tally:
    """What a run of consecutive entries says, mergeable with the next run's."""

    count: int = 0
    first: tuple[int, str] | None = None
    """(index, time) of the first entry with a valid time; `last` of the last one."""
    last: tuple[int, str] | None = None
    max_time: str | None = None
    in_period: int = 0
    period_first: tuple[int, str] | None = None
    period_last: tuple[int, str] | None = None
    days: Counter[str] = field(default_factory=Counter)
    types: Counter[str] = field(default_factory=Counter)
    gaps: list[tuple[int, str, int, str]] = field(default_factory=list)
    regressions: int = 0
    regression_examples: list[tuple[int, str, str]] = field(default_factory=list)
    unparsable: int = 0
    unparsable_examples: list[tuple[int, str]] = field(default_factory=list)
    untimed: int = 0
    times_at: dict[int, str] = field(default_factory=dict)
    activity: Counter[tuple[str, ...]] = field(default_factory=Counter)
    denials: Counter[tuple[str, str]] = field(default_factory=Counter)
    review_total: Counter[tuple[str, str]] = field(default_factory=Counter)
    review_flagged: Counter[tuple[str, str]] = field(default_factory=Counter)
    flagged: list[tuple[Any, ...]] = field(default_factory=list)
    """(index, time, site, purpose, data class, model, version, trace id) of each flagged request; empty
    when the scan was given a `RowFormat`, which writes them as `flagged_rows` instead."""
    flagged_rows: EncodedRows | None = None
    sampling: Counter[tuple[str, ...]] = field(default_factory=Counter)
    sampling_candidates: int = 0
    events: list[tuple[int, dict[str, Any]]] = field(default_factory=list)

    def merge(self, later: Tally, gap_s: float) -> None:
        """Add `later`, the tally of the run that follows this one."""
        if self.last is not None and later.first is not None:
            (i, t), (j, u) = self.last, later.first
            step = seconds_between(t, u)
            if step > gap_s:
                self.gaps.append((i, t, j, u))
            elif step < -CLOCK_TOLERANCE_S:
                self.regressions += 1
                if len(self.regression_examples) < MAX_EXAMPLES:
                    self.regression_examples.append((j, u, t))
        self.count += later.count
        self.first = self.first or later.first
        self.last = later.last or self.last
        if later.max_time is not None and (self.max_time is None or later.max_time > self.max_time):
            self.max_time = later.max_time
        self.in_period += later.in_period
        self.period_first = self.period_first or later.period_first
        self.period_last = later.period_last or self.period_last
        self.days.update(later.days)
        self.types.update(later.types)
        self.gaps += later.gaps
        self.regressions += later.regressions
        self.regression_examples += later.regression_examples[: MAX_EXAMPLES - len(self.regression_examples)]
        self.unparsable += later.unparsable
        self.unparsable_examples += later.unparsable_examples[: MAX_EXAMPLES - len(self.unparsable_examples)]
        self.untimed += later.untimed
        self.times_at.update(later.times_at)
        self.activity.update(later.activity)
        self.denials.update(later.denials)
        self.review_total.update(later.review_total)
        self.review_flagged.update(later.review_flagged)
        self.flagged += later.flagged
        if later.flagged_rows is not None:
            if self.flagged_rows is None:
                self.flagged_rows = EncodedRows()
            self.flagged_rows.extend(later.flagged_rows)
        self.sampling.update(later.sampling)
        self.sampling_candidates += later.sampling_candidates
        self.events += later.events


# -- what one entry says ---------------------------------------------------------------------------------------------

_DAY_START: dict[str, float] = {}


def entry_time(text: Any) -> float | None:
    """POSIX seconds of an entry's `time` (RFC 3339 UTC, 'YYYY-MM-DDTHH:MM:SS[.fff]Z'), or None."""
    if not isinstance(text, str) or len(text) < 20 or text[-1] != "Z" or text[10] != "T":
        return None
    day = text[:10]
    start = _DAY_START.get(day)
    try:
        if start is None:
            start = _DAY_START[day] = float(calendar.timegm((int(day[:4]), int(day[5:7]), int(day[8:10]), 0, 0, 0)))
        return start + int(text[11:13]) * 3600 + int(text[14:16]) * 60 + float(text[17:-1])
    except ValueError:
        return None


def seconds_between(earlier: str, later: str) -> float:
    """`later` minus `earlier`, two valid entry times, in seconds."""
    a, b = entry_time(earlier), entry_time(later)
    assert a is not None and b is not None
    return b - a


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def _release(value: Any) -> tuple[str, str]:
    if isinstance(value, dict):
        return _text(value.get("name")), _text(value.get("version"))
    return "", ""


def _policy_version(policy: Any) -> str:
    """`name version` (or the revision) of the central bundle that decided, and `+ site` for a local one."""
    if not isinstance(policy, dict):
        return ""
    central = policy.get("central")
    text = ""
    if isinstance(central, dict):
        name, version = _text(central.get("name")), _text(central.get("version"))
        text = f"{name} {version}".strip() or _text(central.get("revision"))
    if policy.get("local"):
        text = f"{text} + site policy" if text else "site policy"
    return text


def outcome_of(entry: dict[str, Any]) -> str:
    """allowed, denied (by policy), refused (before a decision: credentials, input, limits) or failed."""
    decision = entry.get("decision")
    status = entry.get("status")
    if isinstance(decision, dict) and decision.get("allow") is False:
        return "denied"
    if status == 200:
        return "allowed"
    if isinstance(status, int) and 400 <= status < 500:
        return "refused"
    return "failed"


def is_request(entry_type: str) -> bool:
    """An inference request of any API (OIP v2, OpenAI-compatible chat or embeddings)."""
    return entry_type == "inference" or entry_type.startswith(("inference.", "chat", "embedding", "lm."))


# The structs an entry decodes into. gc=False: decoded JSON holds no reference cycles, so the collector
# need not track a million of them; frozen ones hash, for `feed_many`'s short activity key.


class _Release(msgspec.Struct, frozen=True, gc=False):
    name: Any = None
    version: Any = None


class _Obligations(msgspec.Struct, gc=False):
    human_review: Any = None


class _Decision(msgspec.Struct, gc=False):
    allow: Any = None
    reasons: Any = None
    obligations: _Obligations | None = None


class _Central(msgspec.Struct, frozen=True, gc=False):
    name: Any = None
    version: Any = None
    revision: Any = None


class _Policy(msgspec.Struct, frozen=True, gc=False):
    central: _Central | None = None
    local: Any = None


class _Requirements(msgspec.Struct, gc=False):
    strategy: Any = None
    requirements_met: Any = None  # agent.lm.requirements.Outcome.report()
    drawn: Any = None


class _Entry(msgspec.Struct, gc=False):
    """The fields of an entry the tallies read; msgspec decodes only these and skips the rest."""

    time: Any = None
    type: Any = None
    site: Any = None
    purpose: Any = None
    data_class: Any = None
    status: Any = None
    trace_id: Any = None
    model: _Release | None = None
    adapter: _Release | None = None
    decision: _Decision | None = None
    policy: _Policy | None = None
    requirements: _Requirements | None = None


_decode = msgspec.json.Decoder(_Entry).decode


# `_Scanner._bulk`'s layout: as `_Entry`, with an absent decision and absent obligations decoded as shared
# placeholders rather than None, so that `_allow_of` and `_review_of` read every entry's in C (a JSON null
# there fails to decode, and the bundle takes the entry-by-entry path, which reads null as absent), and the
# releases and the policy kept as their JSON text: a bundle's are nearly always the same, decoded once.
_UNDECIDED = object()
"""The `allow` of an entry without a decision (distinct from a decision without `allow`, which is None)."""
_NULL = msgspec.Raw(b"null")


class _BulkObligations(msgspec.Struct, frozen=True, gc=False):
    human_review: Any = None


class _BulkDecision(msgspec.Struct, frozen=True, gc=False):
    allow: Any = None
    reasons: Any = None
    obligations: _BulkObligations = _BulkObligations()


class _BulkEntry(_Entry, gc=False):
    model: msgspec.Raw = _NULL  # type: ignore[assignment]
    adapter: msgspec.Raw = _NULL  # type: ignore[assignment]
    decision: _BulkDecision = _BulkDecision(allow=_UNDECIDED)  # type: ignore[assignment]
    policy: msgspec.Raw = _NULL  # type: ignore[assignment]


_decode_bulk = msgspec.json.Decoder(_BulkEntry).decode
_decode_release = msgspec.json.Decoder(_Release | None).decode
_decode_policy = msgspec.json.Decoder(_Policy | None).decode
_time_of = operator.attrgetter("time")
_type_of = operator.attrgetter("type")
_requirements_of = operator.attrgetter("requirements")
_releases_of = operator.attrgetter("model", "adapter", "policy")
_allow_of = operator.attrgetter("decision.allow")
_review_of = operator.attrgetter("decision.obligations.human_review")
_bulk_key = operator.attrgetter("site", "status", "purpose", "data_class", "decision.allow")
_DAY_S = 86400.0
_BULK_TIME = re.compile(r"\d{4}-\d\d-\d\dT(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,9})?Z")
"""The entry times `_bulk` takes: stricter than `entry_time`, so that their order as text is their order in
time (a time it refuses sends its bundle down the entry-by-entry path, which judges it)."""
_MILLIS_SHAPE = "0000-00-00T00:00:00.000Z"
_DIGITS_AS_ZERO = str.maketrans("123456789", "000000000")


def _bulk_times(times: list[Any]) -> bool:
    """Whether every time is one `_BULK_TIME` takes; TypeError when one is not text.

    The agent's own times ('YYYY-MM-DDTHH:MM:SS.fffZ') are checked all at once, the shape of their text
    joined and the largest hour, minute and second; others one by one with `_BULK_TIME`."""
    joined = "".join(times)
    if joined.translate(_DIGITS_AS_ZERO) != _MILLIS_SHAPE * len(times):
        return all(map(_BULK_TIME.fullmatch, times))
    return (
        max(map(operator.getitem, times, itertools.repeat(slice(11, 13)))) <= "23"
        and max(joined[14::24]) <= "5"
        and max(joined[17::24]) <= "5"
    )


_activity_fields = operator.attrgetter("site", "status", "purpose", "data_class", "model", "adapter", "policy")
_decode_any = msgspec.json.Decoder().decode
_NO_RELEASE = _Release()
_NO_CENTRAL = _Central()


def _activity_key(  # noqa: PLR0917 - the activity table's columns, in its order
    site: Any, month: str, kind: str, status: Any, allow: Any, purpose: Any, data_class: Any,
    model: Any, adapter: Any, policy: Any,
) -> tuple[Any, ...]:  # fmt: skip
    """The activity tally's key: site, month, kind, outcome, purpose, data class, releases and policy."""
    central = (policy.central if policy is not None else None) or _NO_CENTRAL
    return (
        site, month, kind, status, allow, purpose, data_class,
        model.name, model.version, adapter.name, adapter.version,
        central.name, central.version, central.revision,
        bool(policy.local) if policy is not None else False,
    )  # fmt: skip


def _denial_keys(site: Any, decision: Any) -> list[tuple[Any, Any]]:
    """(site, reason) for every reason of a denial (one empty reason when none is given); TypeError
    when one cannot be a key."""
    reasons = decision.reasons if isinstance(decision.reasons, list) else [decision.reasons]
    keys = [(site, reason) for reason in reasons or ("",)]
    hash(tuple(keys))
    return keys


def _sampling_key(site: Any, model: _Release, adapter: _Release | None, report: Any) -> tuple[Any, ...] | None:
    """The sampling outcome's key of a request with requirement-checked sampling, None without;
    TypeError when it cannot be a key."""
    if report is None:
        return None
    adapter = adapter or _NO_RELEASE
    key = (site, model.name, adapter.name, adapter.version, report.strategy, report.requirements_met is True)
    hash(key)
    return key


class _Scanner:
    """Tallies one run of entries; `feed` is called once per entry in index order.

    `feed` is the report's inner loop (a million calls for a million entries). It decodes only
    the fields the tallies read (`_Entry`, with msgspec) and keeps raw values in its keys, leaving
    naming and normalising to the few hundred distinct keys at the end. An entry whose fields have
    unexpected types is normalised first (`_normalised`), so that no input makes the fast path
    miscount; the kinds of entry the report lists whole are decoded whole.
    """

    def __init__(self, period: Period, gap_s: float, wanted: frozenset[int], keep_all: bool) -> None:
        self.tally = Tally()
        self.period = period
        self.gap_s = gap_s
        self.wanted = wanted
        self._wanted_sorted = sorted(wanted)
        self.keep_all = keep_all
        self.all_time = period.start is None and period.end is None
        self._day = ""
        self._day_count = 0
        self._minute = ""
        self._minute_start = 0.0
        self._compact: dict[tuple[Any, ...], list[int]] = {}
        """`feed_many`'s activity counts (one-item lists, counted in place) under a short key:
        (`_activity_fields`, month, has a decision, allow), with model, adapter and policy as decoded;
        `finish` adds them to the tally's `activity` and `review_total` (hashing three structs is
        cheaper than taking eight names out of them entry by entry)."""

    def feed(self, index: int, data: bytes | memoryview) -> None:
        t = self.tally
        t.count += 1
        try:
            entry = _decode(data)
        except msgspec.ValidationError:
            entry = self._normalised(index, data)
            if entry is None:
                return
        except msgspec.DecodeError as exc:
            self._unparsable(index, str(exc))
            return
        text = entry.time
        kind = entry.type
        if kind.__class__ is not str:
            kind = entry.type = _text(kind) or "(none)"
        types = t.types
        types[kind] = types.get(kind, 0) + 1
        in_period = False
        if text.__class__ is not str or len(text) < 20 or text[10] != "T" or text[-1] != "Z":
            t.untimed += 1
        elif (last := t.last) is not None and text[:16] == last[1][:16] and text >= last[1]:
            # The common case: later in the same minute as the entry before (no gap, no regression).
            t.last = (index, text)
            t.max_time = max(t.max_time, text)
            if text[:10] == self._day:
                self._day_count += 1
            else:
                self._new_day(text)
            if index in self.wanted:
                t.times_at[index] = text
            in_period = self.all_time or text in self.period
        elif self._timed(index, text):
            in_period = self.all_time or text in self.period
        else:
            t.untimed += 1
        if in_period:
            t.in_period += 1
            if t.period_first is None:
                t.period_first = (index, text)
            t.period_last = (index, text)
        if kind == "inference" or is_request(kind):
            if in_period:
                self._request_or_normalised(index, entry, text, kind)
        elif self.keep_all or kind.startswith(_KEPT_PREFIXES):
            whole = _decode_any(data)
            t.events.append((index, whole if isinstance(whole, dict) else {"value": whole}))

    def feed_many(self, first: int, entries: Iterable[bytes | memoryview]) -> None:
        """`feed` for consecutive entries from index `first`, with the common case inline.

        The common case, nearly every entry of a site's log, is an inference request that decodes
        cleanly and has a valid time in the period asked about, later in the same minute as the entry
        before it. It is tallied here without a method call (a million entries would make millions),
        its running figures kept in local variables and stored back (`_store`) before any other
        entry goes through `feed`, and its activity counted under a short key that `finish`
        expands (`_compact`). Both paths count alike.
        """
        t = self.tally
        decode, period, all_time, wanted, gap_s = _decode, self.period, self.all_time, self.wanted, self.gap_s
        compact, denials, review_flagged, flagged = self._compact, t.denials, t.review_flagged, t.flagged
        last_index, last_text = t.last if t.last is not None else (-1, None)
        max_time = t.max_time
        inline = 0  # entries tallied here since the last `_store`
        no_first = t.period_first is None
        index = first - 1
        for data in entries:
            index += 1
            try:
                entry = decode(data)
            except msgspec.MsgspecError:
                entry = None
            if (
                entry is None
                or entry.type != "inference"
                or last_text is None
                or (text := entry.time).__class__ is not str
                or len(text) < 20
                or text[10] != "T"
                or text[-1] != "Z"
                or not (all_time or text in period)
            ):
                self._store(inline, last_index, last_text, max_time)
                self.feed(index, data)
                inline, max_time, no_first = 0, t.max_time, t.period_first is None
                last_index, last_text = t.last if t.last is not None else (-1, None)
                continue
            if text[:16] == last_text[:16] and text >= last_text:
                max_time = text if text > max_time else max_time  # type: ignore[operator]  # cheaper than max()
            elif (
                text[:10] == last_text[:10]
                and (step := self._step(last_text, text)) is not None
                and -CLOCK_TOLERANCE_S <= step <= gap_s
            ):  # another minute of the same day, neither a gap nor a regression: as `_timed` does
                max_time = text if text > max_time else max_time  # type: ignore[operator]
            else:  # a new day, a gap, a regression or an invalid time: `_timed` checks and records
                self._store(inline, last_index, last_text, max_time)
                inline = 0
                if not self._timed(index, text):  # an invalid time: `feed` counts it as untimed
                    self.feed(index, data)
                    max_time = t.max_time
                    last_index, last_text = t.last if t.last is not None else (-1, None)
                    continue
                self._day_count -= 1  # `_store` counts this entry's day with the others
                max_time = t.max_time
            last_index, last_text = index, text
            inline += 1
            if no_first:
                t.period_first, no_first = (index, text), False
            if index in wanted:
                t.times_at[index] = text
            decision = entry.decision
            allow = decision.allow if decision is not None else None
            key = (_activity_fields(entry), text[:7], decision is not None, allow)
            site, purpose, model = entry.site, entry.purpose, entry.model or _NO_RELEASE
            try:  # every key first, so that an entry is counted whole or not at all
                count = compact.get(key)
                denied = _denial_keys(site, decision) if allow is False else ()
                report = entry.requirements
                sampled = _sampling_key(site, model, entry.adapter, report) if report is not None else None
            except TypeError:  # a value that cannot be a key where a name belongs: as `feed` counts it
                self._request_or_normalised(index, entry, text)
                continue
            if count is None:
                count = compact[key] = [0]
            count[0] += 1
            for denial in denied:
                denials[denial] = denials.get(denial, 0) + 1
            obligations = decision.obligations if decision is not None else None
            if obligations is not None and obligations.human_review is True:
                pair = (site, purpose)
                review_flagged[pair] = review_flagged.get(pair, 0) + 1
                flagged.append(
                    (index, text, site, purpose, entry.data_class, model.name, model.version, entry.trace_id)
                )
            if sampled is not None:
                self._sampled(sampled, entry.requirements)
        self._store(inline, last_index, last_text, max_time)

    def feed_bundle(self, first: int, entries: Sequence[bytes | memoryview]) -> None:
        """`feed_many` for one entry bundle, tallied whole when it can be (`_bulk`)."""
        if not self._bulk(first, entries):
            self.feed_many(first, entries)

    def _bulk(self, first: int, entries: Sequence[bytes | memoryview]) -> bool:
        """Tally a bundle of ordinary requests whole, or change nothing and return False.

        Most bundles of a site's log are inference requests that decode cleanly, stamped within one day
        (the day of the entry before), in order but for concurrent requests' small inversions, in the
        period asked about, without requirement-checked sampling, on one model and one policy. Such a
        bundle has no gap (gaps are a day at least here), no regression and no untimed entry, so that
        what `feed_many` would count is counted here with C-level passes over the bundle (`map`, a
        `Counter` of short activity keys, the releases and policy decoded once) and a Python loop only
        over its inversions, denials and flags. Anything else, or any value that cannot be a key, and the
        bundle goes to `feed_many` untouched.
        """
        t = self.tally
        n = len(entries)
        if t.last is None or not n or self.gap_s < _DAY_S:
            return False
        last_text = t.last[1]
        try:
            decoded = list(map(_decode_bulk, entries))
            times = list(map(_time_of, decoded))
            releases = list(map(_releases_of, decoded))
            if (
                list(map(_type_of, decoded)).count("inference") != n
                or list(map(_requirements_of, decoded)).count(None) != n
                or releases.count(releases[0]) != n
                or not _BULK_TIME.fullmatch(last_text)
                or not _bulk_times(times)
                or not (earliest := min(times))[:10] == (latest := max(times))[:10] == last_text[:10]
                or not (self.all_time or (earliest in self.period and latest in self.period))
            ):
                return False
            before = [last_text, *times[:-1]]
            for i in itertools.compress(range(n), map(operator.gt, before, times)):  # concurrent requests
                if entry_time(times[i]) - entry_time(before[i]) < -CLOCK_TOLERANCE_S:  # type: ignore[operator]
                    return False  # a clock regression: `feed_many` records it
            model, adapter, policy = releases[0]
            model, adapter, policy = _decode_release(model), _decode_release(adapter), _decode_policy(policy)
            hash((model, adapter, policy))
            activity = Counter(map(_bulk_key, decoded))
            allows = list(map(_allow_of, decoded))
            denied = [
                _denial_keys(e.site, e.decision)
                for e in itertools.compress(decoded, map(operator.is_, allows, itertools.repeat(False)))
            ]
        except (msgspec.MsgspecError, TypeError):
            return False
        # Counted from here on; nothing below can fail.
        month = times[0][:7]
        compact = self._compact
        for (site, status, purpose, data_class, allow), number in activity.items():
            decided = allow is not _UNDECIDED
            key = (
                (site, status, purpose, data_class, model, adapter, policy),
                month,
                decided,
                allow if decided else None,
            )
            count = compact.get(key)
            if count is None:
                count = compact[key] = [0]
            count[0] += number
        denials = t.denials
        for keys in denied:
            for denial in keys:
                denials[denial] = denials.get(denial, 0) + 1
        release = model or _NO_RELEASE
        reviews = map(operator.is_, map(_review_of, decoded), itertools.repeat(True))
        for i in itertools.compress(range(n), reviews):
            e = decoded[i]
            pair = (e.site, e.purpose)
            t.review_flagged[pair] = t.review_flagged.get(pair, 0) + 1
            t.flagged.append(
                (first + i, times[i], e.site, e.purpose, e.data_class, release.name, release.version, e.trace_id)
            )
        wanted = self._wanted_sorted
        for index in wanted[bisect.bisect_left(wanted, first) : bisect.bisect_left(wanted, first + n)]:
            t.times_at[index] = times[index - first]
        t.count += n
        t.types["inference"] = t.types.get("inference", 0) + n
        t.in_period += n
        if t.period_first is None:
            t.period_first = (first, times[0])
        t.last = t.period_last = (first + n - 1, times[-1])
        t.max_time = latest if t.max_time is None or latest > t.max_time else t.max_time
        self._day_count += n  # the running day's (`_new_day`): the day of `t.last` before
        return True

    def _store(self, inline: int, last_index: int, last_text: str | None, max_time: str | None) -> None:
        """Store the running figures of `feed_many`'s last `inline` entries back into the tally."""
        if not inline:
            return
        t = self.tally
        t.count += inline
        t.types["inference"] = t.types.get("inference", 0) + inline
        t.in_period += inline
        t.last = t.period_last = (last_index, last_text)  # type: ignore[assignment]
        t.max_time = max_time
        self._day_count += inline  # entries in the same minute as the one before are in its day

    def _timed(self, index: int, text: str) -> bool:
        """A time that starts a new minute or goes back: checked for gaps and regressions. False if invalid."""
        t = self.tally
        last = t.last
        if last is None:
            if self._seconds(text) is None:
                return False
            t.first = (index, text)
        else:
            step = self._step(last[1], text)
            if step is None:
                return False
            if step > self.gap_s:
                t.gaps.append((last[0], last[1], index, text))
            elif step < -CLOCK_TOLERANCE_S:
                t.regressions += 1
                if len(t.regression_examples) < MAX_EXAMPLES:
                    t.regression_examples.append((index, text, last[1]))
        t.last = (index, text)
        if t.max_time is None or text > t.max_time:
            t.max_time = text
        if index in self.wanted:
            t.times_at[index] = text
        if text[:10] == self._day:
            self._day_count += 1
        else:
            self._new_day(text)
        return True

    def _step(self, earlier: str, later: str) -> float | None:
        """Seconds from the last entry's time `earlier` to `later`, as `_timed` computes them (0 when
        `earlier` has no valid seconds); None when `later` is not a valid time."""
        before = self._seconds(earlier)
        when = self._seconds(later)
        if when is None:
            return None
        return when - (before if before is not None else when)

    def _seconds(self, text: str) -> float | None:
        """POSIX seconds of an entry time, the calendar part computed once per minute."""
        minute = text[:16]
        if minute != self._minute:
            start = _DAY_START.get(minute[:10])
            if start is not None and len(minute) == 16 and minute[10] == "T":
                # A day seen before: `entry_time(minute + ":00Z")` without its checks and day lookup.
                try:
                    start = start + int(minute[11:13]) * 3600 + int(minute[14:16]) * 60
                except ValueError:
                    return None
            else:
                start = entry_time(minute + ":00Z")
                if start is None:
                    return None
            self._minute, self._minute_start = minute, start
        try:
            return self._minute_start + float(text[17:-1])
        except ValueError:
            return None

    def _new_day(self, text: str) -> None:
        if self._day_count:
            days = self.tally.days
            days[self._day] = days.get(self._day, 0) + self._day_count
        self._day, self._day_count = text[:10], 1

    def finish(self) -> Tally:
        """The tally, with the running day's count added and `feed_many`'s short keys expanded."""
        self._new_day("")
        self._day_count = 0
        t = self.tally
        for (fields, month, decided, allow), (n,) in self._compact.items():
            site, status, purpose, data_class, model, adapter, policy = fields
            key = _activity_key(
                site, month, "inference", status, allow, purpose, data_class,
                model or _NO_RELEASE, adapter or _NO_RELEASE, policy,
            )  # fmt: skip
            t.activity[key] = t.activity.get(key, 0) + n
            if decided:
                t.review_total[site, purpose] = t.review_total.get((site, purpose), 0) + n
        self._compact.clear()
        return t

    def _request_or_normalised(self, index: int, entry: _Entry, text: str, kind: str = "inference") -> None:
        """Count a request; one with a value that cannot be a key where a name belongs is normalised first."""
        try:
            self._request(index, kind, entry, text)
        except TypeError:
            self._request(index, kind, _normalise(entry), text)

    def _request(self, index: int, kind: str, entry: _Entry, text: str) -> None:
        """Count a request; TypeError, before anything is counted, if a key would hold an unhashable value."""
        t = self.tally
        model = entry.model or _NO_RELEASE
        adapter = entry.adapter or _NO_RELEASE
        decision = entry.decision
        site, purpose = entry.site, entry.purpose
        allow = decision.allow if decision is not None else None
        key = _activity_key(
            site, text[:7], kind, entry.status, allow, purpose, entry.data_class, model, adapter, entry.policy
        )
        activity = t.activity
        count = activity.get(key, 0)
        denied = _denial_keys(site, decision) if decision is not None and allow is False else ()
        sampled = _sampling_key(site, model, adapter, entry.requirements)
        activity[key] = count + 1
        for denial in denied:
            t.denials[denial] = t.denials.get(denial, 0) + 1
        if decision is not None:
            pair = (site, purpose)
            t.review_total[pair] = t.review_total.get(pair, 0) + 1
            if decision.obligations is not None and decision.obligations.human_review is True:
                t.review_flagged[pair] = t.review_flagged.get(pair, 0) + 1
                t.flagged.append(
                    (index, text, site, purpose, entry.data_class, model.name, model.version, entry.trace_id)
                )
        if sampled is not None:
            self._sampled(sampled, entry.requirements)

    def _sampled(self, key: tuple[Any, ...], report: Any) -> None:
        t = self.tally
        t.sampling[key] = t.sampling.get(key, 0) + 1
        if report.drawn.__class__ is int:
            t.sampling_candidates += report.drawn

    def _normalised(self, index: int, data: bytes | memoryview) -> _Entry | None:
        """An entry with fields of unexpected types, decoded whole and normalised; None if unparsable."""
        try:
            whole = _decode_any(data)
        except msgspec.DecodeError as exc:
            self._unparsable(index, str(exc))
            return None
        if not isinstance(whole, dict):
            self._unparsable(index, f"the entry is a JSON {type(whole).__name__}, not an object")
            return None
        return _normalise(whole)

    def _unparsable(self, index: int, message: str) -> None:
        t = self.tally
        t.unparsable += 1
        if len(t.unparsable_examples) < MAX_EXAMPLES:
            t.unparsable_examples.append((index, " ".join(message.split())[:200]))


def _normalise(entry: dict[str, Any] | _Entry) -> _Entry:
    """An `_Entry` whose every read field is a string, an int, a bool or None (names as text)."""
    get = entry.get if isinstance(entry, dict) else lambda k: _plain(getattr(entry, k, None))
    sub = lambda v, k: v.get(k) if isinstance(v, dict) else None  # noqa: E731

    def release(v: Any) -> _Release | None:
        return _Release(_text(sub(v, "name")), _text(sub(v, "version"))) if v is not None else None

    decision, policy, requirements = get("decision"), get("policy"), get("requirements")
    reasons = sub(decision, "reasons")
    central = sub(policy, "central")
    status = get("status")
    return _Entry(
        time=get("time") if isinstance(get("time"), str) else None,
        type=_text(get("type")) or "(none)",
        site=_text(get("site")),
        purpose=_text(get("purpose")),
        data_class=_text(get("data_class")),
        status=status if isinstance(status, int) and not isinstance(status, bool) else None,
        trace_id=_text(get("trace_id")),
        model=release(get("model")),
        adapter=release(get("adapter")),
        decision=_Decision(
            allow=sub(decision, "allow") if isinstance(sub(decision, "allow"), bool) else None,
            reasons=[_text(r) for r in reasons] if isinstance(reasons, list) else [],
            obligations=_Obligations(sub(sub(decision, "obligations"), "human_review") is True),
        )
        if isinstance(decision, dict)
        else None,
        policy=_Policy(
            _Central(*(_text(sub(central, k)) for k in ("name", "version", "revision"))) if central else None,
            bool(sub(policy, "local")),
        )
        if isinstance(policy, dict)
        else None,
        requirements=_Requirements(
            _text(sub(requirements, "strategy")),
            sub(requirements, "requirements_met") is True,
            sub(requirements, "drawn"),
        )
        if isinstance(requirements, dict)
        else None,
    )


def _plain(value: Any) -> Any:
    """A decoded struct as plain JSON values (for `_normalise`)."""
    return msgspec.to_builtins(value) if isinstance(value, msgspec.Struct) else value


# -- a run of bundles, in a worker process ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """A run of consecutive bundles for one worker, and a share of the signed notes to open."""

    root: str | None
    bundles: list[tuple[int, int, tuple[str, bytes] | None]]
    period: Period
    gap_s: float
    wanted: frozenset[int]
    keep_all: bool
    notes: tuple[tuple[int, str], ...] = ()
    vkeys: tuple[str, ...] = ()
    rows: RowFormat | None = None
    size: int = 0
    """Entries in the whole scan (where each level starts in `_shared_levels`)."""


_shared_levels: mmap.mmap | None = None
"""In a parallel scan, a shared buffer (made before the workers fork) that they write their runs' tree
levels 0-8 into: each level of the whole scan back to back (`_level_offset`). Tens of megabytes of
hashes then cross to the parent without being pickled, piped and unpickled."""


def _level_offset(size: int, height: int) -> int:
    """Where level `height` of a scan of `size` entries starts in `_shared_levels`."""
    return sum(size >> h for h in range(height)) * HASH_SIZE


Opened = tuple[int, tuple[str, ...], tuple[tuple[str, int], ...], str]
"""A note opened in a worker: (its number, log signers, (witness, time) cosignatures, error or '')."""


def _open_notes(notes: Sequence[tuple[int, str]], vkeys: Sequence[str]) -> list[Opened]:
    verifiers = [Verifier(k) for k in vkeys]
    out: list[Opened] = []
    for number, signed in notes:
        try:
            note = open_note(signed, verifiers)
        except AuditError as exc:
            out.append((number, (), (), str(exc)))
            continue
        signers = tuple(s.key for s in note.signatures if s.timestamp is None)
        cosigned = tuple((s.key, s.timestamp) for s in note.signatures if s.timestamp is not None)
        out.append((number, signers, cosigned, ""))
    return out


def _scan_run(job: _Job) -> tuple[list[bytes], list[tuple[int, str, str]], Tally, list[Opened]]:
    """Hash and tally a run of consecutive bundles: tree levels 0-8 over them, bundle problems, the tally,
    and the job's share of signed notes opened (signature checks are the other CPU cost of a report)."""
    with gc_paused():
        return _scan_bundles(job)


def _scan_bundles(job: _Job) -> tuple[list[bytes], list[tuple[int, str, str]], Tally, list[Opened]]:
    opened = _open_notes(job.notes, job.vkeys)
    root, jobs, period, gap_s, wanted, keep_all = job.root, job.bundles, job.period, job.gap_s, job.wanted, job.keep_all
    src = Source(Path(root)) if root is not None else None
    leaves = bytearray()
    problems: list[tuple[int, str, str]] = []
    scanner = _Scanner(period, gap_s, wanted, keep_all)
    for n, width, given in jobs:
        found = src.read_tile(tiles.bundle_path(n), width) if src is not None else given
        if found is None:
            rel = tiles.bundle_path(n, width)
            problems.append((n, f"entry bundle {rel} is missing", rel))
            leaves += bytes(width * HASH_SIZE)
            continue
        used, data = found
        entries, problem = split_bundle(data, width, exact=used == tiles.bundle_path(n, width))
        if problem:
            problems.append((n, f"entry bundle {used}: {problem}", used))
        leaves += leaf_hashes(entries)
        leaves += bytes((width - len(entries)) * HASH_SIZE)
        scanner.feed_bundle(n * tiles.TILE_WIDTH, entries)
    levels = merkle.Tree.from_concatenated(leaves).levels[:_JOB_LEVELS]
    if _shared_levels is not None and jobs:  # a worker: into the parent's buffer, not through the pipe
        first = jobs[0][0] * tiles.TILE_WIDTH
        for h, level in enumerate(levels):
            at = _level_offset(job.size, h) + (first >> h) * HASH_SIZE
            _shared_levels[at : at + len(level)] = level
        levels = []
    tally = scanner.finish()
    if job.rows is not None:  # written here, in parallel, rather than returned as tuples
        tally.flagged_rows = EncodedRows.of(flagged_rows(job.rows.label, job.rows.names, tally.flagged))
        tally.flagged = []
    return [bytes(level) for level in levels], problems, tally, opened


@dataclass
class Scanned:
    tree: merkle.Tree
    bundle_problems: list[tuple[int, str, str]]
    tally: Tally
    opened: dict[int, Opened] = field(default_factory=dict)
    """The signed notes given to `scan`, opened: note number -> what `open_note` found."""


def scan(
    src: Source,
    size: int,
    *,
    period: Period = Period(),
    gap_s: float = 86400.0,
    wanted: Iterable[int] = (),
    keep_all: bool = False,
    workers: int | None = None,
    notes: Sequence[str] = (),
    vkeys: Sequence[str] = (),
    rows: RowFormat | None = None,
    meanwhile: Callable[[], object] | None = None,
) -> Scanned:
    """Hash and tally the first `size` entries of an export.

    `wanted` are indexes whose entry time the caller needs (the last entry of each checkpoint);
    `keep_all` keeps every entry whole (for a controller's log, whose every entry is an action);
    `notes` (the log's checkpoint history) are opened with `vkeys` in the same workers; with `rows`,
    the workers write the flagged requests' rows (`Tally.flagged_rows`). `meanwhile` is called while the
    workers of a parallel scan work (this process would otherwise only wait for them).
    """
    bundles = list(tiles.bundles(size))
    runs = [bundles[i : i + _JOB_BUNDLES] for i in range(0, len(bundles), _JOB_BUNDLES)]
    directory = str(src.path) if src.is_directory else None
    want = frozenset(wanted)

    numbered = list(enumerate(notes))
    shares = max(len(runs), 1)

    def job(number: int, run: Sequence[tuple[int, int]]) -> _Job:
        if directory is not None:
            given: list[tuple[int, int, tuple[str, bytes] | None]] = [(n, w, None) for n, w in run]
        else:
            given = [(n, w, src.read_tile(tiles.bundle_path(n), w)) for n, w in run]
        share = tuple(numbered[number::shares])
        return _Job(directory, given, period, gap_s, want, keep_all, share, tuple(vkeys), rows, size)

    if not runs:
        runs = [[]]
    count = min(workers or os.cpu_count() or 1, len(runs))
    # Fork only from a single-threaded process (as audit.export does).
    if count > 1 and size >= _PARALLEL_MIN_ENTRIES and threading.active_count() == 1:
        global _shared_levels  # noqa: PLW0603 (inherited by the workers at fork: see `_shared_levels`)
        ctx = multiprocessing.get_context("fork")
        shared = _shared_levels = mmap.mmap(-1, _level_offset(size, _JOB_LEVELS))
        try:
            with ProcessPoolExecutor(count, mp_context=ctx) as pool:
                pending = pool.map(_scan_run, (job(i, run) for i, run in enumerate(runs)))  # submits them all
                if meanwhile is not None:
                    meanwhile()
                results = list(pending)
        finally:
            _shared_levels = None
        with shared, memoryview(shared) as view:  # the tree copies the levels out of the buffer
            tree = merkle.Tree.from_levels(
                [view[_level_offset(size, h) : _level_offset(size, h + 1)] for h in range(_JOB_LEVELS)]
            )
    else:
        results = [_scan_run(job(i, run)) for i, run in enumerate(runs)]
        tree = None
    levels: list[bytearray] = [bytearray() for _ in range(_JOB_LEVELS)]
    problems: list[tuple[int, str, str]] = []
    tally = Tally()
    opened: dict[int, Opened] = {}
    for run_levels, run_problems, run_tally, run_opened in results:
        for h, level in enumerate(run_levels):
            levels[h] += level
        problems += run_problems
        tally.merge(run_tally, gap_s)
        opened.update((o[0], o) for o in run_opened)
    if tree is None:
        while levels and not levels[-1]:
            levels.pop()
        tree = merkle.Tree.from_levels(levels)
    return Scanned(tree, problems, tally, opened)
