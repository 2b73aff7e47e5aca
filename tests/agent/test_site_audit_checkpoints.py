"""The site's periodic checkpoints: an entry appended while a checkpoint is being signed is in the next one.

The witness loop signs a checkpoint when entries are waiting and `checkpoint_seconds` have passed; requests
are appended by other threads meanwhile. An entry that lands between the signature and the bookkeeping must
still count as unsigned, or it stays out of every checkpoint (and unwitnessed) until the next request comes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AuditSettings
from agent.site_audit import SiteAudit
from tests.site_audit_setup import open_site_audit


def open_audit(tmp_path: Path) -> SiteAudit:
    return open_site_audit(tmp_path / "data", AuditSettings(checkpoint_entries=1_000, checkpoint_seconds=0))


def test_an_entry_appended_while_a_checkpoint_is_signed_is_in_the_next_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = open_audit(tmp_path)
    try:
        for n in range(3):
            audit.record({"type": "inference", "request_id": f"r-{n}"})
        sign = audit.log.checkpoint

        def signed_then_a_request_lands() -> str:
            signed = sign()
            audit.record({"type": "inference", "request_id": "r-late"})  # as a serving thread would
            return signed

        monkeypatch.setattr(audit.log, "checkpoint", signed_then_a_request_lands)
        assert audit.checkpoint_due()
        audit.checkpoint()
        monkeypatch.undo()
        assert audit.log.last_checkpoint().size == 3 and audit.log.size == 4  # type: ignore[union-attr]
        assert audit.checkpoint_due(), "the late entry must still be waiting for a checkpoint"
        audit.checkpoint()
        assert audit.log.last_checkpoint().size == 4  # type: ignore[union-attr]
        assert not audit.checkpoint_due()
    finally:
        audit.close()
