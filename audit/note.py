"""C2SP signed notes with Ed25519 signatures and cosignatures (c2sp.org/signed-note,
c2sp.org/tlog-cosignature).

A note is UTF-8 text ending in a newline, a blank line, and one or more signature lines
`— <name> <base64(key id || signature)>`. Two key types are supported, named by their
signature type byte:

- 0x01, an Ed25519 note signature: the signature is Ed25519 over the note text. A log
  signs its checkpoints with one.
- 0x04, an Ed25519 cosignature (tlog-cosignature v1): the signature is a u64 big-endian
  POSIX timestamp followed by Ed25519 over `cosignature/v1\\ntime <timestamp>\\n` and the
  note text. A witness cosigns a checkpoint with one.

Keys are exchanged as verifier keys (`vkey`: `<name>+<key id hex>+<base64(type || public
key)>`); private keys use Go's encoding `PRIVATE+KEY+<name>+<key id hex>+<base64(type ||
seed)>`. The key id is the first four bytes of SHA-256(name || 0x0A || type || public key).
Opening a note follows Go's `golang.org/x/mod/sumdb/note.Open`: signatures by unknown keys
are kept aside unverified, a bad signature by a known key is an error, and a note with no
verified signature is rejected. Which kinds of signature a note needs (a log's, a quorum of
witnesses') is the caller's policy: see `audit.export.verify_export`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from audit.errors import FormatError, SignatureError

ALG_ED25519 = 0x01
"""Signature type of an Ed25519 note signature (c2sp.org/signed-note)."""
ALG_COSIGNATURE_V1 = 0x04
"""Signature type of an Ed25519 cosignature/v1 (c2sp.org/tlog-cosignature)."""
KEY_TYPES = {ALG_ED25519: "Ed25519 note signature", ALG_COSIGNATURE_V1: "Ed25519 cosignature/v1"}

SIG_PREFIX = "\u2014 "  # em dash and a space
MAX_SIGNATURES = 100
MAX_TIMESTAMP = (1 << 63) - 1  # tlog-cosignature: the timestamp MUST NOT exceed 2^63 - 1
_ED25519_SIZE = 64
_TIMESTAMP = struct.Struct(">Q")
_WHITESPACE = re.compile(r"\s")


def is_valid_name(name: str) -> bool:
    """A key name is non-empty, has no '+' and no Unicode whitespace (signed-note 'Signatures')."""
    return bool(name) and "+" not in name and not _WHITESPACE.search(name)


def key_id(name: str, key_type: int, public_key: bytes) -> int:
    """First four bytes of SHA-256(name || 0x0A || type || public key), as a big-endian int."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([key_type]) + public_key).digest()
    return struct.unpack(">I", digest[:4])[0]


def cosignature_message(text: str | bytes, timestamp: int) -> bytes:
    """What an Ed25519 cosigner signs (tlog-cosignature, 'Ed25519 signed message'): a header
    line, a timestamp line, then the whole note text including its final newline."""
    body = text.encode() if isinstance(text, str) else bytes(text)
    return b"cosignature/v1\ntime %d\n" % timestamp + body


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FormatError(f"{what}: invalid base64") from exc


def _check_key_type(key_type: int, what: str) -> None:
    if key_type not in KEY_TYPES:
        supported = ", ".join(f"0x{t:02x} ({d})" for t, d in KEY_TYPES.items())
        raise FormatError(f"{what}: unsupported key type 0x{key_type:02x}; supported: {supported}")


class Verifier:
    """A public key with its note name and type, from a `vkey` string.

    `verify(text, signature)` checks the bytes that follow the key id in a signature line:
    an Ed25519 signature for type 0x01, a timestamp and an Ed25519 signature for 0x04.
    """

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
        if not raw:
            raise FormatError(f"malformed vkey {vkey!r}: no key type and key")
        _check_key_type(raw[0], f"malformed vkey {vkey!r}")
        if len(raw) != 33:
            raise FormatError(f"malformed vkey {vkey!r}: an Ed25519 key is 32 bytes, got {len(raw) - 1}")
        if key_id(name, raw[0], raw[1:]) != int(hex_id, 16):
            raise FormatError(f"malformed vkey {vkey!r}: key id does not match the key")
        self.name = name
        self.key_id = int(hex_id, 16)
        self.key_type = raw[0]
        self.public_key = raw[1:]
        self.vkey = vkey
        self._key = Ed25519PublicKey.from_public_bytes(self.public_key)

    @property
    def is_cosigner(self) -> bool:
        """True for a cosigner key (type 0x04): it vouches for consistency, not for content."""
        return self.key_type == ALG_COSIGNATURE_V1

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether `signature` (the bytes after the key id) is this key's signature of the note text `message`."""
        if self.key_type == ALG_COSIGNATURE_V1:
            if len(signature) != _TIMESTAMP.size + _ED25519_SIZE:
                return False
            timestamp = _TIMESTAMP.unpack_from(signature)[0]
            if timestamp > MAX_TIMESTAMP:
                return False
            message, signature = cosignature_message(message, timestamp), signature[_TIMESTAMP.size :]
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def __repr__(self) -> str:
        return f"Verifier({self.vkey!r})"


class Signer:
    """An Ed25519 private key with its note name and type, from Go's `PRIVATE+KEY+...` encoding."""

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
        if not raw:
            raise FormatError("malformed private key: no key type and seed")
        _check_key_type(raw[0], "malformed private key")
        if len(raw) != 33:
            raise FormatError(f"malformed private key: an Ed25519 seed is 32 bytes, got {len(raw) - 1}")
        self._key = Ed25519PrivateKey.from_private_bytes(raw[1:])
        public = self._key.public_key().public_bytes_raw()
        if key_id(name, raw[0], public) != int(hex_id, 16):
            raise FormatError("malformed private key: key id does not match the key")
        self.name = name
        self.key_id = int(hex_id, 16)
        self.key_type = raw[0]
        self.public_key = public

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Signer:
        try:
            text = Path(path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise FormatError(f"cannot read private key {path}: {exc}") from exc
        return cls(text)

    @classmethod
    def from_ed25519(cls, name: str, key: Ed25519PrivateKey, key_type: int = ALG_ED25519) -> Signer:
        """A signer for an Ed25519 key held elsewhere, e.g. a site's identity key (`sitewarden.keys`)."""
        if not is_valid_name(name):
            raise FormatError(f"invalid key name {name!r}: must be non-empty, without '+' or whitespace")
        _check_key_type(key_type, f"key {name!r}")
        return cls(_private_key_string(name, key_type, key.private_bytes_raw(), key.public_key().public_bytes_raw()))

    @property
    def is_cosigner(self) -> bool:
        return self.key_type == ALG_COSIGNATURE_V1

    @property
    def vkey(self) -> str:
        return verifier_key(self.name, self.public_key, self.key_type)

    def verifier(self) -> Verifier:
        return Verifier(self.vkey)

    def sign(self, message: bytes, *, timestamp: int | None = None) -> bytes:
        """The bytes that follow the key id in this key's signature line for note text `message`.

        Type 0x01: an Ed25519 signature of `message`. Type 0x04: the timestamp (default:
        now) as a u64 big-endian, then an Ed25519 signature of the cosignature message.
        """
        if self.key_type != ALG_COSIGNATURE_V1:
            if timestamp is not None:
                raise ValueError(f"{self!r} makes note signatures, which carry no timestamp")
            return self._key.sign(message)
        if timestamp is None:
            timestamp = int(time.time())
        if not 0 <= timestamp <= MAX_TIMESTAMP:
            raise ValueError(f"cosignature timestamp {timestamp} is outside [0, 2^63 - 1]")
        return _TIMESTAMP.pack(timestamp) + self._key.sign(cosignature_message(message, timestamp))

    def __repr__(self) -> str:
        kind = "cosigner" if self.is_cosigner else "signer"
        return f"Signer(name={self.name!r}, key_id={self.key_id:08x}, {kind})"


def _private_key_string(name: str, key_type: int, seed: bytes, public: bytes) -> str:
    kid = key_id(name, key_type, public)
    return f"PRIVATE+KEY+{name}+{kid:08x}+{base64.b64encode(bytes([key_type]) + seed).decode()}"


def verifier_key(name: str, public_key: bytes, key_type: int = ALG_ED25519) -> str:
    """The `vkey` string for an Ed25519 public key of type 0x01 (note signatures) or 0x04 (cosignatures)."""
    _check_key_type(key_type, f"key {name!r}")
    kid = key_id(name, key_type, public_key)
    return f"{name}+{kid:08x}+{base64.b64encode(bytes([key_type]) + public_key).decode()}"


def generate_key(name: str, key_type: int = ALG_ED25519) -> tuple[str, str]:
    """A new Ed25519 key pair for `name`: (private key string, vkey string).

    `key_type` is ALG_ED25519 for a log's signing key, ALG_COSIGNATURE_V1 for a witness.
    """
    if not is_valid_name(name):
        raise FormatError(f"invalid key name {name!r}: must be non-empty, without '+' or whitespace")
    _check_key_type(key_type, f"key {name!r}")
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes_raw()
    return _private_key_string(name, key_type, key.private_bytes_raw(), public), verifier_key(name, public, key_type)


def write_key_pair(
    name: str, directory: str | os.PathLike[str], stem: str = "log", key_type: int = ALG_ED25519
) -> tuple[Path, str]:
    """Generate a key pair; write `<stem>.key` (mode 0600) and `<stem>.vkey` into `directory`.

    Refuses to overwrite an existing key. Returns the private key path and the vkey.
    """
    skey, vkey = generate_key(name, key_type)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path = out / f"{stem}.key"
    # O_EXCL: never replace a key someone may already depend on.
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError as exc:
        raise FormatError(f"{key_path} already exists; refusing to overwrite a key") from exc
    os.fchmod(fd, 0o600)  # created no wider than 0600; exactly 0600 whatever the umask
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
    timestamp: int | None = None
    """For a verified cosignature (type 0x04): when the cosigner signed, as a POSIX timestamp."""

    @property
    def key(self) -> str:
        """`<name>+<key id hex>`: the key the signature claims, as in a vkey."""
        return f"{self.name}+{self.key_id:08x}"

    def line(self) -> str:
        return f"{SIG_PREFIX}{self.name} {self.base64}\n"


@dataclass(frozen=True)
class Note:
    """An opened note: its text, the signatures verified by trusted keys, and the others."""

    text: str
    signatures: tuple[Signature, ...]
    unverified: tuple[Signature, ...] = field(default=())


def signature_lines(text: str, *signers: Signer, timestamp: int | None = None) -> str:
    """The signature lines of `signers` for note text `text`, without the text.

    What a witness returns from tlog-witness `add-checkpoint`. Cosigners (type 0x04) sign
    with `timestamp`, by default now; note signers ignore it.
    """
    _check_text(text)
    if not signers:
        raise ValueError("signing needs at least one signer")
    lines = []
    for signer in signers:
        stamp = timestamp if signer.is_cosigner else None
        sig = struct.pack(">I", signer.key_id) + signer.sign(text.encode(), timestamp=stamp)
        lines.append(Signature(signer.name, signer.key_id, base64.b64encode(sig).decode()).line())
    return "".join(lines)


def sign(text: str, *signers: Signer, timestamp: int | None = None) -> str:
    """Sign `text` (which must end in a newline) and return the note.

    Each signer signs as its type says: a note signature (0x01) or a cosignature (0x04,
    at `timestamp`, by default now).
    """
    return text + "\n" + signature_lines(text, *signers, timestamp=timestamp)


def add_signatures(signed_note: str, lines: str | Iterable[str]) -> str:
    """Merge signature lines (e.g. a witness's reply) into a signed note; nothing is verified.

    A line by a key (name and key id) that already signs the note is skipped: a note
    carries one signature per key. Open the result with `open_note` to verify it.
    """
    text, existing = _split_note(signed_note)
    if isinstance(lines, str):
        lines = lines.split("\n")
    keys = {_line_key(name, b64) for _, name, b64 in existing}
    merged = [line for line, _, _ in existing]
    for raw in lines:
        line = raw.rstrip("\n")
        if not line:
            continue
        name, b64 = _parse_signature_line(line)
        key = _line_key(name, b64)
        if key in keys:
            continue
        keys.add(key)
        merged.append(line)
    if len(merged) > MAX_SIGNATURES:
        raise FormatError(f"a note carries at most {MAX_SIGNATURES} signatures, this one would carry {len(merged)}")
    return text + "\n" + "".join(line + "\n" for line in merged)


def _line_key(name: str, b64: str) -> tuple[str, int]:
    raw = _b64decode(b64, f"malformed note: signature of {name}")
    if len(raw) < 5:
        raise FormatError(f"malformed note: signature of {name} is too short")
    return name, struct.unpack(">I", raw[:4])[0]


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise FormatError("note text must end with a newline")
    if control := _CONTROL_BUT_NEWLINE.search(text):
        raise FormatError(f"note text contains control character {control.group()!r}")


# Characters below U+0020, searched for with a regex rather than a loop over characters: the
# report opens a note per checkpoint of the log.
_CONTROL = re.compile("[\x00-\x1f]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f]")


def _parse_signature_line(line: str) -> tuple[str, str]:
    """(name, base64) of one signature line, without its newline."""
    if not line.startswith(SIG_PREFIX):
        raise FormatError(f"malformed note: signature line {line!r} does not start with '— '")
    if _CONTROL.search(line):
        raise FormatError(f"malformed note: signature line {line!r} contains a control character")
    name, _, b64 = line[len(SIG_PREFIX) :].partition(" ")
    if not is_valid_name(name) or not b64:
        raise FormatError(f"malformed note: bad signature line {line!r}")
    return name, b64


def _split_note(msg: str | bytes) -> tuple[str, list[tuple[str, str, str]]]:
    """Split a note into its text and (line, name, base64) per signature line, checking the framing."""
    if isinstance(msg, bytes):
        try:
            msg = msg.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError("malformed note: not valid UTF-8") from exc
    if control := _CONTROL_BUT_NEWLINE.search(msg):
        raise FormatError(f"malformed note: control character {control.group()!r}")
    split = msg.rfind("\n\n")
    if split < 0:
        raise FormatError("malformed note: no blank line before the signatures")
    text, sigs = msg[: split + 1], msg[split + 2 :]
    if not sigs or not sigs.endswith("\n"):
        raise FormatError("malformed note: signature block must be non-empty and end with a newline")
    out = []
    for line in sigs[:-1].split("\n"):
        name, b64 = _parse_signature_line(line)
        out.append((line, name, b64))
        if len(out) > MAX_SIGNATURES:
            raise FormatError(f"malformed note: more than {MAX_SIGNATURES} signatures")
    return text, out


def open_note(msg: str | bytes, verifiers: Iterable[Verifier | str]) -> Note:
    """Open a signed note, verifying its signatures against trusted keys of either type.

    Signatures by keys not in `verifiers` are returned as unverified and otherwise ignored;
    a signature by a trusted key that does not verify raises `SignatureError`, as does a
    note with no verified signature at all. A verified cosignature carries its timestamp.
    Repeated signatures by one key are checked, then dropped.
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
        verifier = known.get((name, kid))
        if verifier is None:
            if line not in seen_unverified:
                seen_unverified.add(line)
                unverified.append(Signature(name, kid, b64))
            continue
        # As Go's note.Open: every line by a trusted key must verify, repeated or not.
        if not verifier.verify(text.encode(), raw[4:]):
            raise SignatureError(f"invalid signature by trusted key {name}+{kid:08x}")
        if (name, kid) in seen:
            continue
        seen.add((name, kid))
        stamp = _TIMESTAMP.unpack_from(raw, 4)[0] if verifier.is_cosigner else None
        verified.append(Signature(name, kid, b64, stamp))
    if not verified:
        names = ", ".join(s.key for s in unverified) or "none"
        raise SignatureError(f"note has no signature by a trusted key (signed by: {names})")
    return Note(text, tuple(verified), tuple(unverified))


def note_text(msg: str | bytes) -> str:
    """The text of a note without verifying anything: only for notes already trusted."""
    return _split_note(msg)[0]


verify = open_note
"""Alias of `open_note`: verifying a note and opening it are the same operation."""
