"""A controller's keys made on an offline machine: `controller keygen`, then `controller init --keys-from`.

A bank that keeps every key in its vault before a service runs (and that will not let the TUF
root key into a cluster at all) makes the controller's keys offline. `make_keyset()` writes one
directory, which becomes a Kubernetes Secret (the chart's `keys.existingSecret`):

- `tuf-targets.pem`, `tuf-snapshot.pem`, `tuf-timestamp.pem`: the online TUF role keys
  (Ed25519, PKCS#8 PEM);
- `root.json`: TUF root version 1 naming those keys, signed there with the root key, which is
  written elsewhere (`--root-key-out`, to keep offline) and is never part of the set;
- `audit.key` and `audit.vkey`: the key of the controller's audit log (signed-note format,
  named `sitewarden/controller/<name>`);
- `witness.key` and `witness.vkey`: the witness's cosigner key (`sitewarden/witness/<name>`).

`load_keyset()` checks such a directory completely (every file present and a key of the
right kind and name, the root signed by its own root keys and naming exactly these online keys,
no root key among the files) before anything is written; `Keyset.install()` then copies the
keys into a new data dir's `keys/` (mode 0600). The Secret is read on the first start only.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from audit.errors import AuditError
from audit.note import ALG_COSIGNATURE_V1, ALG_ED25519, Signer, write_key_pair
from controller.config import Expiries
from controller.errors import ControllerError
from controller.tuf_repo import (
    ONLINE_ROLES,
    KeyFileError,
    RepositoryStateError,
    TufKeys,
    check_initial_root,
    generate_keys,
    load_signer,
    sign_initial_root,
)
from controller.witness import witness_name
from sitewarden.files import write_new_file

ROOT_FILE = "root.json"
ONLINE_FILES = ("tuf-targets.pem", "tuf-snapshot.pem", "tuf-timestamp.pem")
FILES = (*ONLINE_FILES, ROOT_FILE, "audit.key", "witness.key")
ROOT_KEY_FILE = "tuf-root.pem"
MAX_FILE = 64 * 1024


class KeysetError(ControllerError):
    """A key set directory is incomplete, holds a wrong or foreign key, or holds the root key."""


def audit_origin(name: str) -> str:
    return f"sitewarden/controller/{name}"


def make_keyset(out: Path, name: str, root_key_out: Path, expiries: Expiries | None = None) -> dict[str, str]:
    """Write a new key set into the new or empty directory `out` and the root key to `root_key_out`.

    Returns the public facts to record offline: the root's SHA-256 and both vkeys.
    """
    if out.exists() and any(out.iterdir()):
        raise KeysetError(f"{out} exists and is not empty; give a new or empty directory")
    if root_key_out.exists():
        raise KeysetError(f"{root_key_out} already exists; refusing to overwrite a key")
    if root_key_out.resolve().is_relative_to(out.resolve()):
        raise KeysetError(f"--root-key-out {root_key_out} is inside {out}: the root key must not go into the Secret")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    generate_keys(out, root_key_out)
    root = sign_initial_root(root_key_out, out, expiries)
    write_new_file(out / ROOT_FILE, root)
    origin = audit_origin(name)
    _, audit_vkey = write_key_pair(origin, out, stem="audit")
    _, witness_vkey = write_key_pair(witness_name(origin), out, stem="witness", key_type=ALG_COSIGNATURE_V1)
    return {"root_sha256": hashlib.sha256(root).hexdigest(), "audit_vkey": audit_vkey, "witness_vkey": witness_vkey}


@dataclass(frozen=True)
class Keyset:
    """A checked key set: file name -> bytes, and what the controller needs to know of it."""

    files: dict[str, bytes]
    root_json: bytes
    audit_vkey: str
    witness_vkey: str

    def install(self, keys_dir: Path) -> None:
        """Copy the keys into `keys_dir` (new files, mode 0600; the public vkeys too)."""
        keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name, data in self.files.items():
            if name != ROOT_FILE:
                write_new_file(keys_dir / name, data)
        write_new_file(keys_dir / "audit.vkey", (self.audit_vkey + "\n").encode())
        write_new_file(keys_dir / "witness.vkey", (self.witness_vkey + "\n").encode())


def load_keyset(directory: Path, name: str) -> Keyset:
    """The key set in `directory` (a mounted Secret) for the controller called `name`, checked whole."""
    if not directory.is_dir():
        raise KeysetError(f"{directory} is not a directory of keys")
    if (directory / ROOT_KEY_FILE).exists():
        raise KeysetError(
            f"{directory} holds the TUF root key ({ROOT_KEY_FILE}): keep it offline and give root.json signed with it "
            "(sitewarden controller keygen)"
        )
    missing = [f for f in FILES if not (directory / f).is_file()]
    if missing:
        raise KeysetError(f"{directory} lacks {', '.join(missing)} (sitewarden controller keygen writes them all)")
    files = {f: _read(directory / f) for f in FILES}
    try:
        online = {role: load_signer(directory / TufKeys.in_dir(directory).path(role).name) for role in ONLINE_ROLES}
        root = check_initial_root(files[ROOT_FILE], online, datetime.now(UTC))
    except (KeyFileError, RepositoryStateError) as exc:
        raise KeysetError(f"{directory}: {exc}") from exc
    root_keyids = set(root.signed.roles["root"].keyids)
    if root_keyids & {signer.public_key.keyid for signer in online.values()}:
        raise KeysetError(f"{directory}: an online key is also a root key; the root key must stay offline")
    origin = audit_origin(name)
    vkeys = {}
    wanted = (("audit", origin, ALG_ED25519), ("witness", witness_name(origin), ALG_COSIGNATURE_V1))
    for stem, key_name, key_type in wanted:
        try:
            signer = Signer(files[f"{stem}.key"].decode("ascii"))
        except (AuditError, UnicodeDecodeError) as exc:
            raise KeysetError(f"{directory / (stem + '.key')} is not a signed-note private key: {exc}") from exc
        if signer.name != key_name or signer.key_type != key_type:
            raise KeysetError(
                f"{directory / (stem + '.key')} is the key of {signer.name!r} (type {signer.key_type:#04x}); "
                f"this controller ({name}) needs {key_name!r} (type {key_type:#04x})"
            )
        published = directory / f"{stem}.vkey"
        if published.is_file() and _read(published).decode("ascii", "replace").strip() != signer.vkey:
            raise KeysetError(f"{published} is not the vkey of {stem}.key")
        vkeys[stem] = signer.vkey
    return Keyset(files, files[ROOT_FILE], vkeys["audit"], vkeys["witness"])


def _read(path: Path) -> bytes:
    try:
        if os.stat(path).st_size > MAX_FILE:
            raise KeysetError(f"{path} is larger than {MAX_FILE} bytes; not a key file")
        return path.read_bytes()
    except OSError as exc:
        raise KeysetError(f"cannot read {path}: {exc.strerror or exc}") from exc
