"""Where a site's training data comes from: a CSV file, a Parquet file, or a read-only SQLite query.

A SuperNode's node config names the source (`data-kind`, `data-path`, `data-query`); the ClientApp
loads the eight fraud features (`sitewarden.fraud_model.FEATURES`) and the `label` column from it BY
NAME, so a site's table may hold other columns (identifiers, free-text notes) in any order: they are
never read into the model. Parquet files are read column by column, so other columns are not even
decoded; a CSV row is parsed whole by the csv module, but only the named fields are kept.

`DataSource.sha256()` fingerprints the data a job trained on, for the site's report: the file's
bytes for CSV and Parquet, a canonical encoding of the query's result for SQLite (see the method).
Every failure is a `DataSourceError` that names the source, and the column or value at fault.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sitewarden.fraud_model import FEATURES

__all__ = ["KINDS", "LABEL", "DataSource", "DataSourceError"]

KINDS = ("csv", "parquet", "sqlite")
LABEL = "label"
COLUMNS = (*FEATURES, LABEL)
_CHUNK = 1 << 20


class DataSourceError(ValueError):
    """A site's data source cannot be read as training data; the message names the source and the fault."""


@dataclass(frozen=True)
class DataSource:
    """A site's local training data: `kind` in KINDS, a file `path`, and for SQLite the `query` to run."""

    kind: str
    path: str
    query: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataSourceError(f"data kind {self.kind!r} is not one of {', '.join(KINDS)} (path {self.path!r})")
        if not self.path:
            raise DataSourceError(f"a {self.kind} data source needs a path (data-path)")
        if self.kind == "sqlite" and not self.query.strip():
            raise DataSourceError(f"{self.path}: a sqlite data source needs a query (data-query)")
        if self.kind != "sqlite" and self.query:
            raise DataSourceError(f"{self.path}: a query only applies to sqlite, not to {self.kind}")

    # --- node config ----------------------------------------------------------------------------

    @classmethod
    def from_node_config(cls, cfg: Mapping[str, Any]) -> DataSource:
        """The source a SuperNode's node config names: `data-kind` (default csv), `data-path`, `data-query`."""
        return cls(
            kind=str(cfg.get("data-kind", "csv")),
            path=str(cfg.get("data-path", "")),
            query=str(cfg.get("data-query", "")),
        )

    def to_node_config(self) -> dict[str, str]:
        """The node config entries for this source; `from_node_config` reads them back to an equal source.

        Flower 1.42 parses `flower-supernode --node-config` with a pattern that ends a quoted value at
        the next quote of the same kind: a query passed that way cannot hold that quote character (quote
        SQL identifiers with brackets or backticks instead of double quotes)."""
        return {"data-kind": self.kind, "data-path": self.path, "data-query": self.query}

    # --- loading --------------------------------------------------------------------------------

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """Features (float64 [n, 8], columns in the order of FEATURES) and labels (float64 [n], 0 or 1)."""
        self._check_exists()
        if self.kind == "csv":
            columns = self._load_csv()
        elif self.kind == "parquet":
            columns = self._load_parquet()
        else:
            columns = self._load_sqlite()
        x = np.column_stack([columns[name] for name in FEATURES]).astype(np.float64, copy=False)
        y = np.asarray(columns[LABEL], dtype=np.float64)
        if len(y) == 0:
            raise DataSourceError(f"{self._what()}: no rows")
        bad = ~np.isfinite(x)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise DataSourceError(f"{self._what()}: column {FEATURES[col]!r} is not finite in row {row + 1}")
        not_binary = (y != 0.0) & (y != 1.0)
        if not_binary.any():
            row = int(np.argmax(not_binary))
            found = float(y[row])
            raise DataSourceError(f"{self._what()}: column {LABEL!r} must be 0 or 1, row {row + 1} has {found!r}")
        return x, y

    def _what(self) -> str:
        return f"{self.kind} {self.path}"

    def _check_exists(self) -> None:
        if not Path(self.path).is_file():
            raise DataSourceError(f"{self._what()}: no such file")

    def _missing(self, available: Iterable[str]) -> None:
        have = set(available)
        missing = [name for name in COLUMNS if name not in have]
        if missing:
            raise DataSourceError(f"{self._what()}: missing column(s) {', '.join(repr(m) for m in missing)}")

    def _load_csv(self) -> dict[str, np.ndarray]:
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as handle:
                reader = csv.reader(handle)
                header = next(reader, None)
                if header is None:
                    raise DataSourceError(f"{self._what()}: empty file, no header row")
                header = [name.strip() for name in header]
                self._missing(header)
                index = [header.index(name) for name in COLUMNS]
                values: list[list[float]] = []
                for row in reader:
                    if not row:
                        continue  # a blank line
                    line = reader.line_num  # where the record ends: a quoted field may span lines
                    if len(row) != len(header):
                        raise DataSourceError(f"{self._what()}: line {line} has {len(row)} fields, not {len(header)}")
                    values.append([_number(row[i], self, COLUMNS[k], line) for k, i in enumerate(index)])
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataSourceError(f"{self._what()}: {exc}") from exc
        table = np.asarray(values, dtype=np.float64).reshape(-1, len(COLUMNS))
        return {name: table[:, k] for k, name in enumerate(COLUMNS)}

    def _load_parquet(self) -> dict[str, np.ndarray]:
        import pyarrow as pa  # noqa: PLC0415 - only sites with Parquet data pay for the import
        import pyarrow.parquet as pq  # noqa: PLC0415

        try:
            self._missing(pq.read_schema(self.path).names)
            table = pq.read_table(self.path, columns=list(COLUMNS))
        except (OSError, pa.ArrowException) as exc:
            raise DataSourceError(f"{self._what()}: {exc}") from exc
        columns: dict[str, np.ndarray] = {}
        for name in COLUMNS:
            column = table.column(name)
            if column.null_count:
                raise DataSourceError(f"{self._what()}: column {name!r} has {column.null_count} null value(s)")
            kind = column.type
            if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
                raise DataSourceError(f"{self._what()}: column {name!r} is {kind}, not numeric")
            columns[name] = column.to_numpy().astype(np.float64)
        return columns

    def _connect(self) -> sqlite3.Connection:
        # mode=ro: SQLite refuses every write on this connection; query_only also refuses them per statement.
        uri = Path(self.path).resolve().as_uri() + "?mode=ro"
        connection = sqlite3.connect(uri, uri=True)
        connection.execute("PRAGMA query_only = ON")
        return connection

    @contextmanager
    def _result(self) -> Iterator[tuple[list[str], Iterator[Sequence[Any]]]]:
        """(column names, rows) of the query on a read-only connection, closed after use."""
        try:
            connection = self._connect()
        except sqlite3.Error as exc:
            raise DataSourceError(f"{self._what()}: {exc}") from exc
        try:
            cursor = connection.execute(self.query)
            yield [d[0] for d in cursor.description or ()], iter(cursor)
        except sqlite3.Error as exc:
            raise DataSourceError(f"{self._what()}: query {self.query!r} failed: {exc}") from exc
        finally:
            connection.close()

    def _load_sqlite(self) -> dict[str, np.ndarray]:
        with self._result() as (names, rows):
            self._missing(names)
            index = [names.index(name) for name in COLUMNS]
            values = [
                [_number(row[i], self, COLUMNS[k], line) for k, i in enumerate(index)]
                for line, row in enumerate(rows, start=1)
            ]
        if not values:
            raise DataSourceError(f"{self._what()}: query {self.query!r} returned no rows")
        table = np.asarray(values, dtype=np.float64)
        return {name: table[:, k] for k, name in enumerate(COLUMNS)}

    # --- fingerprint ----------------------------------------------------------------------------

    def sha256(self) -> str:
        """Hex SHA-256 of the data this source yields.

        CSV and Parquet: of the file's bytes, exactly as stored.

        SQLite: of the query's result, encoded as UTF-8 lines, each ending in "\\n": first the column
        names as a JSON array of strings, then one JSON array per row in the order the query returns
        them. Values are encoded as compact JSON (separators "," and ":", no ASCII escaping): INTEGER
        as a JSON integer, REAL as Python's shortest round-trip repr (`1.0`, `0.1`, `1e-05`;
        `Infinity`, `-Infinity`, `NaN`), TEXT as a JSON string, NULL as `null`, and BLOB as
        `{"blob":"<lowercase hex>"}`. Every column the query returns counts, the ignored ones too; give
        the query an ORDER BY for a fingerprint that survives a rewrite of the database file.
        """
        self._check_exists()
        digest = hashlib.sha256()
        if self.kind == "sqlite":
            with self._result() as (names, rows):
                digest.update(_canonical_line(names))
                for row in rows:
                    digest.update(_canonical_line(row))
            return digest.hexdigest()
        try:
            with open(self.path, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
        except OSError as exc:
            raise DataSourceError(f"{self._what()}: {exc}") from exc
        return digest.hexdigest()


def _number(value: Any, source: DataSource, column: str, line: int) -> float:
    """A CSV field or SQLite value as a float; None, empty text and non-numbers are errors."""
    if isinstance(value, bool | int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text:
            try:
                return float(text)
            except ValueError:
                pass
    where = f"line {line}" if source.kind == "csv" else f"row {line}"
    raise DataSourceError(f"{source._what()}: column {column!r} is not a number at {where}: {value!r}")


def _canonical_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"blob": value.hex()}
    return value


def _canonical_line(values: Iterable[Any]) -> bytes:
    encoded = json.dumps([_canonical_value(v) for v in values], ensure_ascii=False, separators=(",", ":"))
    return encoded.encode("utf-8") + b"\n"
