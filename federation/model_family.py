"""The first model family for federated fine-tuning: a tabular logistic regression, read from and
written to ONNX, so that a job starts from the base release's weights and its result is served by
the agents like any other model.

The family is the graph the demo fraud scorer ships (`sitewarden.fraud_model`, converted by
skl2onnx): `ai.onnx.ml.Scaler` (offset, scale) then `ai.onnx.ml.LinearClassifier` (two classes,
logistic post-transform), input `features` FP32 [-1, n], outputs `label` INT64 [-1] and
`probabilities` FP32 [-1, 2]. The scaler is the frozen part of the base: every site applies the same
one, so that weights mean the same thing everywhere and no site's statistics are shared; the
federation trains `coef` and `intercept` on the scaled features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

FAMILY = "tabular-logreg"
OPSETS = {"": 17, "ai.onnx.ml": 1}


class ModelFamilyError(ValueError):
    """An ONNX model is not of this family; the message says what differs."""


@dataclass(frozen=True)
class TabularLogReg:
    offset: np.ndarray  # [n] subtracted from each feature
    scale: np.ndarray  # [n] then multiplied
    coef: np.ndarray  # [n] weights of the positive class on scaled features
    intercept: float

    @property
    def n_features(self) -> int:
        return len(self.coef)

    def scaled(self, x: np.ndarray) -> np.ndarray:
        """The features as the classifier sees them (float64)."""
        return (np.asarray(x, dtype=np.float64) - self.offset) * self.scale

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """P(class 1) for each row, in float64 (the reference for the ONNX graph)."""
        z = self.scaled(x) @ self.coef + self.intercept
        return 0.5 * (1.0 + np.tanh(0.5 * z))

    def with_weights(self, coef: np.ndarray, intercept: float) -> TabularLogReg:
        coef = np.asarray(coef, dtype=np.float64).reshape(-1)
        if coef.shape != self.coef.shape:
            raise ModelFamilyError(f"coef has {coef.size} weights, the model {self.n_features} features")
        return TabularLogReg(self.offset, self.scale, coef, float(intercept))


def from_onnx(model_bytes: bytes) -> TabularLogReg:
    """Read a Scaler + LinearClassifier model (as skl2onnx writes a StandardScaler + LogisticRegression)."""
    model = onnx.load_from_string(model_bytes)
    nodes = list(model.graph.node)
    if [(n.op_type, n.domain) for n in nodes] != [("Scaler", "ai.onnx.ml"), ("LinearClassifier", "ai.onnx.ml")]:
        found = ", ".join(f"{n.domain or 'ai.onnx'}.{n.op_type}" for n in nodes)
        raise ModelFamilyError(f"{FAMILY} is Scaler then LinearClassifier; this graph has {found}")
    scaler, classifier = ({a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes)
    offset = np.asarray(scaler["offset"], dtype=np.float64)
    scale = np.asarray(scaler["scale"], dtype=np.float64)
    n = len(offset)
    if list(classifier.get("classlabels_ints", [])) != [0, 1]:
        raise ModelFamilyError("the classifier must have the two classes 0 and 1")
    if classifier.get("post_transform") != b"LOGISTIC":
        raise ModelFamilyError("the classifier's post_transform must be LOGISTIC")
    coefficients = np.asarray(classifier["coefficients"], dtype=np.float64)
    intercepts = np.asarray(classifier["intercepts"], dtype=np.float64)
    if len(scale) != n or coefficients.shape != (2 * n,) or intercepts.shape != (2,):
        raise ModelFamilyError(f"inconsistent sizes: {n} offsets, {len(scale)} scales, {coefficients.size} weights")
    negative, positive = coefficients[:n], coefficients[n:]
    if not np.allclose(negative, -positive) or not np.isclose(intercepts[0], -intercepts[1]):
        raise ModelFamilyError("the two classes' weights must be each other's negation (a binary logistic model)")
    return TabularLogReg(offset, scale, positive, float(intercepts[1]))


def to_onnx(model: TabularLogReg, *, doc: str = "") -> bytes:
    """The model as ONNX, in the same layout `from_onnx` reads and the fraud scorer's card declares."""
    n = model.n_features
    features = helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, n])
    label = helper.make_tensor_value_info("label", TensorProto.INT64, [None])
    probabilities = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])
    scaler = helper.make_node(
        "Scaler",
        ["features"],
        ["variable"],
        domain="ai.onnx.ml",
        offset=[float(v) for v in model.offset],
        scale=[float(v) for v in model.scale],
    )
    classifier = helper.make_node(
        "LinearClassifier",
        ["variable"],
        ["label", "probabilities"],
        domain="ai.onnx.ml",
        classlabels_ints=[0, 1],
        coefficients=[float(-v) for v in model.coef] + [float(v) for v in model.coef],
        intercepts=[-model.intercept, model.intercept],
        multi_class=0,
        post_transform="LOGISTIC",
    )
    graph = helper.make_graph([scaler, classifier], FAMILY, [features], [label, probabilities])
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in OPSETS.items()])
    onnx_model.ir_version = 8
    onnx_model.doc_string = doc
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model.SerializeToString()
