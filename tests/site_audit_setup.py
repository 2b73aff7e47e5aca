"""A site's audit log (`agent.site_audit.SiteAudit`) on a data dir of its own, for tests of it alone."""

from __future__ import annotations

from pathlib import Path

from agent.config import AuditSettings
from agent.identity import DataDir, Identity
from agent.site_audit import SiteAudit
from sitewarden.keys import generate_key

IDENTITY = Identity(
    site_id="3f1c2b8e-5d7a-4e0b-9c6f-1a2b3c4d5e6f",
    site_name="branch-t",
    controller_url="https://127.0.0.1:1",
    root_sha256="00" * 32,
    enrolled_at="2026-12-06T09:00:00Z",
    witness_vkey="",
)


def open_site_audit(data_dir: Path, settings: AuditSettings) -> SiteAudit:
    """The audit log of the site data dir `data_dir`, its keys made the first time."""
    data = DataDir(data_dir)
    data.keys.mkdir(parents=True, exist_ok=True)
    if not data.site_key_file.exists():
        generate_key(data.site_key_file)
        data.hmac_file.write_text("11" * 32)
    return SiteAudit(data, IDENTITY, settings)
