"""Fuzzing every parser of bytes that come from outside a site: only the documented errors come out.

Coverage-guided with atheris (libFuzzer) where the parser is Python: each target of
`tests.attacks.fuzz_targets` runs in its own process for a few seconds (SITEWARDEN_FUZZ_SECONDS,
default 2, so that CI stays bounded; run longer by hand), from a corpus of well-formed inputs,
with a fixed seed. A crash fails the test with libFuzzer's report: the exception, its
traceback and the input that caused it.

pydantic-core validates in Rust, which atheris cannot instrument, so a byte-level fuzzer gets no
coverage feedback inside it: the desired state and the long-poll answer are also fuzzed with
Hypothesis, structure-aware (a valid document with any part replaced by arbitrary JSON).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sitewarden.desired import DesiredState
from sitewarden.wire import DesiredPointer

FUZZ_SECONDS = int(os.environ.get("SITEWARDEN_FUZZ_SECONDS", "2"))
TARGETS = [
    "note",
    "checkpoint",
    "tlog_proof",
    "cosignature",
    "add_checkpoint",
    "oip_request",
    "join_token",
    "desired_state",
    "site_jwt",
    "approval",
]
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("target", TARGETS)
def test_parser_raises_only_its_documented_errors(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"  # filled with the target's seeds by the fuzzing process itself
    corpus.mkdir()
    fuzzed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.attacks.fuzz_targets",
            target,
            str(corpus),
            f"-max_total_time={FUZZ_SECONDS}",
            "-seed=20261202",
            "-timeout=10",
            "-rss_limit_mb=2048",
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=FUZZ_SECONDS + 120,
        check=False,
    )
    report = "\n".join(line for line in fuzzed.stderr.splitlines() if not line.startswith("INFO: Instrumenting"))
    assert fuzzed.returncode == 0, f"{target}: an undocumented error escaped the parser:\n{report[-6000:]}"
    assert "Done " in fuzzed.stderr, report[-2000:]
    assert len(list(corpus.iterdir())) >= 1  # the seeds, and what the fuzzer found worth keeping


# -- structure-aware: the desired state and the long-poll answer -------------------------------------

SHA = "b" * 64
SITE = "0d9b6f8e-1c4a-4f0e-9a1b-2c3d4e5f6a7b"
REF = {"target": "releases/m/1.0.0/release.json", "sha256": SHA, "size": 10}
DOCUMENT: dict[str, Any] = {
    "site_id": SITE,
    "version": 3,
    "generated_at": "2026-01-01T00:00:00Z",
    "rollout": {"id": SITE, "name": "r1"},
    "releases": [
        {
            "name": "m",
            "version": "1.0.0",
            "kind": "model",
            "runtime": "onnx",
            "manifest": REF,
            "files": [{**REF, "path": "model.onnx"}],
            "approvals": [{**REF, "approver": "alice", "key_fingerprint": SHA}],
        }
    ],
    "policy": None,
    "jobs": [],
}
POINTER = {"version": 3, "target": f"sites/{SITE}/desired.json", "sha256": SHA, "changed": True}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.sampled_from(["../../etc/passwd", "/abs", "a\\b", "%2e%2e", "x" * 500, SHA, SITE]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _paths(item, (*prefix, i))
    return found


def _replaced(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = json.loads(json.dumps(document))
    node = copy
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return copy


@st.composite
def mutated(draw: st.DrawFn, document: dict[str, Any]) -> bytes:
    path = draw(st.sampled_from(_paths(document)))
    return json.dumps(_replaced(document, path, draw(json_values))).encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(data=mutated(DOCUMENT) | mutated(POINTER))
def test_a_mutated_desired_state_or_pointer_is_valid_or_a_validation_error(data: bytes) -> None:
    for model in (DesiredState, DesiredPointer):
        with contextlib.suppress(ValidationError):
            model.model_validate_json(data)
