"""The report's one-pass scan: its inline path for the common entry (`_Scanner.feed_many`) counts every
entry exactly as the entry-by-entry path (`_Scanner.feed`) does, on logs mixing ordinary requests with
what an attacker or a broken writer could put in a log: unparsable entries, fields of the wrong type,
values that cannot be keys, times that are invalid, go back, jump days or leave gaps."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from audit import Log
from audit.note import Signer, generate_key
from audit.report import scan as scan_module
from audit.report.scan import Period, Tally, _Scanner, entry_time

SITE = "5d2f3c1e-1111-4a1a-9a1a-000000000001"


def _time(seconds: int, rng: random.Random) -> str:
    day, rest = divmod(seconds, 86400)
    hour, rest = divmod(rest, 3600)
    minute, second = divmod(rest, 60)
    return f"2026-05-{1 + day:02d}T{hour:02d}:{minute:02d}:{second:02d}.{rng.randrange(1000):03d}Z"


def _request(stamp: str, rng: random.Random, *, plain: bool = False) -> dict[str, Any]:
    """A request; `plain`: an OIP inference request without requirement-checked sampling."""
    allow = rng.random() > 0.2
    entry: dict[str, Any] = {
        "time": stamp,
        "site": SITE,
        "type": "inference" if plain else rng.choice(("inference", "inference", "inference", "chat.completions")),
        "caller": "teller-app",
        "purpose": rng.choice(("fraud-detection", "credit-scoring")),
        "data_class": "internal",
        "model": {"name": "fraud", "version": "1.0.0" if plain else rng.choice(("1.0.0", "1.1.0")), "digest": "a" * 64},
        "trace_id": f"{rng.getrandbits(64):016x}",
        "policy": {"central": {"name": "bank", "version": "1.2.0", "revision": "r1"}, "local": None},
        "decision": {
            "allow": allow,
            "reasons": [] if allow else [rng.choice(("purpose not allowed", "data class too high"))],
            "obligations": {"human_review": True} if rng.random() < 0.3 else {"max_batch": 64},
        },
        "status": 200 if allow else 403,
    }
    if not plain and rng.random() < 0.1:
        entry["adapter"] = {"name": "fraud-lora", "version": "0.1.0"}
        met = rng.random() < 0.8
        entry["requirements"] = {"strategy": "bernoulli", "requirements_met": met, "drawn": rng.randrange(9)}
    return entry


# Ways to spoil one entry, each something the scan must count as the entry-by-entry path does.
_ODDITIES: list[Any] = [
    lambda e: b"{not json",
    lambda e: b"[1, 2]",
    lambda e: {**e, "time": "not-a-time"},
    lambda e: {**e, "time": e["time"][:14] + "xx" + e["time"][16:]},  # the minute is not a number
    lambda e: {**e, "time": e["time"][:17] + "99.000Z"},  # seconds past the minute's end
    lambda e: {**e, "time": e["time"][:17] + "ab.cdeZ"},
    lambda e: {**e, "time": 1777593600},
    lambda e: {**e, "type": ["inference"]},
    lambda e: {**e, "type": None},
    lambda e: {**e, "purpose": ["a", "list"]},
    lambda e: {**e, "purpose": 7},
    lambda e: {**e, "status": "200"},
    lambda e: {**e, "model": "fraud"},
    lambda e: {**e, "model": {"name": ["fraud"], "version": 1}},
    lambda e: {**e, "policy": {"central": {"name": {"x": 1}}, "local": None}},
    lambda e: {**e, "policy": {"central": None, "local": ["site", "rules"]}},
    lambda e: {**e, "decision": {"allow": False, "reasons": [["nested"], "plain"]}},
    lambda e: {**e, "decision": {"allow": False, "reasons": "a single reason"}},
    lambda e: {**e, "decision": {"allow": "no", "obligations": {"human_review": "yes"}}},
    lambda e: {**e, "decision": ["allow"]},
    lambda e: {**e, "requirements": {"strategy": ["x"], "requirements_met": True, "drawn": 3}},
    lambda e: {**e, "requirements": "checked"},
    lambda e: {**e, "type": "activation", "release": {"name": "fraud", "version": "1.1.0"}},
    lambda e: {**e, "type": "sync.failed", "error": "timeout"},
]


def _log(
    seed: int, count: int, *, trouble: float = 1.0, spoil_rate: float = 0.125, plain_rate: float = 0.0
) -> list[bytes]:
    """A seeded log: requests every few seconds, with jumps (gaps, a later day), clocks going back,
    and about one entry in eight spoilt one of the ways above. With less `trouble`, a lower `spoil_rate`
    and a `plain_rate` of plain requests, the log is more like a site's: mostly plain requests in order,
    with the same kinds of trouble now and then."""
    rng = random.Random(seed)
    clock = 36_000
    entries = []
    for _ in range(count):
        roll = rng.random() / trouble
        if roll < 0.003:
            clock += rng.choice((7_200, 90_000))  # gaps of hours and of a day
        elif roll < 0.03:
            clock -= rng.choice((1, 30, 4_000))  # small inversions and clock regressions
        else:
            clock += rng.randrange(0, 20)
        entry = _request(_time(clock, rng), rng, plain=plain_rate > 0 and rng.random() < plain_rate)
        if rng.random() < spoil_rate:
            spoilt = rng.choice(_ODDITIES)(entry)
            entries.append(spoilt if isinstance(spoilt, bytes) else json.dumps(spoilt).encode())
        else:
            entries.append(json.dumps(entry, separators=(",", ":")).encode())
    return entries


def _tally_entry_by_entry(entries: list[bytes], **options: Any) -> Tally:
    scanner = _Scanner(**options)
    for index, entry in enumerate(entries):
        scanner.feed(index, entry)
    return scanner.finish()


def _tally_in_bundles(entries: list[bytes], rng: random.Random, **options: Any) -> Tally:
    scanner = _Scanner(**options)
    start = 0
    while start < len(entries):
        end = min(len(entries), start + rng.randrange(1, 300))
        scanner.feed_many(start, [memoryview(e) for e in entries[start:end]])
        start = end
    return scanner.finish()


@pytest.mark.parametrize(
    ("seed", "period", "gap_s"),
    [
        (1, Period(), 86400.0),
        (2, Period(), 600.0),  # gaps shorter than the minutes between some entries
        (3, Period("2026-05-01T10:30:00", "2026-05-04T00:00:00"), 3600.0),
        (4, Period(), 30.0),
    ],
)
def test_bundle_scan_counts_every_entry_as_the_entry_by_entry_scan(seed: int, period: Period, gap_s: float) -> None:
    entries = _log(seed, 6_000)
    options = {"period": period, "gap_s": gap_s, "wanted": frozenset(range(0, 6_000, 97)), "keep_all": False}
    expected = _tally_entry_by_entry(entries, **options)
    got = _tally_in_bundles(entries, random.Random(seed), **options)
    assert got == expected
    # The log does exercise what it is meant to: requests counted, and every kind of trouble seen.
    assert sum(expected.activity.values()) > 1_000
    assert expected.unparsable and expected.untimed and expected.regressions and expected.gaps
    assert expected.flagged and expected.denials and expected.sampling and expected.events


@pytest.mark.parametrize(
    ("seed", "period", "gap_s"),
    [
        (11, Period(), 86400.0),
        (12, Period("2026-05-01T20:00:00", "2026-05-03T00:00:00"), 86400.0),
        (13, Period(), 600.0),  # gaps shorter than a day: no bundle is tallied whole
    ],
)
def test_whole_bundles_count_every_entry_as_the_entry_by_entry_scan(
    seed: int, period: Period, gap_s: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_Scanner.feed_bundle`, the scan's path: most bundles of a site's log are tallied whole (`_bulk`),
    the others entry by entry, and the tally is the same as the entry-by-entry scan's."""
    entries = _log(seed, 30_000, trouble=0.05, spoil_rate=0.0005, plain_rate=0.999)
    options = {"period": period, "gap_s": gap_s, "wanted": frozenset(range(0, 30_000, 997)), "keep_all": False}
    expected = _tally_entry_by_entry(entries, **options)
    whole: list[bool] = []
    bulk = _Scanner._bulk

    def spied(self: _Scanner, first: int, bundle: Any) -> bool:
        whole.append(bulk(self, first, bundle))
        return whole[-1]

    monkeypatch.setattr(_Scanner, "_bulk", spied)
    scanner = _Scanner(**options)
    for first in range(0, len(entries), 256):
        scanner.feed_bundle(first, [memoryview(e) for e in entries[first : first + 256]])
    assert scanner.finish() == expected
    if gap_s < 86400:
        assert not any(whole)
    else:  # both paths taken (most bundles whole over all time; a period holds a fifth), the trouble counted
        assert (0.5 if period == Period() else 0.05) * len(whole) < sum(whole) < len(whole)
        assert expected.flagged and expected.denials and expected.gaps and expected.regressions


@pytest.mark.parametrize(
    "spoil",
    [
        lambda e: {**e, "model": "fraud"},
        lambda e: {**e, "model": {"name": ["fraud"], "version": 1}},
        lambda e: {**e, "policy": {"central": {"name": {"x": 1}}, "local": None}},
        lambda e: {**e, "decision": None},
        lambda e: {**e, "decision": {**e["decision"], "obligations": None}},
        lambda e: {**e, "time": e["time"][:11] + "24" + e["time"][13:]},  # hour 24: invalid
        lambda e: {**e, "time": e["time"][:-5] + "Z"},  # whole seconds
        lambda e: {**e, "time": e["time"][:-1] + "123456Z"},  # microseconds
    ],
)
def test_bundles_whose_every_entry_is_odd_the_same_way_are_counted_as_entry_by_entry(spoil: Any) -> None:
    """What `_Scanner._bulk` reads once per bundle (the releases and policy) or checks all at once (the
    times) may be odd in every entry alike: counted as the entry-by-entry scan counts it."""
    rng = random.Random(21)
    entries = [json.dumps(spoil(_request(_time(36_000 + 5 * i, rng), rng, plain=True))).encode() for i in range(1_024)]
    options = {"period": Period(), "gap_s": 86400.0, "wanted": frozenset(range(0, 1_024, 97)), "keep_all": False}
    scanner = _Scanner(**options)
    for first in range(0, len(entries), 256):
        scanner.feed_bundle(first, [memoryview(e) for e in entries[first : first + 256]])
    assert scanner.finish() == _tally_entry_by_entry(entries, **options)


def test_an_entry_with_a_value_that_cannot_be_a_key_is_counted_once_normalised() -> None:
    rng = random.Random(5)
    first = _request("2026-05-01T10:00:00.000Z", rng) | {"type": "inference"}
    first["decision"] = {"allow": True, "reasons": [], "obligations": {"max_batch": 64}}
    denied = _request("2026-05-01T10:00:01.000Z", rng) | {"type": "inference"}
    denied["decision"] = {"allow": False, "reasons": ["plain", ["nested"]], "obligations": {"human_review": True}}
    entries = [json.dumps(e).encode() for e in (first, denied)]
    for tally in (
        _tally_entry_by_entry(entries, period=Period(), gap_s=86400.0, wanted=frozenset(), keep_all=False),
        _tally_in_bundles(entries, rng, period=Period(), gap_s=86400.0, wanted=frozenset(), keep_all=False),
    ):
        assert sum(tally.activity.values()) == 2
        assert tally.denials[(SITE, "plain")] == 1
        assert tally.denials[(SITE, "['nested']")] == 1
        assert len(tally.flagged) == 1 and tally.flagged[0][0] == 1


def test_the_scanners_minute_by_minute_seconds_are_entry_time() -> None:
    """`_Scanner._seconds` computes a minute's start once, from the day's when it has seen the day;
    whatever the text, it gives what `entry_time` gives."""
    rng = random.Random(7)
    texts = [_time(rng.randrange(0, 9 * 86400), rng) for _ in range(2_000)]
    texts += [
        "2026-05-01T1a:00:00.000Z",
        "2026-05-01T10:6x:00.000Z",
        "2026-05-01T10:00:xx.000Z",
        "2026-05-01T24:00:00.000Z",
        "2026-05-01T10:٣٣:00.000Z",  # digits int() accepts
        "2026-05-01 10:00:00.000Z",
        "2026-05-01T10:00:00.5Z",
        "2026-13-01T10:00:00.000Z",
    ]
    scanner = _Scanner(Period(), 86400.0, frozenset(), False)
    for text in [*texts, *reversed(texts), *rng.sample(texts, len(texts))]:
        assert scanner._seconds(text) == entry_time(text), text


_PARALLEL_CHECK = """
import sys
from pathlib import Path
from audit.export import Source
from audit.report import scan as scan_module
from audit.report.scan import RowFormat, scan

forked = []
pool = scan_module.ProcessPoolExecutor
scan_module.ProcessPoolExecutor = lambda *a, **k: forked.append(1) or pool(*a, **k)
src, size = Source(Path(sys.argv[1])), int(sys.argv[2])
rows = RowFormat("branch (site)", {sys.argv[3]: "branch"})
options = dict(gap_s=600.0, wanted=range(0, size, 997), rows=rows)
parallel = scan(src, size, **options)
assert forked and scan_module._shared_levels is None, "the scan did not run in worker processes"
alone = scan(src, size, workers=1, **options)
assert parallel.tree.levels == alone.tree.levels
assert parallel.bundle_problems == alone.bundle_problems
assert parallel.tally == alone.tally
assert parallel.tally.flagged_rows.count > 1000
print("same")
"""


def test_a_parallel_scan_gives_the_tree_and_tally_of_a_scan_in_one_process(tmp_path: Path) -> None:
    """Workers hand their runs' tree levels over in shared memory and write the flagged rows themselves;
    a scan of more entries than the parallel threshold (with a partial last bundle, and every oddity)
    gives the same tree, tally and rows as one process scanning alone. Run in a fresh single-threaded
    process, where the scan forks (pytest's runner may have threads)."""
    size = scan_module._PARALLEL_MIN_ENTRIES + 300
    with Log.open(tmp_path / "log", Signer(generate_key("sitewarden/test-site")[0])) as log:
        log.append_many(_log(11, size))
        log.checkpoint()
        export = log.export(tmp_path / "export")
    done = subprocess.run(
        [sys.executable, "-c", _PARALLEL_CHECK, str(export), str(size), SITE], capture_output=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == b"same", done.stderr.decode()[-3000:]
