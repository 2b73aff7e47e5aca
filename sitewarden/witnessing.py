"""The agent's side of witnessing (C2SP tlog-witness): getting its audit checkpoints cosigned.

The workflow, one step per helper:

1. `submission(log, old_size)`: the `add-checkpoint` request for the log's last signed
   checkpoint, with a consistency proof from `old_size`, the size the controller last
   cosigned (0 when it never did, or when the agent does not know).
2. POST `submission.body()` to the controller's `/api/v1/witness/add-checkpoint` with a
   site JWT. On 409 with `text/x.tlog.size`, `conflict_size(body)` is the size the controller
   cosigned last: make the submission again from that size.
3. On 200, `store_cosignatures(log, submission, body, witness_vkey)` verifies the returned
   lines with the controller's witness key and stores them in the log's checkpoint: the
   log's exports and tlog-proofs then carry the cosignature, and an auditor can require it
   (`sitewarden audit verify EXPORT --key <site vkey> --witness <witness vkey>`).

Transport is the caller's business: these functions do no I/O beyond the log.

The other direction, sites witnessing the controller's own log (`agent.controller_witness`,
`controller.log_witnesses`), shares the rule both witnesses apply (`consistency_problem`) and
names the site's cosigner key (`site_witness_name`).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from audit import Log, merkle
from audit.errors import FormatError, LogError, ProofError, SignatureError
from audit.note import Verifier, add_signatures, note_text, open_note

SIZE_CONTENT_TYPE = "text/x.tlog.size"
_SIZE = re.compile(r"(0|[1-9][0-9]{0,19})\n")


def site_witness_name(site_id: str) -> str:
    """The name of a site's cosigner key (its site key, type 0x04) when it witnesses the controller's log."""
    return f"sitewarden/{site_id}/witness"


def consistency_problem(
    old_size: int, old_root: bytes, new_size: int, new_root: bytes, proof: tuple[bytes, ...] | list[bytes]
) -> str | None:
    """Why a checkpoint (new) contradicts one a witness cosigned before (old), or None when it extends it.

    The rule of c2sp.org/tlog-witness: at equal sizes the roots must be equal (and the proof empty);
    a larger checkpoint needs a consistency proof from the old one (RFC 9162 §2.1.4); a smaller one
    contradicts what was cosigned (the log would have lost entries).
    """
    if new_size < old_size:
        return f"the checkpoint has size {new_size}, smaller than the size {old_size} cosigned before"
    if new_size == old_size:
        if new_root != old_root:
            return f"the checkpoint has the cosigned size {new_size} but another root hash"
        return "a consistency proof between equal sizes must be empty" if proof else None
    if old_size == 0:
        return "a consistency proof from size 0 must be empty" if proof else None
    try:
        merkle.verify_consistency(old_size, new_size, list(proof), old_root, new_root)
    except ProofError as exc:
        return f"the consistency proof from the cosigned size {old_size} to {new_size} fails: {exc}"
    return None


@dataclass(frozen=True)
class Submission:
    """An add-checkpoint request: the checkpoint as signed by the log, and how it extends `old_size`."""

    old_size: int
    size: int
    proof: tuple[bytes, ...]
    checkpoint: str

    def body(self) -> bytes:
        """The request body: `old <size>`, one base64 proof hash per line, an empty line, the checkpoint."""
        lines = [f"old {self.old_size}", *(base64.b64encode(h).decode() for h in self.proof)]
        return ("\n".join(lines) + "\n\n" + self.checkpoint).encode()


def submission(log: Log, old_size: int) -> Submission:
    """The add-checkpoint request for `log`'s last signed checkpoint, proving consistency from `old_size`."""
    signed = log.signed_checkpoint
    last = log.last_checkpoint()
    if signed is None or last is None:
        raise LogError(f"audit log {log.path} has no signed checkpoint to submit; sign one first")
    if not 0 <= old_size <= last.size:
        raise LogError(
            f"the controller last cosigned size {old_size}, but the log's last checkpoint has size {last.size}: "
            "the log lost entries it had shown the witness (restored from an old backup?)"
        )
    proof = log.consistency_proof(old_size, last.size) if 0 < old_size < last.size else []
    return Submission(old_size, last.size, tuple(proof), signed)


def conflict_size(body: bytes | str) -> int:
    """The size in a 409 `text/x.tlog.size` answer: the controller's latest cosigned size for this log."""
    text = body.decode("ascii", errors="replace") if isinstance(body, bytes) else body
    m = _SIZE.fullmatch(text)
    if m is None:
        raise FormatError(f"a 409 from the witness must be a decimal size and a newline, got {text[:40]!r}")
    return int(m.group(1))


def verify_cosignatures(checkpoint: str, lines: bytes | str, witness_vkey: str | Verifier) -> str:
    """`checkpoint` with the witness's cosignature lines from `lines` added, once they verify.

    Lines by other keys are dropped (tlog-witness: a client ignores unknown keys). Raises
    SignatureError when no line is a valid cosignature by the witness.
    """
    witness = witness_vkey if isinstance(witness_vkey, Verifier) else Verifier(witness_vkey)
    if not witness.is_cosigner:
        raise FormatError(f"witness key {witness.name}+{witness.key_id:08x} is not a cosigner key (type 0x04)")
    try:
        text = lines.decode("utf-8") if isinstance(lines, bytes) else lines
    except UnicodeDecodeError as exc:  # the controller's bytes: a documented error, not a crash (fuzzed)
        raise FormatError(f"the witness's reply is not UTF-8: {exc.reason} at byte {exc.start}") from exc
    # Checked against the note text alone, so that the log's own lines cannot stand in for the witness's.
    bare = note_text(checkpoint)
    try:
        opened = open_note(bare + "\n" + text, [witness])
    except FormatError as exc:
        raise FormatError(f"the witness's reply is not signature lines: {exc}") from exc
    except SignatureError as exc:
        raise SignatureError(f"the witness's reply holds no valid cosignature by {witness.vkey}: {exc}") from exc
    return add_signatures(checkpoint, [s.line() for s in opened.signatures])


def store_cosignatures(log: Log, sent: Submission, lines: bytes | str, witness_vkey: str | Verifier) -> str:
    """Verify the witness's reply to `sent` and store its cosignature in `log`'s checkpoint; return that note.

    Refuses (LogError) when the log signed a newer checkpoint since `sent`: submit that one.
    """
    return log.add_cosignatures(verify_cosignatures(sent.checkpoint, lines, witness_vkey))
