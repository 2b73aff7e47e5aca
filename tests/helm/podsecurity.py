"""Pod Security Standards, restricted profile, and OpenShift's restricted-v2 SCC, as plain checks.

Each rule follows https://kubernetes.io/docs/concepts/security/pod-security-standards/
(restricted, which includes baseline), plus what this project asks on top: a read-only root
file system, an explicit emptyDir for /tmp, no service account token. `violations` returns one
line per broken rule, naming the pod and the container.
"""

from __future__ import annotations

from typing import Any

ALLOWED_VOLUME_KINDS = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
ALLOWED_CAPS_ADD = {"NET_BIND_SERVICE"}


def _containers(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for field in ("initContainers", "containers", "ephemeralContainers"):
        out += [(f"{field}[{c['name']}]", c) for c in spec.get(field, []) or []]
    return out


def violations(label: str, spec: dict[str, Any], *, openshift: bool = False) -> list[str]:
    found: list[str] = []
    pod_sc = spec.get("securityContext") or {}

    def bad(message: str) -> None:
        found.append(f"{label}: {message}")

    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(host):
            bad(f"{host} is set")
    if spec.get("automountServiceAccountToken") is not False:
        bad("automountServiceAccountToken is not false")
    for volume in spec.get("volumes", []) or []:
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUME_KINDS:
            bad(f"volume {volume['name']} is of a kind restricted forbids: {sorted(kinds - ALLOWED_VOLUME_KINDS)}")
    if (pod_sc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        bad("pod seccompProfile is not RuntimeDefault")
    if pod_sc.get("runAsNonRoot") is not True:
        bad("pod runAsNonRoot is not true")
    if pod_sc.get("runAsUser") == 0:
        bad("pod runAsUser is 0")
    if openshift:
        for field in ("runAsUser", "runAsGroup", "fsGroup", "supplementalGroups"):
            if field in pod_sc:
                bad(f"OpenShift restricted-v2 assigns {field}: the pod must not fix it")
    else:
        for field in ("runAsUser", "runAsGroup", "fsGroup"):
            if not isinstance(pod_sc.get(field), int) or pod_sc[field] < 1:
                bad(f"pod {field} is not a fixed non-root id")
    for sysctl in pod_sc.get("sysctls", []) or []:
        bad(f"sysctl {sysctl.get('name')} is set")
    volumes = {v["name"]: v for v in spec.get("volumes", []) or []}
    for where, container in _containers(spec):
        sc = container.get("securityContext") or {}
        prefix = f"{where}:"
        if sc.get("privileged"):
            bad(f"{prefix} privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad(f"{prefix} allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad(f"{prefix} capabilities.drop lacks ALL")
        if set(caps.get("add") or []) - ALLOWED_CAPS_ADD:
            bad(f"{prefix} adds capabilities {caps.get('add')}")
        if sc.get("runAsNonRoot") is False or sc.get("runAsUser") == 0:
            bad(f"{prefix} may run as root")
        profile = (sc.get("seccompProfile") or {}).get("type")
        if profile is not None and profile not in ("RuntimeDefault", "Localhost"):
            bad(f"{prefix} seccompProfile {profile}")
        if sc.get("readOnlyRootFilesystem") is not True:
            bad(f"{prefix} readOnlyRootFilesystem is not true")
        if openshift and ("runAsUser" in sc or "runAsGroup" in sc):
            bad(f"{prefix} fixes runAsUser/runAsGroup in OpenShift mode")
        for port in container.get("ports", []) or []:
            if port.get("hostPort"):
                bad(f"{prefix} uses hostPort {port['hostPort']}")
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", []) or []}
        tmp = volumes.get(mounts.get("/tmp", ""), {})
        if "emptyDir" not in tmp:
            bad(f"{prefix} has no emptyDir at /tmp")
    return found
