"""Offline-verifiable inclusion proofs in the C2SP tlog-proof format (c2sp.org/tlog-proof).

c2sp.org/tlog-proof@v1
[extra <base64>]
index <N>
<base64 hash, leaf's sibling first, one per line>

<signed checkpoint, verbatim>
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass

from audit import merkle
from audit.checkpoint import Checkpoint
from audit.checkpoint import parse as parse_checkpoint
from audit.errors import FormatError
from audit.note import Note, Verifier, open_note

HEADER = "c2sp.org/tlog-proof@v1"
_INDEX = re.compile(r"index (0|[1-9][0-9]*)")


@dataclass(frozen=True)
class TlogProof:
    index: int
    hashes: tuple[bytes, ...]
    checkpoint: str
    """The signed checkpoint note, verbatim."""
    extra: bytes | None = None

    def format(self) -> str:
        lines = [HEADER]
        if self.extra is not None:
            lines.append(f"extra {base64.b64encode(self.extra).decode()}")
        lines.append(f"index {self.index}")
        lines += [base64.b64encode(h).decode() for h in self.hashes]
        return "\n".join(lines) + "\n\n" + self.checkpoint


def parse(text: str) -> TlogProof:
    """Parse a tlog-proof file; FormatError names what is malformed."""
    head, sep, signed = text.partition("\n\n")
    if not sep:
        raise FormatError("malformed tlog-proof: no blank line before the checkpoint")
    lines = head.split("\n")
    if lines[0] != HEADER:
        raise FormatError(f"malformed tlog-proof: first line must be {HEADER!r}")
    pos = 1
    extra = None
    if pos < len(lines) and lines[pos].startswith("extra "):
        try:
            extra = base64.b64decode(lines[pos][len("extra ") :], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise FormatError("malformed tlog-proof: extra data is not valid base64") from exc
        pos += 1
    if pos >= len(lines) or not (m := _INDEX.fullmatch(lines[pos])):
        raise FormatError("malformed tlog-proof: want an 'index <N>' line")
    index = int(m.group(1))
    hashes = []
    for i, line in enumerate(lines[pos + 1 :]):
        try:
            h = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise FormatError(f"malformed tlog-proof: proof hash {i} is not valid base64") from exc
        if len(h) != merkle.HASH_SIZE:
            raise FormatError(f"malformed tlog-proof: proof hash {i} is {len(h)} bytes, want 32")
        hashes.append(h)
    return TlogProof(index, tuple(hashes), signed, extra)


def verify(proof: TlogProof, entry: bytes, keys: Iterable[str | Verifier]) -> tuple[Checkpoint, Note]:
    """Check the checkpoint's signature by a log key and that `entry` is at `proof.index` in its tree.

    `keys` are the log's vkeys (type 0x01): a cosignature alone never makes a proof valid,
    and cosigner keys are refused here. Raises SignatureError or FormatError for the
    checkpoint, ProofError for the inclusion.
    """
    verifiers = [k if isinstance(k, Verifier) else Verifier(k) for k in keys]
    cosigners = [f"{v.name}+{v.key_id:08x}" for v in verifiers if v.is_cosigner]
    if cosigners:
        raise FormatError(f"{', '.join(cosigners)}: cosigner keys cannot vouch for a log's checkpoint")
    note = open_note(proof.checkpoint, verifiers)
    cp = parse_checkpoint(note.text)
    merkle.verify_inclusion(merkle.leaf_hash(entry), proof.index, cp.size, proof.hashes, cp.root)
    return cp, note
