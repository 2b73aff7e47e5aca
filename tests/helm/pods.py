"""Rendered pods run with podman the way a kubelet runs them on one node, for the tests.

`Node` takes the objects a render produced (ConfigMaps, Secrets, Services) plus the Secrets an
operator creates beside the release, and runs a workload's pod from its rendered spec:

- each container's image, `command`, `args` and `env` (values, Secret and ConfigMap keys);
- volumes as the kubelet lays them out: ConfigMaps and Secrets as files under the atomic
  writer's `..data` symlink with their `defaultMode`/`items` (group-readable by fsGroup, as
  kubelet makes them), `emptyDir` as a tmpfs of its `sizeLimit` (so /tmp is a tmpfs), and
  persistent volume claims (a StatefulSet's volumeClaimTemplates included) as directories of
  this node that outlive the pod, group-owned by fsGroup;
- the security context: `--user` from runAsUser/runAsGroup (else the image's user, refused
  when runAsNonRoot and it is root, as kubelet refuses it), fsGroup and supplementalGroups as
  extra groups, `--read-only` without podman's own tmpfs mounts, `--cap-drop ALL`, and
  `no-new-privileges` for allowPrivilegeEscalation: false;
- init containers in order, each to exit 0 before the next, then the containers.

Networking: every container has its own network namespace (slirp4netns, since netavark needs
iptables that this machine lacks). A Service that selects a pod has its port published on
127.0.0.1 (each test picks free Service ports), and its DNS names resolve inside every
container to 10.0.2.2, slirp4netns's address for the host's loopback: containers reach each
other through Services over loopback, as pods do through kube-proxy. Probes, resource limits
and restarts are not emulated: the tests wait on the rendered probes themselves.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helm.image import PODMAN, ULIMITS, podman

HOST_LOOPBACK = "10.0.2.2"  # slirp4netns: the host's 127.0.0.1 seen from a container
NETWORK = "slirp4netns:allow_host_loopback=true"
_QUANTITY = re.compile(r"^([0-9]+)(Ki|Mi|Gi|k|M|G)?$")
_UNITS = {None: 1, "k": 1000, "M": 1000**2, "G": 1000**3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


class PodFailed(AssertionError):
    """A container of a pod exited non-zero, or a pod spec asks for what a kubelet would refuse."""


def quantity_bytes(text: str) -> int:
    match = _QUANTITY.match(str(text))
    if not match:
        raise PodFailed(f"cannot read the quantity {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class Container:
    """A started container: its podman name and the host ports of its container ports."""

    name: str
    ports: dict[int, int]  # container port -> 127.0.0.1 port (the Service port)
    started_at: float

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def running(self) -> bool:
        done = podman("inspect", self.name, "--format", "{{.State.Running}}", check=False)
        return done.stdout.strip() == "true"

    def exit_code(self) -> int:
        return int(podman("inspect", self.name, "--format", "{{.State.ExitCode}}").stdout.strip())

    def exec(self, *args: str) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *args, check=False)


@dataclass
class Pod:
    name: str
    containers: dict[str, Container]
    init_logs: dict[str, str] = field(default_factory=dict)


@dataclass
class Node:
    """One node's view of the cluster: the objects kubelet reads, and the volumes it keeps."""

    root: Path
    namespace: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    configmaps: dict[str, dict[str, bytes]] = field(default_factory=dict)
    secrets: dict[str, dict[str, bytes]] = field(default_factory=dict)
    services: list[dict[str, Any]] = field(default_factory=list)
    extra_hosts: dict[str, str] = field(default_factory=dict)
    image_users: dict[str, str] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)

    # -- the API objects ---------------------------------------------------------------------

    def apply(self, objects: list[dict[str, Any]]) -> None:
        """Take the ConfigMaps, Secrets and Services of a render (other kinds need no kubelet)."""
        for obj in objects:
            kind, name = obj["kind"], obj["metadata"]["name"]
            if kind == "ConfigMap":
                data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
                data |= {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
                self.configmaps[name] = data
            elif kind == "Secret":
                data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
                data |= {k: v.encode() for k, v in (obj.get("stringData") or {}).items()}
                self.secrets[name] = data
            elif kind == "Service":
                self.services = [s for s in self.services if s["metadata"]["name"] != name] + [obj]

    def secret(self, name: str, data: dict[str, str | bytes]) -> None:
        """A Secret created beside the release (`kubectl create secret ...`)."""
        self.secrets[name] = {k: v.encode() if isinstance(v, str) else v for k, v in data.items()}

    def configmap(self, name: str, data: dict[str, str]) -> None:
        self.configmaps[name] = {k: v.encode() for k, v in data.items()}

    def service_hosts(self) -> list[str]:
        names = []
        for service in self.services:
            svc = service["metadata"]["name"]
            names += [svc, f"{svc}.{self.namespace}", f"{svc}.{self.namespace}.svc"]
            names.append(f"{svc}.{self.namespace}.svc.cluster.local")
        return names

    def claim_dir(self, claim: str) -> Path:
        """The directory of a persistent volume claim on this node (kept across pods)."""
        path = self.root / "claims" / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- pods -------------------------------------------------------------------------------

    def run_workload(self, obj: dict[str, Any], *, wait_init: float = 300) -> Pod:
        """Start the pod of a Deployment (one replica), a StatefulSet's pod 0, a Job's or a bare Pod."""
        name, labels, spec = pod_of(obj)
        spec = dict(spec)
        if obj["kind"] == "StatefulSet":
            templates = [t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])]
            claims = [{"name": t, "persistentVolumeClaim": {"claimName": f"{t}-{name}"}} for t in templates]
            spec["volumes"] = [*spec.get("volumes", []), *claims]
        return self.run_pod(name, labels, spec, wait_init=wait_init)

    def run_pod(self, name: str, labels: dict[str, str], spec: dict[str, Any], *, wait_init: float = 300) -> Pod:
        pod = Pod(name, {})
        volumes = self._volumes(name, spec)
        for container in spec.get("initContainers", []):
            code, logs = self.run_to_completion(name, labels, spec, container, volumes, timeout=wait_init)
            pod.init_logs[container["name"]] = logs
            if code != 0:
                raise PodFailed(f"init container {container['name']} of {name} exited {code}:\n{logs}")
        for container in spec["containers"]:
            pod.containers[container["name"]] = self._start(name, labels, spec, container, volumes)
        return pod

    def run_once(self, obj: dict[str, Any], timeout: float = 300) -> tuple[int, str]:
        """Run a Job's or a test Pod's (single) container to completion: (exit code, logs)."""
        name, labels, spec = pod_of(obj)
        volumes = self._volumes(name, spec)
        [container] = spec["containers"]
        return self.run_to_completion(name, labels, spec, container, volumes, timeout=timeout)

    def run_to_completion(
        self,
        pod: str,
        labels: dict[str, str],
        spec: dict[str, Any],
        container: dict[str, Any],
        volumes: dict[str, list[str]],
        *,
        timeout: float,
    ) -> tuple[int, str]:
        args = self._podman_run_args(pod, labels, spec, container, volumes, publish=False)
        done = subprocess.run([*PODMAN, "run", "--rm", *args], capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout + done.stderr

    def stop(self, container: Container, timeout: float | None = None) -> None:
        podman("stop", *(["--time", str(int(timeout))] if timeout is not None else []), container.name, check=False)

    def remove(self, container: Container) -> None:
        podman("rm", "--force", container.name, check=False)

    def cleanup(self) -> None:
        """Remove every container this node started (by name: nobody else's)."""
        if self.started:
            podman("rm", "--force", "--time", "0", *self.started, check=False)
        self.started.clear()

    # -- internals --------------------------------------------------------------------------

    def _start(
        self,
        pod: str,
        labels: dict[str, str],
        spec: dict[str, Any],
        container: dict[str, Any],
        volumes: dict[str, list[str]],
    ) -> Container:
        args = self._podman_run_args(pod, labels, spec, container, volumes, publish=True)
        name = args[args.index("--name") + 1]
        podman("rm", "--force", name, check=False)
        started = time.monotonic()
        podman("run", "--detach", *args)
        self.started.append(name)
        return Container(name, self._ports(labels, container), started)

    def _ports(self, labels: dict[str, str], container: dict[str, Any]) -> dict[int, int]:
        """container port -> Service port, for every non-headless Service that selects the pod."""
        by_name = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        numbers = {p["containerPort"] for p in container.get("ports", [])}
        published: dict[int, int] = {}
        for service in self.services:
            spec = service["spec"]
            selector = spec.get("selector") or {}
            if spec.get("clusterIP") == "None" or not selector or any(labels.get(k) != v for k, v in selector.items()):
                continue
            for port in spec.get("ports", []):
                target = port.get("targetPort", port["port"])
                number = by_name.get(target) if isinstance(target, str) else target
                if number in numbers:
                    published[number] = port["port"]
        return published

    def _podman_run_args(
        self,
        pod: str,
        labels: dict[str, str],
        spec: dict[str, Any],
        container: dict[str, Any],
        volumes: dict[str, list[str]],
        *,
        publish: bool,
    ) -> list[str]:
        pod_sc = spec.get("securityContext") or {}
        sc = container.get("securityContext") or {}
        image = container["image"]
        args = ["--name", f"swt-{self.run_id}-{pod}-{container['name']}", "--hostname", pod]
        args += ["--pull", "never", "--network", NETWORK, *ULIMITS]
        args += ["--label", f"sitewarden-test={self.run_id}"]
        args += ["--stop-timeout", str(spec.get("terminationGracePeriodSeconds", 30))]
        for host in self.service_hosts():
            args += ["--add-host", f"{host}:{HOST_LOOPBACK}"]
        for host, address in self.extra_hosts.items():
            args += ["--add-host", f"{host}:{address}"]
        # The user, as kubelet decides it.
        user = sc.get("runAsUser", pod_sc.get("runAsUser"))
        group = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
        uid = user if user is not None else self._image_user(image).split(":")[0]
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) and str(uid) in ("0", "root", ""):
            raise PodFailed(f"{pod}/{container['name']}: runAsNonRoot and the image runs as root")
        if user is not None:
            args += ["--user", f"{user}:{group}" if group is not None else str(user)]
        for extra in [pod_sc.get("fsGroup"), *pod_sc.get("supplementalGroups", [])]:
            if extra is not None:
                args += ["--group-add", str(extra)]
        if sc.get("readOnlyRootFilesystem"):
            # podman would mount its own tmpfs on /tmp, /var/tmp and /run: the pod's volumes must do.
            args += ["--read-only", "--read-only-tmpfs=false"]
        drop = (sc.get("capabilities") or {}).get("drop") or []
        add = (sc.get("capabilities") or {}).get("add") or []
        args += [f"--cap-drop={c}" for c in drop] + [f"--cap-add={c}" for c in add]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        if sc.get("privileged"):
            raise PodFailed(f"{pod}/{container['name']}: privileged containers are not run here")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type", "RuntimeDefault")
        if seccomp != "RuntimeDefault":
            raise PodFailed(f"{pod}/{container['name']}: seccomp profile {seccomp} is not emulated")
        for env in container.get("env", []):
            args += ["--env", f"{env['name']}={self._env_value(pod, env)}"]
        for mount in container.get("volumeMounts", []):
            args += volumes_for_mount(volumes, mount)
        if publish:
            for container_port, host_port in self._ports(labels, container).items():
                args += ["--publish", f"127.0.0.1:{host_port}:{container_port}"]
        if container.get("command"):
            args += ["--entrypoint", _json_list(container["command"])]
        return [*args, image, *container.get("args", [])]

    def _image_user(self, image: str) -> str:
        if image not in self.image_users:
            self.image_users[image] = podman("image", "inspect", image, "--format", "{{.Config.User}}").stdout.strip()
        return self.image_users[image]

    def _env_value(self, pod: str, env: dict[str, Any]) -> str:
        if "value" in env:
            return str(env["value"])
        source = env.get("valueFrom") or {}
        if "secretKeyRef" in source or "configMapKeyRef" in source:
            ref = source.get("secretKeyRef") or source["configMapKeyRef"]
            store = self.secrets if "secretKeyRef" in source else self.configmaps
            value = store.get(ref["name"], {}).get(ref["key"])
            if value is None:
                raise PodFailed(f"{pod}: env {env['name']} names {ref['name']}/{ref['key']}, which does not exist")
            return value.decode()
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            return {"metadata.name": pod, "metadata.namespace": self.namespace}[path]
        raise PodFailed(f"{pod}: env {env['name']} has a source this node does not emulate: {source}")

    def _volumes(self, pod: str, spec: dict[str, Any]) -> dict[str, list[str]]:
        """volume name -> podman mount arguments (without the mount path), laying out the files."""
        fs_group = (spec.get("securityContext") or {}).get("fsGroup")
        out: dict[str, list[str]] = {}
        base = self.root / "pods" / pod / f"{time.time_ns()}"
        for volume in spec.get("volumes", []):
            name = volume["name"]
            if "emptyDir" in volume:
                size = (volume["emptyDir"] or {}).get("sizeLimit")
                options = ["tmpfs-mode=1777"] + ([f"tmpfs-size={quantity_bytes(size)}"] if size else [])
                out[name] = ["tmpfs", ",".join(options)]
            elif "secret" in volume or "configMap" in volume:
                source = volume.get("secret") or volume["configMap"]
                key = "secretName" if "secret" in volume else "name"
                store = self.secrets if "secret" in volume else self.configmaps
                data = store.get(source[key])
                if data is None and not source.get("optional"):
                    raise PodFailed(f"{pod}: volume {name} needs {source[key]}, which does not exist")
                directory = base / name
                _atomic_writer(directory, data or {}, source, fs_group)
                out[name] = ["bind", str(directory)]
            elif "persistentVolumeClaim" in volume:
                directory = self.claim_dir(volume["persistentVolumeClaim"]["claimName"])
                if fs_group is not None and directory.stat().st_gid != fs_group:  # fsGroupChangePolicy: OnRootMismatch
                    for path in [directory, *directory.rglob("*")]:
                        os.chown(path, -1, fs_group, follow_symlinks=False)
                        if not path.is_symlink():
                            extra = 0o2070 if path.is_dir() else 0o060
                            path.chmod(path.stat().st_mode & 0o7777 | extra)
                out[name] = ["bind", str(directory)]
            else:
                raise PodFailed(f"{pod}: volume {name} has a type this node does not emulate: {sorted(volume)}")
        return out


def pod_of(obj: dict[str, Any]) -> tuple[str, dict[str, str], dict[str, Any]]:
    """(pod name, pod labels, pod spec) of a Pod, Deployment, StatefulSet or Job."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    if kind == "Pod":
        return name, obj["metadata"].get("labels", {}), obj["spec"]
    template = obj["spec"]["template"]
    suffix = {"Deployment": "-0000000000-00000", "StatefulSet": "-0", "Job": "-00000"}[kind]
    return name + suffix, template["metadata"].get("labels", {}), template["spec"]


def volumes_for_mount(volumes: dict[str, list[str]], mount: dict[str, Any]) -> list[str]:
    kind, source = volumes[mount["name"]]
    target = mount["mountPath"]
    if mount.get("subPath"):
        raise PodFailed(f"subPath mounts are not emulated ({mount})")
    if kind == "tmpfs":
        return ["--mount", f"type=tmpfs,destination={target},{source}"]
    readonly = ",ro" if mount.get("readOnly") else ""
    return ["--mount", f"type=bind,source={source},destination={target}{readonly}"]


def _atomic_writer(directory: Path, data: dict[str, bytes], source: dict[str, Any], fs_group: int | None) -> None:
    """ConfigMap/Secret files as kubelet's atomic writer lays them out: key -> ..data/key -> ..<ts>/key."""
    if directory.exists():
        shutil.rmtree(directory)
    stamp = directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.time_ns() % 10**9}"
    stamp.mkdir(parents=True)
    default_mode = source.get("defaultMode", 0o644)
    items = source.get("items") or [{"key": k, "path": k} for k in sorted(data)]
    top = []
    for item in items:
        if item["key"] not in data:
            if source.get("optional"):
                continue
            raise PodFailed(f"key {item['key']} is missing from {source}")
        path = stamp / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[item["key"]])
        mode = item.get("mode", default_mode)
        if fs_group is not None:
            os.chown(path, 0, fs_group)
            mode |= 0o440  # kubelet makes read-only volumes group-readable by fsGroup
        path.chmod(mode)
        top.append(item["path"].split("/")[0])
    (directory / "..data").symlink_to(stamp.name)
    for name in sorted(set(top)):
        (directory / name).symlink_to(f"..data/{name}")
    for folder in (directory, stamp):
        if fs_group is not None:
            os.chown(folder, 0, fs_group)
        folder.chmod(0o2755 if fs_group is not None else 0o755)


def _json_list(values: list[str]) -> str:
    import json  # noqa: PLC0415

    return json.dumps(values)
