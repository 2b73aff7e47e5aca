"""The demo and test model: a fraud scorer trained on synthetic card transactions, shipped as ONNX.

`generate` draws a seeded synthetic data set of card transactions (eight numeric features, `FEATURES`)
labelled fraudulent by a plausible logistic rule plus noise (about 4 % fraud). `train` fits a
scikit-learn pipeline (StandardScaler, LogisticRegression), converts it with skl2onnx (input `features`
FP32 [-1, 8]; ZipMap disabled so that the outputs are plain tensors: `label` INT64 [-1] and
`probabilities` FP32 [-1, 2]; ONNX opset 17) and evaluates the ONNX graph itself on a held-out quarter.
`build_release` writes a release directory holding only `model.onnx`, and the model card beside it as
`<directory>.card.json`, the file `sitewarden release push <directory> --metadata <card>` takes; the card's
`inputs` and `outputs` are the declaration the agent checks the graph against when it loads the release.
The same seed gives byte-identical models; different seeds give different, equally valid ones. Training
needs the `dev` extra (scikit-learn, skl2onnx), imported only when a model is trained; `sample_features`,
for clients, needs only numpy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FEATURES",
    "INPUTS",
    "OUTPUTS",
    "TrainedFraudModel",
    "build_release",
    "generate",
    "model_card",
    "sample_features",
    "train",
]

FEATURES: tuple[str, ...] = (
    "amount",  # transaction amount, EUR
    "hour",  # local hour of day, 0-23
    "merchant_risk",  # the merchant's risk score, 0-1
    "distance_km",  # distance from the cardholder's home, km
    "transactions_24h",  # the card's transactions in the last 24 hours
    "card_age_days",  # days since the card was issued
    "foreign",  # 1 when the merchant is abroad
    "online",  # 1 for card-not-present transactions
)
INPUTS: list[dict[str, Any]] = [{"name": "features", "datatype": "FP32", "shape": [-1, len(FEATURES)]}]
OUTPUTS: list[dict[str, Any]] = [
    {"name": "label", "datatype": "INT64", "shape": [-1]},
    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
]
OPSET = 17
# A bank's daily rhythm: few transactions at night.
_HOUR_WEIGHTS = np.array([1, 1, 1, 1, 1, 2, 3, 5, 7, 8, 8, 8, 8, 8, 8, 8, 8, 8, 7, 6, 5, 4, 3, 2], dtype=np.float64)


@dataclass(frozen=True)
class TrainedFraudModel:
    """A trained scorer: the scikit-learn estimator, its ONNX bytes, and how the ONNX graph did on held-out data."""

    estimator: Any
    onnx: bytes
    evaluation: dict[str, float]
    seed: int
    n_samples: int
    n_held_out: int
    fraud_rate: float


def _features(rng: np.random.Generator, n: int) -> np.ndarray:
    amount = np.round(np.minimum(rng.lognormal(3.8, 1.1, n), 25_000.0), 2)
    hour = rng.choice(24, size=n, p=_HOUR_WEIGHTS / _HOUR_WEIGHTS.sum())
    merchant_risk = rng.beta(2.0, 8.0, n)
    distance = np.round(np.minimum(rng.lognormal(1.5, 1.3, n), 20_000.0), 1)
    transactions = rng.poisson(2.0, n)
    card_age = np.round(np.minimum(1.0 + rng.exponential(700.0, n), 7_300.0))
    foreign = rng.random(n) < 0.08
    online = rng.random(n) < 0.35
    columns = [amount, hour, merchant_risk, distance, transactions, card_age, foreign, online]
    return np.column_stack(columns).astype(np.float32)


def generate(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` synthetic transactions: features (float32, shape [n, 8], columns `FEATURES`) and labels (int64, 1 = fraud).

    Fraud is more likely for large amounts, risky merchants, far from home, many recent transactions,
    new cards, abroad, online and at night; the logit gets Gaussian noise and the label is drawn from it.
    """
    if n < 1:
        raise ValueError(f"n must be positive, not {n}")
    rng = np.random.default_rng(seed)
    x = _features(rng, n).astype(np.float64)
    amount, hour, merchant_risk, distance, transactions, card_age, foreign, online = x.T
    night = (hour < 6) | (hour >= 23)
    logit = (
        -10.0
        + 0.8 * np.log1p(amount)
        + 7.0 * merchant_risk
        + 0.45 * np.log1p(distance)
        + 0.45 * transactions
        - 0.5 * np.log1p(card_age / 30.0)
        + 2.0 * foreign
        + 1.2 * online
        + 1.2 * night
        + rng.normal(0.0, 0.5, n)
    )
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    return x.astype(np.float32), labels


def sample_features(n: int, seed: int = 0) -> np.ndarray:
    """`n` synthetic transactions to score (float32, shape [n, 8]), drawn like the training data."""
    if n < 1:
        raise ValueError(f"n must be positive, not {n}")
    return _features(np.random.default_rng(seed), n)


def train(*, seed: int = 7, n_samples: int = 20_000) -> TrainedFraudModel:
    """Generate `n_samples` transactions, fit on three quarters, convert to ONNX, evaluate the graph on the rest."""
    import onnx  # noqa: PLC0415  (the training stack is a dev extra; see the module docstring)
    import onnxruntime as ort  # noqa: PLC0415
    from skl2onnx import to_onnx  # noqa: PLC0415
    from skl2onnx.common.data_types import FloatTensorType  # noqa: PLC0415
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415
    from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415
    from sklearn.pipeline import make_pipeline  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    if n_samples < 100:
        raise ValueError(f"n_samples must be at least 100, not {n_samples}")
    x, y = generate(n_samples, seed)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    estimator = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1_000)).fit(x_train, y_train)

    graph = to_onnx(
        estimator,
        initial_types=[("features", FloatTensorType([None, len(FEATURES)]))],
        options={"zipmap": False},
        target_opset=OPSET,
    )
    # skl2onnx lists the default domain once per converter; one entry per domain is what the ONNX spec expects.
    opsets = {entry.domain: entry.version for entry in graph.opset_import}
    del graph.opset_import[:]
    graph.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in sorted(opsets.items()))
    graph.doc_string = f"Sitewarden demo fraud scorer; synthetic data, seed {seed}; features: {', '.join(FEATURES)}"
    onnx.helper.set_model_props(graph, {"sitewarden.seed": str(seed), "sitewarden.features": ",".join(FEATURES)})
    onnx.checker.check_model(graph, full_check=True)
    model_bytes = graph.SerializeToString()

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(["label", "probabilities"], {"features": x_test})
    evaluation = {
        "auc": round(float(roc_auc_score(y_test, probabilities[:, 1])), 4),
        "accuracy": round(float(accuracy_score(y_test, labels)), 4),
        "average_precision": round(float(average_precision_score(y_test, probabilities[:, 1])), 4),
    }
    return TrainedFraudModel(
        estimator=estimator,
        onnx=model_bytes,
        evaluation=evaluation,
        seed=seed,
        n_samples=n_samples,
        n_held_out=len(y_test),
        fraud_rate=round(float(y.mean()), 4),
    )


def model_card(trained: TrainedFraudModel, *, version_note: str | None = None) -> dict[str, Any]:
    """The model card of a trained scorer: the metadata of its release."""
    import skl2onnx  # noqa: PLC0415
    import sklearn  # noqa: PLC0415

    card: dict[str, Any] = {
        "owner": "fraud-analytics",
        "description": "Scores card transactions for fraud. Demo model trained on synthetic data only.",
        "intended_purposes": ["fraud"],
        "risk_tier": "medium",
        "licence": "Apache-2.0",
        "data_classes": ["public", "internal", "confidential"],
        "evaluation": dict(trained.evaluation),
        # The minimum the model risk team set for this use; acceptance policies compare evaluation to it.
        "evaluation_thresholds": {"auc": 0.7},
        "model_file": "model.onnx",
        "inputs": [dict(t) for t in INPUTS],
        "outputs": [dict(t) for t in OUTPUTS],
        "feature_names": list(FEATURES),
        "training": {
            "data": "synthetic (sitewarden.fraud_model.generate)",
            "algorithm": "StandardScaler + LogisticRegression",
            "libraries": f"scikit-learn {sklearn.__version__}, skl2onnx {skl2onnx.__version__}",
            "onnx_opset": OPSET,
            "seed": trained.seed,
            "n_samples": trained.n_samples,
            "held_out": trained.n_held_out,
            "fraud_rate": trained.fraud_rate,
        },
    }
    if version_note is not None:
        card["version_note"] = version_note
    return card


def build_release(
    directory: Path,
    *,
    seed: int = 7,
    n_samples: int = 20_000,
    version_note: str | None = None,
    card_path: Path | None = None,
) -> Path:
    """Train a scorer, write `directory/model.onnx` and its model card; returns the card's path.

    The card goes to `card_path`, by default `<directory>.card.json` beside the directory: never inside it,
    because every file in a release directory becomes a file of the release.
    """
    directory = Path(directory)
    card_path = Path(card_path) if card_path is not None else directory.with_name(directory.name + ".card.json")
    if card_path.resolve().is_relative_to(directory.resolve()):
        raise ValueError(f"the model card {card_path} must not be inside the release directory {directory}")
    trained = train(seed=seed, n_samples=n_samples)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(trained.onnx)
    card_path.parent.mkdir(parents=True, exist_ok=True)
    card_path.write_text(json.dumps(model_card(trained, version_note=version_note), indent=2) + "\n")
    return card_path
