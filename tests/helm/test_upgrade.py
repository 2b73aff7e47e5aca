"""Upgrading a release: the previous chart version (packaged in tests/helm/previous/) and this one,
rendered with the same values, differ in no immutable field.

A StatefulSet's selector, serviceName and volumeClaimTemplates (and a Deployment's selector)
cannot change in place: `helm upgrade` would fail and leave the site half-upgraded. When a
chart version is released, its package replaces the one in previous/.
"""

from __future__ import annotations

import json
import tarfile

import pytest

from tests.helm.charts import CHARTS, KUBE_VERSIONS, ci_values, load_values, objects, render
from tests.helm.charts import ROOT as CHARTS_ROOT

PREVIOUS = CHARTS_ROOT.parent / "tests" / "helm" / "previous"
IMMUTABLE = {
    "StatefulSet": ("selector", "serviceName", "volumeClaimTemplates", "podManagementPolicy"),
    "Deployment": ("selector",),
}


def _immutable(rendered):
    return {
        (o["kind"], o["metadata"]["name"]): {field: o["spec"].get(field) for field in IMMUTABLE[o["kind"]]}
        for o in objects(rendered)
        if o["kind"] in IMMUTABLE
    }


def _known_to(schema, values):
    """The values the previous chart's schema knows: a value added since is set after the upgrade."""
    properties = schema.get("properties")
    if not isinstance(values, dict) or properties is None:
        return values
    return {k: _known_to(properties[k], v) for k, v in values.items() if k in properties}


def _schema_of(package):
    with tarfile.open(package) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/values.schema.json") and m.name.count("/") == 1)
        return json.load(tar.extractfile(member))


@pytest.mark.parametrize("chart", CHARTS)
def test_upgrade_from_the_previous_chart_version_changes_no_immutable_field(chart):
    [previous] = sorted(PREVIOUS.glob(f"{chart}-*.tgz"))[-1:]
    schema = _schema_of(previous)
    for case, path in ci_values(chart).items():
        values = load_values(path)
        before = _immutable(render(previous, _known_to(schema, values), KUBE_VERSIONS[-1], name="site"))
        after = _immutable(render(chart, values, KUBE_VERSIONS[-1], name="site", is_install=False, is_upgrade=True))
        assert before.keys() == after.keys(), case
        for key in before:
            # The chart label carries the version; it is not part of the selector, so it may change.
            assert before[key] == after[key], f"{case}: {key} changes an immutable field"
