"""The rendered ServiceMonitor, PrometheusRule and Certificate objects, validated against their CRDs.

kubernetes-validate knows no CRD kinds, so the CRDs are vendored in tests/helm/crds/ (each file
says where it came from: project, path, commit and version) and their `openAPIV3Schema` is
applied with `jsonschema` the way an API server with strict field validation would: unknown
fields are errors (every object schema with properties gets `additionalProperties: false`,
unless it preserves unknown fields), `x-kubernetes-*` markers are dropped.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.helm.charts import CHARTS, KUBE_VERSIONS, ci_values, load_values, objects, render

CRDS = Path(__file__).with_name("crds")


def strict(schema: Any) -> Any:
    """An OpenAPI v3 structural schema as a JSON Schema with strict field validation."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    preserve = schema.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def load_crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> JSON Schema, for every served version of every vendored CRD."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            if version["served"]:
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                schemas[key] = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return schemas


SCHEMAS = load_crds()


def validate(obj: dict[str, Any]) -> list[str]:
    schema = SCHEMAS[(obj["apiVersion"], obj["kind"])]
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def test_the_vendored_crds_are_the_three_kinds_the_charts_render() -> None:
    assert set(SCHEMAS) == {
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
        ("cert-manager.io/v1", "Certificate"),
    }
    for path in CRDS.glob("*.yaml"):
        header = path.read_text().split("apiVersion:", 1)[0]
        assert "Source: github.com/" in header and re.search(r"commit\s+(# )?[0-9a-f]{40}", header), path


def test_every_rendered_crd_object_validates_against_its_published_schema() -> None:
    seen: dict[str, int] = {}
    errors = []
    for chart in CHARTS:
        for case, path in ci_values(chart).items():
            values = load_values(path)
            for obj in objects(render(chart, values, KUBE_VERSIONS[-1])):
                if (obj["apiVersion"], obj["kind"]) in SCHEMAS:
                    seen[obj["kind"]] = seen.get(obj["kind"], 0) + 1
                    errors += [f"{chart} {case} {obj['kind']}: {e}" for e in validate(obj)]
    assert not errors, "\n".join(errors)
    assert set(seen) == {"ServiceMonitor", "PrometheusRule", "Certificate"}, seen


def _rendered(kind: str) -> dict[str, Any]:
    for chart in CHARTS:
        for path in ci_values(chart).values():
            for obj in objects(render(chart, load_values(path), KUBE_VERSIONS[-1])):
                if obj["kind"] == kind:
                    return obj
    raise AssertionError(f"no {kind} rendered")


@pytest.mark.parametrize(
    ("kind", "breaks", "message"),
    [
        ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(interval="30 seconds"), "does not match"),
        ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(scheme="ftp"), "is not one of"),
        ("ServiceMonitor", lambda o: o["spec"].pop("selector"), "'selector' is a required property"),
        ("PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][0].update(expires="5m"), "expires"),
        ("PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][0].update({"for": "5 min"}), "does not match"),
        ("Certificate", lambda o: o["spec"]["privateKey"].update(algorithm="DSA"), "is not one of"),
        ("Certificate", lambda o: o["spec"].pop("issuerRef"), "'issuerRef' is a required property"),
        ("Certificate", lambda o: o["spec"].update(dnsName=["x"]), "dnsName"),
    ],
)
def test_the_schemas_refuse_what_the_api_server_would(kind: str, breaks: Any, message: str) -> None:
    obj = copy.deepcopy(_rendered(kind))
    assert validate(obj) == []
    breaks(obj)
    problems = validate(obj)
    assert any(message in p for p in problems), problems
