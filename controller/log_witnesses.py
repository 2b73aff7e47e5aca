"""The sites as witnesses of the controller's own audit log: C2SP tlog-witness semantics, pulled by the sites.

The controller's witness cosigns the sites' logs (`controller.witness`); here the roles are
reversed, so that whoever holds the controller's host cannot rewrite its history unseen:

1. Every checkpoint the controller signs is kept (`audit_checkpoints`), so that a cosignature of an
   older one can still be shown with its note; old ones nobody's latest cosignature names are pruned.
2. A site fetches the latest checkpoint (`GET /api/v1/audit/checkpoint`, public) and a consistency
   proof from the size it last cosigned (`GET /api/v1/audit/consistency`), verifies both against the
   controller's log key it pinned at enrollment, and cosigns with its site key (tlog-cosignature,
   Ed25519, type 0x04, key name `sitewarden/<site id>/witness`: `sitewarden.witnessing`).
3. It posts the cosigned checkpoint (`POST /api/v1/agent/audit-cosignatures`). `accept` checks that the
   note's text is a checkpoint this controller signed and that the cosignature verifies with the
   site's witness key (derived from its enrolled key), and keeps it as the site's latest, never
   moving back to a smaller size.
4. Exports (`export`) carry the cosignatures: see `audit.export` for the layout.

A site that finds a checkpoint inconsistent with what it cosigned refuses it, records it in its own
log and reports it (`POST /api/v1/agent/audit-refusals`, recorded here as a change).
"""

from __future__ import annotations

import base64
import logging
import tempfile
from collections import defaultdict
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from audit.checkpoint import parse as parse_checkpoint
from audit.errors import AuditError, FormatError, SignatureError
from audit.export import CosignedCheckpoint, write_export
from audit.note import ALG_COSIGNATURE_V1, MAX_SIGNATURES, Verifier, add_signatures, note_text, open_note, verifier_key
from controller import audit_trail
from controller.audit_trail import AuditTrail
from controller.changes import ControllerLogRefused
from controller.db import AuditCheckpoint, LogCosignature, Site, utcnow
from controller.errors import BadRequest, Conflict, Forbidden, NotFound
from sitewarden.witnessing import site_witness_name

log = logging.getLogger("sitewarden.controller.audit")

COSIGNATURES_PER_NOTE = MAX_SIGNATURES - 1  # the log's own signature is one of a note's 100
KEEP_CHECKPOINTS = 1000
MAX_COSIGNATURE_BODY = 16 * 1024

_CHECKPOINTS = AuditCheckpoint.__table__


def site_witness_vkey(site: Site) -> str | None:
    """The vkey a site cosigns the controller's checkpoints with: its enrolled key, as a cosigner (0x04)."""
    if site.public_key is None:
        return None
    return verifier_key(site_witness_name(site.id), base64.b64decode(site.public_key), ALG_COSIGNATURE_V1)


def remember(engine: Engine, signed: str) -> None:
    """Keep a checkpoint the controller signed; prune old ones no site's latest cosignature names."""
    cp = parse_checkpoint(note_text(signed))
    with engine.begin() as conn:
        insert = postgresql_insert if conn.dialect.name == "postgresql" else sqlite_insert
        conn.execute(
            insert(_CHECKPOINTS)
            .values(size=cp.size, root_hash=cp.root.hex(), note=signed, signed_at=utcnow())
            .on_conflict_do_nothing(index_elements=[_CHECKPOINTS.c.size])
        )
        newest = select(_CHECKPOINTS.c.size).order_by(_CHECKPOINTS.c.size.desc()).offset(KEEP_CHECKPOINTS).limit(1)
        cutoff = conn.execute(newest).scalar()
        if cutoff is not None:
            named = select(LogCosignature.size)
            conn.execute(delete(_CHECKPOINTS).where(_CHECKPOINTS.c.size <= cutoff, _CHECKPOINTS.c.size.not_in(named)))


def _lines(records: list[LogCosignature]) -> list[str]:
    return [r.line for r in records]


def _with_cosignatures(signed: str, lines: list[str]) -> str:
    return add_signatures(signed, lines[:COSIGNATURES_PER_NOTE]) if lines else signed


def latest(session: Session, trail: AuditTrail) -> str:
    """The latest checkpoint with the cosignatures the sites gave it (as many as a note carries)."""
    signed = trail.published
    if signed is None:
        raise NotFound("the controller has signed no checkpoint of its audit log yet")
    size = parse_checkpoint(note_text(signed)).size
    records = session.scalars(
        select(LogCosignature)
        .where(LogCosignature.size == size)
        .order_by(LogCosignature.received_at)
        .limit(COSIGNATURES_PER_NOTE)
    ).all()
    return _with_cosignatures(signed, _lines(list(records)))


def consistency(trail: AuditTrail, old: int, new: int) -> list[bytes]:
    """The consistency proof between two sizes the controller signed checkpoints at (RFC 9162 §2.1.4)."""
    signed = trail.checkpoint_size
    if not 0 < old <= new:
        raise BadRequest(f"want 0 < old <= new, got old={old}, new={new}")
    if new > signed:
        raise NotFound(f"the latest signed checkpoint has size {signed}; no proof to size {new}")
    return trail.log.consistency_proof(old, new) if old < new else []


def accept(session: Session, site: Site, body: bytes) -> LogCosignature:
    """Store a site's cosignature of one of the controller's checkpoints; commits.

    The body is the checkpoint as the controller signed it, with the site's cosignature line.
    Refused: a note that is not the text of a checkpoint this controller signed (409), no valid
    cosignature by the site's witness key (403), an older size than the site cosigned before (409).
    """
    if len(body) > MAX_COSIGNATURE_BODY:
        raise BadRequest(f"a cosigned checkpoint is at most {MAX_COSIGNATURE_BODY} bytes")
    vkey = site_witness_vkey(site)
    if vkey is None:
        raise Forbidden(f"site {site.name} has no enrolled key")
    try:
        note = open_note(body, [Verifier(vkey)])
        cp = parse_checkpoint(note.text)
    except SignatureError as exc:
        raise Forbidden(f"no valid cosignature by site {site.name}'s witness key {vkey}: {exc}") from exc
    except (FormatError, AuditError) as exc:
        raise BadRequest(f"not a cosigned checkpoint: {exc}") from exc
    signed = session.get(AuditCheckpoint, cp.size)
    if signed is None or note_text(signed.note) != note.text:
        raise Conflict(f"the controller signed no checkpoint with this text at size {cp.size}")
    cosignature = note.signatures[0]
    line = cosignature.line().rstrip("\n")
    stored = session.get(LogCosignature, site.id, populate_existing=True)
    if stored is not None and stored.size > cp.size:
        raise Conflict(f"site {site.name} cosigned size {stored.size} already; a cosignature of {cp.size} is older")
    if stored is None:
        stored = LogCosignature(site_id=site.id)
        session.add(stored)
    stored.size, stored.witness_vkey, stored.line = cp.size, vkey, line
    stored.timestamp, stored.received_at = int(cosignature.timestamp or 0), utcnow()
    session.commit()
    return stored


def refused(session: Session, site: Site, report: dict[str, object]) -> None:
    """Record a site's report of a checkpoint it refused (the site keeps serving; an operator must look); commits."""
    log.error("site %s refused a checkpoint of the controller's audit log: %s", site.name, report.get("reason"))
    change = ControllerLogRefused(
        site.id,
        site.name,
        str(report["reason"]),
        report.get("cosigned_size"),  # type: ignore[arg-type]
        report.get("cosigned_root"),  # type: ignore[arg-type]
        report.get("presented_size"),  # type: ignore[arg-type]
        report.get("presented_root"),  # type: ignore[arg-type]
        report.get("checkpoint_sha256"),  # type: ignore[arg-type]
    )
    audit_trail.record(session, change)
    session.commit()


def export(session: Session, trail: AuditTrail, directory: Path, witnesses: int = 0) -> Path:
    """Export the log with the sites' cosignatures, as a .tar.gz in a new directory under `directory`.

    With `witnesses` 0 the export is cut at a checkpoint signed now (everything so far); with K it is
    cut at the newest checkpoint at least K sites cosigned (their latest cosignatures are of it or of
    a later one), so that a quorum of K can be checked. Every site's latest cosignature travels with
    it: of the export's checkpoint inside `checkpoint` (up to the cap), of others under `cosigned/`
    with a consistency proof to it.
    """
    records = list(session.scalars(select(LogCosignature).order_by(LogCosignature.size.desc())))
    if witnesses > 0:
        if len(records) < witnesses:
            raise Conflict(f"{len(records)} sites have cosigned a checkpoint of the controller's log, not {witnesses}")
        cut = session.get(AuditCheckpoint, records[witnesses - 1].size)
        if cut is None:
            raise Conflict(f"the checkpoint of size {records[witnesses - 1].size} is no longer kept")
        signed = cut.note
    else:
        signed = trail.checkpoint()
    size = parse_checkpoint(note_text(signed)).size
    by_size: dict[int, list[str]] = defaultdict(list)
    for record in records:
        by_size[record.size].append(record.line)
    own = by_size.pop(size, [])
    others: list[CosignedCheckpoint] = []
    for chunk in range(COSIGNATURES_PER_NOTE, len(own), COSIGNATURES_PER_NOTE):
        others.append(CosignedCheckpoint(size, _with_cosignatures(signed, own[chunk:])))
    for other_size, lines in sorted(by_size.items()):
        kept = session.get(AuditCheckpoint, other_size)
        if kept is None:
            continue  # pruned: too old to matter next to the newer checkpoints kept
        low, high = sorted((other_size, size))
        proof = tuple(trail.log.consistency_proof(low, high)) if low > 0 else ()
        for chunk in range(0, len(lines), COSIGNATURES_PER_NOTE):
            others.append(CosignedCheckpoint(other_size, _with_cosignatures(kept.note, lines[chunk:]), proof))
    audit_log = trail.log
    dest = Path(tempfile.mkdtemp(dir=directory, prefix="audit-export-")) / "controller-audit.tar.gz"
    vkeys = [audit_log.vkey] if audit_log.vkey else []
    return write_export(audit_log, _with_cosignatures(signed, own), dest, vkeys, others)
