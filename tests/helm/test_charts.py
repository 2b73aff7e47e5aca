"""The charts rendered by real Helm with every ci/*-values.yaml, for two Kubernetes versions.

Each render is linted strictly, every object is validated against Kubernetes' own schemas
(kubernetes-validate, strict: unknown fields fail), and every pod spec (workloads, the
migration hook Job, helm test pods) is checked against the restricted Pod Security profile,
and against OpenShift's restricted-v2 (no fixed ids) for the OpenShift values.
"""

from __future__ import annotations

import json

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.helm.charts import CHARTS, KUBE_VERSIONS, ROOT, ci_values, load_values, objects, pod_specs, render
from tests.helm.podsecurity import violations

# Kinds that come from CRDs: kubernetes-validate has no schema for them.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "Certificate"}

CASES = [(chart, name) for chart in CHARTS for name in ci_values(chart)]


def test_every_case_the_issue_lists_has_ci_values_for_both_charts():
    wanted = {"defaults", "postgresql", "openshift", "airgapped", "private-ca-proxy", "monitoring", "network-policy"}
    wanted |= {"federation"}
    for chart in CHARTS:
        assert wanted <= set(ci_values(chart)), chart


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize(("chart", "case"), CASES)
def test_chart_renders_valid_restricted_objects(chart, case, kube_version):
    values = load_values(ci_values(chart)[case])
    rendered = render(chart, values, kube_version)
    found = objects(rendered)
    assert found, "nothing rendered"
    errors = []
    pods = 0
    openshift = bool(values.get("openshift") or values.get("global", {}).get("openshift"))
    for obj in found:
        if obj["kind"] not in CRD_KINDS:
            try:
                kubernetes_validate.validate(obj, kube_version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc}")
        for label, spec in pod_specs(obj):
            pods += 1
            errors += violations(label, spec, openshift=openshift)
    assert not errors, "\n".join(errors)
    assert pods >= 2  # the workload and at least one helm test pod


@pytest.mark.parametrize("chart", CHARTS)
def test_lint_strict_is_clean_for_every_ci_values_file(chart):
    for case, path in ci_values(chart).items():
        for kube_version in KUBE_VERSIONS:
            report = helm.lint(
                str(ROOT / chart), load_values(path), strict=True, kube_version=f"v{kube_version}", namespace="sw"
            )
            problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
            assert not problems, f"{chart} {case} {kube_version}: {problems}"


def test_monitoring_values_add_service_monitor_and_the_listed_alerts():
    rendered = objects(render("sitewarden-agent", load_values(ci_values("sitewarden-agent")["monitoring"])))
    rule = next(o for o in rendered if o["kind"] == "PrometheusRule")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {
        "SitewardenHeartbeatMissing",
        "SitewardenWitnessLag",
        "SitewardenAuditWriteFailures",
        "SitewardenSyncRefusals",
    } <= alerts
    assert any(o["kind"] == "ServiceMonitor" for o in rendered)


def test_agent_network_policy_admits_only_the_sites_apps_and_lets_out_only_dns_and_the_controller():
    values = load_values(ci_values("sitewarden-agent")["network-policy"])
    policy = next(o for o in objects(render("sitewarden-agent", values)) if o["kind"] == "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    [ingress] = policy["spec"]["ingress"]
    peers = ingress["from"]
    assert peers[0] == values["networkPolicy"]["inferenceFrom"][0]
    assert peers[1]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "test"
    assert len(peers) == 2
    dns, controller = policy["spec"]["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert controller["to"] == [{"ipBlock": {"cidr": "203.0.113.10/32"}}]
    assert [p["port"] for p in controller["ports"]] == [443]
    federated = load_values(ci_values("sitewarden-agent")["federation"])
    policy = next(o for o in objects(render("sitewarden-agent", federated)) if o["kind"] == "NetworkPolicy")
    assert [p["port"] for p in policy["spec"]["egress"][1]["ports"]] == [443, 443]


def test_agent_statefulset_keeps_its_volume_and_never_runs_two_writers():
    values = load_values(ci_values("sitewarden-agent")["defaults"])
    sts = next(o for o in objects(render("sitewarden-agent", values)) if o["kind"] == "StatefulSet")
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    env = {e["name"]: e.get("value") for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SITEWARDEN_JOIN_TOKEN_FILE"] == "/etc/sitewarden/join-token/token"
    token = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "join-token")
    assert token["secret"] == {"secretName": "branch-1-join-token", "defaultMode": 0o440, "optional": True}


def test_controller_migration_is_a_pre_install_and_pre_upgrade_hook_only_with_postgresql():
    pg = objects(render("sitewarden-controller", load_values(ci_values("sitewarden-controller")["postgresql"])))
    job = next(o for o in pg if o["kind"] == "Job")
    notes = job["metadata"]["annotations"]
    assert notes["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert notes["argocd.argoproj.io/hook"] == "PreSync"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["controller", "migrate"]
    trial = objects(render("sitewarden-controller", load_values(ci_values("sitewarden-controller")["sqlite-trial"])))
    assert not any(o["kind"] == "Job" for o in trial)
    deployment = next(o for o in trial if o["kind"] == "Deployment")
    assert [c["name"] for c in deployment["spec"]["template"]["spec"]["initContainers"]] == ["init", "migrate"]


def test_tuf_root_key_stays_in_memory_of_the_init_container_unless_asked_for():
    values = load_values(ci_values("sitewarden-controller")["defaults"])
    deployment = next(o for o in objects(render("sitewarden-controller", values)) if o["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    init = spec["initContainers"][0]
    assert "--root-key-out=/var/run/sitewarden/tuf-root/root.key" in init["args"]
    volume = next(v for v in spec["volumes"] if v["name"] == "tuf-root")
    assert volume["emptyDir"]["medium"] == "Memory"
    assert all(m["name"] != "tuf-root" for m in spec["containers"][0]["volumeMounts"])
    online = objects(render("sitewarden-controller", {**values, "keys": {"tufRootKey": "dataVolume"}}))
    args = next(o for o in online if o["kind"] == "Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    assert not any(a.startswith("--root-key-out") for a in args["args"])


def test_charts_use_no_lookup_and_render_offline():
    for chart in CHARTS:
        for template in (ROOT / chart / "templates").rglob("*"):
            if template.is_file():
                assert "lookup" not in template.read_text(), template


@pytest.mark.parametrize(
    ("chart", "change", "message"),
    [
        ("sitewarden-controller", {"port": "8443"}, "port"),
        ("sitewarden-controller", {"databse": {}}, "databse"),
        ("sitewarden-controller", {"database": {"type": "mysql"}}, "database"),
        ("sitewarden-controller", {"tls": {"existingScret": "x"}}, "existingScret"),
        ("sitewarden-controller", {"image": {"digest": "latest"}}, "digest"),
        ("sitewarden-agent", {"networkPolicy": {"enabled": "yes"}}, "enabled"),
        ("sitewarden-agent", {"site": {"audit": {"mode": "fast"}}}, "mode"),
        ("sitewarden-agent", {"joinToken": {"secret": "x"}}, "secret"),
        ("sitewarden-agent", {"persistence": {"size": 10}}, "size"),
    ],
)
def test_values_schema_refuses_wrong_types_and_unknown_keys_naming_the_key(chart, change, message):
    values = _merge(load_values(ci_values(chart)["defaults"]), change)
    with pytest.raises(helm.HelmError) as refused:
        render(chart, values)
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("chart", "change", "message"),
    [
        ("sitewarden-controller", {"publicUrl": ""}, "publicUrl is required"),
        ("sitewarden-controller", {"tls": {"certManager": {"enabled": True, "issuerRef": {"name": "x"}}}}, "contra"),
        ("sitewarden-controller", {"database": {"type": "sqlite"}}, "database.existingSecret is set but"),
        ("sitewarden-controller", {"metrics": {"prometheusRule": {"enabled": True}}}, "needs metrics.serviceMonitor"),
        ("sitewarden-agent", {"joinToken": {"value": "swj1.x"}}, "contradict"),
        ("sitewarden-agent", {"networkPolicy": {"controller": {"ipBlocks": []}}}, "cannot reach the controller"),
        ("sitewarden-agent", {"approvers": {"keys": {}}}, "at least one approver"),
    ],
)
def test_contradictory_values_fail_with_a_clear_message(chart, change, message):
    values = load_values(ci_values(chart)["defaults"])
    values = {**values, **{k: v for k, v in change.items() if not isinstance(v, dict)}}
    values = _merge(values, {k: v for k, v in change.items() if isinstance(v, dict)})
    if change == {"approvers": {"keys": {}}}:
        values["approvers"]["keys"] = {}
    with pytest.raises(helm.HelmError) as refused:
        render(chart, values)
    assert message in str(refused.value)


def test_schema_covers_every_value_and_forbids_unknown_keys_in_our_blocks():
    def walk(values, schema, path):
        assert schema.get("type") == "object", path
        if path != "global" and schema.get("properties"):
            assert schema.get("additionalProperties") is False, path
        for key, value in values.items():
            sub = (schema.get("properties") or {}).get(key)
            assert sub is not None, f"{path}.{key} is not in the schema"
            if isinstance(value, dict) and sub.get("properties"):
                walk(value, sub, f"{path}.{key}".strip("."))

    for chart in CHARTS:
        values = yaml.safe_load((ROOT / chart / "values.yaml").read_text())
        schema = json.loads((ROOT / chart / "values.schema.json").read_text())
        walk(values, schema, "")


def _merge(base, change):
    out = dict(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
