"""The site's own configuration (a TOML file the site writes; the controller never pushes it).

    [server]                       # the inference API for local apps
    listen = "127.0.0.1:9443"
    tls_cert = "server.pem"        # optional; without it only a loopback address is allowed
    tls_key = "server.key"
    max_body_bytes = 4194304

    [controller]
    ca_cert = "controller-ca.pem"  # verifies the controller's TLS certificate
    fetch_timeout_s = 30           # a TUF fetch that stalls this long is cut and retried
    witness_seconds = 30           # how often the site witnesses the controller's audit log (also after
                                   # every long-poll answer)
    audit_vkey = "..."             # only for sites enrolled before the controller's log key was pinned

    [approvers]                    # approver public keys this site trusts, by name
    alice = "approvers/alice.pub.pem"

    [apps.fraud-service]           # what the keys of app fraud-service may state (see agent.apps):
    purposes = ["fraud"]           # a request claiming another purpose or data class is refused (403)
    data_classes = ["internal", "confidential"]

    [metrics]                      # Prometheus metrics on a listener of their own (plain HTTP);
    listen = "127.0.0.1:9464"      # without it, /metrics on the API listener needs an app key

    [audit]
    mode = "durable"               # or "async": see AuditSettings
    checkpoint_entries = 1000
    checkpoint_seconds = 30

    [data]
    local = "/srv/site-data"       # where the site's local data lives

    [datasets.transactions]        # a data set name a federated job can name, mapped to local data:
    kind = "sqlite"                # "csv", "parquet" or "sqlite"
    path = "/srv/site-data/core.db"
    query = "SELECT amount, ..., label FROM tx WHERE booked >= '2026-01-01'"   # sqlite only

    [policy]
    local = "policy-local"         # the site's own Rego modules (OPA bundle layout), never pushed:
                                   # they can only tighten the central bundle's decisions

    [lm]                           # the language-model runtime (agent.lm)
    max_batch = 16                 # sequences decoded together
    batch_window_ms = 20           # how long a waiting request may wait for others to join

Relative paths are relative to the configuration file. Every configured path must exist when
the agent starts (certificates, keys and data sets as files, `data.local` and `policy.local`
as directories or bundles): one that does not stops it with a message naming the key and the
path. `SITEWARDEN_LISTEN` overrides the listen address, `SITEWARDEN_METRICS_LISTEN` the
metrics listener's. An app with keys but no `[apps.<name>]` binding may state nothing: its
requests are refused.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.apps import AppBinding, check_app_name
from agent.errors import ConfigError
from federation.datasource import DataSource

DATASET_KINDS = ("csv", "parquet", "sqlite")


@dataclass(frozen=True)
class AuditSettings:
    """`durable`: an inference response leaves only once its audit entry is on disk.
    `async`: entries are queued and written in the background; a crash can lose the last
    entries of acknowledged requests (at most `checkpoint_entries`), in exchange for latency."""

    mode: str = "durable"
    checkpoint_entries: int = 1000
    checkpoint_seconds: float = 30.0


@dataclass(frozen=True)
class SiteConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 9443
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_body_bytes: int = 4 << 20
    controller_ca: Path | None = None
    fetch_timeout_s: float = 30.0
    controller_witness_s: float = 30.0
    controller_audit_vkey: str = ""
    approvers: dict[str, Path] = field(default_factory=dict)
    audit: AuditSettings = field(default_factory=AuditSettings)
    local_data: Path | None = None
    local_policy: Path | None = None
    datasets: dict[str, DataSource] = field(default_factory=dict)
    apps: dict[str, AppBinding] = field(default_factory=dict)
    metrics_host: str | None = None
    """Where the separate metrics listener binds (None: no separate listener)."""
    metrics_port: int = 0
    lm: dict[str, Any] = field(default_factory=dict)  # [lm]: read by agent.lm.site.Settings

    def approver_keys(self) -> dict[str, bytes]:
        """Name -> public key PEM of every approver this site trusts."""
        keys = {}
        for name, path in self.approvers.items():
            try:
                keys[name] = path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"approver {name}: cannot read {path}: {exc.strerror}") from exc
        return keys


def _path(base: Path, value: Any, what: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be a path")
    path = Path(value)
    return path if path.is_absolute() else base / path


def _positive(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
        raise ConfigError(f"{what} must be a number of seconds from 0 to 3600, not {value!r}")
    return float(value)


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"server.listen {value!r} must be host:port")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def load(path: Path | None, env: dict[str, str] | None = None) -> SiteConfig:
    """Read a site configuration; defaults when `path` is None. ConfigError names what is wrong."""
    env = dict(os.environ) if env is None else env
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read site configuration {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"site configuration {path} is not valid TOML: {exc}") from exc
        base = path.parent
    known = {"server", "controller", "approvers", "audit", "data", "policy", "datasets", "apps", "metrics", "lm"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown section(s) in the site configuration: {', '.join(sorted(unknown))}")
    server, controller, audit, data, policy, metrics = (
        raw.get(k, {}) for k in ("server", "controller", "audit", "data", "policy", "metrics")
    )
    host, port = _listen(env.get("SITEWARDEN_LISTEN") or server.get("listen", "127.0.0.1:9443"))
    tls_cert = _path(base, server.get("tls_cert"), "server.tls_cert")
    tls_key = _path(base, server.get("tls_key"), "server.tls_key")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("server.tls_cert and server.tls_key go together")
    if tls_cert is None and not is_loopback(host):
        raise ConfigError(f"refusing plain HTTP on {host}: set server.tls_cert and server.tls_key")
    mode = audit.get("mode", "durable")
    if mode not in ("durable", "async"):
        raise ConfigError(f"audit.mode must be 'durable' or 'async', not {mode!r}")
    metrics_listen = env.get("SITEWARDEN_METRICS_LISTEN") or metrics.get("listen")
    metrics_host, metrics_port = _listen(metrics_listen) if metrics_listen else (None, 0)
    approvers = {}
    for name, value in raw.get("approvers", {}).items():
        resolved = _path(base, value, f"approvers.{name}")
        assert resolved is not None
        approvers[name] = resolved
    try:
        config = SiteConfig(
            listen_host=host,
            listen_port=port,
            tls_cert=tls_cert,
            tls_key=tls_key,
            max_body_bytes=int(server.get("max_body_bytes", 4 << 20)),
            controller_ca=_path(base, controller.get("ca_cert"), "controller.ca_cert"),
            fetch_timeout_s=_positive(controller.get("fetch_timeout_s", 30), "controller.fetch_timeout_s"),
            controller_witness_s=_positive(controller.get("witness_seconds", 30.0), "controller.witness_seconds"),
            controller_audit_vkey=str(controller.get("audit_vkey", "")),
            approvers=approvers,
            audit=AuditSettings(
                mode=mode,
                checkpoint_entries=int(audit.get("checkpoint_entries", 1000)),
                checkpoint_seconds=float(audit.get("checkpoint_seconds", 30)),
            ),
            local_data=_path(base, data.get("local"), "data.local"),
            local_policy=_path(base, policy.get("local"), "policy.local"),
            datasets=_datasets(base, raw.get("datasets", {})),
            apps=_apps(raw.get("apps", {})),
            metrics_host=metrics_host,
            metrics_port=metrics_port,
            lm=_lm(raw.get("lm", {})),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"site configuration has a value of the wrong type: {exc}") from exc
    check_paths(config)
    return config


def configured_paths(config: SiteConfig) -> list[tuple[str, Path, str]]:
    """(key, path, "file" or "directory" or "any") of every path the configuration names."""
    found: list[tuple[str, Path, str]] = []
    for key, path, kind in (
        ("server.tls_cert", config.tls_cert, "file"),
        ("server.tls_key", config.tls_key, "file"),
        ("controller.ca_cert", config.controller_ca, "file"),
        ("data.local", config.local_data, "directory"),
        ("policy.local", config.local_policy, "any"),  # a bundle directory or a built .tar.gz
    ):
        if path is not None:
            found.append((key, path, kind))
    found += [(f"approvers.{name}", path, "file") for name, path in config.approvers.items()]
    found += [(f"datasets.{name}.path", Path(source.path), "file") for name, source in config.datasets.items()]
    return found


def check_paths(config: SiteConfig) -> None:
    """ConfigError for the first configured path that does not exist (or is not a file or directory as the
    key needs): better at start, naming the key, than a failure when a job or a request first needs it."""
    for key, path, kind in configured_paths(config):
        if not path.exists():
            raise ConfigError(f"{key} = {str(path)!r}: no such file or directory")
        if kind == "file" and not path.is_file():
            raise ConfigError(f"{key} = {str(path)!r} is not a file")
        if kind == "directory" and not path.is_dir():
            raise ConfigError(f"{key} = {str(path)!r} is not a directory")


def _positive(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{what} must be a positive number of seconds, not {value!r}")
    return float(value)


def _lm(raw: Any) -> dict[str, Any]:
    """`[lm]`: the language-model runtime's batching (`max_batch`, `batch_window_ms`), checked here."""
    from agent.lm.site import Settings  # noqa: PLC0415

    if not isinstance(raw, dict):
        raise ConfigError("lm must be a table")
    try:
        Settings.parse(raw)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return raw


def _datasets(base: Path, raw: dict[str, Any]) -> dict[str, DataSource]:
    """`[datasets.<name>]` tables: the local data each data set name of a federated job maps to."""
    out = {}
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"datasets.{name} must be a table with kind and path")
        unknown = set(table) - {"kind", "path", "query"}
        if unknown:
            raise ConfigError(f"datasets.{name}: unknown key(s) {', '.join(sorted(unknown))}")
        kind = table.get("kind")
        if kind not in DATASET_KINDS:
            raise ConfigError(f"datasets.{name}.kind must be one of {', '.join(DATASET_KINDS)}, not {kind!r}")
        path = _path(base, table.get("path"), f"datasets.{name}.path")
        query = table.get("query", "")
        if (kind == "sqlite") != bool(query):
            raise ConfigError(f"datasets.{name}: a query goes with kind sqlite, and only with it")
        out[name] = DataSource(kind, str(path), str(query))
    return out


def _apps(raw: dict[str, Any]) -> dict[str, AppBinding]:
    """`[apps.<name>]` tables: the purposes and data classes each app's keys may state."""
    if not isinstance(raw, dict):
        raise ConfigError("apps must be tables [apps.<name>] with purposes and data_classes")
    out = {}
    for name, table in raw.items():
        check_app_name(name, "apps: app name")
        if not isinstance(table, dict):
            raise ConfigError(f"apps.{name} must be a table with purposes and data_classes")
        unknown = set(table) - {"purposes", "data_classes"}
        if unknown:
            raise ConfigError(f"apps.{name}: unknown key(s) {', '.join(sorted(unknown))}")
        lists = {}
        for key in ("purposes", "data_classes"):
            value = table.get(key)
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"apps.{name}.{key} must be a non-empty list of names")
            lists[key] = tuple(dict.fromkeys(value))
        out[name] = AppBinding(lists["purposes"], lists["data_classes"])
    return out
