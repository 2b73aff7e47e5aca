"""A text model for tests of text obligations: it answers each note with the note itself (ONNX Identity).

Redaction and token limits apply to text (BYTES) outputs; the fraud scorer has none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

CARD: dict[str, Any] = {
    "owner": "service-desk",
    "description": "Echoes notes back; a stand-in for a text model in tests.",
    "intended_purposes": ["service"],
    "risk_tier": "low",
    "licence": "Apache-2.0",
    "data_classes": ["public", "internal", "confidential"],
    "evaluation": {"exact_match": 1.0},
    "evaluation_thresholds": {"exact_match": 0.9},
    "model_file": "model.onnx",
    "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
    "outputs": [{"name": "reply", "datatype": "BYTES", "shape": [-1]}],
}


def build_release(directory: Path) -> Path:
    """Write `directory/model.onnx` and the card beside the directory; returns the card's path."""
    text = helper.make_tensor_value_info("text", TensorProto.STRING, [None])
    reply = helper.make_tensor_value_info("reply", TensorProto.STRING, [None])
    graph = helper.make_graph([helper.make_node("Identity", ["text"], ["reply"])], "notes", [text], [reply])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(model.SerializeToString())
    card = directory.with_name(directory.name + ".card.json")
    card.write_text(json.dumps(CARD))
    return card
