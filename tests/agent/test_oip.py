"""The Open Inference Protocol codec: parsing, validation against a model's signature, encoding, round trips."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.utils import serialize_byte_tensor

from agent.errors import InferenceError
from agent.oip import (
    DATATYPES,
    InferenceInputError,
    InferenceOutputError,
    InferenceRequest,
    InferenceResponse,
    Signature,
    SignatureError,
    TensorMetadata,
    binary_inputs,
    binary_outputs,
    decode_inputs,
    decode_tensor,
    encode_outputs,
    encode_tensor,
    numpy_dtype,
    parse_request,
    request_input,
    requested_outputs,
)

FRAUD = Signature.from_declaration(
    [{"name": "features", "datatype": "FP32", "shape": [-1, 8]}],
    [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
    ],
)


def body(*inputs: dict[str, Any], **extra: Any) -> str:
    return json.dumps({"inputs": list(inputs), **extra})


def features(data: Any, shape: list[int] | None = None, datatype: str = "FP32") -> dict[str, Any]:
    return {"name": "features", "shape": shape or [1, 8], "datatype": datatype, "data": data}


def decode(text: str, signature: Signature = FRAUD, **options: Any) -> dict[str, np.ndarray]:
    return decode_inputs(parse_request(text), signature, **options)


def refused(text: str, signature: Signature = FRAUD, **options: Any) -> str:
    with pytest.raises(InferenceInputError) as caught:
        decode(text, signature, **options)
    assert caught.value.status == 400
    return str(caught.value)


def one(datatype: str, shape: list[int]) -> Signature:
    return Signature((TensorMetadata(name="x", datatype=datatype, shape=shape),), ())


# --- the happy path ----------------------------------------------------------------------------------------


def test_flat_fp32_data_decodes_row_major_to_the_request_shape() -> None:
    arrays = decode(body(features([float(i) for i in range(16)], [2, 8])))
    assert arrays["features"].dtype == np.float32
    assert arrays["features"].shape == (2, 8)
    assert arrays["features"][1, 0] == 8.0


def test_nested_data_decodes_like_flat_data() -> None:
    flat = decode(body(features(list(range(16)), [2, 8])))["features"]
    nested = decode(body(features([list(range(8)), list(range(8, 16))], [2, 8])))["features"]
    np.testing.assert_array_equal(flat, nested)


def test_json_integers_are_accepted_for_float_inputs() -> None:
    assert decode(body(features([1, 2, 3, 4, 5, 6, 7, 8])))["features"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]


def test_an_empty_batch_decodes_to_an_empty_array() -> None:
    assert decode(body(features([], [0, 8])))["features"].shape == (0, 8)


def test_parse_request_accepts_a_decoded_object_and_keeps_id_parameters_and_outputs() -> None:
    request = parse_request(
        {
            "id": "42",
            "parameters": {"purpose": "fraud", "sample": True},
            "inputs": [features([0.5] * 8)],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}],
        }
    )
    assert request.id == "42"
    assert request.parameters == {"purpose": "fraud", "sample": True}
    assert requested_outputs(request, FRAUD) == ["probabilities"]


# --- every refusal names the input and what is wrong -------------------------------------------------------


def test_shape_that_does_not_match_the_model_is_refused() -> None:
    message = refused(body(features([0.0] * 14, [2, 7])))
    assert message == "input 'features': shape [2, 7] does not match the model's [-1, 8]"


def test_shape_of_another_rank_is_refused() -> None:
    assert refused(body(features([0.0] * 8, [8]))) == "input 'features': shape [8] does not match the model's [-1, 8]"


def test_datatype_that_differs_from_the_model_is_refused_not_coerced() -> None:
    message = refused(body(features([0.0] * 8, datatype="FP64")))
    assert message == "input 'features': datatype FP64 does not match the model's FP32"


def test_unknown_datatype_is_refused_naming_the_input() -> None:
    message = refused(body(features([0.0] * 8, datatype="FLOAT")))
    assert message.startswith("input 'features': datatype: Input should be 'BOOL'")
    assert '"FLOAT"' in message


def test_unknown_input_is_refused() -> None:
    message = refused(body({"name": "amount", "shape": [1], "datatype": "FP32", "data": [1.0]}))
    assert message == "input 'amount' is not an input of this model, which takes 'features'"


def test_missing_input_is_refused() -> None:
    two = Signature.from_declaration(
        [{"name": "a", "datatype": "FP32", "shape": [-1]}, {"name": "b", "datatype": "INT64", "shape": [-1]}], []
    )
    message = refused(body({"name": "a", "shape": [1], "datatype": "FP32", "data": [1.0]}), two)
    assert message == "input 'b' is missing: the model needs 'a', 'b'"


def test_input_given_twice_is_refused() -> None:
    assert refused(body(features([0.0] * 8), features([1.0] * 8))) == "input 'features' is given more than once"


def test_element_count_that_disagrees_with_the_shape_is_refused() -> None:
    message = refused(body(features([0.0] * 15, [2, 8])))
    assert message == "input 'features': shape [2, 8] holds 16 elements but data has 15"


def test_nesting_that_disagrees_with_the_shape_is_refused() -> None:
    message = refused(body(features([[0.0] * 16], [2, 8])))
    assert message == "input 'features': data is nested as [1, 16], which is neither flat nor the shape [2, 8]"


def test_ragged_data_is_refused() -> None:
    message = refused(body(features([[0.0] * 8, [0.0] * 7], [2, 8])))
    assert message == "input 'features': data is ragged (nested lists of different lengths)"


@pytest.mark.parametrize(
    ("value", "shown"), [("1.5", '"1.5"'), (None, "null"), ({"v": 1}, '{"v": 1}'), ([], "[]")], ids=str
)
def test_non_numeric_data_is_refused(value: Any, shown: str) -> None:
    data = [0.0] * 7 + [value]
    if value == []:
        data = [[0.0]] * 7 + [[]]
    message = refused(body(features(data)))
    assert message in (
        f"input 'features': FP32 data must be numbers; found {shown}",
        "input 'features': data is ragged (nested lists of different lengths)",
    )


def test_booleans_are_not_numbers() -> None:
    assert refused(body(features([True] * 8))) == "input 'features': FP32 data must be numbers; found true"


def test_data_that_is_not_a_list_is_refused() -> None:
    assert refused(body(features(5))) == "input 'features': data: Input should be a valid array (got 5)"


def test_negative_dimension_in_a_request_is_refused() -> None:
    message = refused(body(features([0.0] * 8, [1, -8])))
    assert message == "input 'features': shape[1]: Input should be greater than or equal to 0 (got -8)"


def test_unknown_fields_are_refused() -> None:
    assert refused(body({**features([0.0] * 8), "dtype": "FP32"})) == (
        "input 'features': dtype: Extra inputs are not permitted"
    )
    assert refused(body(features([0.0] * 8), model="fraud")) == "model: Extra inputs are not permitted"
    assert refused(body({**features([0.0] * 8), "model_name": "x"})) == (
        "input 'features': model_name: Extra inputs are not permitted"
    )


def test_body_that_is_not_json_or_not_an_object_is_refused() -> None:
    with pytest.raises(InferenceInputError, match=r"^the request body is not valid JSON"):
        parse_request(b'{"inputs": [')
    with pytest.raises(InferenceInputError, match=r"^the request body must be a JSON object"):
        parse_request("[]")
    with pytest.raises(InferenceInputError, match=r"^inputs: List should have at least 1 item"):
        parse_request('{"inputs": []}')


def test_nan_and_infinity_are_refused_by_default() -> None:
    # Python's and pydantic's JSON parsers both accept these non-standard literals, so the codec must check.
    for literal, shown in (("NaN", "NaN"), ("Infinity", "infinity"), ("-Infinity", "-infinity")):
        text = body(features("DATA")).replace('"DATA"', f"[1, 2, 3, 4, 5, 6, 7, {literal}]")
        message = refused(text)
        assert message == f"input 'features': data holds {shown}, which this model does not accept"


def test_nan_and_infinity_pass_when_the_model_allows_them() -> None:
    text = body(features("DATA")).replace('"DATA"', "[NaN, Infinity, 0, 0, 0, 0, 0, 0]")
    array = decode(text, allow_non_finite=True)["features"]
    assert math.isnan(array[0, 0]) and math.isinf(array[0, 1])


def test_number_too_large_for_the_datatype_is_refused_even_when_non_finite_values_are_allowed() -> None:
    for options in ({}, {"allow_non_finite": True}):
        message = refused(body(features([1e39] + [0.0] * 7)), **options)
        assert message == "input 'features': value 1e+39 is out of range for FP32"
    assert refused(body({"name": "x", "shape": [1], "datatype": "FP16", "data": [70000]}), one("FP16", [-1])) == (
        "input 'x': value 70000 is out of range for FP16"
    )


def test_integer_inputs_take_integral_numbers_in_range_only() -> None:
    signature = one("UINT8", [-1])

    def uint8(data: list[Any]) -> str:
        return body({"name": "x", "shape": [len(data)], "datatype": "UINT8", "data": data})

    assert decode(uint8([0, 255, 7.0]), signature)["x"].tolist() == [0, 255, 7]
    assert refused(uint8([1, 2.5]), signature) == "input 'x': UINT8 data must be integers; found 2.5"
    assert refused(uint8([1, 256]), signature) == "input 'x': value 256 is out of range for UINT8 [0, 255]"
    assert refused(uint8([-1, 2]), signature) == "input 'x': value -1 is out of range for UINT8 [0, 255]"
    assert refused(uint8([1, "2"]), signature) == "input 'x': UINT8 data must be numbers; found \"2\""
    # numpy infers float64 for a mix of int64 and uint64 values, which would lose digits
    uint64 = body({"name": "x", "shape": [2], "datatype": "UINT64", "data": [0, 2**63 + 1]})
    assert decode(uint64, one("UINT64", [-1]))["x"].tolist() == [0, 2**63 + 1]
    int64 = one("INT64", [-1])
    too_big = body({"name": "x", "shape": [1], "datatype": "INT64", "data": [2**70]})
    assert refused(too_big, int64) == f"input 'x': value {2**70} is out of range for INT64 [{-(2**63)}, {2**63 - 1}]"


def test_bool_inputs_take_true_and_false_only() -> None:
    signature = one("BOOL", [2])
    ok = body({"name": "x", "shape": [2], "datatype": "BOOL", "data": [True, False]})
    assert decode(ok, signature)["x"].tolist() == [True, False]
    bad = body({"name": "x", "shape": [2], "datatype": "BOOL", "data": [1, 0]})
    assert refused(bad, signature) == "input 'x': BOOL data must be true or false; found 1"


def test_bytes_inputs_take_strings_only() -> None:
    signature = one("BYTES", [-1, 2])
    ok = body({"name": "x", "shape": [1, 2], "datatype": "BYTES", "data": ["café", ""]})
    array = decode(ok, signature)["x"]
    assert array.dtype == object and array.tolist() == [["café", ""]]
    bad = body({"name": "x", "shape": [1, 2], "datatype": "BYTES", "data": ["a", 5]})
    assert refused(bad, signature) == "input 'x': BYTES data must be strings; found 5"
    ragged = body({"name": "x", "shape": [2, 2], "datatype": "BYTES", "data": [["a", "b"], ["c"]]})
    assert refused(ragged, signature) == "input 'x': data is ragged (nested lists of different lengths)"


def binary(*tensors: tuple[dict[str, Any], bytes], **extra: Any) -> tuple[bytes, int]:
    """A body with the binary tensor data extension: the JSON header, then each tensor's bytes."""
    inputs = [{**t, "parameters": {"binary_data_size": len(raw)}} for t, raw in tensors]
    header = json.dumps({"inputs": inputs, **extra}).encode()
    return header + b"".join(raw for _, raw in tensors), len(header)


def decode_binary(body: bytes, length: int, signature: Signature) -> dict[str, np.ndarray]:
    request = parse_request(body, length)
    return decode_inputs(request, signature, binary=binary_inputs(request, body, length))


def spec(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def test_binary_tensor_data_decodes_little_endian_row_major_for_every_datatype() -> None:
    cases = {
        "FP32": np.arange(16, dtype=np.float32).reshape(2, 8) / 3,
        "FP16": np.arange(6, dtype=np.float16).reshape(2, 3),
        "INT64": np.array([[-(2**62), 2**62 - 1]], dtype=np.int64),
        "UINT8": np.array([0, 255], dtype=np.uint8),
        "BOOL": np.array([True, False, True]),
    }
    for datatype, array in cases.items():
        body, length = binary(
            (spec("x", datatype, list(array.shape)), array.astype(array.dtype.newbyteorder("<")).tobytes())
        )
        decoded = decode_binary(body, length, one(datatype, [-1] * array.ndim))["x"]
        assert decoded.dtype == array.dtype and decoded.shape == array.shape, datatype
        np.testing.assert_array_equal(decoded, array)
    strings = np.array([["héllo", ""], ["wörld", "x" * 300]], dtype=object)
    raw = serialize_byte_tensor(strings).item()  # the framing Triton's and KServe's clients use
    body, length = binary((spec("x", "BYTES", [2, 2]), raw))
    assert decode_binary(body, length, one("BYTES", [-1, 2]))["x"].tolist() == strings.tolist()


def test_binary_and_json_inputs_mix_in_one_request_in_order() -> None:
    signature = Signature.from_declaration(
        [spec("a", "FP32", [-1]), spec("b", "INT32", [-1]), spec("c", "FP32", [-1])], []
    )
    a, c = np.array([1.5, 2.5], dtype="<f4"), np.array([9.0], dtype="<f4")
    inputs = [
        {**spec("a", "FP32", [2]), "parameters": {"binary_data_size": 8}},
        {**spec("b", "INT32", [1]), "data": [7]},
        {**spec("c", "FP32", [1]), "parameters": {"binary_data_size": 4}},
    ]
    header = json.dumps({"inputs": inputs}).encode()
    arrays = decode_binary(header + a.tobytes() + c.tobytes(), len(header), signature)
    assert arrays["a"].tolist() == [1.5, 2.5] and arrays["b"].tolist() == [7] and arrays["c"].tolist() == [9.0]


@pytest.mark.parametrize(
    ("tensor", "raw", "length", "message"),
    [
        (
            spec("features", "FP32", [1, 8]),
            b"\0" * 28,
            None,
            "takes 32 bytes of binary data, but binary_data_size is 28",
        ),
        (spec("features", "FP32", [1, 8]), b"\0" * 36, 32, "4 bytes of binary tensor data follow"),
        (spec("features", "FP32", [1, 8]), b"\0" * 32, 40, "binary_data_size is 40, but only 32 bytes"),
        (
            {**spec("features", "FP32", [1, 8]), "data": [0.0] * 8},
            b"\0" * 32,
            None,
            "has both data and binary_data_size",
        ),
        (spec("features", "FP32", [1, 8]), np.full(8, np.inf, "<f4").tobytes(), None, "data holds infinity"),
    ],
)
def test_binary_tensor_data_that_does_not_add_up_is_refused_naming_the_input(
    tensor: dict[str, Any], raw: bytes, length: int | None, message: str
) -> None:
    inputs = [{**tensor, "parameters": {"binary_data_size": len(raw) if length is None else length}}]
    if length is not None and length < len(raw):
        inputs[0]["parameters"]["binary_data_size"] = length
    header = json.dumps({"inputs": inputs}).encode()
    with pytest.raises(InferenceInputError) as caught:
        decode_binary(header + raw, len(header), FRAUD)
    assert message in str(caught.value)


def test_binary_bool_and_bytes_data_are_checked_element_by_element() -> None:
    body, length = binary((spec("x", "BOOL", [2]), b"\x01\x02"))
    with pytest.raises(InferenceInputError, match="BOOL binary data must be bytes 0 or 1"):
        decode_binary(body, length, one("BOOL", [-1]))
    for raw, message in (
        (b"\x05\0\0\0abc", "BYTES element 0 claims 5 bytes, but only 3 are left"),
        (b"\x01\0\0\0\xff", "BYTES element 0 is not UTF-8 text"),
        (b"\x01\0\0\0a\0\0", "ends before element 1 of 2"),
        (b"\x01\0\0\0a\x01\0\0\0bzz", "2 bytes of BYTES binary data follow its 2 elements"),
    ):
        body, length = binary((spec("x", "BYTES", [2]), raw))
        with pytest.raises(InferenceInputError) as caught:
            decode_binary(body, length, one("BYTES", [-1]))
        assert message in str(caught.value), raw


def test_an_input_whose_binary_data_the_caller_did_not_pass_is_refused() -> None:
    body, length = binary((spec("features", "FP32", [1, 8]), b"\0" * 32))
    with pytest.raises(InferenceInputError, match="its binary tensor data is missing"):
        decode_inputs(parse_request(body, length), FRAUD)


def test_binary_data_without_the_header_length_or_with_a_bad_one_is_refused() -> None:
    body, length = binary((spec("features", "FP32", [1, 8]), b"\0" * 32))
    with pytest.raises(InferenceInputError, match="no Inference-Header-Content-Length header"):
        parse_request(body[:length])
    with pytest.raises(InferenceInputError, match="needs the Inference-Header-Content-Length header"):
        parse_request(body)
    for bad in (0, len(body) + 1):
        with pytest.raises(InferenceInputError, match="does not fit a body"):
            parse_request(body, bad)


def test_unsupported_extensions_are_refused_by_name_not_ignored() -> None:
    cases = {
        "the shared memory extension": body({**features([0.0] * 8), "parameters": {"shared_memory_region": "r"}}),
        "the classification extension": body(
            features([0.0] * 8), outputs=[{"name": "label", "parameters": {"classification": 2}}]
        ),
        "the sequence extension": body(features([0.0] * 8), parameters={"sequence_id": 7}),
    }
    for extension, text in cases.items():
        with pytest.raises(InferenceInputError, match=f"{extension} is not supported"):
            parse_request(text)


def test_model_name_and_version_in_the_body_are_accepted_for_the_server_to_check() -> None:
    request = parse_request(body(features([0.0] * 8), model_name="fraud-scorer", model_version="1.0.0"))
    assert (request.model_name, request.model_version) == ("fraud-scorer", "1.0.0")


def test_binary_outputs_move_the_outputs_asked_for_into_one_buffer_in_order() -> None:
    arrays = {
        "label": np.array([1, 0], dtype=np.int64),
        "probabilities": np.array([[0.25, 0.75], [1.0, 0.0]], np.float32),
    }
    outputs = [t.model_dump(exclude_none=True) for t in encode_outputs(arrays, FRAUD)]
    request = parse_request(
        body(
            features([0.0] * 8),
            parameters={"binary_data_output": True},
            outputs=[{"name": "label", "parameters": {"binary_data": False}}, {"name": "probabilities"}],
        )
    )
    buffer = binary_outputs(request, outputs)
    assert outputs[0]["data"] == [1, 0] and "parameters" not in outputs[0]  # asked for in JSON
    assert "data" not in outputs[1] and outputs[1]["parameters"] == {"binary_data_size": 16}
    np.testing.assert_array_equal(np.frombuffer(buffer, "<f4").reshape(2, 2), arrays["probabilities"])
    text = [{"name": "t", "datatype": "BYTES", "shape": [2], "data": ["ab", "é"]}]
    plain = parse_request(body(features([0.0] * 8), parameters={"binary_data_output": True}))
    assert binary_outputs(plain, text) == b"\x02\0\0\0ab\x02\0\0\0" + "é".encode()
    assert binary_outputs(parse_request(body(features([0.0] * 8))), [dict(o) for o in text]) == b""


def test_requested_outputs_must_be_outputs_of_the_model_and_asked_once() -> None:
    def ask(*names: str) -> InferenceRequest:
        return parse_request(body(features([0.0] * 8), outputs=[{"name": n} for n in names]))

    assert requested_outputs(parse_request(body(features([0.0] * 8))), FRAUD) is None
    assert requested_outputs(ask("probabilities", "label"), FRAUD) == ["probabilities", "label"]
    with pytest.raises(InferenceInputError, match=r"^output 'score' is not an output of this model, which produces"):
        requested_outputs(ask("score"), FRAUD)
    with pytest.raises(InferenceInputError, match=r"^output 'label' is requested more than once$"):
        requested_outputs(ask("label", "label"), FRAUD)


def test_input_errors_are_inference_errors_with_status_400_and_value_errors() -> None:
    error = InferenceInputError("x")
    assert isinstance(error, InferenceError) and isinstance(error, ValueError) and error.status == 400


# --- encoding ----------------------------------------------------------------------------------------------


def outputs(n: int = 2) -> dict[str, np.ndarray]:
    probabilities = np.linspace(0, 1, 2 * n, dtype=np.float32).reshape(n, 2)
    return {"label": probabilities.argmax(axis=1).astype(np.int64), "probabilities": probabilities}


def test_encode_outputs_gives_every_output_in_graph_order_with_flat_data() -> None:
    tensors = encode_outputs(outputs(), FRAUD)
    assert [t.name for t in tensors] == ["label", "probabilities"]
    assert tensors[0].datatype == "INT64" and tensors[0].shape == [2] and tensors[0].data == [1, 1]
    assert tensors[1].datatype == "FP32" and tensors[1].shape == [2, 2] and len(tensors[1].data) == 4
    response = InferenceResponse(model_name="fraud", id="42", outputs=tensors)
    wire = json.loads(response.model_dump_json(exclude_none=True))
    assert set(wire) == {"model_name", "id", "outputs"}
    assert set(wire["outputs"][0]) == {"name", "shape", "datatype", "data"}


def test_encode_outputs_gives_the_requested_outputs_only() -> None:
    assert [t.name for t in encode_outputs(outputs(), FRAUD, ["probabilities"])] == ["probabilities"]
    with pytest.raises(InferenceInputError, match=r"^output 'score' is not an output"):
        encode_outputs(outputs(), FRAUD, ["score"])


def test_outputs_the_model_gets_wrong_are_model_faults() -> None:
    arrays = outputs()
    with pytest.raises(InferenceOutputError, match=r"^the model produced no output 'label'$") as caught:
        encode_outputs({"probabilities": arrays["probabilities"]}, FRAUD)
    assert caught.value.status == 500
    with pytest.raises(InferenceOutputError, match=r"^output 'label': the model produced FP64, but declares INT64$"):
        encode_outputs({**arrays, "label": arrays["label"].astype(np.float64)}, FRAUD)
    with pytest.raises(InferenceOutputError, match=r"produced shape \[2, 3\], but declares \[-1, 2\]$"):
        encode_outputs({**arrays, "probabilities": np.zeros((2, 3), np.float32)}, FRAUD)
    with pytest.raises(InferenceOutputError, match=r"^output 'probabilities' holds NaN or infinity"):
        encode_outputs({**arrays, "probabilities": np.full((2, 2), np.nan, np.float32)}, FRAUD)


def test_bytes_outputs_are_strings_on_the_wire() -> None:
    tensor = encode_tensor("t", np.array([b"ok", "caf\u00e9"], dtype=object))
    assert tensor.datatype == "BYTES" and tensor.data == ["ok", "café"]
    with pytest.raises(InferenceOutputError, match="not UTF-8"):
        encode_tensor("t", np.array([b"\xff"], dtype=object))


# --- signatures and model cards ----------------------------------------------------------------------------


def test_signature_round_trips_through_the_card_format() -> None:
    card = FRAUD.to_card()
    assert card["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 8]}]
    assert Signature.from_card(card) == FRAUD
    metadata = FRAUD.metadata("fraud-scorer", versions=["1.0.0"]).model_dump()
    assert metadata["platform"] == "onnx_onnxv1" and metadata["inputs"] == card["inputs"]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([{"name": "x", "datatype": "FLOAT", "shape": [1]}], r"^inputs\[0\]: datatype: Input should be"),
        ([{"name": "x", "datatype": "FP32", "shape": [-2]}], r"^inputs\[0\]: shape\[0\]: Input should be greater"),
        ([{"name": "x", "datatype": "FP32"}], r"^inputs\[0\]: shape: Field required"),
        ([{"name": "x", "dtype": "FP32", "datatype": "FP32", "shape": []}], r"^inputs\[0\]: dtype: Extra inputs"),
        ({"name": "x"}, "^inputs must be a list"),
        ([{"name": "x", "datatype": "FP32", "shape": []}] * 2, "^input 'x' is declared twice$"),
    ],
)
def test_malformed_declarations_are_refused(inputs: Any, message: str) -> None:
    with pytest.raises(SignatureError, match=message):
        Signature.from_declaration(inputs, [])


def test_a_card_without_inputs_or_outputs_is_refused() -> None:
    with pytest.raises(SignatureError, match=r"^the model card has no inputs and no outputs$"):
        Signature.from_card({"owner": "x"})


# --- properties --------------------------------------------------------------------------------------------

_shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(_shapes)
    if datatype == "BYTES":
        return draw(hnp.arrays(object, shape, elements=st.text(max_size=8)))
    dtype = numpy_dtype(datatype)
    elements = st.floats(allow_nan=False, allow_infinity=False, width=dtype.itemsize * 8) if dtype.kind == "f" else None
    return draw(hnp.arrays(dtype, shape, elements=elements))


@settings(max_examples=300, deadline=None)
@given(array=arrays(), nested=st.booleans(), wildcard=st.booleans())
def test_any_tensor_survives_a_json_round_trip(array: np.ndarray, nested: bool, wildcard: bool) -> None:
    tensor = request_input("x", array, nested=nested)
    declared = [-1] * array.ndim if wildcard else list(array.shape)
    spec = TensorMetadata(name="x", datatype=tensor.datatype, shape=declared)
    text = InferenceRequest(inputs=[tensor]).model_dump_json(exclude_none=True)
    decoded = decode_inputs(parse_request(text), Signature((spec,), ()))["x"]
    assert decoded.dtype == numpy_dtype(tensor.datatype)
    assert decoded.shape == array.shape
    assert decoded.tolist() == array.tolist()
    encoded = encode_tensor("x", decoded, tensor.datatype)
    assert encoded.shape == list(array.shape)
    assert encoded.data == np.asarray(array).ravel().tolist()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=3),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=2), children, max_size=2),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    datatype=st.sampled_from(DATATYPES),
    declared=st.lists(st.integers(-1, 3), max_size=3),
    shape=st.lists(st.integers(0, 3), max_size=3),
    data=st.lists(_json_values, max_size=8),
)
def test_decoding_arbitrary_json_either_fits_the_declaration_or_is_refused_as_bad_input(
    datatype: str, declared: list[int], shape: list[int], data: list[Any]
) -> None:
    signature = one(datatype, declared)
    request = {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]}
    try:
        decoded = decode_inputs(parse_request(request), signature)["x"]
    except InferenceInputError:
        return
    assert decoded.dtype == numpy_dtype(datatype)
    assert list(decoded.shape) == shape
    assert all(d in (-1, s) for s, d in zip(shape, declared, strict=True))
    if decoded.dtype.kind == "f":
        assert np.isfinite(decoded).all()


def test_decode_tensor_checks_one_tensor_against_its_declaration() -> None:
    tensor = request_input("features", np.zeros((3, 8), np.float32))
    assert decode_tensor(tensor, FRAUD.inputs[0]).shape == (3, 8)
