"""The witness: verifies sites' audit checkpoints and cosigns them (c2sp.org/tlog-witness).

A site submits `add-checkpoint` with the size the controller last cosigned for its log, a
consistency proof from that size and its new signed checkpoint. `add_checkpoint` checks,
in the order of the specification:

1. the body is well formed (else 400);
2. the checkpoint's origin is the calling site's own log, `sitewarden/<site-id>` (else 403:
   a site JWT speaks for one site only; answering 404 for other origins would let a site
   probe which site ids exist);
3. the checkpoint carries a valid signature by the site's enrolled key (else 403);
4. the old size is at most the checkpoint's size (else 400);
5. the old size is the size of the latest cosigned checkpoint, or 0 (else 409, body
   `<size>\\n`, `text/x.tlog.size`); 0 also when that checkpoint was signed by an earlier key
   of the site: after a key rotation the site may start a new log under its new key (the
   old log's last witnessed checkpoint stays in the site's key history, `SiteKey`);
6. at equal sizes the roots are equal (else 409), otherwise the consistency proof verifies
   (else 422);

then cosigns (tlog-cosignature, Ed25519, type 0x04), stores the cosigned checkpoint and
commits before returning the cosignature line. Steps 5 and 6 and the store run under a
per-site lock: see `SiteLocks`. A checkpoint that forks from what was witnessed (6) is
refused and reported to the caller's `on_fork`, which records it in the controller's audit
log: the site signed two histories, and its signature on both is the evidence.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from audit import merkle
from audit.checkpoint import Checkpoint
from audit.checkpoint import parse as parse_checkpoint
from audit.errors import FormatError, SignatureError
from audit.note import ALG_COSIGNATURE_V1, ALG_ED25519, Signer, open_note, signature_lines, verifier_key
from audit.note import write_key_pair as write_note_key_pair
from controller import audit_trail
from controller.changes import CheckpointWitnessed
from controller.config import ConfigError
from controller.db import Site, WitnessedCheckpoint, utcnow
from controller.errors import BadRequest, Conflict, Forbidden, NotFound, Unprocessable
from sitewarden.witnessing import consistency_problem

MAX_PROOF_LINES = 63  # tlog-witness: a client MUST NOT send more
KEY_STEM = "witness"
SIZE_CONTENT_TYPE = "text/x.tlog.size"
EMPTY_ROOT = hashlib.sha256(b"").digest()
_OLD = re.compile(r"old (0|[1-9][0-9]{0,19})")
_EVIDENCE_LIMIT = 8192  # bytes of a refused checkpoint kept verbatim in the audit log


def site_origin(site_id: str) -> str:
    """The checkpoint origin (and log key name) of a site's audit log."""
    return f"sitewarden/{site_id}"


def witness_name(audit_origin: str) -> str:
    """The witness key's name, `sitewarden/witness/<controller name>`, from the controller's audit origin.

    Named like the project's logs rather than after the public URL: the URL can change
    (and is overridden by environment), the name is baked into the key id auditors pin.
    """
    return "sitewarden/witness/" + audit_origin.rstrip("/").rsplit("/", 1)[-1]


class WitnessKeyMissing(ConfigError):
    """The witness key is not in the data dir: the controller refuses to start rather than make a new one."""


def _key_paths(keys_dir: Path) -> tuple[Path, Path]:
    return keys_dir / f"{KEY_STEM}.key", keys_dir / f"{KEY_STEM}.vkey"


def create_witness_key(keys_dir: Path, name: str) -> Signer:
    """Create the controller's cosigner key, `keys/witness.key` (0600) and `witness.vkey`.

    Only `controller init` and the explicit `controller witness-keygen` call this: a witness
    key is pinned by every site (at enrollment) and every auditor's witness policy, so it is
    never made behind anyone's back. Refuses to overwrite an existing key.
    """
    try:
        write_note_key_pair(name, keys_dir, stem=KEY_STEM, key_type=ALG_COSIGNATURE_V1)
    except FormatError as exc:
        raise ConfigError(f"cannot create the witness key: {exc}") from exc
    return load_witness_key(keys_dir, name)


def load_witness_key(keys_dir: Path, name: str) -> Signer:
    """The controller's cosigner key, `keys/witness.key`; refuses, saying how to restore it, when missing.

    A new key would silently invalidate every site's pinned witness vkey and every auditor's
    witness policy, and split the record of what was cosigned: so a missing key stops the
    controller. `witness.vkey` (when present) must be the key's vkey: a key restored from the
    wrong backup is refused too.
    """
    key_path, vkey_path = _key_paths(keys_dir)
    published = vkey_path.read_text(encoding="ascii").strip() if vkey_path.is_file() else None
    if not key_path.exists():
        pinned = f" (the vkey sites and auditors pin: {published})" if published else ""
        raise WitnessKeyMissing(
            f"the witness key {key_path} is missing{pinned}. Restore it from your backup of the data dir's "
            f"keys/ (mode 0600); do not make a new one, or every site's and auditor's witness check fails. "
            f"Only if it is lost for good: `sitewarden controller witness-keygen --data {keys_dir.parent}` "
            "creates a new witness key, whose vkey you must then give to every site and auditor"
        )
    try:
        signer = Signer.from_file(key_path)
    except FormatError as exc:
        raise ConfigError(f"witness key {key_path} is unusable: {exc}") from exc
    if not signer.is_cosigner:
        raise ConfigError(f"witness key {key_path} is not a cosigner key (type 0x04)")
    if signer.name != name:
        raise ConfigError(f"witness key {key_path} is named {signer.name!r}, but this controller's witness is {name!r}")
    if published is not None and published != signer.vkey:
        raise ConfigError(
            f"witness key {key_path} is not the key of {vkey_path} ({published}); restored from the wrong backup?"
        )
    if published is None:
        vkey_path.write_text(signer.vkey + "\n", encoding="ascii")
    return signer


# -- the request -------------------------------------------------------------------------


@dataclass(frozen=True)
class AddCheckpoint:
    """A parsed add-checkpoint body: old size, consistency proof, signed checkpoint note."""

    old_size: int
    proof: tuple[bytes, ...]
    checkpoint: str


def parse_add_checkpoint(body: bytes) -> AddCheckpoint:
    """Parse a tlog-witness add-checkpoint body; BadRequest says what is malformed."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("add-checkpoint body is not UTF-8") from exc
    head, sep, checkpoint = text.partition("\n\n")
    if not sep:
        raise BadRequest("add-checkpoint body needs an old size line, proof lines, an empty line, then the checkpoint")
    lines = head.split("\n")
    m = _OLD.fullmatch(lines[0])
    if m is None or int(m.group(1)) >= 1 << 64:
        raise BadRequest(f"first line must be 'old <size>' in decimal without leading zeros, not {lines[0][:80]!r}")
    if len(lines) - 1 > MAX_PROOF_LINES:
        raise BadRequest(f"{len(lines) - 1} consistency proof lines; at most {MAX_PROOF_LINES} are allowed")
    proof = []
    for i, line in enumerate(lines[1:]):
        try:
            h = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadRequest(f"consistency proof line {i + 1} is not base64") from exc
        if len(h) != merkle.HASH_SIZE:
            raise BadRequest(f"consistency proof line {i + 1} is {len(h)} bytes, want {merkle.HASH_SIZE}")
        proof.append(h)
    return AddCheckpoint(int(m.group(1)), tuple(proof), checkpoint)


# -- atomicity -----------------------------------------------------------------------------


class SiteLocks:
    """One lock per site around read-check-cosign-store.

    tlog-witness requires checking the old size and storing the new checkpoint atomically,
    or two requests can roll a log back. The controller runs as one process per data dir
    (`Runtime` holds an exclusive lock on it), so a process-local lock per site serializes
    them. The store is also conditional on the row still being what was checked (a
    compare-and-swap in the database), so a second process could never roll a site back
    either: it would get a 409 instead.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def __call__(self, site_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(site_id, threading.Lock())


class SizeConflict(Conflict):
    """The old size is not the size of the latest cosigned checkpoint (answered as text/x.tlog.size)."""

    def __init__(self, detail: str, current_size: int) -> None:
        super().__init__(detail, size=current_size)
        self.current_size = current_size


@dataclass(frozen=True)
class Cosigned:
    """The outcome of a successful add-checkpoint: the lines to return and what was stored."""

    lines: str
    record: WitnessedCheckpoint


def add_checkpoint(
    session: Session,
    site: Site,
    body: bytes,
    *,
    signer: Signer,
    locks: SiteLocks,
    on_fork: Callable[[dict[str, Any]], object],
    now: Callable[[], float] = time.time,
) -> Cosigned:
    """Verify a site's add-checkpoint request, cosign it, store it, and commit (see the module doc)."""
    request = parse_add_checkpoint(body)
    origin = site_origin(site.id)
    if site.public_key is None:
        raise NotFound(f"site {site.name} has no enrolled key, so the witness knows no log for it")
    site_vkey = verifier_key(origin, base64.b64decode(site.public_key), ALG_ED25519)
    try:
        claimed = parse_checkpoint(_note_text(request.checkpoint))
    except FormatError as exc:
        raise BadRequest(f"checkpoint: {exc}") from exc
    if claimed.origin != origin:
        raise Forbidden(
            f"checkpoint origin {claimed.origin[:200]!r} is not this site's log: the site JWT authenticates "
            f"site {site.name}, which may submit only checkpoints of origin {origin}"
        )
    try:
        note = open_note(request.checkpoint, [site_vkey])
    except SignatureError as exc:
        raise Forbidden(
            f"checkpoint is not signed by the enrolled key of site {site.name}, {site_vkey}: {exc}"
        ) from exc
    except FormatError as exc:
        raise BadRequest(f"checkpoint: {exc}") from exc
    cp = parse_checkpoint(note.text)
    if request.old_size > cp.size:
        raise BadRequest(f"old size {request.old_size} is larger than the checkpoint's size {cp.size}")
    if request.old_size == 0 and request.proof:
        raise BadRequest("a consistency proof from size 0 must be empty")

    with locks(site.id):
        # Read-check-write in one transaction, under the site's lock (see SiteLocks). End any
        # read transaction first, so that the check reads the latest committed row.
        session.commit()
        stored = session.get(WitnessedCheckpoint, site.id, populate_existing=True)
        current = stored.size if stored is not None else 0
        if request.old_size == 0 and stored is not None and not _signed_by(stored.note, site_vkey):
            current = 0  # a new log under a rotated key
        if request.old_size != current:
            raise SizeConflict(
                f"old size {request.old_size} is not the size of the latest checkpoint cosigned for {origin}, "
                f"{current}; send a consistency proof from {current}",
                current,
            )
        fork = _fork(request, cp, stored)
        if fork is None:
            lines = signature_lines(note.text, signer, timestamp=int(now()))
            stored_note = note.text + "\n" + "".join(s.line() for s in note.signatures) + lines
            return Cosigned(lines, _store(session, site, cp, stored_note, stored, old_size=request.old_size))
    status, reason = fork
    on_fork(_fork_event(site, stored, cp, request, reason))  # durable in the audit log before the refusal leaves
    if status == 409:
        raise Conflict(f"{reason}; refused and recorded as a fork of {origin}", witnessed_size=current)
    raise Unprocessable(f"{reason}; refused and recorded as a possible fork of {origin}", witnessed_size=current)


def _signed_by(note: str, vkey: str) -> bool:
    """Whether a stored (cosigned) checkpoint carries a valid signature by `vkey`."""
    try:
        open_note(note, [vkey])
    except (SignatureError, FormatError):
        return False
    return True


def _note_text(signed: str) -> str:
    # The checkpoint is parsed before its signature is checked only to route the request
    # (whose log is it?); nothing else is read from it until the signature verifies.
    split = signed.rfind("\n\n")
    if split < 0:
        raise FormatError("malformed note: no blank line before the signatures")
    return signed[: split + 1]


def _fork(request: AddCheckpoint, cp: Checkpoint, stored: WitnessedCheckpoint | None) -> tuple[int, str] | None:
    """(status, reason) when the checkpoint contradicts what was witnessed, else None.

    Raises Unprocessable for requests that are wrong without contradicting anything.
    """
    if cp.size == 0 and cp.root != EMPTY_ROOT:
        raise Unprocessable("a checkpoint of an empty log must have the empty tree's root, SHA-256 of nothing")
    if stored is None or request.old_size == 0:
        return None  # nothing witnessed yet: any correctly signed checkpoint starts the record
    witnessed_root = bytes.fromhex(stored.root_hash)
    if request.old_size == cp.size and cp.root == witnessed_root and request.proof:
        raise Unprocessable("a consistency proof between equal sizes must be empty")
    # The rule every witness applies, the sites witnessing the controller's log included.
    problem = consistency_problem(request.old_size, witnessed_root, cp.size, cp.root, request.proof)
    if problem is None:
        return None
    return (409 if request.old_size == cp.size else 422), problem


def _store(
    session: Session, site: Site, cp: Checkpoint, note: str, stored: WitnessedCheckpoint | None, *, old_size: int
) -> WitnessedCheckpoint:
    """Replace the site's witnessed checkpoint, only if it is still the one checked; commit."""
    site_id = site.id
    values = {"origin": cp.origin, "size": cp.size, "root_hash": cp.root.hex(), "note": note, "cosigned_at": utcnow()}
    change = CheckpointWitnessed(site.id, site.name, cp.origin, old_size, cp.size, cp.root.hex())
    try:
        audit_trail.record(session, change)
        if stored is None:
            session.add(WitnessedCheckpoint(site_id=site_id, **values))
        else:
            result = session.execute(
                update(WitnessedCheckpoint)
                .where(
                    WitnessedCheckpoint.site_id == site_id,
                    WitnessedCheckpoint.size == stored.size,
                    WitnessedCheckpoint.root_hash == stored.root_hash,
                )
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise _Lost()
        session.commit()
    except (IntegrityError, _Lost) as exc:
        session.rollback()
        again = session.get(WitnessedCheckpoint, site_id, populate_existing=True)
        size = again.size if again is not None else 0
        raise SizeConflict(f"another request for {cp.origin} was cosigned meanwhile, at size {size}", size) from exc
    record = session.get(WitnessedCheckpoint, site_id, populate_existing=True)
    assert record is not None
    return record


class _Lost(Exception):
    """The row changed between the check and the store."""


def _fork_event(
    site: Site, stored: WitnessedCheckpoint | None, cp: Checkpoint, request: AddCheckpoint, reason: str
) -> dict[str, Any]:
    """The audit event of a refused fork; the site's own signature on the checkpoint is the evidence."""
    evidence = request.checkpoint
    return {
        "type": "witness.fork_refused",
        "site": site.id,
        "site_name": site.name,
        "origin": cp.origin,
        "witnessed_size": stored.size if stored is not None else 0,
        "witnessed_root": stored.root_hash if stored is not None else None,
        "presented_size": cp.size,
        "presented_root": cp.root.hex(),
        "old_size": request.old_size,
        "reason": reason,
        "checkpoint": evidence if len(evidence.encode()) <= _EVIDENCE_LIMIT else None,
        "checkpoint_sha256": hashlib.sha256(evidence.encode()).hexdigest(),
    }


def latest(session: Session, site: Site) -> WitnessedCheckpoint:
    """The latest checkpoint cosigned for a site; NotFound if none."""
    record = session.get(WitnessedCheckpoint, site.id)
    if record is None:
        raise NotFound(f"the witness has cosigned no checkpoint of site {site.name} yet")
    return record
