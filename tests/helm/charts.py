"""Rendering the charts with real Helm (helm-python-sdk embeds Helm v4's Go SDK) for the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from helm_python import Chart, _native

ROOT = Path(__file__).resolve().parents[2] / "helm"
CHARTS = ("sitewarden-controller", "sitewarden-agent")
# The oldest Kubernetes the charts support (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
KUBE_VERSIONS = ("1.29.0", "1.33.0")
NAMESPACE = "sitewarden"


def ci_values(chart: str) -> dict[str, Path]:
    return {p.name.removesuffix("-values.yaml"): p for p in sorted((ROOT / chart / "ci").glob("*-values.yaml"))}


def render(
    chart: str | Path, values: dict[str, Any] | None, kube_version: str = KUBE_VERSIONS[-1], **options: Any
) -> dict[str, str]:
    """Template path -> rendered text, as `helm template --kube-version` renders it (offline).

    The Python binding does not pass kube_version and api_versions on: the C call takes them.
    """
    opts = {
        "name": options.pop("name", "sw"),
        "namespace": NAMESPACE,
        "is_install": True,
        "kube_version": f"v{kube_version}",
        **options,
    }
    path = chart if isinstance(chart, Path) else ROOT / chart
    with Chart.load(str(path)) as loaded:
        out = _native.call_string("helm_render", loaded._raw(), json.dumps(values or {}), json.dumps(opts))
    return json.loads(out)


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object of a render (NOTES.txt aside)."""
    found = []
    for name, text in rendered.items():
        if name.endswith("NOTES.txt"):
            continue
        found.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return found


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def pod_specs(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, pod spec) of an object that carries pods: Pods, workloads and Jobs (hooks included)."""
    kind = obj.get("kind")
    label = f"{kind}/{obj['metadata']['name']}"
    if kind == "Pod":
        return [(label, obj["spec"])]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [(label, obj["spec"]["template"]["spec"])]
    if kind == "CronJob":
        return [(label, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])]
    return []
