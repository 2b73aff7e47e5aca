"""The controller's TUF repository: every release file, approval bundle and site desired-state
document is a target that agents fetch and verify with python-tuf's ``ngclient.Updater``.

Built on python-tuf's Metadata API and its ``tuf.repository.Repository`` editing pattern.
References below are to the TUF specification 1.0 (theupdateframework.github.io/specification)
and to TAP 15 (succinct hash bin delegations). What ``TufRepository`` does:

  * ``create()`` signs version 1 of every role into ``<directory>/metadata/``: root (Ed25519 keys,
    threshold 1, ``consistent_snapshot`` true), a top-level targets role that holds no targets and
    delegates every path to ``2**k`` hash bins (TAP 15 ``succinct_roles``, signed with the online
    targets key), one targets file per bin, snapshot and timestamp. The root key may be written
    outside ``key_dir`` and kept offline (spec §6.1); targets, snapshot and timestamp keys are
    online and loaded at ``open()``.
  * Files are named as consistent snapshots require (spec §6.2): ``<version>.<role>.json`` for
    root, targets, the bins and snapshot, plain ``timestamp.json`` for timestamp. Every root
    version stays published, so clients can walk the chain (spec §5.3, §6.2).
  * ``add_targets()`` / ``remove_targets()`` publish a new version of each bin they touch, then of
    snapshot, then of timestamp (spec §6.3) and nothing else, so adding one target re-signs three
    files however many targets the repository holds. Unchanged targets are a no-op.
  * Publishing is crash-safe: every file goes through temp file + fsync + rename, versioned files
    are written (and their directory synced) before ``timestamp.json``, the only file clients read
    without a version. Until timestamp is replaced clients keep seeing the previous, complete
    snapshot; files left behind by a crash are never referenced and are overwritten next time.
    Published roots are never overwritten.
  * ``refresh()`` re-signs online roles with less than half their lifetime left, so clients never
    hit the freeze checks (spec §5.4.4, §5.5.6, §5.6.5). Root needs the offline key: ``refresh()``
    only warns; ``rotate_root()`` renews it.
  * ``rotate_root()`` publishes root N+1 with the new root key in place of the old one, signed by
    both (spec §5.3.4, §6.1).
  * ``metadata_file()`` and ``resolve_target()`` map the paths ngclient requests
    (``/tuf/metadata/<name>``, ``/tuf/targets/<dir>/<sha256>.<name>``) to a metadata file or to
    the SHA-256 of a blob, and return None for anything else, so no request path reaches the
    file system unchecked.

One controller process owns the repository: a lock serialises publication between request
threads, and the in-memory copy of the current metadata is the truth between publications.
Two processes publishing into one directory are not supported.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import tempfile
import threading
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from copy import deepcopy
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from securesystemslib.exceptions import FormatError as CanonicalJSONError
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    SuccinctRoles,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError
from tuf.repository import AbortEdit, Repository

from controller.config import Expiries
from controller.errors import ControllerError
from sitewarden import keys as sitewarden_keys
from sitewarden.errors import CredentialError
from sitewarden.files import fsync_dir

__all__ = [
    "BIN_PREFIX",
    "DEFAULT_BINS",
    "Expiries",
    "KeyFileError",
    "RepositoryStateError",
    "TargetError",
    "TargetSpec",
    "TufError",
    "TufKeys",
    "TufRepository",
    "check_initial_root",
    "check_target_path",
    "generate_keys",
    "load_signer",
    "sign_initial_root",
]

log = logging.getLogger(__name__)
_SignedT = TypeVar("_SignedT", bound=Signed)

METADATA_DIR = "metadata"
TIMESTAMP_FILE = "timestamp.json"
BIN_PREFIX = "bin"
DEFAULT_BINS = 64
MAX_BINS = 1 << 14
MAX_TARGET_PATH = 1024
ONLINE_ROLES = (Targets.type, Snapshot.type, Timestamp.type)

_TMP_PREFIX = ".tuf-tmp-"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASH_PREFIXED = re.compile(r"(?P<sha256>[0-9a-f]{64})\.(?P<name>.+)", re.DOTALL)
# A version is 1 to 16 decimal digits without a leading zero; role names are ASCII.
_METADATA_NAME = re.compile(r"(?:(?P<version>[1-9][0-9]{0,15})\.)?(?P<role>[a-z][a-z0-9-]{0,63})\.json")
_ROOT_FILE = re.compile(r"(?P<version>[1-9][0-9]{0,15})\.root\.json")
# ngclient appends the target path to the base URL unquoted: these would change the URL's meaning.
_URL_SIGNIFICANT = frozenset("?#%\\")
_PUBLISH_ORDER = {Root.type: 0, Targets.type: 1, Snapshot.type: 3, Timestamp.type: 4}


# --- errors -------------------------------------------------------------------------------------


class TufError(ControllerError):
    """Base class of everything this module raises on purpose."""

    status, slug, title = 500, "tuf-error", "TUF repository error"


class TargetError(TufError, ValueError):
    """A target path or a target's length, hash or custom data is not acceptable."""

    status, slug, title = 400, "invalid-target", "Invalid TUF target"


class KeyFileError(TufError):
    """A key file is missing, malformed, not Ed25519, would be overwritten, or is not the key
    the repository's metadata names for its role."""


class RepositoryStateError(TufError):
    """The metadata directory is missing, already initialised, or does not verify."""


# --- values ---------------------------------------------------------------------------------------


class TargetSpec(NamedTuple):
    """What a target's metadata says about it: length in bytes, SHA-256 (lowercase hex) and an
    optional ``custom`` object (canonical-JSON values: no floats). A plain ``(length, sha256)``
    tuple is accepted wherever a ``TargetSpec`` is."""

    length: int
    sha256: str
    custom: Mapping[str, Any] | None = None

    @classmethod
    def for_bytes(cls, data: bytes, custom: Mapping[str, Any] | None = None) -> TargetSpec:
        return cls(len(data), hashlib.sha256(data).hexdigest(), custom)


@dataclass(frozen=True)
class TufKeys:
    """Where the private keys of the four top-level roles live (Ed25519, PKCS#8 PEM, mode 0600).

    The hash bins are signed with the targets key. Names carry a ``tuf-`` prefix because the
    controller's key directory also holds other keys (the audit log's)."""

    root: Path
    targets: Path
    snapshot: Path
    timestamp: Path

    @classmethod
    def in_dir(cls, key_dir: Path, root_key_path: Path | None = None) -> TufKeys:
        """The layout of a key directory; the root key is elsewhere when ``root_key_path`` is given."""
        key_dir = Path(key_dir)
        root = Path(root_key_path) if root_key_path is not None else key_dir / "tuf-root.pem"
        return cls(
            root=root,
            targets=key_dir / "tuf-targets.pem",
            snapshot=key_dir / "tuf-snapshot.pem",
            timestamp=key_dir / "tuf-timestamp.pem",
        )

    def path(self, role: str) -> Path:
        return {
            Root.type: self.root,
            Targets.type: self.targets,
            Snapshot.type: self.snapshot,
            Timestamp.type: self.timestamp,
        }[role]


def generate_keys(key_dir: Path, root_key_out: Path | None = None) -> TufKeys:
    """Create a fresh Ed25519 key for each top-level role; refuse if any key file already exists.

    ``root_key_out`` puts the root key outside ``key_dir`` (to be moved offline after ``create``).
    """
    paths = TufKeys.in_dir(key_dir, root_key_out)
    existing = [str(p) for p in (paths.root, paths.targets, paths.snapshot, paths.timestamp) if p.exists()]
    if existing:
        raise KeyFileError(f"refusing to overwrite existing key files: {', '.join(existing)}")
    for path in (paths.root, paths.targets, paths.snapshot, paths.timestamp):
        _mkdir_private(path.parent)
        try:
            sitewarden_keys.generate_key(path)
        except CredentialError as exc:
            raise KeyFileError(str(exc)) from exc
        fsync_dir(path.parent)
    return paths


def load_signer(path: Path) -> CryptoSigner:
    """A securesystemslib signer for the Ed25519 PKCS#8 PEM private key at ``path``."""
    path = Path(path)
    try:
        private_key = sitewarden_keys.load_private_key(path)
    except CredentialError as exc:
        raise KeyFileError(str(exc)) from exc
    with suppress(OSError):
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            log.warning("key file %s is readable by group or others; it should be mode 0600", path)
    return CryptoSigner(private_key)


def check_target_path(path: str) -> str:
    """Return ``path`` if it can be a target path, else raise ``TargetError``.

    A target path is a relative URL path (spec §4.5 TARGETPATH) that ngclient appends to the
    targets base URL without quoting: NFC text, no leading '/', no empty, '.' or '..' segments,
    no control characters and none of ``? # % \\``, at most 1024 characters.
    """
    if not isinstance(path, str) or not path:
        raise TargetError(f"target path {path!r} must be a non-empty string")
    if len(path) > MAX_TARGET_PATH:
        raise TargetError(f"target path {path[:64]!r}... is longer than {MAX_TARGET_PATH} characters")
    if unicodedata.normalize("NFC", path) != path:
        raise TargetError(f"target path {path!r} must be NFC-normalised")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise TargetError(f"target path {path!r} contains control characters")
    if bad := sorted(_URL_SIGNIFICANT.intersection(path)):
        raise TargetError(f"target path {path!r} contains {' '.join(bad)}, which would change its URL")
    if any(segment in {"", ".", ".."} for segment in path.split("/")):
        raise TargetError(f"target path {path!r} must be relative, without empty, '.' or '..' segments")
    return path


# --- the repository -------------------------------------------------------------------------------


class TufRepository:
    """A TUF repository in a directory, published by this process. Use ``create()`` or ``open()``."""

    def __init__(
        self,
        metadata_dir: Path,
        *,
        committed: dict[str, Metadata[Any]],
        root_bytes: bytes,
        signers: Mapping[str, Signer],
        expiries: Expiries,
        clock: Callable[[], datetime],
    ) -> None:
        delegations = committed[Targets.type].signed.delegations
        if delegations is None or delegations.succinct_roles is None:
            raise RepositoryStateError(f"{metadata_dir}: targets metadata does not delegate to hash bins")
        self._metadata_dir = metadata_dir
        self._committed = committed
        self._root_bytes = root_bytes
        self._signers = dict(signers)
        self._expiries = expiries
        self._clock = clock
        self._succinct: SuccinctRoles = delegations.succinct_roles
        self._bins: tuple[str, ...] = tuple(self._succinct.get_roles())
        # Target paths whose content changed or that were removed, with the SHA-256 they had
        # before: a client holding the previous bin version may still ask for it (see resolve_target).
        self._previous: dict[str, str] = {}
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: Path,
        key_dir: Path,
        *,
        root_key_path: Path | None = None,
        expiries: Expiries | None = None,
        bins: int = DEFAULT_BINS,
        clock: Callable[[], datetime] | None = None,
        signed_root: bytes | None = None,
    ) -> TufRepository:
        """Sign and write version 1 of every role into ``directory/metadata`` (which must be empty).

        Keys come from ``TufKeys.in_dir(key_dir, root_key_path)`` (see ``generate_keys``). ``bins``
        is the number of hash bins, a power of two from 2 to 16384; it cannot change later.
        ``signed_root`` is root version 1 signed elsewhere with the offline root key
        (``sign_initial_root``): it is checked (``check_initial_root``) and published byte for byte,
        and the root key is not needed here.
        """
        if not (2 <= bins <= MAX_BINS and bins & (bins - 1) == 0):
            raise ValueError(f"bins must be a power of two from 2 to {MAX_BINS}, got {bins}")
        expiries = expiries or Expiries()
        clock = clock or _utcnow
        metadata_dir = Path(directory) / METADATA_DIR
        if metadata_dir.exists() and any(metadata_dir.iterdir()):
            raise RepositoryStateError(f"{metadata_dir} is not empty; a repository exists there (use open)")
        paths = TufKeys.in_dir(key_dir, root_key_path)
        online = {role: load_signer(paths.path(role)) for role in ONLINE_ROLES}
        root_signers = [] if signed_root is not None else [load_signer(paths.root)]
        checked_root = check_initial_root(signed_root, online, _utc(clock())) if signed_root is not None else None
        metadata_dir.mkdir(parents=True, exist_ok=True)

        targets_key = online[Targets.type].public_key
        succinct = SuccinctRoles([targets_key.keyid], 1, bins.bit_length() - 1, BIN_PREFIX)
        publication = _Publication(
            committed={},
            signers={Root.type: root_signers, **{role: [signer] for role, signer in online.items()}},
            expiries=expiries,
            now=_utc(clock()),
            targets_roles=[Targets.type, *succinct.get_roles()],
        )
        if checked_root is not None:
            publication.staged[Root.type] = checked_root
        else:
            _edit_initial_root(publication, root_signers[0], online)
        with publication.edit_targets() as targets:
            targets.delegations = Delegations({targets_key.keyid: targets_key}, succinct_roles=succinct)
        for bin_name in succinct.get_roles():
            with publication.edit_targets(bin_name):
                pass
        publication.do_snapshot()
        publication.do_timestamp()

        staged = publication.staged
        repo = cls(
            metadata_dir,
            committed=dict(staged),
            root_bytes=signed_root if signed_root is not None else staged[Root.type].to_bytes(),
            signers=online,
            expiries=expiries,
            clock=clock,
        )
        repo._commit(publication, verbatim={Root.type: signed_root} if signed_root is not None else None)
        log.info("created TUF repository in %s with %d hash bins", metadata_dir, bins)
        return repo

    @classmethod
    def open(
        cls,
        directory: Path,
        key_dir: Path,
        *,
        expiries: Expiries | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> TufRepository:
        """Load and verify the current metadata of an existing repository and its online keys."""
        metadata_dir = Path(directory) / METADATA_DIR
        if not (metadata_dir / TIMESTAMP_FILE).is_file():
            raise RepositoryStateError(f"no TUF repository in {metadata_dir} (timestamp.json is missing); create one")
        _remove_stale_temp_files(metadata_dir)

        root_versions = sorted(int(m["version"]) for p in metadata_dir.iterdir() if (m := _ROOT_FILE.fullmatch(p.name)))
        if not root_versions or root_versions != list(range(1, root_versions[-1] + 1)):
            raise RepositoryStateError(f"{metadata_dir}: root versions {root_versions} are not 1..N")
        root_bytes = _read(metadata_dir / f"{root_versions[-1]}.root.json")
        root_md: Metadata[Root] = _parse(root_bytes, Root, f"{root_versions[-1]}.root.json")
        root = root_md.signed
        _verify(root, Root.type, root_md)
        if not root.consistent_snapshot:
            raise RepositoryStateError(f"{metadata_dir}: root does not enable consistent snapshots")

        timestamp_md = _parse(_read(metadata_dir / TIMESTAMP_FILE), Timestamp, TIMESTAMP_FILE)
        _verify(root, Timestamp.type, timestamp_md)
        name = f"{timestamp_md.signed.snapshot_meta.version}.snapshot.json"
        snapshot_md = _parse(_read(metadata_dir / name), Snapshot, name)
        _verify(root, Snapshot.type, snapshot_md)
        committed: dict[str, Metadata[Any]] = {
            Root.type: root_md,
            Timestamp.type: timestamp_md,
            Snapshot.type: snapshot_md,
        }
        targets_md = _load_targets(metadata_dir, snapshot_md.signed, Targets.type)
        _verify(root, Targets.type, targets_md)
        committed[Targets.type] = targets_md
        delegations = targets_md.signed.delegations
        if delegations is None or delegations.succinct_roles is None:
            raise RepositoryStateError(f"{metadata_dir}: targets metadata does not delegate to hash bins")
        for bin_name in delegations.succinct_roles.get_roles():
            bin_md = _load_targets(metadata_dir, snapshot_md.signed, bin_name)
            _verify(targets_md.signed, bin_name, bin_md)
            committed[bin_name] = bin_md

        paths = TufKeys.in_dir(key_dir)
        online = {role: load_signer(paths.path(role)) for role in ONLINE_ROLES}
        for role, signer in online.items():
            if signer.public_key.keyid not in root.roles[role].keyids:
                raise KeyFileError(f"{paths.path(role)} is not a {role} key of root version {root.version}")
        if online[Targets.type].public_key.keyid not in delegations.succinct_roles.keyids:
            raise KeyFileError(f"{paths.targets} is not the key the hash bins are delegated to")
        return cls(
            metadata_dir,
            committed=committed,
            root_bytes=root_bytes,
            signers=online,
            expiries=expiries or Expiries(),
            clock=clock or _utcnow,
        )

    # -- publishing ---------------------------------------------------------------------------

    def add_targets(self, targets: Mapping[str, TargetSpec | tuple[int, str]]) -> list[str]:
        """Publish ``targets`` (path -> spec), adding new paths and replacing changed ones.

        Returns the roles that got a new version: the bins touched, then snapshot and timestamp;
        empty when every target was already published exactly so. Replacing a path's hash is
        allowed here (desired-state documents change); releases are immutable one layer up.
        """
        wanted = {check_target_path(path): _target_file(path, spec) for path, spec in targets.items()}
        with self._lock:
            by_bin: dict[str, list[TargetFile]] = {}
            for path, target in wanted.items():
                by_bin.setdefault(self._succinct.get_role_for_target(path), []).append(target)
            publication = self._publication()
            superseded: dict[str, str] = {}
            for bin_name, bin_targets in sorted(by_bin.items()):
                with publication.edit_targets(bin_name) as bin_role:
                    changed = [t for t in bin_targets if bin_role.targets.get(t.path) != t]
                    if not changed:
                        raise AbortEdit
                    for target in changed:
                        if (old := bin_role.targets.get(target.path)) is not None:
                            superseded[target.path] = old.hashes["sha256"]
                        bin_role.targets[target.path] = target
            return self._finish(publication, superseded)

    def remove_targets(self, paths: Iterable[str]) -> list[str]:
        """Stop publishing ``paths``; unknown paths are ignored. Returns the roles re-signed."""
        wanted = sorted({check_target_path(path) for path in paths})
        with self._lock:
            by_bin: dict[str, list[str]] = {}
            for path in wanted:
                by_bin.setdefault(self._succinct.get_role_for_target(path), []).append(path)
            publication = self._publication()
            superseded: dict[str, str] = {}
            for bin_name, bin_paths in sorted(by_bin.items()):
                with publication.edit_targets(bin_name) as bin_role:
                    present = [p for p in bin_paths if p in bin_role.targets]
                    if not present:
                        raise AbortEdit
                    for path in present:
                        superseded[path] = bin_role.targets.pop(path).hashes["sha256"]
            return self._finish(publication, superseded)

    def refresh(self, now: datetime | None = None) -> list[str]:
        """Re-sign every online role with less than half its lifetime left; return those re-signed.

        Call it periodically (well within the timestamp lifetime). A second call right after
        changes nothing. Root is only checked: renewing it needs the offline key (``rotate_root``).
        """
        with self._lock:
            publication = self._publication(now)
            at = publication.now
            for role in (Targets.type, *self._bins):
                if self._expiring(role, at):
                    with publication.edit_targets(role):
                        pass
            if self._expiring(Root.type, at):
                log.warning(
                    "TUF root version %d expires at %s; sign a new version with the root key (rotate-root)",
                    self._committed[Root.type].signed.version,
                    self._committed[Root.type].signed.expires.isoformat(),
                )
            return self._finish(
                publication,
                force_snapshot=self._expiring(Snapshot.type, at),
                force_timestamp=self._expiring(Timestamp.type, at),
            )

    def rotate_root(self, new_root_key_path: Path, old_root_key_path: Path) -> int:
        """Publish the next root version with the new root key replacing the old one, signed by
        both keys (spec §5.3.4), and return its version. Rotating to the same key renews root's
        expiry. Targets, snapshot and timestamp keys stay as they are."""
        old_signer = load_signer(old_root_key_path)
        new_signer = load_signer(new_root_key_path)
        old_id, new_id = old_signer.public_key.keyid, new_signer.public_key.keyid
        with self._lock:
            current = self._committed[Root.type]
            if old_id not in current.signed.roles[Root.type].keyids:
                raise KeyFileError(f"{old_root_key_path} is not a root key of root version {current.signed.version}")
            signers = [old_signer] if new_id == old_id else [old_signer, new_signer]
            publication = self._publication(root_signers=signers)
            with publication.edit_root() as root:
                if new_id != old_id:
                    root.add_key(new_signer.public_key, Root.type)
                    root.revoke_key(old_id, Root.type)
            new_root = publication.staged[Root.type]
            # What a client checks (spec §5.3.4): signed by a threshold of the old and of the new root.
            _verify(current.signed, Root.type, new_root)
            _verify(new_root.signed, Root.type, new_root)
            self._commit(publication)
            log.info("published TUF root version %d", new_root.signed.version)
            return new_root.signed.version

    # -- reading ------------------------------------------------------------------------------

    def root_json(self) -> bytes:
        """The current root metadata, byte for byte as published (what enrollment hands out)."""
        with self._lock:
            return self._root_bytes

    def root_sha256(self) -> str:
        """SHA-256 (hex) of ``root_json()``, the value a join token carries."""
        return hashlib.sha256(self.root_json()).hexdigest()

    @property
    def bins(self) -> tuple[str, ...]:
        """Names of the hash bins, ``bin-00`` ... in order."""
        return self._bins

    def bin_for(self, path: str) -> str:
        """The hash bin responsible for a target path (TAP 15: leading bits of SHA-256(path))."""
        return self._succinct.get_role_for_target(path)

    def version(self, role: str) -> int:
        """The current version of a role (``root``, ``targets``, ``snapshot``, ``timestamp``, a bin)."""
        with self._lock:
            return self._committed[role].signed.version

    def expires(self, role: str) -> datetime:
        """When the current version of a role expires."""
        with self._lock:
            return self._committed[role].signed.expires

    def get_target(self, path: str) -> TargetSpec | None:
        """What the repository currently publishes for ``path``, or None."""
        with self._lock:
            target = self._current_target(path)
        if target is None:
            return None
        return TargetSpec(target.length, target.hashes["sha256"], target.custom)

    def metadata_file(self, name: str) -> Path | None:
        """The file to serve for ``/tuf/metadata/<name>``, or None (the route answers 404).

        Accepts only the names ngclient asks for with consistent snapshots (spec §5.3.3, §5.4.1,
        §5.5.1, §5.6.1): ``timestamp.json`` and ``<version>.<role>.json`` for root, snapshot,
        targets and this repository's bins; anything else, including any path, is None.
        """
        match = _METADATA_NAME.fullmatch(name) if isinstance(name, str) else None
        if match is None:
            return None
        role, versioned = match["role"], match["version"] is not None
        if role == Timestamp.type:
            acceptable = not versioned
        elif role in (Root.type, Snapshot.type, Targets.type) or self._succinct.is_delegated_role(role):
            acceptable = versioned
        else:
            acceptable = False
        path = self._metadata_dir / name
        return path if acceptable and path.is_file() else None

    def resolve_target(self, url_path: str) -> str | None:
        """The SHA-256 of the blob to serve for ``/tuf/targets/<url_path>``, or None.

        ``url_path`` is the decoded consistent-snapshot path ``<dir>/<sha256>.<name>`` (spec §5.7.3)
        of target ``<dir>/<name>``. It resolves when the hash is the target's current one, or the
        one it had just before it last changed or was removed in this process (a client that read
        the previous bin version may still ask for it; the client checks the bytes either way).
        """
        if not isinstance(url_path, str):
            return None
        directory, sep, filename = url_path.rpartition("/")
        match = _HASH_PREFIXED.fullmatch(filename)
        if match is None:
            return None
        path, sha256 = f"{directory}{sep}{match['name']}", match["sha256"]
        try:
            check_target_path(path)
        except TargetError:
            return None
        with self._lock:
            target = self._current_target(path)
            if target is not None and target.hashes.get("sha256") == sha256:
                return sha256
            return sha256 if self._previous.get(path) == sha256 else None

    # -- internals ----------------------------------------------------------------------------

    def _current_target(self, path: str) -> TargetFile | None:
        return self._committed[self._succinct.get_role_for_target(path)].signed.targets.get(path)

    def _publication(self, now: datetime | None = None, root_signers: Sequence[Signer] = ()) -> _Publication:
        signers: dict[str, Sequence[Signer]] = {role: [signer] for role, signer in self._signers.items()}
        if root_signers:
            signers[Root.type] = root_signers
        return _Publication(
            committed=self._committed,
            signers=signers,
            expiries=self._expiries,
            now=_utc(now if now is not None else self._clock()),
            targets_roles=[Targets.type, *self._bins],
        )

    def _expiring(self, role: str, now: datetime) -> bool:
        return self._committed[role].signed.expires - now < _lifetime(self._expiries, role) / 2

    def _finish(
        self,
        publication: _Publication,
        superseded: Mapping[str, str] | None = None,
        *,
        force_snapshot: bool = False,
        force_timestamp: bool = False,
    ) -> list[str]:
        """Add snapshot and timestamp to a publication of targets roles (spec §6.3.2, §6.3.3), commit it."""
        publication.do_snapshot(force=force_snapshot)
        publication.do_timestamp(force=force_timestamp)
        roles = self._commit(publication)
        self._previous.update(superseded or {})
        return roles

    def _commit(self, publication: _Publication, verbatim: Mapping[str, bytes] | None = None) -> list[str]:
        """Write the staged versions (versioned files first, timestamp.json last), then adopt them.

        ``verbatim`` gives the bytes of a role signed elsewhere (an offline root), published as they are.
        """
        staged = publication.staged
        roles = sorted(staged, key=lambda role: (_PUBLISH_ORDER.get(role, 2), role))
        encoded = {role: (verbatim or {}).get(role) or staged[role].to_bytes() for role in roles}
        for role in roles:
            if role != Timestamp.type:
                name = f"{staged[role].signed.version}.{role}.json"
                _write_file(self._metadata_dir / name, encoded[role], replace=role != Root.type)
        if roles:
            fsync_dir(self._metadata_dir)
        if Timestamp.type in encoded:
            _write_file(self._metadata_dir / TIMESTAMP_FILE, encoded[Timestamp.type], replace=True)
            fsync_dir(self._metadata_dir)
        self._committed.update(staged)
        if Root.type in encoded:
            self._root_bytes = encoded[Root.type]
        return roles


class _Publication(Repository):
    """One publication: edits staged on top of the committed metadata.

    python-tuf's ``Repository`` supplies the editing pattern (``edit_*`` context managers,
    ``AbortEdit``) and the snapshot/timestamp bookkeeping with its rollback checks (``do_snapshot``,
    ``do_timestamp``); this class only says where metadata comes from and goes to. Nothing it
    stages is visible to clients or to the repository until ``TufRepository._commit`` writes it.
    """

    def __init__(
        self,
        committed: Mapping[str, Metadata[Any]],
        signers: Mapping[str, Sequence[Signer]],
        expiries: Expiries,
        now: datetime,
        targets_roles: Sequence[str],
    ) -> None:
        self._committed = committed
        self._signers = signers
        self._expiries = expiries
        self._targets_roles = targets_roles
        self.now = now
        self.staged: dict[str, Metadata[Any]] = {}

    def _current(self, role: str) -> Metadata[Any] | None:
        staged = self.staged.get(role)
        return staged if staged is not None else self._committed.get(role)

    def open(self, role: str) -> Metadata[Any]:
        current = self._current(role)
        if current is not None:
            return deepcopy(current)
        initial: dict[str, type[Signed]] = {Root.type: Root, Snapshot.type: Snapshot, Timestamp.type: Timestamp}
        fresh: Metadata[Any] = Metadata(initial.get(role, Targets)())
        fresh.signed.version = 0  # close() makes it version 1
        return fresh

    def close(self, role: str, md: Metadata[Any]) -> None:
        signers = self._signers.get(_signing_role(role), ())
        if not signers:
            raise KeyFileError(f"no signing key is loaded for role {role}")
        md.signed.version += 1
        md.signed.expires = self.now + _lifetime(self._expiries, role)
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        self.staged[role] = md

    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        infos = {}
        for role in self._targets_roles:
            current = self._current(role)
            if current is None:
                raise RepositoryStateError(f"targets role {role} has no metadata")
            infos[f"{role}.json"] = MetaFile(version=current.signed.version)
        return infos

    @property
    def snapshot_info(self) -> MetaFile:
        current = self._current(Snapshot.type)
        if current is None:
            raise RepositoryStateError("snapshot has no metadata")
        return MetaFile(version=current.signed.version)


# --- the initial root, signed here or offline -----------------------------------------------------


def _edit_initial_root(publication: _Publication, root_signer: Signer, online: Mapping[str, Signer]) -> None:
    with publication.edit_root() as root:
        root.consistent_snapshot = True
        for role, signer in [(Root.type, root_signer), *online.items()]:
            root.add_key(signer.public_key, role)


def sign_initial_root(
    root_key_path: Path, key_dir: Path, expiries: Expiries | None = None, now: datetime | None = None
) -> bytes:
    """Root version 1 for the online keys in ``key_dir``, signed with the root key (on an offline machine).

    What ``create`` would publish as its first root, made where the root key lives, so that the
    controller can be set up (``create(signed_root=...)``) without the root key ever reaching it.
    """
    paths = TufKeys.in_dir(key_dir)
    online = {role: load_signer(paths.path(role)) for role in ONLINE_ROLES}
    root_signer = load_signer(root_key_path)
    publication = _Publication(
        committed={},
        signers={Root.type: [root_signer]},
        expiries=expiries or Expiries(),
        now=_utc(now or _utcnow()),
        targets_roles=[],
    )
    _edit_initial_root(publication, root_signer, online)
    return publication.staged[Root.type].to_bytes()


def check_initial_root(data: bytes, online: Mapping[str, Signer], now: datetime) -> Metadata[Root]:
    """``data`` as root version 1 of a new repository whose online keys are ``online``, or ``RepositoryStateError``.

    It must be version 1, enable consistent snapshots, be signed by a threshold of its own root
    keys (spec §5.3.4 for the first root), not have expired, and give each online role exactly
    the key this controller holds for it, with threshold 1.
    """
    root_md: Metadata[Root] = _parse(data, Root, "root.json")
    root = root_md.signed
    if root.version != 1:
        raise RepositoryStateError(f"root.json is version {root.version}; a new repository starts at version 1")
    if not root.consistent_snapshot:
        raise RepositoryStateError("root.json does not enable consistent snapshots")
    _verify(root, Root.type, root_md)
    if root.expires <= now:
        raise RepositoryStateError(f"root.json expired at {root.expires.isoformat()}; sign a new one")
    for role, signer in online.items():
        wanted = [signer.public_key.keyid]
        if root.roles[role].keyids != wanted or root.roles[role].threshold != 1:
            raise RepositoryStateError(
                f"root.json does not name the {role} key given with it (keyid {wanted[0][:16]}...) "
                "as that role's only key with threshold 1"
            )
    return root_md


# --- helpers --------------------------------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _signing_role(role: str) -> str:
    """The top-level key that signs ``role``: its own, or the targets key for a hash bin."""
    return role if role in (Root.type, Snapshot.type, Timestamp.type) else Targets.type


def _lifetime(expiries: Expiries, role: str) -> timedelta:
    seconds = {
        Root.type: expiries.root,
        Snapshot.type: expiries.snapshot,
        Timestamp.type: expiries.timestamp,
    }.get(role, expiries.targets)
    return timedelta(seconds=seconds)


def _target_file(path: str, spec: TargetSpec | tuple[int, str]) -> TargetFile:
    try:
        length, sha256, *rest = spec
    except (TypeError, ValueError):
        raise TargetError(f"target {path!r}: want (length, sha256[, custom]), got {spec!r}") from None
    custom = rest[0] if rest else None
    if len(rest) > 1:
        raise TargetError(f"target {path!r}: want (length, sha256[, custom]), got {len(spec)} values")
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise TargetError(f"target {path!r}: length must be a non-negative integer, got {length!r}")
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise TargetError(f"target {path!r}: sha256 must be 64 lowercase hex digits, got {sha256!r}")
    fields: dict[str, Any] = {}
    if custom is not None:
        if not isinstance(custom, Mapping):
            raise TargetError(f"target {path!r}: custom must be a JSON object")
        fields["custom"] = dict(custom)
        try:
            encode_canonical(fields)  # signing needs canonical JSON: no floats, string keys
        except CanonicalJSONError as exc:
            raise TargetError(f"target {path!r}: custom is not canonical JSON: {exc}") from exc
    return TargetFile(length, {"sha256": sha256}, path, fields)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RepositoryStateError(f"cannot read {path}: {exc.strerror}") from exc


def _parse(data: bytes, kind: type[_SignedT], name: str) -> Metadata[_SignedT]:
    try:
        md = Metadata[_SignedT].from_bytes(data)
    except DeserializationError as exc:
        raise RepositoryStateError(f"{name} is not valid TUF metadata: {exc}") from exc
    if not isinstance(md.signed, kind):
        raise RepositoryStateError(f"{name} holds {md.signed.type} metadata, want {kind.type}")
    return md


def _load_targets(metadata_dir: Path, snapshot: Snapshot, role: str) -> Metadata[Targets]:
    meta = snapshot.meta.get(f"{role}.json")
    if meta is None:
        raise RepositoryStateError(f"{metadata_dir}: snapshot version {snapshot.version} does not list {role}")
    name = f"{meta.version}.{role}.json"
    md = _parse(_read(metadata_dir / name), Targets, name)
    if md.signed.version != meta.version:
        raise RepositoryStateError(f"{name} holds version {md.signed.version}")
    return md


def _verify(delegator: Root | Targets, role: str, md: Metadata[Any]) -> None:
    try:
        delegator.verify_delegate(role, md.signed_bytes, md.signatures)
    except UnsignedMetadataError as exc:
        raise RepositoryStateError(f"{role} version {md.signed.version} is not signed as required: {exc}") from exc


def _mkdir_private(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def _write_file(path: Path, data: bytes, *, replace: bool) -> None:
    """Write ``data`` to ``path`` atomically and durably (the caller syncs the directory).

    With ``replace=False`` an existing file is an error: a published root must never change.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise RepositoryStateError(f"{path} already exists; refusing to replace published metadata") from None
            os.unlink(tmp)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _remove_stale_temp_files(metadata_dir: Path) -> None:
    for path in metadata_dir.glob(f"{_TMP_PREFIX}*"):
        with suppress(FileNotFoundError):
            path.unlink()
