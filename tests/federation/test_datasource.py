"""A site's training data from CSV, Parquet and read-only SQLite, selected by column name."""

from __future__ import annotations

import csv
import hashlib
import sqlite3
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from federation.datasource import DataSource, DataSourceError
from sitewarden.fraud_model import FEATURES, generate

NOTES = ['says "hi", then leaves', "multi\nline, with commas", "", "plain"]


def _data(rows: int = 40, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    x, y = generate(rows, seed)
    return x.astype(np.float64), y.astype(np.float64)


def _records(x: np.ndarray, y: np.ndarray) -> list[dict[str, object]]:
    """Rows with a free-text column first and the label before the features: order must not matter."""
    return [
        {"note": NOTES[i % len(NOTES)], "label": int(y[i]), **{f: float(x[i, j]) for j, f in enumerate(FEATURES)}}
        for i in range(len(y))
    ]


def write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    records = _records(x, y)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def write_parquet(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    records = _records(x, y)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def _quoted(names) -> str:
    """Column names for SQL; `foreign` is a keyword."""
    return ", ".join(f'"{name}"' for name in names)


def write_sqlite(path: Path, x: np.ndarray, y: np.ndarray, table: str = "transactions") -> Path:
    records = _records(x, y)
    columns = [f'"{name}"' for name in records[0]]
    with sqlite3.connect(path) as db:
        db.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, {', '.join(columns)})")
        db.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
            [tuple(r.values()) for r in records],
        )
    return path


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    return _data()


def test_csv_parquet_and_sqlite_yield_the_same_features_by_name_ignoring_free_text(tmp_path: Path, data) -> None:
    x, y = data
    sources = [
        DataSource("csv", str(write_csv(tmp_path / "site.csv", x, y))),
        DataSource("parquet", str(write_parquet(tmp_path / "site.parquet", x, y))),
        DataSource("sqlite", str(write_sqlite(tmp_path / "site.db", x, y)), "SELECT * FROM transactions ORDER BY id"),
    ]
    for source in sources:
        features, labels = source.load()
        assert features.dtype == labels.dtype == np.float64
        assert features.shape == (len(y), len(FEATURES)), source
        np.testing.assert_array_equal(features, x)
        np.testing.assert_array_equal(labels, y)


def test_sqlite_query_selects_rows_and_columns(tmp_path: Path, data) -> None:
    x, y = data
    db = write_sqlite(tmp_path / "site.db", x, y)
    source = DataSource(
        "sqlite", str(db), f"SELECT label, {_quoted(reversed(FEATURES))} FROM transactions WHERE id <= 5"
    )
    features, labels = source.load()
    np.testing.assert_array_equal(features, x[:5])
    np.testing.assert_array_equal(labels, y[:5])


def test_node_config_round_trip_and_csv_default() -> None:
    source = DataSource("sqlite", "/data/site.db", "SELECT * FROM t")
    assert source.to_node_config() == {
        "data-kind": "sqlite",
        "data-path": "/data/site.db",
        "data-query": "SELECT * FROM t",
    }
    assert DataSource.from_node_config(source.to_node_config()) == source
    assert DataSource.from_node_config({"data-path": "/data/site.csv", "partition-id": 0}) == DataSource(
        "csv", "/data/site.csv", ""
    )


def test_file_fingerprints_are_the_sha256_of_the_bytes(tmp_path: Path, data) -> None:
    x, y = data
    for source in (
        DataSource("csv", str(write_csv(tmp_path / "site.csv", x, y))),
        DataSource("parquet", str(write_parquet(tmp_path / "site.parquet", x, y))),
    ):
        assert source.sha256() == hashlib.sha256(Path(source.path).read_bytes()).hexdigest()


def test_sqlite_fingerprint_is_the_documented_encoding_of_the_result(tmp_path: Path) -> None:
    db = tmp_path / "tiny.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (i INTEGER, r REAL, s TEXT, b BLOB, n)")
        conn.execute("INSERT INTO t VALUES (1, 0.1, 'é, \"q\"', x'00ff', NULL)")
        conn.execute("INSERT INTO t VALUES (-2, 1e-05, '', x'', 3.0)")
    source = DataSource("sqlite", str(db), "SELECT * FROM t ORDER BY i DESC")
    expected = (
        '["i","r","s","b","n"]\n[1,0.1,"é, \\"q\\"",{"blob":"00ff"},null]\n[-2,1e-05,"",{"blob":""},3.0]\n'
    ).encode()
    assert source.sha256() == hashlib.sha256(expected).hexdigest()
    # Another query over the same file is another result, so another fingerprint.
    assert DataSource("sqlite", str(db), "SELECT * FROM t ORDER BY i").sha256() != source.sha256()


def test_sqlite_is_opened_read_only(tmp_path: Path, data) -> None:
    x, y = data
    db = write_sqlite(tmp_path / "site.db", x, y)
    before = db.read_bytes()
    for statement in ("DELETE FROM transactions", "CREATE TABLE evil (a)"):
        with pytest.raises(DataSourceError, match=r"readonly"):
            DataSource("sqlite", str(db), statement).load()
    assert db.read_bytes() == before


@pytest.mark.parametrize(
    ("kind", "missing"),
    [("csv", "merchant_risk"), ("parquet", "label"), ("sqlite", "online")],
)
def test_a_missing_column_is_named_with_the_path(tmp_path: Path, data, kind: str, missing: str) -> None:
    x, y = data
    if kind == "csv":
        path = write_csv(tmp_path / "site.csv", x, y)
        rows = list(csv.DictReader(path.open(newline="")))
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[k for k in rows[0] if k != missing])
            writer.writeheader()
            writer.writerows({k: v for k, v in r.items() if k != missing} for r in rows)
        source = DataSource("csv", str(path))
    elif kind == "parquet":
        path = tmp_path / "site.parquet"
        pq.write_table(pa.Table.from_pylist(_records(x, y)).drop_columns([missing]), path)
        source = DataSource("parquet", str(path))
    else:
        path = write_sqlite(tmp_path / "site.db", x, y)
        columns = _quoted(c for c in (*FEATURES, "label") if c != missing)
        source = DataSource("sqlite", str(path), f"SELECT {columns} FROM transactions")
    with pytest.raises(DataSourceError, match=rf"{kind} {path}: missing column\(s\) '{missing}'"):
        source.load()


def test_an_empty_result_is_an_error(tmp_path: Path, data) -> None:
    x, y = data
    db = write_sqlite(tmp_path / "site.db", x, y)
    with pytest.raises(DataSourceError, match=r"returned no rows"):
        DataSource("sqlite", str(db), "SELECT * FROM transactions WHERE id < 0").load()
    header_only = tmp_path / "empty.csv"
    header_only.write_text(",".join([*FEATURES, "label"]) + "\n")
    with pytest.raises(DataSourceError, match=rf"{header_only}: no rows"):
        DataSource("csv", str(header_only)).load()


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(DataSourceError, match=r"data kind 'excel' is not one of csv, parquet, sqlite"):
        DataSource.from_node_config({"data-kind": "excel", "data-path": "/d/x.xlsx"})
    with pytest.raises(DataSourceError, match=r"needs a path"):
        DataSource.from_node_config({"data-kind": "csv"})
    with pytest.raises(DataSourceError, match=r"/d/x.db: a sqlite data source needs a query"):
        DataSource("sqlite", "/d/x.db")
    with pytest.raises(DataSourceError, match=r"a query only applies to sqlite"):
        DataSource("csv", "/d/x.csv", "SELECT 1")


def test_unreadable_values_and_files_are_named(tmp_path: Path, data) -> None:
    x, y = data
    path = write_csv(tmp_path / "site.csv", x, y)
    text = path.read_text().replace(repr(float(x[0, 0])), "n/a", 1)
    path.write_text(text)
    with pytest.raises(DataSourceError, match=r"column 'amount' is not a number at line \d+: 'n/a'"):
        DataSource("csv", str(path)).load()
    missing = tmp_path / "nowhere.parquet"
    with pytest.raises(DataSourceError, match=rf"parquet {missing}: no such file"):
        DataSource("parquet", str(missing)).load()
    with pytest.raises(DataSourceError, match="no such file"):
        DataSource("sqlite", str(tmp_path / "nowhere.db"), "SELECT 1").sha256()
    db = write_sqlite(tmp_path / "site.db", x, y)
    with pytest.raises(DataSourceError, match=r"column 'label' must be 0 or 1, row 1 has 2.0"):
        DataSource("sqlite", str(db), f"SELECT {_quoted(FEATURES)}, 2 AS label FROM transactions").load()
    with pytest.raises(DataSourceError, match=r"failed: no such table: nope"):
        DataSource("sqlite", str(db), "SELECT * FROM nope").load()


def test_records_keep_text_with_quotes_and_newlines_intact_in_the_csv(tmp_path: Path, data) -> None:
    """The writer quoted the notes (commas, quotes, a newline): a naive split would shift columns."""
    x, y = data
    path = write_csv(tmp_path / "site.csv", x, y)
    assert '"says ""hi"", then leaves"' in path.read_text()
    features, _ = DataSource("csv", str(path)).load()
    np.testing.assert_array_equal(features, x)
