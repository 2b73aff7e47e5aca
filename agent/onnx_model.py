"""An ONNX model served with ONNX Runtime: load, signature, check against the model card, infer.

`OnnxModel(path)` opens a `.onnx` file in an ONNX Runtime `InferenceSession` on the CPU execution provider
only, reads the graph's inputs and outputs as Open Inference Protocol tensors (`agent.oip.Signature`:
datatypes from the ONNX element types, symbolic or unknown dimensions as -1), and refuses, with a
`ModelLoadError` naming the file and the cause, a file that does not load and a graph whose tensors the
protocol cannot carry (sequences, maps, unknown rank). `check_declared` compares the graph with the
`inputs`/`outputs` a release's model card declares and refuses any difference; `declaration` computes that
declaration from a graph, so a release pipeline can fill the card. `infer` is safe to call from many threads
at once: `InferenceSession.run` is thread-safe and releases the GIL (onnxruntime issues #114 and #22967).

Nothing here talks to a network. ONNX Runtime has no telemetry of its own on Linux or macOS; official
Windows builds emit ETW trace events, which `disable_telemetry_events()` turns off (called once, before the
first session). Only `CPUExecutionProvider` is ever requested: the PyPI wheel also offers the
`AzureExecutionProvider`, whose operators call remote endpoints, and it is never enabled. The session reads
the ONNX format only (not the ORT flatbuffer format), and ONNX Runtime (1.32) itself refuses external-data paths
that leave the model's directory.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from agent.errors import AgentError, InferenceError
from agent.oip import Datatype, InferenceInputError, Signature, SignatureError, TensorMetadata

__all__ = ["ModelLoadError", "ModelRuntimeError", "OnnxModel", "declaration"]

# ONNX element types the protocol can carry; bfloat16, float8 and int4 have no OIP datatype.
_DATATYPES: dict[str, Datatype] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : (\w+) : ")


class ModelLoadError(AgentError):
    """A model file cannot be served: it does not load, or its graph disagrees with its model card."""


class ModelRuntimeError(InferenceError):
    """ONNX Runtime failed while running a request that had passed validation (a model fault: HTTP 500)."""

    def __init__(self, message: str) -> None:
        super().__init__(500, message)


@functools.cache
def _quiet_runtime() -> None:
    """Once per process, before any session: no telemetry events, and only errors in ONNX Runtime's log."""
    ort.disable_telemetry_events()
    ort.set_default_logger_severity(3)


class OnnxModel:
    """One ONNX graph in one ONNX Runtime session, shared by every request."""

    def __init__(self, path: Path | str, *, intra_op_threads: int = 1) -> None:
        """Load the graph at `path` into a CPU-only session.

        `intra_op_threads` is how many threads one request may use. Concurrency comes from concurrent
        requests, each on its own thread, so 1 is the right default for small models.
        """
        if intra_op_threads < 1:
            raise ValueError(f"intra_op_threads must be at least 1, not {intra_op_threads}")
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: no such file")
        _quiet_runtime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.use_deterministic_compute = True  # the same input gives the same output digest in the audit log
        options.enable_profiling = False
        options.add_session_config_entry("session.load_model_format", "ONNX")
        # Threads that spin while idle would take CPU from concurrent requests and from the site's other work.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises bare Exception subclasses (Fail, InvalidProtobuf, ...)
            raise ModelLoadError(f"{self.path}: not a loadable ONNX model: {_ort_message(exc)}") from exc
        self.signature = Signature(
            tuple(self._tensor("input", arg) for arg in self._session.get_inputs()),
            tuple(self._tensor("output", arg) for arg in self._session.get_outputs()),
        )
        self._output_names = self.signature.output_names
        # A moving average of the CPU time of `infer` on the calling thread (not wall time, which includes
        # waiting for the GIL under load): lets a server run quick models inline and slow ones on a thread.
        self.recent_seconds = math.inf

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r})"

    def check_declared(self, declared_inputs: Sequence[Any], declared_outputs: Sequence[Any]) -> None:
        """Refuse a declaration that differs from the graph in any name, datatype or shape, naming every difference.

        The declaration is a model card's `inputs` and `outputs`, each a list of `{name, datatype, shape}`;
        order does not matter, and a fixed dimension where the graph has -1 is a difference too.
        """
        try:
            declared = Signature.from_declaration(declared_inputs, declared_outputs)
        except SignatureError as exc:
            raise ModelLoadError(f"{self.path}: the model card's declaration is malformed: {exc}") from None
        problems: list[str] = []
        for kind, card, graph in (
            ("input", declared.inputs, self.signature.inputs),
            ("output", declared.outputs, self.signature.outputs),
        ):
            in_graph = {t.name: t for t in graph}
            in_card = {t.name: t for t in card}
            for tensor in card:
                found = in_graph.get(tensor.name)
                if found is None:
                    problems.append(f"the card declares {kind} {tensor.name!r}, which the graph does not have")
                elif (found.datatype, found.shape) != (tensor.datatype, tensor.shape):
                    problems.append(
                        f"{kind} {tensor.name!r} is {_describe(tensor)} in the card but {_describe(found)} in the graph"
                    )
            problems.extend(
                f"the graph has {kind} {t.name!r} ({_describe(t)}), which the card does not declare"
                for t in graph
                if t.name not in in_card
            )
        if problems:
            raise ModelLoadError(f"{self.path}: the model card does not match the graph: {'; '.join(problems)}")

    def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the graph on decoded inputs (see `agent.oip.decode_inputs`) and return the named outputs.

        All outputs when `outputs` is None. Inputs ONNX Runtime rejects raise `InferenceInputError`; other
        failures raise `ModelRuntimeError`. Safe to call from several threads at once.
        """
        names = self._output_names if outputs is None else list(outputs)
        started = time.thread_time()
        try:
            results = self._session.run(names, dict(inputs))
        except (InvalidArgument, ValueError) as exc:  # ValueError: the Python binding's own input checks
            raise InferenceInputError(_ort_message(exc)) from None
        except Exception as exc:
            raise ModelRuntimeError(f"{self.path.name}: inference failed: {_ort_message(exc)}") from exc
        took = time.thread_time() - started
        self.recent_seconds = took if self.recent_seconds == math.inf else 0.8 * self.recent_seconds + 0.2 * took
        return dict(zip(names, results, strict=True))

    def _tensor(self, kind: str, arg: Any) -> TensorMetadata:
        datatype = _DATATYPES.get(arg.type)
        if datatype is None:
            hint = (
                " (for scikit-learn classifiers, convert with options={'zipmap': False})" if "map(" in arg.type else ""
            )
            raise ModelLoadError(
                f"{self.path}: {kind} {arg.name!r} has type {arg.type}, which the Open Inference Protocol "
                f"cannot carry{hint}"
            )
        shape = arg.shape
        if not shape and self._rank_unknown(kind, arg.name):
            raise ModelLoadError(
                f"{self.path}: {kind} {arg.name!r} has no shape in the graph; the Open Inference Protocol needs "
                "at least its rank"
            )
        dims = [d if isinstance(d, int) and d >= 0 else -1 for d in shape]
        return TensorMetadata(name=arg.name, datatype=datatype, shape=dims)

    def _rank_unknown(self, kind: str, name: str) -> bool:
        """Whether a tensor ONNX Runtime reports as shape [] has no shape at all, rather than being a scalar.

        Only the graph itself tells the two apart; it is parsed again only for such tensors, which are rare,
        so that loading a large model does not parse it twice.
        """
        import onnx  # noqa: PLC0415  (only needed on this rare path)

        graph = onnx.load(str(self.path), load_external_data=False).graph
        for value in graph.input if kind == "input" else graph.output:
            if value.name == name:
                return not value.type.tensor_type.HasField("shape")
        return True


def declaration(path: Path | str) -> dict[str, list[dict[str, Any]]]:
    """The `inputs` and `outputs` of a model card for the graph at `path`, read as the agent will read it.

    Example: `{"inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 8]}], "outputs": [...]}`.
    """
    return OnnxModel(path).signature.to_card()


def _describe(tensor: TensorMetadata) -> str:
    return f"{tensor.datatype} [{', '.join(str(d) for d in tensor.shape)}]"


def _ort_message(exc: BaseException) -> str:
    """ONNX Runtime's message without its "[ONNXRuntimeError] : 7 : " prefix, on one line."""
    text = _ORT_PREFIX.sub(r"\1: ", str(exc).strip())
    return " ".join(text.split())
