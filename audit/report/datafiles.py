"""How a table's rows are written to its data files, `data/<name>.csv` and `data/<name>.json`, and rows
written ahead of time (`EncodedRows`).

A site's log can flag a hundred thousand requests for human review, and each is a row of the oversight
table. The scan's workers write those rows as the data files hold them, in parallel and run by run
(`flagged_rows`), so that the report's main process only joins text. Rows are written by the same
`csv` writer and `json` encoder either way, and CSV lines and JSON arrays concatenate, so the files
are byte for byte those of rows written at the end.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

KEPT_ROWS = 50
"""How many rows written ahead `EncodedRows` keeps as tuples, for the tables the HTML and PDF show."""


def cell_text(value: Any) -> str:
    """A cell of a table that names something: text as it is, None as empty, a bool as yes or no."""
    if value.__class__ is str:  # nearly always: tables of a million entries call this for every cell
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value if isinstance(value, str) else str(value)


def flagged_rows(label: str, names: dict[str, str], flagged: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows of the oversight table's `human_review_requests` for a log's flagged requests (`Tally.flagged`)."""
    text = cell_text
    return [
        (
            label,
            index,
            text(time),
            names.get(text(site), text(site)),
            text(purpose),
            text(data_class),
            text(model),
            text(version),
            text(trace),
        )
        for index, time, site, purpose, data_class, model, version, trace in flagged
    ]


def csv_lines(rows: Iterable[Sequence[Any]]) -> str:
    """Rows as CSV lines ('\\n'-terminated; None is written as an empty field), as `csv.writer` writes them.

    A row of two cells or more, without None, whose cells hold no comma, quote or line break is what the
    writer makes of it (its cells as `str` gives them, joined with commas): such rows, nearly all, are
    joined here at half the writer's cost; any other row (a lone empty cell is quoted) is the writer's.
    """
    lines = []
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for row in rows:
        if len(row) > 1 and None not in row:
            line = ",".join(map(str, row))
            if line.count(",") == len(row) - 1 and '"' not in line and "\n" not in line and "\r" not in line:
                lines.append(line)
                continue
        writer.writerow(row)
        lines.append(buf.getvalue()[:-1])
        buf.seek(0)
        buf.truncate()
    return "\n".join(lines) + "\n" if lines else ""


def json_arrays(rows: Iterable[Sequence[Any]]) -> str:
    """Rows as JSON arrays separated by commas, as they appear inside the data file's `rows` array."""
    return json.dumps(list(rows), ensure_ascii=False, separators=(",", ":"))[1:-1]


class EncodedRows(Sequence[tuple[Any, ...]]):
    """Rows already written as CSV lines and JSON arrays (in fragments, joined when the files are
    written), with their count and the first `KEPT_ROWS` rows as tuples.

    It stands for the rows in a `Table`: its length is the row count, and it can be sliced within
    the rows it keeps (what the HTML shows); rows beyond them were not kept.
    """

    def __init__(self) -> None:
        self.count = 0
        self.csv: list[str] = []
        self.json: list[str] = []
        self.head: list[tuple[Any, ...]] = []

    @classmethod
    def of(cls, rows: Sequence[tuple[Any, ...]]) -> EncodedRows:
        encoded = cls()
        if rows:
            encoded.count = len(rows)
            encoded.csv.append(csv_lines(rows))
            encoded.json.append(json_arrays(rows))
            encoded.head = list(rows[:KEPT_ROWS])
        return encoded

    def extend(self, later: EncodedRows) -> None:
        """Add the rows that follow these."""
        self.count += later.count
        self.csv += later.csv
        self.json += later.json
        self.head += later.head[: KEPT_ROWS - len(self.head)]

    def csv_text(self) -> str:
        return "".join(self.csv)

    def json_text(self) -> str:
        return ",".join(self.json)

    def __len__(self) -> int:
        return self.count

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EncodedRows):
            return NotImplemented
        return (self.count, self.head, self.csv_text(), self.json_text()) == (
            other.count,
            other.head,
            other.csv_text(),
            other.json_text(),
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        if self.count > len(self.head):
            raise IndexError(f"only the first {len(self.head)} of {self.count} encoded rows are kept as tuples")
        return iter(self.head)

    @overload
    def __getitem__(self, index: int) -> tuple[Any, ...]: ...
    @overload
    def __getitem__(self, index: slice) -> list[tuple[Any, ...]]: ...
    def __getitem__(self, index: int | slice) -> tuple[Any, ...] | list[tuple[Any, ...]]:
        wanted = range(self.count)[index]
        last = max(wanted, default=-1) if isinstance(wanted, range) else wanted
        if last >= len(self.head):
            raise IndexError(f"only the first {len(self.head)} of {self.count} encoded rows are kept as tuples")
        return self.head[index]


def csv_file(columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> bytes:
    """`data/<name>.csv`: a header line and a line per row."""
    body = rows.csv_text() if isinstance(rows, EncodedRows) else csv_lines(rows)
    return (csv_lines([columns]) + body).encode()


def json_file(title: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> bytes:
    """`data/<name>.json`: title, columns, row count and the rows as arrays, on one line."""
    doc = {"title": title, "columns": list(columns), "row_count": len(rows), "rows": []}
    text = json.dumps(doc, ensure_ascii=False, indent=None, separators=(",", ":"))
    assert text.endswith("[]}")  # rows come last
    body = rows.json_text() if isinstance(rows, EncodedRows) else json_arrays(rows)
    return (text[:-2] + body + "]}\n").encode()
