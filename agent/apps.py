"""Keys of the local applications allowed to call the agent's inference API.

A key is `swa_<id>_<secret>`; `apps.json` in the data dir keeps, per key id, the app's name
and the SHA-256 of the secret. The agent reloads the file when it changes, so a key
created or revoked with the CLI takes effect without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
from datetime import UTC, datetime
from pathlib import Path

from agent.errors import ConfigError
from sitewarden.files import write_atomically

PREFIX = "swa"
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _read(path: Path) -> dict[str, dict[str, str | None]]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read app keys {path}: {exc}") from exc
    return data.get("keys", {})


def create(path: Path, name: str) -> str:
    """Add a key for app `name`; returns the key, shown once."""
    if not name or len(name) > 100 or set(name) - NAME_CHARS:
        raise ConfigError(f"app name {name!r} must be 1-100 letters, digits, '.', '_' or '-'")
    keys = _read(path)
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(24)
    keys[key_id] = {
        "name": name,
        "sha256": hashlib.sha256(secret.encode()).hexdigest(),
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "revoked_at": None,
    }
    write_atomically(path, json.dumps({"keys": keys}, indent=2).encode(), mode=0o600)
    return f"{PREFIX}_{key_id}_{secret}"


def revoke(path: Path, name: str) -> int:
    """Revoke every key of app `name`; returns how many."""
    keys = _read(path)
    count = 0
    for record in keys.values():
        if record["name"] == name and record["revoked_at"] is None:
            record["revoked_at"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            count += 1
    write_atomically(path, json.dumps({"keys": keys}, indent=2).encode(), mode=0o600)
    return count


class AppKeys:
    """Checks bearer keys against `apps.json`, reloading it when its modification time changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = str(path)  # os.stat of a str: this runs on every request
        self._lock = threading.Lock()
        self._mtime: int | None = None
        self._keys: dict[str, dict[str, str | None]] = {}

    def _refresh(self) -> None:
        try:
            mtime = os.stat(self._file).st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime != self._mtime:
            with self._lock:
                self._keys = _read(self.path)
                self._mtime = mtime

    def app_for(self, credential: str) -> str | None:
        """The app a key belongs to, or None if it is unknown or revoked."""
        parts = credential.split("_", 2)
        if len(parts) != 3 or parts[0] != PREFIX:
            return None
        self._refresh()
        record = self._keys.get(parts[1])
        if record is None or record.get("revoked_at"):
            return None
        if not hmac.compare_digest(str(record["sha256"]), hashlib.sha256(parts[2].encode()).hexdigest()):
            return None
        return str(record["name"])
