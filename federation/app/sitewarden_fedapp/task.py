"""The model and the data: logistic regression in NumPy on the eight fraud features of a site's CSV.

The CSV has a header row, eight float feature columns (`sitewarden.fraud_model.FEATURES`) and a last
column `label` (0/1). Every site applies the same fixed transform (`transform`), so that weights mean the
same thing everywhere without sharing any statistics of the local data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

N_FEATURES = 8
# Columns with heavy tails (amount, distance, transactions in 24 h, card age) are log-scaled; the hour
# becomes a fraction of the day; the rest are already in [0, 1].
_LOG_COLUMNS = (0, 3, 4, 5)
_HOUR_COLUMN = 1


def load_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Features (float64, [n, 8], untransformed) and labels (float64, [n]) from a site's CSV."""
    data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    if data.shape[1] != N_FEATURES + 1:
        raise ValueError(f"{path}: expected {N_FEATURES + 1} columns, got {data.shape[1]}")
    return data[:, :N_FEATURES], data[:, N_FEATURES]


def transform(x: np.ndarray) -> np.ndarray:
    """The fixed, data-independent feature transform every site applies before training and scoring."""
    out = np.array(x, dtype=np.float64, copy=True)
    out[:, _LOG_COLUMNS] = np.log1p(np.maximum(out[:, _LOG_COLUMNS], 0.0))
    out[:, _HOUR_COLUMN] = out[:, _HOUR_COLUMN] / 24.0
    return out


def initial_weights() -> tuple[np.ndarray, np.ndarray]:
    """Zero coefficients [8] and a zero intercept [1]."""
    return np.zeros(N_FEATURES, dtype=np.float64), np.zeros(1, dtype=np.float64)


def to_record(coef: np.ndarray, intercept: np.ndarray) -> ArrayRecord:
    return ArrayRecord({"coef": Array(np.asarray(coef, dtype=np.float64)), "intercept": Array(intercept)})


def from_record(record: ArrayRecord) -> tuple[np.ndarray, np.ndarray]:
    return record["coef"].numpy().astype(np.float64), record["intercept"].numpy().astype(np.float64)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def evaluate(coef: np.ndarray, intercept: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean log loss, accuracy at 0.5) of the model on transformed features `x` and labels `y`."""
    p = np.clip(_sigmoid(x @ coef + intercept[0]), 1e-12, 1.0 - 1e-12)
    loss = float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))
    accuracy = float(np.mean((p >= 0.5) == (y >= 0.5)))
    return loss, accuracy


def train(
    coef: np.ndarray, intercept: np.ndarray, x: np.ndarray, y: np.ndarray, *, epochs: int, learning_rate: float
) -> tuple[np.ndarray, np.ndarray]:
    """Full-batch gradient descent on the mean log loss, starting from the given weights."""
    coef = coef.copy()
    intercept = intercept.copy()
    n = len(y)
    for _ in range(epochs):
        error = _sigmoid(x @ coef + intercept[0]) - y
        coef -= learning_rate * (x.T @ error) / n
        intercept -= learning_rate * np.array([error.mean()])
    return coef, intercept
