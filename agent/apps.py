"""Keys of the local applications allowed to call the agent's inference API.

A key is `swa_<id>_<secret>`; `apps.json` in the data dir keeps, per key id, the app's name
and the SHA-256 of the secret. The agent reloads the file when it changes, so a key
created or revoked with the CLI takes effect without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agent.errors import ConfigError
from sitewarden.files import write_atomically

log = logging.getLogger("sitewarden.agent.apps")

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


@dataclass(frozen=True)
class KeyCheck:
    """What a presented key is: `app` set when its secret matches a key (revoked or not), `key_id` when the
    credential has the form of a key."""

    app: str | None = None
    key_id: str | None = None
    revoked_at: str | None = None


class AppKeys:
    """Checks bearer keys against `apps.json`, reloading it when its modification time changes.

    Each reload that changes the keys is logged: keys created and revoked, by id and app (never the secret).
    """

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
                if mtime == self._mtime:
                    return
                try:
                    keys = _read(self.path)
                except ConfigError as exc:
                    log.warning("app keys not reloaded: %s", exc)  # the keys read before stay in force
                    self._mtime = mtime
                    return
                first = self._mtime is None and not self._keys
                _log_changes(self._keys, keys, first=first)
                self._keys = keys
                self._mtime = mtime

    def refresh(self) -> None:
        """Reload `apps.json` if it changed (and log what changed); requests also reload it."""
        self._refresh()

    def identify(self, credential: str) -> KeyCheck:
        """What a presented key is; an app is named only when the key's secret matches."""
        parts = credential.split("_", 2)
        if len(parts) != 3 or parts[0] != PREFIX or not _is_key_id(parts[1]):
            return KeyCheck()
        self._refresh()
        record = self._keys.get(parts[1])
        if record is None:
            return KeyCheck(key_id=parts[1])
        if not hmac.compare_digest(str(record["sha256"]), hashlib.sha256(parts[2].encode()).hexdigest()):
            return KeyCheck(key_id=parts[1])
        revoked = record.get("revoked_at")
        return KeyCheck(app=str(record["name"]), key_id=parts[1], revoked_at=str(revoked) if revoked else None)

    def app_for(self, credential: str) -> str | None:
        """The app a key belongs to, or None if it is unknown or revoked."""
        check = self.identify(credential)
        return check.app if check.revoked_at is None else None


def _is_key_id(text: str) -> bool:
    return 0 < len(text) <= 32 and all(c in "0123456789abcdef" for c in text)


Keys = dict[str, dict[str, str | None]]


def _log_changes(before: Keys, after: Keys, *, first: bool) -> None:
    if first:
        active = [r for r in after.values() if not r.get("revoked_at")]
        log.info("app keys loaded: %d active key(s) of %d app(s)", len(active), len({r["name"] for r in active}))
        return
    for key_id, record in after.items():
        old = before.get(key_id)
        if old is None and not record.get("revoked_at"):
            log.info("app key %s of app %s created", key_id, record["name"])
        elif record.get("revoked_at") and (old is None or not old.get("revoked_at")):
            log.info("app key %s of app %s revoked at %s", key_id, record["name"], record["revoked_at"])
    for key_id, record in before.items():
        if key_id not in after:
            log.info("app key %s of app %s removed", key_id, record["name"])
