"""ONNX Runtime behind the agent: loading, signatures, declared-vs-graph checks, inference, concurrency."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LogisticRegression

from agent.oip import (
    InferenceInputError,
    InferenceResponse,
    decode_inputs,
    encode_outputs,
    parse_request,
    request_input,
)
from agent.onnx_model import ModelLoadError, OnnxModel, declaration
from sitewarden import fraud_model
from sitewarden.fraud_model import INPUTS, OUTPUTS, TrainedFraudModel


@pytest.fixture(scope="module")
def trained() -> TrainedFraudModel:
    return fraud_model.train(seed=7, n_samples=4_000)


@pytest.fixture(scope="module")
def model_path(trained: TrainedFraudModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("release") / "model.onnx"
    path.write_bytes(trained.onnx)
    return path


@pytest.fixture(scope="module")
def model(model_path: Path) -> OnnxModel:
    return OnnxModel(model_path)


def graph_file(directory: Path, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> Path:
    """A one-node Identity graph from the first input to the first output."""
    nodes = [helper.make_node("Identity", [inputs[0].name], [o.name]) for o in outputs]
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    path = directory / "graph.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


# --- loading and the signature -----------------------------------------------------------------------------


def test_signature_of_the_fraud_model_is_read_from_the_graph(model: OnnxModel) -> None:
    assert model.signature.to_card() == {"inputs": INPUTS, "outputs": OUTPUTS}


def test_declaration_gives_the_model_card_format(model_path: Path) -> None:
    assert declaration(model_path) == {
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 8]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
        ],
    }
    json.dumps(declaration(model_path))  # JSON-ready as it is


def test_symbolic_dimensions_become_minus_one_and_scalars_stay_scalars(tmp_path: Path) -> None:
    path = graph_file(
        tmp_path,
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["batch", 3])],
    )
    assert declaration(path)["inputs"] == [{"name": "x", "datatype": "FP64", "shape": [-1, 3]}]
    scalar = graph_file(
        tmp_path,
        [helper.make_tensor_value_info("x", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [])],
    )
    assert declaration(scalar)["outputs"] == [{"name": "y", "datatype": "INT32", "shape": []}]


def test_graph_with_a_tensor_of_unknown_rank_is_refused(tmp_path: Path) -> None:
    path = graph_file(
        tmp_path,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    with pytest.raises(ModelLoadError, match=r"input 'x' has no shape in the graph"):
        OnnxModel(path)


def test_graph_with_a_zipmap_output_is_refused_with_a_hint(tmp_path: Path) -> None:
    x, y = fraud_model.generate(500, seed=1)
    graph = to_onnx(
        LogisticRegression(max_iter=1_000).fit(x, y), initial_types=[("features", FloatTensorType([None, 8]))]
    )
    path = tmp_path / "zipmap.onnx"
    path.write_bytes(graph.SerializeToString())
    with pytest.raises(ModelLoadError) as caught:
        OnnxModel(path)
    assert "output 'output_probability' has type seq(map(int64,tensor(float)))" in str(caught.value)
    assert "options={'zipmap': False}" in str(caught.value)


@pytest.mark.parametrize(
    ("write", "cause"),
    [
        (lambda p, good: p.write_bytes(b""), "No graph was found in the protobuf"),
        (lambda p, good: p.write_bytes(b"this is not an ONNX model"), "INVALID_PROTOBUF"),
        (lambda p, good: p.write_bytes(good[: len(good) // 2]), "INVALID_PROTOBUF"),
        (lambda p, good: p.write_text(json.dumps({"model": "fraud"})), "INVALID_PROTOBUF"),
    ],
    ids=["empty", "text", "truncated", "json"],
)
def test_a_file_that_is_not_an_onnx_model_is_refused_naming_the_file_and_the_cause(
    tmp_path: Path, trained: TrainedFraudModel, write: Callable[[Path, bytes], object], cause: str
) -> None:
    path = tmp_path / "model.onnx"
    write(path, trained.onnx)
    with pytest.raises(ModelLoadError) as caught:
        OnnxModel(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a loadable ONNX model: ")
    assert cause in message


def test_a_missing_file_or_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model\.onnx: no such file$"):
        OnnxModel(tmp_path / "model.onnx")
    with pytest.raises(ModelLoadError, match="no such file"):
        OnnxModel(tmp_path)


def test_intra_op_threads_must_be_positive(model_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        OnnxModel(model_path, intra_op_threads=0)
    assert OnnxModel(model_path, intra_op_threads=2).signature == OnnxModel(model_path).signature


# --- declared against the graph ----------------------------------------------------------------------------


def test_the_card_of_the_fraud_release_matches_its_graph(model: OnnxModel, trained: TrainedFraudModel) -> None:
    card = fraud_model.model_card(trained)
    model.check_declared(card["inputs"], card["outputs"])
    model.check_declared(list(reversed(card["inputs"])), list(reversed(card["outputs"])))  # order is not compared


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda i, o: (i, [{**o[0], "datatype": "INT32"}, o[1]]),
            "output 'label' is INT32 [-1] in the card but INT64 [-1] in the graph",
        ),
        (
            lambda i, o: ([{**i[0], "shape": [-1, 9]}], o),
            "input 'features' is FP32 [-1, 9] in the card but FP32 [-1, 8] in the graph",
        ),
        (
            lambda i, o: ([{**i[0], "shape": [1, 8]}], o),
            "input 'features' is FP32 [1, 8] in the card but FP32 [-1, 8] in the graph",
        ),
        (
            lambda i, o: (i, o[:1]),
            "the graph has output 'probabilities' (FP32 [-1, 2]), which the card does not declare",
        ),
        (
            lambda i, o: ([*i, {"name": "merchant", "datatype": "BYTES", "shape": [-1]}], o),
            "the card declares input 'merchant', which the graph does not have",
        ),
        (lambda i, o: ([], o), "the graph has input 'features' (FP32 [-1, 8]), which the card does not declare"),
    ],
    ids=["datatype", "shape", "narrower-shape", "undeclared-output", "extra-input", "no-inputs"],
)
def test_a_card_that_disagrees_with_the_graph_is_refused(
    model: OnnxModel, model_path: Path, change: Callable[[list, list], tuple[list, list]], problem: str
) -> None:
    inputs, outputs = change([dict(t) for t in INPUTS], [dict(t) for t in OUTPUTS])
    with pytest.raises(ModelLoadError) as caught:
        model.check_declared(inputs, outputs)
    assert str(caught.value) == f"{model_path}: the model card does not match the graph: {problem}"


def test_every_disagreement_is_named_at_once(model: OnnxModel) -> None:
    with pytest.raises(ModelLoadError) as caught:
        model.check_declared([{"name": "x", "datatype": "FP32", "shape": [8]}], [])
    message = str(caught.value)
    assert message.count("; ") == 3
    assert "'x'" in message and "'features'" in message and "'label'" in message and "'probabilities'" in message


def test_a_malformed_declaration_is_refused(model: OnnxModel) -> None:
    with pytest.raises(ModelLoadError, match=r"declaration is malformed: inputs\[0\]: datatype: Input should be"):
        model.check_declared([{"name": "features", "datatype": "float32", "shape": [-1, 8]}], OUTPUTS)


# --- inference ---------------------------------------------------------------------------------------------


def test_inference_matches_scikit_learn(model: OnnxModel, trained: TrainedFraudModel) -> None:
    x = fraud_model.sample_features(2_000, seed=3)
    result = model.infer({"features": x})
    expected = trained.estimator.predict_proba(x)
    np.testing.assert_allclose(result["probabilities"], expected, atol=1e-5)
    clear = np.abs(expected[:, 1] - 0.5) > 1e-4  # away from the decision boundary, labels agree exactly
    np.testing.assert_array_equal(result["label"][clear], trained.estimator.predict(x)[clear])
    assert result["label"].dtype == np.int64 and result["probabilities"].dtype == np.float32


def test_inference_returns_the_requested_outputs_only(model: OnnxModel) -> None:
    result = model.infer({"features": fraud_model.sample_features(3)}, ["probabilities"])
    assert list(result) == ["probabilities"]
    assert result["probabilities"].shape == (3, 2)


def test_inputs_onnx_runtime_rejects_are_bad_input(model: OnnxModel) -> None:
    with pytest.raises(InferenceInputError, match="INVALID_ARGUMENT: Unexpected input data type"):
        model.infer({"features": np.zeros((1, 8), np.float64)})
    with pytest.raises(InferenceInputError, match=r"Required inputs \(\['features'\]\) are missing"):
        model.infer({})
    with pytest.raises(InferenceInputError, match="Invalid output name"):
        model.infer({"features": np.zeros((1, 8), np.float32)}, ["score"])


def test_concurrent_inference_from_threads_gives_the_sequential_results(model: OnnxModel) -> None:
    batches = [fraud_model.sample_features(n, seed=n) for n in (1, 2, 3, 5, 8, 13, 21, 34) * 8]
    sequential = [model.infer({"features": x}) for x in batches]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(lambda x: model.infer({"features": x}), batches))
    for one, other in zip(sequential, concurrent, strict=True):
        np.testing.assert_array_equal(one["probabilities"], other["probabilities"])
        np.testing.assert_array_equal(one["label"], other["label"])


def test_a_request_travels_from_json_to_json(model: OnnxModel) -> None:
    x = fraud_model.sample_features(4, seed=11)
    body = json.dumps({"id": "r1", "inputs": [request_input("features", x, nested=True).model_dump()]})
    request = parse_request(body)
    arrays = model.infer(decode_inputs(request, model.signature))
    response = InferenceResponse(model_name="fraud", id=request.id, outputs=encode_outputs(arrays, model.signature))
    wire = json.loads(response.model_dump_json(exclude_none=True))
    assert wire["id"] == "r1"
    probabilities = next(t for t in wire["outputs"] if t["name"] == "probabilities")
    assert probabilities["shape"] == [4, 2] and probabilities["datatype"] == "FP32"
    np.testing.assert_allclose(np.reshape(probabilities["data"], (4, 2)), arrays["probabilities"])
