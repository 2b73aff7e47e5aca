"""C2SP signed notes with Ed25519 signatures (c2sp.org/signed-note).

A note is UTF-8 text ending in a newline, a blank line, and one or more signature lines
`— <name> <base64(key id || signature)>`. Keys are exchanged as verifier keys
(`vkey`: `<name>+<key id hex>+<base64(0x01 || public key)>`); private keys use Go's
encoding `PRIVATE+KEY+<name>+<key id hex>+<base64(0x01 || seed)>`. The key id is the first
four bytes of SHA-256(name || 0x0A || 0x01 || public key). Opening a note follows Go's
`golang.org/x/mod/sumdb/note.Open`: signatures by unknown keys are kept aside unverified,
a bad signature by a known key is an error, and a note with no verified signature is
rejected.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from audit.errors import FormatError, SignatureError

ALG_ED25519 = 0x01
SIG_PREFIX = "\u2014 "  # em dash and a space
MAX_SIGNATURES = 100
_WHITESPACE = re.compile(r"\s")


def is_valid_name(name: str) -> bool:
    """A key name is non-empty, has no '+' and no Unicode whitespace (signed-note 'Signatures')."""
    return bool(name) and "+" not in name and not _WHITESPACE.search(name)


def key_id(name: str, key_type: int, public_key: bytes) -> int:
    """First four bytes of SHA-256(name || 0x0A || type || public key), as a big-endian int."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([key_type]) + public_key).digest()
    return struct.unpack(">I", digest[:4])[0]


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FormatError(f"{what}: invalid base64") from exc


class Verifier:
    """An Ed25519 public key with its note name, from a `vkey` string."""

    def __init__(self, vkey: str) -> None:
        vkey = vkey.strip()
        parts = vkey.split("+", 2)
        if len(parts) != 3:
            raise FormatError(f"malformed vkey {vkey!r}: want <name>+<key id hex>+<base64 key>")
        name, hex_id, b64 = parts
        if not is_valid_name(name):
            raise FormatError(f"malformed vkey {vkey!r}: invalid key name {name!r}")
        if not re.fullmatch(r"[0-9a-f]{8}", hex_id):
            raise FormatError(f"malformed vkey {vkey!r}: key id must be 8 lowercase hex digits")
        raw = _b64decode(b64, f"malformed vkey {vkey!r}")
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise FormatError(f"malformed vkey {vkey!r}: not an Ed25519 key (type 0x01, 32 bytes)")
        if key_id(name, ALG_ED25519, raw[1:]) != int(hex_id, 16):
            raise FormatError(f"malformed vkey {vkey!r}: key id does not match the key")
        self.name = name
        self.key_id = int(hex_id, 16)
        self.public_key = raw[1:]
        self.vkey = vkey
        self._key = Ed25519PublicKey.from_public_bytes(self.public_key)

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def __repr__(self) -> str:
        return f"Verifier({self.vkey!r})"


class Signer:
    """An Ed25519 private key with its note name, from Go's `PRIVATE+KEY+...` encoding."""

    def __init__(self, skey: str) -> None:
        skey = skey.strip()
        parts = skey.split("+", 4)
        if len(parts) != 5 or parts[0] != "PRIVATE" or parts[1] != "KEY":
            raise FormatError("malformed private key: want PRIVATE+KEY+<name>+<key id hex>+<base64 key>")
        name, hex_id, b64 = parts[2:]
        if not is_valid_name(name):
            raise FormatError(f"malformed private key: invalid key name {name!r}")
        if not re.fullmatch(r"[0-9a-f]{8}", hex_id):
            raise FormatError("malformed private key: key id must be 8 lowercase hex digits")
        raw = _b64decode(b64, "malformed private key")
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise FormatError("malformed private key: not an Ed25519 seed (type 0x01, 32 bytes)")
        self._key = Ed25519PrivateKey.from_private_bytes(raw[1:])
        public = self._key.public_key().public_bytes_raw()
        if key_id(name, ALG_ED25519, public) != int(hex_id, 16):
            raise FormatError("malformed private key: key id does not match the key")
        self.name = name
        self.key_id = int(hex_id, 16)
        self.public_key = public

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Signer:
        try:
            text = Path(path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise FormatError(f"cannot read private key {path}: {exc}") from exc
        return cls(text)

    @property
    def vkey(self) -> str:
        return verifier_key(self.name, self.public_key)

    def verifier(self) -> Verifier:
        return Verifier(self.vkey)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"Signer(name={self.name!r}, key_id={self.key_id:08x})"


def verifier_key(name: str, public_key: bytes) -> str:
    """The `vkey` string for an Ed25519 public key."""
    kid = key_id(name, ALG_ED25519, public_key)
    return f"{name}+{kid:08x}+{base64.b64encode(bytes([ALG_ED25519]) + public_key).decode()}"


def generate_key(name: str) -> tuple[str, str]:
    """A new Ed25519 key pair for `name`: (private key string, vkey string)."""
    if not is_valid_name(name):
        raise FormatError(f"invalid key name {name!r}: must be non-empty, without '+' or whitespace")
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes_raw()
    public = key.public_key().public_bytes_raw()
    kid = key_id(name, ALG_ED25519, public)
    skey = f"PRIVATE+KEY+{name}+{kid:08x}+{base64.b64encode(bytes([ALG_ED25519]) + seed).decode()}"
    return skey, verifier_key(name, public)


def write_key_pair(name: str, directory: str | os.PathLike[str], stem: str = "log") -> tuple[Path, str]:
    """Generate a key pair; write `<stem>.key` (mode 0600) and `<stem>.vkey` into `directory`.

    Refuses to overwrite an existing key. Returns the private key path and the vkey.
    """
    skey, vkey = generate_key(name)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    key_path = out / f"{stem}.key"
    # O_EXCL: never replace a key someone may already depend on.
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise FormatError(f"{key_path} already exists; refusing to overwrite a key") from exc
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(skey + "\n")
        f.flush()
        os.fsync(f.fileno())
    (out / f"{stem}.vkey").write_text(vkey + "\n", encoding="ascii")
    return key_path, vkey


@dataclass(frozen=True)
class Signature:
    name: str
    key_id: int
    base64: str

    def line(self) -> str:
        return f"{SIG_PREFIX}{self.name} {self.base64}\n"


@dataclass(frozen=True)
class Note:
    """An opened note: its text, the signatures verified by trusted keys, and the others."""

    text: str
    signatures: tuple[Signature, ...]
    unverified: tuple[Signature, ...] = field(default=())


def sign(text: str, *signers: Signer) -> str:
    """Sign `text` (which must end in a newline) and return the note."""
    _check_text(text)
    if not signers:
        raise ValueError("sign needs at least one signer")
    lines = []
    for signer in signers:
        sig = struct.pack(">I", signer.key_id) + signer.sign(text.encode())
        lines.append(Signature(signer.name, signer.key_id, base64.b64encode(sig).decode()).line())
    return text + "\n" + "".join(lines)


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise FormatError("note text must end with a newline")
    for ch in text:
        if ch < " " and ch != "\n":
            raise FormatError(f"note text contains control character {ch!r}")


def _split_note(msg: str | bytes) -> tuple[str, list[tuple[str, str, str]]]:
    """Split a note into its text and (line, name, base64) per signature line, checking the framing."""
    if isinstance(msg, bytes):
        try:
            msg = msg.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError("malformed note: not valid UTF-8") from exc
    for ch in msg:
        if ch < " " and ch != "\n":
            raise FormatError(f"malformed note: control character {ch!r}")
    split = msg.rfind("\n\n")
    if split < 0:
        raise FormatError("malformed note: no blank line before the signatures")
    text, sigs = msg[: split + 1], msg[split + 2 :]
    if not sigs or not sigs.endswith("\n"):
        raise FormatError("malformed note: signature block must be non-empty and end with a newline")
    out = []
    for line in sigs[:-1].split("\n"):
        if not line.startswith(SIG_PREFIX):
            raise FormatError(f"malformed note: signature line {line!r} does not start with '— '")
        name, _, b64 = line[len(SIG_PREFIX) :].partition(" ")
        if not is_valid_name(name) or not b64:
            raise FormatError(f"malformed note: bad signature line {line!r}")
        out.append((line, name, b64))
        if len(out) > MAX_SIGNATURES:
            raise FormatError(f"malformed note: more than {MAX_SIGNATURES} signatures")
    return text, out


def open_note(msg: str | bytes, verifiers: Iterable[Verifier | str]) -> Note:
    """Open a signed note, verifying its signatures against trusted keys.

    Signatures by keys not in `verifiers` are returned as unverified and otherwise ignored;
    a signature by a trusted key that does not verify raises `SignatureError`, as does a
    note with no verified signature at all.
    """
    known: dict[tuple[str, int], Verifier] = {}
    for given in verifiers:
        v = given if isinstance(given, Verifier) else Verifier(given)
        known[(v.name, v.key_id)] = v
    text, lines = _split_note(msg)
    verified: list[Signature] = []
    unverified: list[Signature] = []
    seen: set[tuple[str, int]] = set()
    seen_unverified: set[str] = set()
    for line, name, b64 in lines:
        raw = _b64decode(b64, f"malformed note: signature of {name}")
        if len(raw) < 5:
            raise FormatError(f"malformed note: signature of {name} is too short")
        kid = struct.unpack(">I", raw[:4])[0]
        sig = Signature(name, kid, b64)
        verifier = known.get((name, kid))
        if verifier is None:
            if line not in seen_unverified:
                seen_unverified.add(line)
                unverified.append(sig)
            continue
        if (name, kid) in seen:
            continue
        seen.add((name, kid))
        if not verifier.verify(text.encode(), raw[4:]):
            raise SignatureError(f"invalid signature by trusted key {name}+{kid:08x}")
        verified.append(sig)
    if not verified:
        names = ", ".join(f"{s.name}+{s.key_id:08x}" for s in unverified) or "none"
        raise SignatureError(f"note has no signature by a trusted key (signed by: {names})")
    return Note(text, tuple(verified), tuple(unverified))


def note_text(msg: str | bytes) -> str:
    """The text of a note without verifying anything: only for notes already trusted."""
    return _split_note(msg)[0]


verify = open_note
"""Alias of `open_note`: verifying a note and opening it are the same operation."""
