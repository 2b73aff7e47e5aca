"""The site as a witness of the controller's own audit log (C2SP tlog-witness semantics, pulled by the site).

The controller cosigns the site's checkpoints (`sitewarden.witnessing`); the site returns the
favour, so that whoever holds the controller's host cannot rewrite the controller's history unseen.
`ControllerWitness.run_once`, after each long-poll answer and periodically:

1. fetches the controller's latest checkpoint and verifies it with the controller's log key the
   site pinned at enrollment (`Identity.controller_audit_vkey`);
2. when it differs from the checkpoint the site cosigned last, fetches a consistency proof from
   that one and checks it with the rule the controller's witness applies to the site's log
   (`sitewarden.witnessing.consistency_problem`);
3. stores the new checkpoint as the one it cosigned, durably, before the cosignature leaves (the
   site never cosigns two histories, crash or not); cosigns it with the site key (tlog-cosignature,
   Ed25519, type 0x04, key name `sitewarden/<site id>/witness`); posts the cosignature;
4. refuses a checkpoint that contradicts what it cosigned (another root at its size, a failed
   proof, a smaller checkpoint that is not a prefix): records the refusal in the site's audit log,
   reports it to the controller, and cosigns nothing more of that log, since everything after a
   fork is on the other history. A checkpoint that does not verify with the pinned key is refused
   and reported too, but witnessing goes on. Serving is never affected.

State, in `<data>/controller-witness.json`: the checkpoint cosigned last (size, root, its note and the
site's cosignature line), whether the controller has the cosignature, and a refusal if one happened.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.concurrency import run_in_threadpool

from audit.checkpoint import Checkpoint
from audit.checkpoint import parse as parse_checkpoint
from audit.errors import AuditError
from audit.merkle import HASH_SIZE
from audit.note import ALG_COSIGNATURE_V1, Signer, Verifier, open_note, signature_lines
from sitewarden.files import write_atomically
from sitewarden.witnessing import consistency_problem, site_witness_name

log = logging.getLogger("sitewarden.agent.controller_witness")

EVIDENCE_LIMIT = 8192  # bytes of a refused checkpoint kept verbatim in the site's audit log


class Transport(Protocol):
    """What witnessing needs of the controller (`agent.channel.ControllerChannel` has it)."""

    async def audit_checkpoint(self) -> bytes: ...

    async def audit_consistency(self, old: int, new: int) -> bytes: ...

    async def post_cosignature(self, body: bytes) -> None: ...

    async def report_refusal(self, report: dict[str, Any]) -> None: ...


@dataclass
class WitnessState:
    size: int = 0
    root: str = ""  # hex; empty until the first cosignature
    checkpoint: str = ""  # the note text cosigned
    cosignature: str = ""  # the site's cosignature line of it
    posted: bool = False
    cosigned_at: float | None = None
    refused: dict[str, Any] | None = None
    reported: bool = False


@dataclass
class ControllerWitness:
    state_file: Path
    site_id: str
    key: Ed25519PrivateKey
    pinned_vkey: str
    record: Callable[[dict[str, Any]], object]
    state: WitnessState = field(init=False)
    error: str = ""

    def __post_init__(self) -> None:
        self.signer = Signer.from_ed25519(site_witness_name(self.site_id), self.key, ALG_COSIGNATURE_V1)
        self.verifier = Verifier(self.pinned_vkey) if self.pinned_vkey else None
        self.state = self._load()
        self._lock = asyncio.Lock()
        self._reported_bad: set[str] = set()

    @property
    def vkey(self) -> str:
        """The site's cosigner vkey: what an auditor's witness policy names for this site."""
        return self.signer.vkey

    @property
    def size(self) -> int:
        return self.state.size

    def _load(self) -> WitnessState:
        try:
            raw = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return WitnessState()
        return WitnessState(**raw)

    def _save(self) -> None:
        write_atomically(self.state_file, json.dumps(asdict(self.state), indent=2).encode(), 0o600)

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.verifier is not None,
            "cosigned_size": self.state.size,
            "cosigned_at": self.state.cosigned_at,
            "posted": self.state.posted,
            "refused": self.state.refused,
            "error": self.error,
            "witness_vkey": self.vkey,
        }

    # -- one round -----------------------------------------------------------------------------

    async def run_once(self, controller: Transport) -> str:
        """Witness the controller's latest checkpoint: 'cosigned', 'unchanged', 'stale', 'refused' or 'disabled'."""
        async with self._lock:
            if self.verifier is None:
                return "disabled"
            if self.state.refused is not None:
                if not self.state.reported:
                    await self._report(controller, self.state.refused)
                return "refused"
            body = await controller.audit_checkpoint()
            try:
                note = open_note(body, [self.verifier])
                cp = parse_checkpoint(note.text)
                if cp.origin != self.verifier.name:
                    raise AuditError(f"origin {cp.origin!r} is not the pinned log's {self.verifier.name!r}")
            except AuditError as exc:
                await self._refuse_note(controller, body, f"the controller's checkpoint does not verify: {exc}")
                return "refused"
            st = self.state
            if st.root:
                problem = await self._contradiction(controller, cp)
                if problem == "stale":
                    return "stale"  # an older checkpoint of the same history: nothing new to cosign
                if problem is not None:
                    await self._refuse_fork(controller, cp, body, problem)
                    return "refused"
                if cp.size == st.size and st.posted:
                    return "unchanged"
            if cp.size != st.size or not st.cosignature:
                line = signature_lines(note.text, self.signer, timestamp=int(time.time()))
                self.state = WitnessState(cp.size, cp.root.hex(), note.text, line, False, time.time())
                await run_in_threadpool(self._save)  # durable before the cosignature leaves
            await controller.post_cosignature((self.state.checkpoint + "\n" + self.state.cosignature).encode())
            self.state.posted = True
            await run_in_threadpool(self._save)
            self.error = ""
            return "cosigned"

    async def _contradiction(self, controller: Transport, cp: Checkpoint) -> str | None:
        """Why `cp` contradicts the checkpoint cosigned last, 'stale' for an older one of the same history, or None."""
        st = self.state
        old_root = bytes.fromhex(st.root)
        if cp.size < st.size:
            proof = await self._proof(controller, cp.size, st.size) if cp.size else ()
            if proof is None:
                return f"the controller's consistency proof from {cp.size} to {st.size} is malformed"
            problem = consistency_problem(cp.size, cp.root, st.size, old_root, proof)
            if problem is None:
                return "stale"
            return f"a checkpoint of size {cp.size} that is not a prefix of what was cosigned: {problem}"
        proof = await self._proof(controller, st.size, cp.size) if 0 < st.size < cp.size else ()
        if proof is None:
            return f"the controller's consistency proof from {st.size} to {cp.size} is malformed"
        return consistency_problem(st.size, old_root, cp.size, cp.root, proof)

    async def _proof(self, controller: Transport, old: int, new: int) -> tuple[bytes, ...] | None:
        """The controller's consistency proof; None when it is not one (which no consistent log sends)."""
        text = (await controller.audit_consistency(old, new)).decode("ascii", errors="replace")
        hashes = []
        for line in text.splitlines():
            try:
                h = base64.b64decode(line, validate=True)
            except (binascii.Error, ValueError):
                return None
            if len(h) != HASH_SIZE:
                return None
            hashes.append(h)
        return tuple(hashes)

    # -- refusals ------------------------------------------------------------------------------

    def _report_of(self, reason: str, cp: Checkpoint | None, body: bytes) -> dict[str, Any]:
        return {
            "reason": reason[:2000],
            "cosigned_size": self.state.size if self.state.root else None,
            "cosigned_root": self.state.root or None,
            "presented_size": cp.size if cp else None,
            "presented_root": cp.root.hex() if cp else None,
            "checkpoint_sha256": hashlib.sha256(body).hexdigest(),
        }

    async def _audit(self, report: dict[str, Any], body: bytes, stopped: bool) -> None:
        event = {
            "type": "controller_witness.refused",
            "controller_log": self.verifier.name if self.verifier else None,
            **report,
            "checkpoint": body.decode("utf-8", errors="replace") if len(body) <= EVIDENCE_LIMIT else None,
            "witnessing_stopped": stopped,
        }
        await run_in_threadpool(self.record, event)

    async def _refuse_fork(self, controller: Transport, cp: Checkpoint, body: bytes, reason: str) -> None:
        """A checkpoint that contradicts what the site cosigned: recorded, kept, reported; witnessing stops."""
        report = self._report_of(reason, cp, body)
        log.error("refused the controller's audit checkpoint of size %d: %s", cp.size, reason)
        await self._audit(report, body, stopped=True)
        self.state.refused, self.state.reported = report, False
        await run_in_threadpool(self._save)
        self.error = reason
        await self._report(controller, report)

    async def _refuse_note(self, controller: Transport, body: bytes, reason: str) -> None:
        """A checkpoint that does not verify with the pinned key: recorded and reported once per note."""
        self.error = reason
        digest = hashlib.sha256(body).hexdigest()
        if digest in self._reported_bad:
            return
        self._reported_bad.add(digest)
        log.error("refused the controller's audit checkpoint: %s", reason)
        report = self._report_of(reason, None, body)
        await self._audit(report, body, stopped=False)
        await self._report(controller, report, remember=False)

    async def _report(self, controller: Transport, report: dict[str, Any], remember: bool = True) -> None:
        try:
            await controller.report_refusal(report)
        except Exception as exc:  # the controller is away, or refuses to hear it: the site's log has it
            log.warning("could not report the refusal to the controller: %s", exc)
            return
        if remember:
            self.state.reported = True
            await run_in_threadpool(self._save)
