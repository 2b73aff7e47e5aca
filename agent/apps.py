"""Keys of the local applications allowed to call the agent, and what each app may claim.

A key is `swa_<id>_<secret>`; `apps.json` in the data dir keeps, per key id, the app's name,
the SHA-256 of the secret, and when (in time and in the file's generation) it was created
and revoked. The site's configuration binds each app to the purposes and data classes it
may state (`[apps.<name>]`, `AppBinding`): a request claiming anything else is refused
with 403 before any policy runs, and the binding is part of every decision's input.

Changing keys (`create`, `revoke`, the `sitewarden agent app-key` commands):

1. takes an exclusive lock on `apps.lock`, so that two changes at once cannot lose one;
2. reads `apps.json`, bumps its `generation`, records the change under that generation,
   and replaces the file atomically (write, fsync, rename), mode 0600.

The running agent checks, on every request, whether `apps.json` is still the file it read:
it keeps that file open, so its inode cannot be reused, and compares the path's device,
inode, size and modification time with it. A replaced file is always another inode, so a
key revoked a microsecond after the last read stops working on the very next request,
whatever the file system's time granularity. The agent then records every change of a
newer generation in the site's audit log (`AppKeys.unaudited`) and notes the generation it
audited in `apps.audited`, so that a change made while the agent was stopped is audited
when it starts; the CLI waits for that note to say the running agent recorded its change.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.errors import ConfigError, InferenceError
from sitewarden.files import PRIVATE_FILE, write_atomically

log = logging.getLogger("sitewarden.agent.apps")

PREFIX = "swa"
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
FORMAT = 2
LOCK_FILE = "apps.lock"
AUDITED_FILE = "apps.audited"


def check_app_name(name: str, what: str = "app name") -> str:
    if not isinstance(name, str) or not name or len(name) > 100 or set(name) - NAME_CHARS:
        raise ConfigError(f"{what} {name!r} must be 1-100 letters, digits, '.', '_' or '-'")
    return name


@dataclass(frozen=True)
class AppBinding:
    """What an app's keys may state: its purposes and data classes (the site's `[apps.<name>]`)."""

    purposes: tuple[str, ...]
    data_classes: tuple[str, ...]

    def to_json(self) -> dict[str, list[str]]:
        return {"purposes": list(self.purposes), "data_classes": list(self.data_classes)}


class OutsideBinding(InferenceError):
    """The caller claimed a purpose or data class its app is not bound to (403, before any policy runs)."""

    def __init__(self, message: str) -> None:
        super().__init__(403, message)


def check_binding(app: str, binding: AppBinding | None, purpose: str, data_class: str) -> None:
    """Raise `OutsideBinding` unless `app` is bound to both `purpose` and `data_class`."""
    if binding is None:
        raise OutsideBinding(
            f"app {app} has no binding in the site configuration ([apps.{app}] purposes and data_classes): "
            "it may state no purpose"
        )
    if purpose not in binding.purposes:
        raise OutsideBinding(
            f"app {app} may not state purpose {purpose!r}: the site binds it to {', '.join(binding.purposes)}"
        )
    if data_class not in binding.data_classes:
        raise OutsideBinding(
            f"app {app} may not state data class {data_class!r}: the site binds it to {', '.join(binding.data_classes)}"
        )


# -- the keys file ------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read(path: Path) -> dict[str, Any]:
    """The keys file as {"generation": int, "keys": {...}}; a file from before generations is generation 0."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {"generation": 0, "keys": {}}
    except OSError as exc:
        raise ConfigError(f"cannot read app keys {path}: {exc.strerror}") from exc
    return _parse(path, raw)


def _parse(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
        keys = data.get("keys", {})
        generation = int(data.get("generation", 0))
        if not isinstance(keys, dict) or not all(isinstance(r, dict) and "name" in r for r in keys.values()):
            raise ValueError("keys must map key ids to records with a name")
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"app keys {path} are malformed: {exc}") from exc
    return {"generation": generation, "keys": keys}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[dict[str, Any]]:
    """The keys file, read under an exclusive lock; what the block leaves in it is written back."""
    lock = path.with_name(LOCK_FILE)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        data = _read(path)
        before = json.dumps(data, sort_keys=True)
        yield data
        if json.dumps(data, sort_keys=True) != before:
            data["format"] = FORMAT
            write_atomically(path, json.dumps(data, indent=2, sort_keys=True).encode(), mode=PRIVATE_FILE)
    finally:
        os.close(fd)  # releases the lock


def create(path: Path, name: str) -> tuple[str, int]:
    """Add a key for app `name`; returns the key (shown once) and the generation that records it."""
    check_app_name(name)
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(24)
    with _locked(path) as data:
        data["generation"] += 1
        data["keys"][key_id] = {
            "name": name,
            "sha256": hashlib.sha256(secret.encode()).hexdigest(),
            "created_at": _now(),
            "created_generation": data["generation"],
            "revoked_at": None,
            "revoked_generation": None,
        }
        generation = data["generation"]
    return f"{PREFIX}_{key_id}_{secret}", generation


def revoke(path: Path, name: str) -> tuple[int, int]:
    """Revoke every active key of app `name`; returns how many, and the generation that records it."""
    with _locked(path) as data:
        active = [r for r in data["keys"].values() if r["name"] == name and not r.get("revoked_at")]
        if active:
            data["generation"] += 1
            for record in active:
                record["revoked_at"] = _now()
                record["revoked_generation"] = data["generation"]
        return len(active), data["generation"]


def audited_generation(data_dir: Path) -> int:
    """The generation of `apps.json` whose changes the agent has recorded in the site's audit log."""
    try:
        return int((data_dir / AUDITED_FILE).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def agent_running(data_dir: Path) -> bool:
    """Whether an agent holds the site's audit log open (its writer's lock), i.e. runs on this data dir."""
    lock = data_dir / "audit" / "lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)  # a lock we took goes with the descriptor
    return False


def wait_until_audited(data_dir: Path, generation: int, timeout_s: float) -> bool:
    """Wait for the running agent to record changes up to `generation`; False if it did not in time."""
    deadline = time.monotonic() + timeout_s
    while audited_generation(data_dir) < generation:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


# -- the running agent's view ----------------------------------------------------------------------


@dataclass(frozen=True)
class KeyCheck:
    """What a presented key is: `app` set when its secret matches a key (revoked or not), `key_id` when the
    credential has the form of a key."""

    app: str | None = None
    key_id: str | None = None
    revoked_at: str | None = None


class AppKeys:
    """Checks bearer keys against `apps.json` and apps' claims against their bindings.

    `app_for` runs on every request: one `stat` of the path, compared with the file read last
    (held open, see the module docstring); a changed file is read again before answering.
    """

    def __init__(self, path: Path, bindings: Mapping[str, AppBinding] | None = None) -> None:
        self.path = path
        self.bindings = dict(bindings or {})
        self._file = str(path)  # os.stat of a str: this runs on every request
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._signature: tuple[int, int, int, int] | None = None
        self._data: dict[str, Any] = {"generation": 0, "keys": {}}

    @property
    def generation(self) -> int:
        self._refresh()
        return int(self._data["generation"])

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _refresh(self) -> None:
        try:
            st = os.stat(self._file)
            signature: tuple[int, int, int, int] | None = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            signature = None
        if signature == self._signature:
            return
        with self._lock:
            self._load()

    def _load(self) -> None:
        """Read the file through a descriptor it then keeps open (its inode stays ours until the next read)."""
        try:
            fd = os.open(self._file, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = None
        try:
            if fd is None:
                data, signature = {"generation": 0, "keys": {}}, None
            else:
                st = os.fstat(fd)
                with os.fdopen(os.dup(fd), "rb") as f:
                    data = _parse(self.path, f.read())
                signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if self._fd is not None:
            os.close(self._fd)
        _log_changes(self._data["keys"], data["keys"], first=self._signature is None and not self._data["keys"])
        self._fd, self._data, self._signature = fd, data, signature

    def refresh(self) -> None:
        """Reload `apps.json` if it changed (and log what changed); requests also reload it."""
        self._refresh()

    def identify(self, credential: str) -> KeyCheck:
        """What a presented key is; an app is named only when the key's secret matches."""
        parts = credential.split("_", 2)
        if len(parts) != 3 or parts[0] != PREFIX or not _is_key_id(parts[1]):
            return KeyCheck()
        self._refresh()
        record = self._data["keys"].get(parts[1])
        if record is None:
            return KeyCheck(key_id=parts[1])
        if not hmac.compare_digest(str(record.get("sha256")), hashlib.sha256(parts[2].encode()).hexdigest()):
            return KeyCheck(key_id=parts[1])
        revoked = record.get("revoked_at")
        return KeyCheck(app=str(record["name"]), key_id=parts[1], revoked_at=str(revoked) if revoked else None)

    def app_for(self, credential: str) -> str | None:
        """The app a key belongs to, or None if it is unknown or revoked."""
        check = self.identify(credential)
        return check.app if check.revoked_at is None else None

    def binding(self, app: str) -> AppBinding | None:
        return self.bindings.get(app)

    def check(self, app: str, purpose: str, data_class: str) -> AppBinding:
        """The app's binding if it covers `purpose` and `data_class`; `OutsideBinding` (403) otherwise."""
        binding = self.bindings.get(app)
        check_binding(app, binding, purpose, data_class)
        assert binding is not None
        return binding

    def unaudited(self, after: int) -> tuple[int, list[dict[str, Any]]]:
        """The current generation and the audit events of every key change recorded after generation `after`.

        Never names a secret or its digest: a key is named by its id and its app.
        """
        self._refresh()
        with self._lock:
            data = self._data
        events = []
        for key_id, record in sorted(data["keys"].items()):
            app = str(record["name"])
            created = record.get("created_generation") or 0
            revoked = record.get("revoked_generation") or 0
            if created > after:
                binding = self.bindings.get(app)
                events.append(
                    {
                        "type": "app_key.created",
                        "app": app,
                        "key_id": key_id,
                        "at": record.get("created_at"),
                        "generation": created,
                        "binding": binding.to_json() if binding else None,
                    }
                )
            if revoked > after:
                events.append(
                    {
                        "type": "app_key.revoked",
                        "app": app,
                        "key_id": key_id,
                        "at": record.get("revoked_at"),
                        "generation": revoked,
                    }
                )
        events.sort(key=lambda e: (e["generation"], e["type"], e["key_id"]))
        return int(data["generation"]), events

    def note_audited(self, data_dir: Path, generation: int) -> None:
        write_atomically(data_dir / AUDITED_FILE, f"{generation}\n".encode(), mode=PRIVATE_FILE)


def _is_key_id(text: str) -> bool:
    return 0 < len(text) <= 32 and all(c in "0123456789abcdef" for c in text)


Keys = dict[str, dict[str, Any]]


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
