"""Rows written ahead of time, run by run (as the scan's workers write the oversight table), give data
files byte for byte those of the same rows written at once, whatever the cells hold."""

from __future__ import annotations

import csv
import io
import json
import random
from typing import Any

import pytest

from audit.report.datafiles import KEPT_ROWS, EncodedRows, csv_file, json_file

CELLS = [
    "plain",
    "",
    "a,b",
    'say "hi"',
    "two\nlines",
    "cr\rhere",
    "tab\there",
    "ünïcødé ✓",
    "\x00\x1f",
    "\\",
    None,
    " spaced ",
    0.1,
    1e16,
    -3,
]


def _rows(rng: random.Random, count: int) -> list[tuple[Any, ...]]:
    return [
        (f"log {i // 40}", i, *(rng.choice(CELLS) for _ in range(4)), rng.choice((True, False, 7)))
        for i in range(count)
    ]


def _at_once(title: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> tuple[bytes, bytes]:
    """The data files as the report wrote them before rows were written ahead."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    doc = {"title": title, "columns": list(columns), "row_count": len(rows), "rows": rows}
    return buf.getvalue().encode(), (json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


@pytest.mark.parametrize("count", [0, 1, 3, 170])
def test_rows_written_in_runs_give_the_bytes_of_rows_written_at_once(count: int) -> None:
    rows = _rows(random.Random(count), count)
    columns = ("log", "entry", "a", "b", "c", "d", "flag")
    encoded = EncodedRows()
    for start in range(0, count, 37):  # runs of unequal size, some of them empty
        encoded.extend(EncodedRows.of(rows[start : start + 37]))
        encoded.extend(EncodedRows.of([]))
    want_csv, want_json = _at_once('Title, "quoted"', columns, rows)
    assert csv_file(columns, encoded) == csv_file(columns, rows) == want_csv
    assert json_file('Title, "quoted"', columns, encoded) == json_file('Title, "quoted"', columns, rows) == want_json
    assert len(encoded) == count and list(encoded[:KEPT_ROWS]) == rows[:KEPT_ROWS]


@pytest.mark.parametrize("rows", [[("",)], [("x",), ("",), (None,)], [()], [("", ""), (None, None)], [(1,), ("a,b",)]])
def test_short_rows_are_written_as_the_csv_writer_writes_them(rows: list[tuple[Any, ...]]) -> None:
    assert csv_file(("only",), rows) == _at_once("t", ("only",), rows)[0]


def test_rows_beyond_those_kept_are_refused_rather_than_made_up() -> None:
    rows = _rows(random.Random(1), KEPT_ROWS + 5)
    encoded = EncodedRows.of(rows)
    assert encoded[KEPT_ROWS - 1] == rows[KEPT_ROWS - 1]
    with pytest.raises(IndexError):
        encoded[KEPT_ROWS]
    with pytest.raises(IndexError):
        encoded[:]
    with pytest.raises(IndexError):
        list(encoded)
