"""C2SP transparency log checkpoints (c2sp.org/tlog-checkpoint).

A checkpoint is the text of a signed note: the log's origin line, the tree size in
decimal, the tree head in base64, and optional extension lines. This module formats and
parses that text; signing and verifying it is `audit.note`'s job.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from audit.errors import FormatError
from audit.merkle import HASH_SIZE

_SIZE = re.compile(r"0|[1-9][0-9]*")


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin or "\n" in self.origin:
            raise FormatError("checkpoint origin must be a non-empty single line")
        if not 0 <= self.size < 1 << 64:
            raise FormatError(f"checkpoint size {self.size} is out of range")
        if len(self.root) != HASH_SIZE:
            raise FormatError(f"checkpoint root must be {HASH_SIZE} bytes, got {len(self.root)}")
        for ext in self.extensions:
            if not ext or "\n" in ext:
                raise FormatError("checkpoint extension lines must be non-empty single lines")

    def format(self) -> str:
        """The checkpoint body, ready to be signed as a note."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode(), *self.extensions]
        return "\n".join(lines) + "\n"


def parse(text: str) -> Checkpoint:
    """Parse a checkpoint body (the text of a note, not the whole signed note)."""
    if not text.endswith("\n"):
        raise FormatError("malformed checkpoint: must end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise FormatError("malformed checkpoint: want origin, size and root hash lines")
    origin, size, root_b64, *extensions = lines
    if not origin:
        raise FormatError("malformed checkpoint: empty origin line")
    if not _SIZE.fullmatch(size):
        raise FormatError(f"malformed checkpoint: tree size {size!r} is not a decimal without leading zeros")
    try:
        root = base64.b64decode(root_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FormatError("malformed checkpoint: root hash is not valid base64") from exc
    if len(root) != HASH_SIZE:
        raise FormatError(f"malformed checkpoint: root hash is {len(root)} bytes, want {HASH_SIZE}")
    if any(not ext for ext in extensions):
        raise FormatError("malformed checkpoint: empty extension line")
    return Checkpoint(origin, int(size), root, tuple(extensions))
