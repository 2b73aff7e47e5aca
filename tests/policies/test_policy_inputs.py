"""The agent builds decision inputs that validate against the documented JSON Schemas in policies/schemas/."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from referencing import Registry, Resource

from agent import policy_inputs
from agent.onnx_model import OnnxModel
from agent.sync import ActiveRelease
from policies import Bundle, CompiledPolicy
from sitewarden.fraud_model import build_release
from tests.agent_harness import BANK_PACK

SCHEMAS = Path(__file__).resolve().parents[2] / "policies" / "schemas"
SITE = {"id": "6f1c2a9e-0000-4000-8000-000000000001", "name": "branch-a"}


def validator(point: str) -> jsonschema.Draft202012Validator:
    resources = []
    for path in SCHEMAS.glob("*.json"):
        schema = json.loads(path.read_text())
        resources.append((schema["$id"], Resource.from_contents(schema)))
    registry = Registry().with_resources(resources)
    schema = json.loads((SCHEMAS / f"{point}.input.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> ActiveRelease:
    directory = tmp_path_factory.mktemp("fraud") / "release"
    card = json.loads(build_release(directory, seed=7, n_samples=2000).read_text())
    return ActiveRelease(
        name="fraud-scorer",
        version="1.0.0",
        kind="model",
        runtime="onnx",
        directory=directory,
        manifest_sha256=hashlib.sha256(b"manifest").hexdigest(),
        card=card,
        approvers=("alice",),
        model=OnnxModel(directory / "model.onnx"),
    )


def inference(release: ActiveRelease, **overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "app": "fraud-app",
        "purpose": "fraud",
        "data_class": "confidential",
        "model": release.policy_input,
        "batch": 4,
        "inputs": ["features"],
        "binding": {"purposes": ["fraud", "marketing"], "data_classes": ["internal", "confidential"]},
    }
    return policy_inputs.inference_input(SITE, **{**args, **overrides})


def accept(release: ActiveRelease) -> dict[str, Any]:
    return policy_inputs.accept_input(
        SITE,
        name=release.name,
        version=release.version,
        kind=release.kind,
        runtime=release.runtime,
        digest=release.manifest_sha256,
        card=release.card,
        approvers=list(release.approvers),
    )


JOB = {
    "id": "job-1",
    "name": "fraud-finetune",
    "base": {"name": "fraud-scorer", "version": "1.0.0"},
    "model_family": "tabular-logreg",
    "dataset": "transactions",
    "rounds": 3,
    "min_sites": 2,
    "strategy": "FedAvg",
    "differential_privacy": {
        "enabled": True,
        "noise_multiplier": 1.1,
        "clipping_norm": 1.0,
        "delta": 1e-5,
        "epsilon": 4.2,
    },
    "secure_aggregation": True,
    "app": {"name": "fedapp", "version": "0.1.0", "fab_sha256": "ab" * 32, "approvers": ["alice"]},
}


def test_the_inference_input_validates(release: ActiveRelease) -> None:
    validator("inference").validate(inference(release))


def test_the_accept_input_validates(release: ActiveRelease) -> None:
    validator("accept").validate(accept(release))


def test_the_federation_input_validates() -> None:
    validator("federation").validate(policy_inputs.federation_input(SITE, JOB))


def test_the_schemas_catch_a_wrong_input(release: ActiveRelease) -> None:
    with pytest.raises(jsonschema.ValidationError, match="batch"):
        validator("inference").validate({**inference(release), "request": {"batch": -1, "inputs": []}})


def test_the_schema_requires_the_app_binding(release: ActiveRelease) -> None:
    unbound = inference(release)
    unbound["caller"] = {"app": "fraud-app"}
    with pytest.raises(jsonschema.ValidationError, match="binding"):
        validator("inference").validate(unbound)


def test_the_bank_pack_denies_what_the_binding_does_not_cover(release: ActiveRelease) -> None:
    bank = CompiledPolicy(Bundle.load(BANK_PACK))
    narrow = {"purposes": ["fraud"], "data_classes": ["internal"]}
    denied = bank.decide("inference", inference(release, binding=narrow))
    assert not denied.allow
    assert "app 'fraud-app' is not bound to data class 'confidential' (bound: [\"internal\"])" in denied.reasons


def test_the_bank_pack_decides_on_these_inputs(release: ActiveRelease) -> None:
    bank = CompiledPolicy(Bundle.load(BANK_PACK))
    assert bank.decide("inference", inference(release)).allow
    marketing = bank.decide("inference", inference(release, purpose="marketing"))
    assert not marketing.allow and any("marketing" in r for r in marketing.reasons)
    assert bank.decide("accept", accept(release)).allow
    assert bank.decide("federation", policy_inputs.federation_input(SITE, JOB)).allow
    greedy = {**JOB, "differential_privacy": {**JOB["differential_privacy"], "epsilon": 8.5}}
    assert not bank.decide("federation", policy_inputs.federation_input(SITE, greedy)).allow
