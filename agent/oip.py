"""The KServe Open Inference Protocol v2 (REST) wire format, and the codec between its tensors and numpy.

Follows the Open Inference Protocol specification, `inference_rest.md` (kserve/open-inference-protocol):
the inference request and response, the model metadata response, the error object, the tensor data
types, and the rule that tensor data is row-major, flat or nested; and its binary tensor data extension
(`extension_binary_data.md` of Triton, which KServe adopted): a JSON header of `Inference-Header-Content-Length`
bytes, then each binary input's bytes in the order of `inputs` (`binary_data_size` in its parameters),
little-endian, row-major, BOOL one byte, BYTES a 4-byte little-endian length before each element.
`parse_request` turns a body into an `InferenceRequest`; `decode_inputs` checks it against a model's
`Signature` (name, datatype, shape, element count, values) and yields numpy arrays; `encode_outputs` turns a
model's arrays back into response tensors, and `binary_outputs` moves the ones the caller asked for into the
binary part of the response. Every refusal of a request is an `InferenceInputError` (HTTP 400) whose message
names the input and what is wrong with it. Choices the specification leaves to the server: datatypes must
match the model exactly (no coercion of FP64 to FP32); a JSON number where an integer type is expected must be
integral and in range; NaN and infinity are refused unless the caller allows them (RFC 8259 JSON cannot carry
them, and a NaN feature in a risk model yields a NaN score, which is then silently "not above the threshold"),
in JSON and in binary data alike; binary data must be exactly as long as its datatype and shape say, and no
byte may follow the last binary input; the extensions this server does not implement (shared memory,
classification, sequences) are refused by name rather than ignored.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from agent.errors import AgentError, InferenceError

__all__ = [
    "DATATYPES",
    "EXTENSIONS",
    "Datatype",
    "ErrorResponse",
    "InferenceInputError",
    "InferenceOutputError",
    "InferenceRequest",
    "InferenceResponse",
    "ModelMetadata",
    "OutputTensor",
    "RequestInput",
    "RequestOutput",
    "ServerMetadata",
    "Signature",
    "SignatureError",
    "TensorMetadata",
    "binary_inputs",
    "binary_outputs",
    "datatype_of",
    "decode_inputs",
    "decode_tensor",
    "encode_outputs",
    "encode_tensor",
    "numpy_dtype",
    "parse_request",
    "request_input",
    "requested_outputs",
]

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"
]
DATATYPES: tuple[Datatype, ...] = get_args(Datatype)

# BYTES elements travel as JSON strings and become an object array of `str`, which is what ONNX Runtime
# takes for tensor(string).
_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_DATATYPE: dict[np.dtype[Any], str] = {dtype: name for name, dtype in _NUMPY.items()}
_FLOAT_MAX = {dtype: float(np.finfo(dtype).max) for dtype in _NUMPY.values() if dtype.kind == "f"}

_MAX_DIM = 2**63 - 1  # the specification says u64; numpy shapes are int64
_MAX_RANK = 64  # numpy's limit


class InferenceInputError(InferenceError, ValueError):
    """A request does not fit the model: unknown, missing or repeated tensor, wrong datatype, shape or values."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


class InferenceOutputError(InferenceError):
    """The model produced an output the protocol cannot carry or the model did not declare (a model fault)."""

    def __init__(self, message: str) -> None:
        super().__init__(500, message)


class SignatureError(AgentError, ValueError):
    """A declaration of a model's inputs and outputs is malformed (bad entry, repeated name)."""


# --- wire format -------------------------------------------------------------------------------------------

Parameters = dict[str, str | int | float | bool]
_RequestDim = Annotated[StrictInt, Field(ge=0, le=_MAX_DIM)]
_DeclaredDim = Annotated[StrictInt, Field(ge=-1, le=_MAX_DIM)]


class TensorMetadata(BaseModel):
    """`$metadata_tensor`: a tensor a model takes or produces; -1 is a dimension of any size.

    It is also the form in which a release's model card declares the model's `inputs` and `outputs`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=256)
    datatype: Datatype
    shape: list[_DeclaredDim] = Field(max_length=_MAX_RANK)


class RequestInput(BaseModel):
    """`$request_input`: one input tensor of an inference request; `data` is row-major, flat or nested, or
    absent when `parameters.binary_data_size` says how many bytes of the binary part hold it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    shape: list[_RequestDim] = Field(max_length=_MAX_RANK)
    datatype: Datatype
    parameters: Parameters | None = None
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    """`$request_output`: an output the caller wants; without any, the response holds every output."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    parameters: Parameters | None = None


class InferenceRequest(BaseModel):
    """`$inference_request`; `model_name` and `model_version`, which KServe's client sends, must name the
    model (and version) of the request's path: the server checks them, since the path decides."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, max_length=256)
    model_name: str | None = Field(default=None, max_length=256)
    model_version: str | None = Field(default=None, max_length=256)
    parameters: Parameters | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class OutputTensor(BaseModel):
    """`$response_output`: one output tensor of an inference response, its data flat and row-major."""

    name: str
    shape: list[int]
    datatype: Datatype
    parameters: Parameters | None = None
    data: list[Any]


class InferenceResponse(BaseModel):
    """`$inference_response`. Serialise with `exclude_none=True`: absent optional fields are left out."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[OutputTensor]


class ModelMetadata(BaseModel):
    """`$metadata_model_response`."""

    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ErrorResponse(BaseModel):
    """`$inference_error_response` (and the metadata error objects): one descriptive message."""

    error: str


class ServerMetadata(BaseModel):
    """`$metadata_server_response`: `GET /v2`."""

    name: str
    version: str
    extensions: list[str]


# The extensions this server implements, as `GET /v2` reports them.
EXTENSIONS = ["binary_tensor_data"]
# Parameters of extensions this server does not implement: refused by name, since ignoring them would
# answer something other than what the caller asked for.
_UNSUPPORTED_INPUT = {
    "shared_memory_region": "the shared memory extension",
    "shared_memory_byte_size": "the shared memory extension",
    "shared_memory_offset": "the shared memory extension",
}
_UNSUPPORTED_OUTPUT = {**_UNSUPPORTED_INPUT, "classification": "the classification extension"}
_UNSUPPORTED_REQUEST = {
    "sequence_id": "the sequence extension",
    "sequence_start": "the sequence extension",
    "sequence_end": "the sequence extension",
}


# --- signature ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """The tensors a model takes and produces, in graph order; names are unique within each list."""

    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]
    _inputs: dict[str, TensorMetadata] = field(init=False, repr=False, compare=False)
    _outputs: dict[str, TensorMetadata] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for kind, tensors, attribute in (("input", self.inputs, "_inputs"), ("output", self.outputs, "_outputs")):
            by_name: dict[str, TensorMetadata] = {}
            for tensor in tensors:
                if tensor.name in by_name:
                    raise SignatureError(f"{kind} {tensor.name!r} is declared twice")
                by_name[tensor.name] = tensor
            object.__setattr__(self, attribute, by_name)

    @classmethod
    def from_declaration(cls, inputs: Sequence[Any], outputs: Sequence[Any]) -> Signature:
        """Read a model card's `inputs` and `outputs` (lists of `{name, datatype, shape}`)."""
        parsed: dict[str, tuple[TensorMetadata, ...]] = {}
        for kind, entries in (("inputs", inputs), ("outputs", outputs)):
            if isinstance(entries, str | bytes | Mapping) or not isinstance(entries, Sequence):
                raise SignatureError(f"{kind} must be a list of {{name, datatype, shape}} objects")
            items = []
            for index, entry in enumerate(entries):
                try:
                    items.append(entry if isinstance(entry, TensorMetadata) else TensorMetadata.model_validate(entry))
                except ValidationError as exc:
                    raise SignatureError(f"{kind}[{index}]: {_describe(exc)}") from None
            parsed[kind] = tuple(items)
        return cls(parsed["inputs"], parsed["outputs"])

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> Signature:
        """Read the `inputs` and `outputs` of a model card; both are required."""
        missing = [key for key in ("inputs", "outputs") if key not in card]
        if missing:
            raise SignatureError(f"the model card has no {' and no '.join(missing)}")
        return cls.from_declaration(card["inputs"], card["outputs"])

    def to_card(self) -> dict[str, list[dict[str, Any]]]:
        """The `inputs` and `outputs` fields of a model card, as JSON-ready lists."""
        return {
            "inputs": [t.model_dump(mode="json") for t in self.inputs],
            "outputs": [t.model_dump(mode="json") for t in self.outputs],
        }

    def input(self, name: str) -> TensorMetadata | None:
        return self._inputs.get(name)

    def output(self, name: str) -> TensorMetadata | None:
        return self._outputs.get(name)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def metadata(self, name: str, *, versions: list[str] | None = None, platform: str = "onnx_onnxv1") -> ModelMetadata:
        """The model metadata response (`onnx_onnxv1` is the specification's platform name for ONNX Runtime)."""
        return ModelMetadata(
            name=name, versions=versions, platform=platform, inputs=list(self.inputs), outputs=list(self.outputs)
        )


# --- decoding ----------------------------------------------------------------------------------------------


def parse_request(body: bytes | str | Mapping[str, Any], header_length: int | None = None) -> InferenceRequest:
    """Parse an inference request body (JSON text, or an already decoded object).

    With `header_length` (the `Inference-Header-Content-Length` header), the body is a JSON header of that
    many bytes followed by the binary tensor data of the inputs that carry `binary_data_size`, in their order,
    which must claim the binary part to its last byte; `binary_inputs` then gives each its bytes. A body that
    is not JSON or not an `$inference_request`, or whose binary part does not add up, raises
    `InferenceInputError`, naming the input concerned when there is one.
    """
    binary_size: int | None = None
    if header_length is not None:
        if isinstance(body, Mapping):
            raise TypeError("binary tensor data comes with a body of bytes")
        data = body.encode() if isinstance(body, str) else body
        if not 0 < header_length <= len(data):
            raise InferenceInputError(
                f"Inference-Header-Content-Length {header_length} does not fit a body of {len(data)} bytes"
            )
        binary_size = len(data) - header_length
        body = data[:header_length]
    try:
        request = (
            InferenceRequest.model_validate(body)
            if isinstance(body, Mapping)
            else InferenceRequest.model_validate_json(body)
        )
    except ValidationError as exc:
        message = _describe(exc, body)
        if header_length is None and "trailing characters" in message:
            message += " (binary tensor data after the JSON needs the Inference-Header-Content-Length header)"
        raise InferenceInputError(message) from None
    _check_extensions(request)
    _binary_layout(request, binary_size)
    return request


def binary_inputs(request: InferenceRequest, body: bytes, header_length: int) -> dict[int, memoryview]:
    """Input index -> its binary tensor data, for a request `parse_request` took with this `header_length`."""
    binary = memoryview(body)[header_length:]
    return {index: binary[start:end] for index, start, end in _binary_layout(request, len(binary))}


def _check_extensions(request: InferenceRequest) -> None:
    """Refuse, by name, the parameters of protocol extensions this server does not implement."""
    for key in request.parameters or ():
        if key in _UNSUPPORTED_REQUEST:
            raise InferenceInputError(f"parameter {key!r}: {_UNSUPPORTED_REQUEST[key]} is not supported")
    for tensor in request.inputs:
        for key in tensor.parameters or ():
            if key in _UNSUPPORTED_INPUT:
                raise InferenceInputError(
                    f"input {tensor.name!r}: parameter {key!r}: {_UNSUPPORTED_INPUT[key]} is not supported"
                )
    for output in request.outputs or ():
        for key, value in (output.parameters or {}).items():
            if key in _UNSUPPORTED_OUTPUT:
                raise InferenceInputError(
                    f"output {output.name!r}: parameter {key!r}: {_UNSUPPORTED_OUTPUT[key]} is not supported"
                )
            if key == "binary_data" and type(value) is not bool:
                raise InferenceInputError(f"output {output.name!r}: binary_data must be true or false")
    flag = (request.parameters or {}).get("binary_data_output")
    if flag is not None and type(flag) is not bool:
        raise InferenceInputError("parameter 'binary_data_output' must be true or false")


def _binary_layout(request: InferenceRequest, binary_size: int | None) -> list[tuple[int, int, int]]:
    """(input index, start, end) in the binary part of each input that declares `binary_data_size`, in order;
    refuses a layout that does not claim the `binary_size` bytes exactly (None: the body has no binary part)."""
    layout: list[tuple[int, int, int]] = []
    offset = 0
    for index, tensor in enumerate(request.inputs):
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            if tensor.data is None:
                raise InferenceInputError(f"input {tensor.name!r}: data: Field required")
            continue
        name = tensor.name
        if type(size) is not int or size < 0:
            raise InferenceInputError(f"input {name!r}: binary_data_size must be a whole number of bytes")
        if tensor.data is not None:
            raise InferenceInputError(f"input {name!r} has both data and binary_data_size; send one of them")
        if binary_size is None:
            raise InferenceInputError(
                f"input {name!r} has binary_data_size, but the request has no Inference-Header-Content-Length "
                "header to say where the binary tensor data starts"
            )
        if offset + size > binary_size:
            raise InferenceInputError(
                f"input {name!r}: binary_data_size is {size}, but only {binary_size - offset} bytes of binary "
                "tensor data are left"
            )
        layout.append((index, offset, offset + size))
        offset += size
    if binary_size is not None and offset != binary_size:
        raise InferenceInputError(
            f"{binary_size - offset} bytes of binary tensor data follow the inputs' binary_data_size: "
            "every byte after the JSON header must belong to an input"
        )
    return layout


def decode_inputs(
    request: InferenceRequest,
    signature: Signature,
    *,
    binary: Mapping[int, memoryview] | None = None,
    allow_non_finite: bool = False,
) -> dict[str, np.ndarray]:
    """The request's inputs as numpy arrays of the model's dtypes and the request's shapes; `binary` is what
    `binary_inputs` gave for a request with binary tensor data.

    Refuses (with `InferenceInputError`) an input the model does not take, an input given twice, an input the
    model needs but the request lacks, and any input that `decode_tensor` refuses.
    """
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        spec = signature.input(tensor.name)
        if spec is None:
            raise InferenceInputError(
                f"input {tensor.name!r} is not an input of this model, which takes {_names(signature.input_names)}"
            )
        if tensor.name in arrays:
            raise InferenceInputError(f"input {tensor.name!r} is given more than once")
        data = binary.get(index) if binary else None
        arrays[tensor.name] = decode_tensor(tensor, spec, binary=data, allow_non_finite=allow_non_finite)
    if len(arrays) != len(signature.inputs):
        missing = [name for name in signature.input_names if name not in arrays]
        raise InferenceInputError(f"input {missing[0]!r} is missing: the model needs {_names(signature.input_names)}")
    return arrays


def decode_tensor(
    tensor: RequestInput, spec: TensorMetadata, *, binary: memoryview | None = None, allow_non_finite: bool = False
) -> np.ndarray:
    """One request input as a numpy array, after checking it against the model's declaration of it; `binary`
    is its binary tensor data when it came that way.

    Checks, in this order: datatype equal to the declared one; shape of the declared rank with every fixed
    dimension equal; data flat with as many elements as the shape holds, or nested exactly as the shape
    (binary data: exactly as many bytes as the shape holds elements of the datatype); values of the datatype
    (numbers; integers in range; true/false; strings, UTF-8 in binary data) and, unless `allow_non_finite`, no
    NaN or infinity (nor a number too large for FP16/FP32). The value check looks at the array numpy infers,
    to stay fast: all-boolean data is refused for numeric inputs, but a list mixing true/false with numbers
    is coerced (true counts as 1).
    """
    name = tensor.name
    if tensor.datatype != spec.datatype:
        raise InferenceInputError(
            f"input {name!r}: datatype {tensor.datatype} does not match the model's {spec.datatype}"
        )
    shape = tensor.shape
    declared = spec.shape
    if len(shape) != len(declared) or any(d not in (-1, s) for s, d in zip(shape, declared, strict=True)):
        raise InferenceInputError(f"input {name!r}: shape {_fmt(shape)} does not match the model's {_fmt(declared)}")
    if binary is not None:
        return _decode_binary(name, binary, spec.datatype, shape, allow_non_finite)
    if tensor.data is None:
        raise InferenceInputError(f"input {name!r}: its binary tensor data is missing")
    dtype = _NUMPY[spec.datatype]
    if spec.datatype == "BYTES":
        return _decode_bytes(name, tensor.data, shape)
    try:
        raw = np.asarray(tensor.data)
    except (ValueError, TypeError):
        raise InferenceInputError(f"input {name!r}: data is ragged (nested lists of different lengths)") from None
    raw = _shaped(name, raw, shape)
    if raw.size == 0:
        return np.empty(shape, dtype=dtype)
    kind = raw.dtype.kind
    if dtype.kind == "f":
        if kind not in "iuf":
            _check_values(name, spec.datatype, tensor.data)
            raise InferenceInputError(f"input {name!r}: data holds values that are not {spec.datatype}")
        if not _in_float_range(raw, dtype, allow_non_finite):
            _refuse_float(name, spec.datatype, raw, allow_non_finite)
        return raw.astype(dtype, copy=False)
    if dtype.kind in "iu":
        if kind not in "iu" and not (kind == "f" and _exact_integers(raw)):
            # numpy inferred something else than integers (strings, booleans, fractions, or float64 for a mix
            # of int64 and uint64 values, which loses digits): check each value, then convert exactly.
            _check_values(name, spec.datatype, tensor.data)
            return _shaped(name, np.array(tensor.data, dtype=dtype), shape)
        info = np.iinfo(dtype)
        low, high = raw.min(), raw.max()
        if low < info.min or high > info.max:
            value = low if low < info.min else high
            raise InferenceInputError(
                f"input {name!r}: value {_number(value)} is out of range for {spec.datatype} [{info.min}, {info.max}]"
            )
        return raw.astype(dtype, copy=False)
    if kind != "b":  # BOOL
        _check_values(name, spec.datatype, tensor.data)
        raise InferenceInputError(f"input {name!r}: data holds values that are not {spec.datatype}")
    return raw


def requested_outputs(request: InferenceRequest, signature: Signature) -> list[str] | None:
    """The names of the outputs the request asks for, or None for all; unknown or repeated names are refused."""
    if request.outputs is None:
        return None
    names: list[str] = []
    for output in request.outputs:
        if signature.output(output.name) is None:
            produced = _names(signature.output_names)
            raise InferenceInputError(
                f"output {output.name!r} is not an output of this model, which produces {produced}"
            )
        if output.name in names:
            raise InferenceInputError(f"output {output.name!r} is requested more than once")
        names.append(output.name)
    return names


def _shaped(name: str, raw: np.ndarray, shape: list[int]) -> np.ndarray:
    """`raw` in the request's shape: given nested as the shape, or flat with as many elements."""
    if raw.shape == tuple(shape):
        return raw
    if raw.dtype == object and any(isinstance(v, list) for v in raw.flat):
        raise InferenceInputError(f"input {name!r}: data is ragged (nested lists of different lengths)")
    count = math.prod(shape)
    if raw.ndim == 1 or raw.size == count == 0:  # nesting of an empty tensor is ambiguous: [[]] may be [1, 0, 0]
        if raw.size != count:
            raise InferenceInputError(
                f"input {name!r}: shape {_fmt(shape)} holds {count} elements but data has {raw.size}"
            )
        return raw.reshape(shape)
    raise InferenceInputError(
        f"input {name!r}: data is nested as {_fmt(list(raw.shape))}, which is neither flat nor the shape {_fmt(shape)}"
    )


def _decode_bytes(name: str, data: list[Any], shape: list[int]) -> np.ndarray:
    try:
        raw = np.array(data, dtype=object)
    except (ValueError, TypeError):
        raise InferenceInputError(f"input {name!r}: data is ragged (nested lists of different lengths)") from None
    raw = _shaped(name, raw, shape)
    for value in raw.flat:
        if type(value) is not str:
            if isinstance(value, list):
                raise InferenceInputError(f"input {name!r}: data is ragged (nested lists of different lengths)")
            raise InferenceInputError(f"input {name!r}: BYTES data must be strings; found {_json(value)}")
    return raw


def _decode_binary(name: str, raw: memoryview, datatype: str, shape: list[int], allow_non_finite: bool) -> np.ndarray:
    """An input's binary tensor data as an array: little-endian, row-major, no padding (BYTES and BOOL aside)."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return _decode_binary_bytes(name, raw, count).reshape(shape)
    dtype = _NUMPY[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InferenceInputError(
            f"input {name!r}: shape {_fmt(shape)} of {datatype} takes {count * dtype.itemsize} bytes of binary "
            f"data, but binary_data_size is {len(raw)}"
        )
    if datatype == "BOOL":
        octets = np.frombuffer(raw, dtype=np.uint8)
        if octets.size and octets.max() > 1:
            raise InferenceInputError(f"input {name!r}: BOOL binary data must be bytes 0 or 1")
        return octets.view(np.bool_).reshape(shape)
    array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)
    if array.dtype != dtype:  # a big-endian machine: swap into the native order ONNX Runtime expects
        array = array.astype(dtype)
    if dtype.kind == "f" and not allow_non_finite and array.size and not np.isfinite(array).all():
        value = array.ravel()[~np.isfinite(array.ravel())][0]
        raise InferenceInputError(f"input {name!r}: data holds {_number(value)}, which this model does not accept")
    return array


def _decode_binary_bytes(name: str, raw: memoryview, count: int) -> np.ndarray:
    """BYTES binary data: each element a 4-byte little-endian length, then that many bytes (UTF-8 here)."""
    elements: list[str] = []
    offset = 0
    end = len(raw)
    for index in range(count):
        if offset + 4 > end:
            raise InferenceInputError(f"input {name!r}: BYTES binary data ends before element {index} of {count}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > end:
            raise InferenceInputError(
                f"input {name!r}: BYTES element {index} claims {length} bytes, but only {end - offset} are left"
            )
        try:
            elements.append(bytes(raw[offset : offset + length]).decode())
        except UnicodeDecodeError:
            raise InferenceInputError(f"input {name!r}: BYTES element {index} is not UTF-8 text") from None
        offset += length
    if offset != end:
        raise InferenceInputError(
            f"input {name!r}: {end - offset} bytes of BYTES binary data follow its {count} elements"
        )
    array = np.empty(count, dtype=object)
    array[:] = elements
    return array


def _leaves(data: Any) -> Iterator[Any]:
    if isinstance(data, list):
        for item in data:
            yield from _leaves(item)
    else:
        yield data


def _exact_integers(raw: np.ndarray) -> bool:
    """Whether float64 `raw` holds only integers small enough to be exact (|x| < 2**53)."""
    return bool(np.abs(raw).max() < 2.0**53) and bool((raw == np.trunc(raw)).all())


def _check_values(name: str, datatype: str, data: list[Any]) -> None:
    """Raise for the first element that is not a value of `datatype` (the slow path, element by element)."""
    integral = datatype not in ("FP16", "FP32", "FP64", "BOOL")
    info = np.iinfo(_NUMPY[datatype]) if integral else None
    for value in _leaves(data):
        if datatype == "BOOL":
            if type(value) is not bool:
                raise InferenceInputError(f"input {name!r}: BOOL data must be true or false; found {_json(value)}")
        elif type(value) not in (int, float):
            raise InferenceInputError(f"input {name!r}: {datatype} data must be numbers; found {_json(value)}")
        elif info is not None:
            if type(value) is float and not (math.isfinite(value) and value.is_integer()):
                raise InferenceInputError(f"input {name!r}: {datatype} data must be integers; found {_json(value)}")
            if not info.min <= value <= info.max:
                raise InferenceInputError(
                    f"input {name!r}: value {_number(value)} is out of range for {datatype} [{info.min}, {info.max}]"
                )


def _in_float_range(raw: np.ndarray, dtype: np.dtype[Any], allow_non_finite: bool) -> bool:
    """Whether casting `raw` to `dtype` keeps every value (NaN and infinity only if allowed): one reduction."""
    limit = _FLOAT_MAX[dtype]
    if raw.dtype.kind == "f":
        if allow_non_finite:
            finite = raw[np.isfinite(raw)]
            return finite.size == 0 or bool(np.abs(finite).max() <= limit)
        return bool(np.abs(raw).max() <= limit)  # False for NaN too
    # Every 64-bit integer fits in FP32 and FP64; only FP16 can overflow.
    return dtype != np.float16 or (-limit <= int(raw.min()) and int(raw.max()) <= limit)


def _refuse_float(name: str, datatype: str, raw: np.ndarray, allow_non_finite: bool) -> None:
    flat = raw.ravel()
    source = flat.astype(np.float64)
    finite = np.isfinite(source)
    if not allow_non_finite and not finite.all():
        raise InferenceInputError(
            f"input {name!r}: data holds {_number(source[~finite][0])}, which this model does not accept"
        )
    limit = _FLOAT_MAX[_NUMPY[datatype]]
    index = np.flatnonzero(finite & (np.abs(source) > limit))[0]
    raise InferenceInputError(f"input {name!r}: value {_number(flat[index])} is out of range for {datatype}")


# --- encoding ----------------------------------------------------------------------------------------------


def encode_outputs(
    arrays: Mapping[str, np.ndarray], signature: Signature, requested: Sequence[str] | None = None
) -> list[OutputTensor]:
    """Response tensors for the requested outputs (all, in graph order, when `requested` is None).

    A requested name the model does not declare is the caller's fault (`InferenceInputError`); an output
    the model did not produce, or produced with another datatype or shape than it declares, or holding
    NaN or infinity (which JSON cannot carry), is the model's (`InferenceOutputError`).
    """
    names = signature.output_names if requested is None else requested
    tensors = []
    for name in names:
        spec = signature.output(name)
        if spec is None:
            raise InferenceInputError(
                f"output {name!r} is not an output of this model, which produces {_names(signature.output_names)}"
            )
        array = arrays.get(name)
        if array is None:
            raise InferenceOutputError(f"the model produced no output {name!r}")
        shape = array.shape
        if len(shape) != len(spec.shape) or any(d not in (-1, s) for s, d in zip(shape, spec.shape, strict=True)):
            raise InferenceOutputError(
                f"output {name!r}: the model produced shape {_fmt(list(shape))}, but declares {_fmt(spec.shape)}"
            )
        tensors.append(encode_tensor(name, array, spec.datatype))
    return tensors


def encode_tensor(name: str, array: np.ndarray, datatype: Datatype | None = None) -> OutputTensor:
    """One array as a response tensor with flat row-major data; `datatype`, when given, must match the array."""
    actual = datatype_of(array.dtype)
    if datatype is not None and actual != datatype:
        raise InferenceOutputError(f"output {name!r}: the model produced {actual}, but declares {datatype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InferenceOutputError(f"output {name!r} holds NaN or infinity, which JSON cannot carry")
    data = _wire_data(name, array)
    return OutputTensor(name=name, shape=list(array.shape), datatype=actual, data=data)


def binary_outputs(request: InferenceRequest, outputs: list[dict[str, Any]]) -> bytes:
    """Move the data of the response outputs the caller asked for in binary into one buffer, in output order.

    An output goes binary when its `$request_output` says `binary_data: true`, or, when it does not say, when
    the request's `binary_data_output` parameter is true. Each such output loses `data` and gets
    `parameters.binary_data_size`; the buffer follows the JSON header in the response (empty: all JSON).
    """
    default = (request.parameters or {}).get("binary_data_output") is True
    asked = {o.name: (o.parameters or {}).get("binary_data") for o in request.outputs or ()}
    chunks: list[bytes] = []
    for output in outputs:
        wanted = asked.get(output["name"])
        if not (default if wanted is None else wanted is True):
            continue
        chunk = _binary_data(output["datatype"], output.pop("data"))
        output["parameters"] = {**(output.get("parameters") or {}), "binary_data_size": len(chunk)}
        chunks.append(chunk)
    return b"".join(chunks)


def _binary_data(datatype: str, data: list[Any]) -> bytes:
    if datatype == "BYTES":
        encoded = [value.encode() if isinstance(value, str) else bytes(value) for value in data]
        return b"".join(struct.pack("<I", len(value)) + value for value in encoded)
    return np.asarray(data, dtype=_NUMPY[datatype].newbyteorder("<")).tobytes()


def request_input(name: str, array: np.ndarray, *, nested: bool = False) -> RequestInput:
    """A request input carrying `array` (for clients and tests); flat row-major data unless `nested`."""
    data = array.tolist() if nested and array.ndim > 0 else _wire_data(name, array)
    return RequestInput(name=name, shape=list(array.shape), datatype=datatype_of(array.dtype), data=data)


def datatype_of(dtype: np.dtype[Any]) -> Datatype:
    """The protocol datatype of a numpy dtype; str, bytes and object arrays are BYTES."""
    found = _DATATYPE.get(np.dtype(dtype))
    if found is not None:
        return found  # type: ignore[return-value]
    if np.dtype(dtype).kind in "USO":
        return "BYTES"
    raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")


def numpy_dtype(datatype: Datatype) -> np.dtype[Any]:
    """The numpy dtype that holds a protocol datatype (object, holding `str`, for BYTES)."""
    return _NUMPY[datatype]


def _wire_data(name: str, array: np.ndarray) -> list[Any]:
    data = array.ravel().tolist()
    if array.dtype.kind in "SO":
        for index, value in enumerate(data):
            if isinstance(value, bytes):
                try:
                    data[index] = value.decode()
                except UnicodeDecodeError:
                    raise InferenceOutputError(f"tensor {name!r} holds bytes that are not UTF-8") from None
            elif not isinstance(value, str):
                raise InferenceOutputError(f"tensor {name!r} holds {type(value).__name__}, which BYTES cannot carry")
    return data


# --- messages ----------------------------------------------------------------------------------------------


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _names(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names) if names else "nothing"


def _json(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: Any) -> str:
    number = float(value) if isinstance(value, np.floating) else value
    if not isinstance(number, float):
        return str(int(number))
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "infinity" if number > 0 else "-infinity"
    return repr(number)


def _describe(exc: ValidationError, body: bytes | str | Mapping[str, Any] | None = None) -> str:
    """One readable line for the first problem pydantic found, naming the input or output it concerns."""
    error = exc.errors(include_url=False)[0]
    loc = error["loc"]
    if error["type"] == "json_invalid":
        return f"the request body is not valid JSON: {error['msg']}"
    if not loc:
        return "the request body must be a JSON object (an $inference_request)"
    subject = _subject(loc, body)
    message = error["msg"]
    if error["type"] not in ("missing", "extra_forbidden"):
        message += f" (got {_json(error.get('input'))})"
    if subject:
        return f"{subject}: {_path(loc[2:]) or 'it'}: {message}"
    return f"{_path(loc)}: {message}"


def _path(loc: Sequence[Any]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _subject(loc: tuple[Any, ...], body: bytes | str | Mapping[str, Any] | None) -> str | None:
    """Who a location under inputs[i] or outputs[i] concerns: "input 'features'", or "input #0" if unnamed."""
    if len(loc) < 2 or loc[0] not in ("inputs", "outputs") or not isinstance(loc[1], int):
        return None
    kind = "input" if loc[0] == "inputs" else "output"
    document: Any = body
    if isinstance(body, bytes | str):
        try:
            document = json.loads(body)
        except ValueError:
            return None
    try:
        name = document[loc[0]][loc[1]]["name"]
    except (KeyError, IndexError, TypeError):
        name = None
    return f"{kind} {name!r}" if isinstance(name, str) else f"{kind} #{loc[1]}"
