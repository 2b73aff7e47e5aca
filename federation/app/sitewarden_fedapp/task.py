"""The model: logistic regression in NumPy on the eight fraud features of a site's data.

A site's data comes from `federation.datasource` (CSV, Parquet or a SQLite query; columns selected by
name). Every site applies the same fixed transform (`transform`), or the base release's frozen scaler,
so that weights mean the same thing everywhere without sharing any statistics of the local data.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

N_FEATURES = 8
# Columns with heavy tails (amount, distance, transactions in 24 h, card age) are log-scaled; the hour
# becomes a fraction of the day; the rest are already in [0, 1].
_LOG_COLUMNS = (0, 3, 4, 5)
_HOUR_COLUMN = 1


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


def auc(coef: np.ndarray, intercept: np.ndarray, x: np.ndarray, y: np.ndarray) -> float | None:
    """ROC AUC of the model's scores on `x` against labels `y` (Mann-Whitney, ties counted half); None
    when only one class is present, where it is undefined."""
    scores = x @ coef + intercept[0]
    positive = y >= 0.5
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1, dtype=np.float64)
    sorted_scores = scores[order]
    # Tied scores share the mean of their ranks.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    for group in np.split(np.arange(len(scores)), boundaries):
        if len(group) > 1:
            ranks[order[group]] = ranks[order[group]].mean()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def train(
    coef: np.ndarray,
    intercept: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    learning_rate: float,
    proximal_mu: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Full-batch gradient descent on the mean log loss, starting from the given (global) weights.

    With `proximal_mu` > 0 (FedProx) the objective gains mu/2 * ||w - w_global||^2 over all weights, the
    intercept included, which keeps a site's model near the global one when sites' data differ.
    """
    global_coef, global_intercept = coef.copy(), intercept.copy()
    coef = coef.copy()
    intercept = intercept.copy()
    n = len(y)
    for _ in range(epochs):
        error = _sigmoid(x @ coef + intercept[0]) - y
        coef_gradient = (x.T @ error) / n + proximal_mu * (coef - global_coef)
        intercept_gradient = np.array([error.mean()]) + proximal_mu * (intercept - global_intercept)
        coef -= learning_rate * coef_gradient
        intercept -= learning_rate * intercept_gradient
    return coef, intercept
