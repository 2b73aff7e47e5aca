"""Sitewarden's tamper-evident audit log: RFC 9162 Merkle trees, C2SP signed notes,
checkpoints, tlog-tiles exports and tlog-proofs, and a durable append-only `Log`.

Both the agent and the controller record into an `audit.Log`; auditors check what they
receive with `audit.verify_export` (or `sitewarden audit verify`), trusting only keys.
"""

from audit.errors import (
    AuditError,
    CheckpointRefusedError,
    EntryTooLargeError,
    FormatError,
    LogError,
    ProofError,
    SignatureError,
)
from audit.export import Report, verify_export
from audit.log import Log

__all__ = [
    "AuditError",
    "CheckpointRefusedError",
    "EntryTooLargeError",
    "FormatError",
    "Log",
    "LogError",
    "ProofError",
    "Report",
    "SignatureError",
    "verify_export",
]
