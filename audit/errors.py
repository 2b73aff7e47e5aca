"""The audit library's exceptions, rooted at one base class.

A caller catches exactly what it can handle: `ProofError` for a proof that does not
verify, `SignatureError` for a note no trusted key vouches for, `FormatError` for bytes
that are not what a specification says they must be, `LogError` for the state of a log
on disk. Everything the library raises on purpose is an `AuditError`.
"""

from __future__ import annotations


class AuditError(Exception):
    """Base class of every error the audit library raises on purpose."""


class ProofError(AuditError):
    """A Merkle inclusion or consistency proof failed to verify, or its inputs are out of range."""


class FormatError(AuditError, ValueError):
    """Input does not follow its format: a note, a checkpoint, a key string, a proof file, an export."""


class SignatureError(AuditError):
    """A signed note carries no valid signature by a trusted key, or a trusted key's signature is bad."""


class EntryTooLargeError(AuditError, ValueError):
    """An entry is longer than the 65,535 bytes a tlog-tiles entry bundle can frame."""


class LogError(AuditError):
    """The log on disk cannot be used as asked: corrupt, locked by another process, failed write."""


class CheckpointRefusedError(LogError):
    """The log refuses to sign a checkpoint that would contradict the last one it signed."""
