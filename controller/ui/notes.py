"""Signed checkpoints as the dashboard shows them: what they say, who signed, which signatures verify.

A checkpoint (C2SP tlog-checkpoint in a signed note) carries the log's own signature and the
witnesses' cosignatures (type 0x04, with the time they cosigned). Each line is shown with its key
name and id, whether it is a signature or a cosignature, and whether it verifies with a key the
controller knows for that name (the site's enrolled key, the controller's audit or witness key);
a line by an unknown key is shown as such, never as verified.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from audit.checkpoint import parse as parse_checkpoint
from audit.errors import FormatError
from audit.note import SIG_PREFIX, Verifier

_COSIGNATURE_BYTES = 4 + 8 + 64
_SIGNATURE_BYTES = 4 + 64


@dataclass(frozen=True)
class SignatureView:
    name: str
    key_id: str
    kind: str  # "signature" or "cosignature"
    timestamp: datetime | None
    verified: bool | None  # None: no known key of that name and id


@dataclass(frozen=True)
class NoteView:
    origin: str
    size: int
    root_hex: str
    signatures: list[SignatureView]
    note: str


def describe(note: str, vkeys: Iterable[str]) -> NoteView | None:
    """The checkpoint in `note` and its signature lines; None if it is not a well-formed checkpoint."""
    split = note.rfind("\n\n")
    if split < 0:
        return None
    text, block = note[: split + 1], note[split + 2 :]
    try:
        checkpoint = parse_checkpoint(text)
    except FormatError:
        return None
    known: dict[tuple[str, int], Verifier] = {}
    for vkey in vkeys:
        try:
            verifier = Verifier(vkey)
        except FormatError:
            continue
        known[(verifier.name, verifier.key_id)] = verifier
    signatures = []
    for line in block.splitlines():
        if not line.startswith(SIG_PREFIX):
            continue
        name, _, b64 = line[len(SIG_PREFIX) :].partition(" ")
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(raw) not in (_COSIGNATURE_BYTES, _SIGNATURE_BYTES):
            continue
        kid = struct.unpack(">I", raw[:4])[0]
        cosigned = len(raw) == _COSIGNATURE_BYTES
        stamp = None
        if cosigned:
            try:
                stamp = datetime.fromtimestamp(struct.unpack(">Q", raw[4:12])[0], UTC)
            except (OverflowError, OSError, ValueError):
                stamp = None  # not a time: verification (below) says whether the line is genuine
        verifier = known.get((name, kid))
        verified = verifier.verify(text.encode(), raw[4:]) if verifier is not None else None
        signatures.append(
            SignatureView(name, f"{kid:08x}", "cosignature" if cosigned else "signature", stamp, verified)
        )
    return NoteView(checkpoint.origin, checkpoint.size, checkpoint.root.hex(), signatures, note)
