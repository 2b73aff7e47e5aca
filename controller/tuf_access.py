"""Who may read which TUF target: a site what its desired state names, a person what their role reads.

The TUF repository holds every release's files (model weights, some fine-tuned on regulated
data) and every site's desired state. Signatures protect their integrity, not their secrecy,
so the routes `/tuf/metadata/...` and `/tuf/targets/...` are served only to enrolled sites
and people (`access.SITE_OR_PERSON`), and each target is narrowed further here:

- a site reads its own desired-state document, `sites/<its id>/desired.json`, and the targets
  its current desired state names (every `target` in the document: manifests, files and
  approvals of its releases and policy), plus what every site may read
  (`SITE_READABLE_PREFIXES`);
- a person reads a desired-state document with a role that may read desired states through
  the API (`access.READERS`), and any other target with a role that may download release
  files (`access.REVIEWERS`).

Anything else is answered as if the target did not exist (404): a site learns nothing of
another site's desired state or of releases not meant for it. Metadata (which names targets
and their hashes, never their bytes) is served to every authenticated caller.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.access import READERS, REVIEWERS
from controller.auth import Principal
from controller.db import DesiredState
from sitewarden.desired import target_path as desired_target

SITE_READABLE_PREFIXES: tuple[str, ...] = ()
"""Target path prefixes every enrolled site may read whatever its desired state (none yet)."""

_HASH_PREFIXED = re.compile(r"(?P<sha256>[0-9a-f]{64})\.(?P<name>.+)", re.DOTALL)


def target_path(url_path: str) -> str | None:
    """The target path `<dir>/<name>` of a consistent-snapshot URL path `<dir>/<sha256>.<name>`, or None."""
    directory, sep, filename = url_path.rpartition("/")
    match = _HASH_PREFIXED.fullmatch(filename)
    return f"{directory}{sep}{match['name']}" if match else None


def person_may_read(caller: Principal, path: str) -> bool:
    """Whether a person's role reads this target through the REST API too."""
    roles = READERS if path.startswith("sites/") else REVIEWERS
    return caller.role in roles


def _named_targets(document: Any) -> set[str]:
    """Every `target` path a desired-state document names, wherever it is in the document."""
    found: set[str] = set()
    if isinstance(document, dict):
        for key, value in document.items():
            if key == "target" and isinstance(value, str):
                found.add(value)
            else:
                found |= _named_targets(value)
    elif isinstance(document, list):
        for item in document:
            found |= _named_targets(item)
    return found


class TufAccess:
    """Decides target reads; remembers, per site, the targets of its current desired-state version."""

    def __init__(self) -> None:
        self._named: dict[str, tuple[int, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def site_may_read(self, session: Session, site_id: str, path: str) -> bool:
        """Whether the site may read the target `path` (reads its current desired-state version)."""
        if path == desired_target(site_id) or path.startswith(SITE_READABLE_PREFIXES):
            return True
        if path.startswith("sites/"):
            return False  # another site's documents: never, whatever a desired state says
        return path in self.named_by(session, site_id)

    def named_by(self, session: Session, site_id: str) -> frozenset[str]:
        """The targets the site's current desired state names (empty without one)."""
        version = session.scalar(
            select(DesiredState.version)
            .where(DesiredState.site_id == site_id)
            .order_by(DesiredState.version.desc())
            .limit(1)
        )
        if version is None:
            return frozenset()
        with self._lock:
            cached = self._named.get(site_id)
        if cached is not None and cached[0] == version:
            return cached[1]
        document = session.scalar(
            select(DesiredState.document).where(DesiredState.site_id == site_id, DesiredState.version == version)
        )
        named = frozenset(_named_targets(document))
        with self._lock:
            self._named[site_id] = (version, named)
        return named
