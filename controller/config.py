"""Controller configuration: `controller.json` in the data dir, overridden by `SITEWARDEN_*` variables.

The data dir holds everything the controller needs: `controller.json`, `keys/` (online
TUF keys, the controller's audit-log key and the witness key), `tuf/` (the repository's
metadata), `blobs/` (content-addressed files), `uploads/` (partial uploads), `audit/` and,
by default, the SQLite database `controller.db`; files 0600 (blobs 0400), directories 0700.
The TUF root key is not in it unless `controller init --root-key-online` put it there.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.errors import ControllerError
from sitewarden.files import write_atomically

CONFIG_FILE = "controller.json"
FORMAT = 1


class ConfigError(ControllerError):
    """The data dir or configuration cannot be used; the message says why."""


@dataclass(frozen=True)
class Expiries:
    """Lifetimes of signed TUF metadata, in seconds; roles are re-signed at half-life."""

    root: int = 365 * 86400
    targets: int = 90 * 86400
    snapshot: int = 7 * 86400
    timestamp: int = 86400


@dataclass(frozen=True)
class ControllerConfig:
    data_dir: Path
    public_url: str
    database_url: str
    audit_origin: str
    expiries: Expiries = field(default_factory=Expiries)
    max_json_body: int = 1 << 20
    max_upload_chunk: int = 1 << 30
    upload_ttl_s: int = 86400
    """An unfinished upload that has received no byte for this long is removed with its bytes."""

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def tuf_dir(self) -> Path:
        return self.data_dir / "tuf"

    @property
    def blobs_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def audit_dir(self) -> Path:
        return self.data_dir / "audit"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "public_url": self.public_url,
            "database_url": self.database_url,
            "audit_origin": self.audit_origin,
            "expiries": self.expiries.__dict__,
            "max_json_body": self.max_json_body,
            "max_upload_chunk": self.max_upload_chunk,
            "upload_ttl_s": self.upload_ttl_s,
        }


def default_database_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'controller.db').resolve()}"


def load(data_dir: Path, env: dict[str, str] | None = None) -> ControllerConfig:
    """Read `controller.json`; `SITEWARDEN_PUBLIC_URL`, `SITEWARDEN_DATABASE_URL` and `SITEWARDEN_UPLOAD_TTL_S`
    override it."""
    env = dict(os.environ) if env is None else env
    path = data_dir / CONFIG_FILE
    if not data_dir.is_dir():
        raise ConfigError(f"data dir {data_dir} does not exist; run `sitewarden controller init --data {data_dir}`")
    if not path.is_file():
        raise ConfigError(f"{data_dir} is not a controller data dir ({CONFIG_FILE} is missing); run init first")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if raw.get("format") != FORMAT:
        raise ConfigError(f"{path} has format {raw.get('format')!r}; this controller reads format {FORMAT}")
    try:
        return ControllerConfig(
            data_dir=data_dir.resolve(),
            public_url=env.get("SITEWARDEN_PUBLIC_URL", raw["public_url"]),
            database_url=env.get("SITEWARDEN_DATABASE_URL", raw.get("database_url") or default_database_url(data_dir)),
            audit_origin=raw["audit_origin"],
            expiries=Expiries(**raw.get("expiries", {})),
            max_json_body=int(raw.get("max_json_body", 1 << 20)),
            max_upload_chunk=int(raw.get("max_upload_chunk", 1 << 30)),
            upload_ttl_s=int(env.get("SITEWARDEN_UPLOAD_TTL_S", raw.get("upload_ttl_s", 86400))),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path} is incomplete or invalid: {exc}") from exc


def save(config: ControllerConfig) -> None:
    write_atomically(config.data_dir / CONFIG_FILE, (json.dumps(config.to_json(), indent=2) + "\n").encode(), 0o600)
