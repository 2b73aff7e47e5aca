"""The tabular logistic-regression family: read from the base release's ONNX, trained weights written back,
and served by the agent's ONNX loader against the fraud scorer's declared inputs and outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from agent.onnx_model import OnnxModel
from federation.model_family import ModelFamilyError, TabularLogReg, from_onnx, to_onnx
from sitewarden.fraud_model import build_release, sample_features


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    directory = tmp_path_factory.mktemp("base") / "release"
    card = json.loads(build_release(directory, seed=7, n_samples=2000).read_text())
    return directory / "model.onnx", card


def _run(model_bytes: bytes, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    label, probabilities = session.run(["label", "probabilities"], {"features": x.astype(np.float32)})
    return label, probabilities


def test_the_base_release_reads_as_the_family_and_its_reference_matches_onnx_runtime(base: tuple[Path, dict]) -> None:
    path, _card = base
    model = from_onnx(path.read_bytes())
    x = sample_features(256, seed=5)
    label, probabilities = _run(path.read_bytes(), x)
    assert model.n_features == 8
    np.testing.assert_allclose(probabilities[:, 1], model.predict_proba(x), atol=1e-5)
    np.testing.assert_array_equal(label, (probabilities[:, 1] > 0.5).astype(np.int64))


def test_new_weights_written_back_are_served_like_the_base(base: tuple[Path, dict], tmp_path: Path) -> None:
    path, card = base
    model = from_onnx(path.read_bytes())
    tuned = model.with_weights(model.coef * 1.5 + 0.1, model.intercept - 0.2)
    raw = to_onnx(tuned, doc="federated job j-1, round 3")
    x = sample_features(128, seed=6)
    _, probabilities = _run(raw, x)
    np.testing.assert_allclose(probabilities[:, 1], tuned.predict_proba(x), atol=1e-5)
    round_trip = from_onnx(raw)
    np.testing.assert_allclose(round_trip.coef, tuned.coef, rtol=1e-6)
    assert round_trip.intercept == pytest.approx(tuned.intercept, rel=1e-6)
    (tmp_path / "model.onnx").write_bytes(raw)
    served = OnnxModel(tmp_path / "model.onnx")
    served.check_declared(card["inputs"], card["outputs"])  # the base's card holds for the result


def test_a_model_of_another_family_is_refused_naming_what_differs() -> None:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["features"], ["label"])],
        "other",
        [onnx.helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, [None, 8])],
        [onnx.helper.make_tensor_value_info("label", onnx.TensorProto.FLOAT, [None, 8])],
    )
    with pytest.raises(ModelFamilyError, match=r"this graph has ai\.onnx\.Identity"):
        from_onnx(onnx.helper.make_model(graph).SerializeToString())
    small = TabularLogReg(np.zeros(8), np.ones(8), np.linspace(-1, 1, 8), 0.5)
    model = from_onnx(to_onnx(small))
    with pytest.raises(ModelFamilyError, match="coef has 3 weights"):
        model.with_weights(np.zeros(3), 0.0)
