"""Exports of a log in the C2SP tlog-tiles layout, and their offline verification.

An export is a directory (or a tar archive of one) holding:

- `checkpoint`: the signed checkpoint the export is cut at (c2sp.org/tlog-checkpoint);
- `tile/<L>/<N>[.p/<W>]`: the hash tiles of that tree (c2sp.org/tlog-tiles);
- `tile/entries/<N>[.p/<W>]`: the entries, in uint16-length-prefixed bundles;
- `cosigned/<size>-<part>` (optional): other signed checkpoints of the same log with witnesses'
  cosignatures, and `cosigned/<size>.proof` the consistency proof (one base64 hash per line)
  between that checkpoint and the export's. A note carries at most 100 signatures, and witnesses
  cosign at their own pace: so the export's checkpoint carries the cosignatures of exactly it
  (up to the cap), and the others travel here. A witness that cosigned a later checkpoint
  consistent with the export's vouches for all of it; one that cosigned an earlier checkpoint
  vouches for that prefix only;
- `vkeys` and `manifest.json`: the log's public key(s) and a short description, for
  people. The verifier never trusts or needs them: an auditor brings the keys.

`verify_export` checks, with nothing but the export and trusted keys: the checkpoint is
signed by a trusted log key and cosigned by the trusted witnesses required
(c2sp.org/tlog-cosignature; cosignatures of later checkpoints count once their consistency with
it is proven), the entries hash to its root, and every hash tile matches the entries. When
something is wrong it names the first bad entry or tile. (`checkpoints.jsonl`, when present, is
every checkpoint the log signed up to the export's: see `audit.log`; the report reads it.)
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gc
import io
import json
import multiprocessing
import os
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from audit import merkle, tiles
from audit.checkpoint import Checkpoint
from audit.checkpoint import parse as parse_checkpoint
from audit.errors import AuditError, FormatError, ProofError
from audit.merkle import HASH_SIZE
from audit.note import Verifier, note_text, open_note
from audit.policy import Policy, Verdict

if TYPE_CHECKING:
    from audit.log import Log

MANIFEST_FORMAT = "sitewarden-audit-export/1"
HISTORY_FILE = "checkpoints.jsonl"
"""Every checkpoint the log signed up to the export's (not part of tlog-tiles; see `audit.log`)."""
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


# -- writing ---------------------------------------------------------------------------


COSIGNED_DIR = "cosigned/"


@dataclass(frozen=True)
class CosignedCheckpoint:
    """Another checkpoint of the log, signed by it and cosigned by witnesses, for `write_export`.

    `note` is the signed note with up to 99 cosignatures; `proof` the consistency proof between
    its size and the export's (from the smaller to the larger; empty at equal sizes).
    """

    size: int
    note: str
    proof: tuple[bytes, ...] = ()


def _export_files(
    log: Log, signed_checkpoint: str, vkeys: Sequence[str], cosigned: Sequence[CosignedCheckpoint] = ()
) -> Iterable[tuple[str, bytes]]:
    """Every (relative path, content) of the export of `log` at `signed_checkpoint`."""
    cp = parse_checkpoint(note_text(signed_checkpoint))
    size = cp.size
    yield "checkpoint", signed_checkpoint.encode()
    levels = log.tree.levels
    for level, n, width in tiles.tiles(size):
        hashes = levels[tiles.TILE_HEIGHT * level]
        start = n * tiles.TILE_WIDTH * HASH_SIZE
        yield tiles.tile_path(level, n, width), bytes(hashes[start : start + width * HASH_SIZE])
    for n, width in tiles.bundles(size):
        first = n * tiles.TILE_WIDTH
        bundle = bytearray()
        for entry in log.entries(first, first + width):
            bundle += len(entry).to_bytes(2, "big")
            bundle += entry
        yield tiles.bundle_path(n, width), bytes(bundle)
    history = log.checkpoint_history(size)
    if history:
        yield (
            HISTORY_FILE,
            "".join(json.dumps({"note": note}, separators=(",", ":")) + "\n" for note in history).encode(),
        )
    parts: dict[int, int] = {}
    for other in cosigned:
        part = parts[other.size] = parts.get(other.size, -1) + 1
        yield f"{COSIGNED_DIR}{other.size}-{part}", other.note.encode()
        if other.size != size and part == 0:
            yield (
                f"{COSIGNED_DIR}{other.size}.proof",
                "".join(base64.b64encode(h).decode() + "\n" for h in other.proof).encode(),
            )
    yield "vkeys", "".join(k + "\n" for k in vkeys).encode()
    manifest = {
        "format": MANIFEST_FORMAT,
        "layout": "https://c2sp.org/tlog-tiles",
        "origin": cp.origin,
        "size": cp.size,
        "root": cp.root.hex(),
        "vkeys": list(vkeys),
        "cosigned_checkpoints": sorted(parts),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "verify": "sitewarden audit verify <this export> --key <log vkey you trust> [--witness <witness vkey> ...]",
    }
    yield "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode()


def write_export(
    log: Log,
    signed_checkpoint: str,
    dest: str | os.PathLike[str],
    vkeys: Sequence[str],
    cosigned: Sequence[CosignedCheckpoint] = (),
) -> Path:
    """Write the export atomically: nothing appears at `dest` until it is complete.

    `cosigned` are other checkpoints with witnesses' cosignatures, to travel with it.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FormatError(f"{dest} already exists; refusing to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    files = _export_files(log, signed_checkpoint, vkeys, cosigned)
    if dest.name.endswith(_TAR_SUFFIXES):
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        os.close(fd)
        try:
            mode = "w:gz" if dest.name.endswith((".gz", ".tgz")) else "w"
            with tarfile.open(tmp, mode) as tar:  # type: ignore[call-overload]
                for rel, data in files:
                    info = tarfile.TarInfo(rel)
                    info.size = len(data)
                    info.mtime = int(time.time())
                    info.mode = 0o644
                    tar.addfile(info, io.BytesIO(data))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest
    tmp_dir = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        made: set[Path] = set()
        for rel, data in files:
            target = tmp_dir / rel
            if target.parent not in made:
                target.parent.mkdir(parents=True, exist_ok=True)
                made.add(target.parent)
            target.write_bytes(data)
        if dest.exists():
            dest.rmdir()
        os.replace(tmp_dir, dest)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return dest


# -- reading ---------------------------------------------------------------------------


class Source:
    """Read access to the files of an export, a directory or a tar archive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._members: dict[str, bytes] | None = None
        self.is_directory = False
        if not path.exists():
            raise FormatError(f"export {path} does not exist")
        if path.is_dir():
            if not os.access(path, os.R_OK | os.X_OK):
                raise FormatError(f"export {path} is not readable")
            self.is_directory = True
            return
        try:
            with tarfile.open(path) as tar:
                members: dict[str, bytes] = {}
                for member in tar:
                    if not member.isfile():
                        continue
                    f = tar.extractfile(member)
                    if f is not None:
                        members[member.name.removeprefix("./")] = f.read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise FormatError(f"export {path} is neither a directory nor a readable tar archive: {exc}") from exc
        # Accept an archive whose files sit under one top-level directory.
        if "checkpoint" not in members:
            tops = [name[: -len("checkpoint")] for name in members if name.endswith("/checkpoint")]
            if len(tops) == 1:
                members = {k.removeprefix(tops[0]): v for k, v in members.items() if k.startswith(tops[0])}
        self._members = members

    def read(self, rel: str) -> bytes | None:
        if self._members is not None:
            return self._members.get(rel)
        try:
            with open(os.path.join(self.path, rel), "rb") as f:  # not pathlib: called once per tile
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise FormatError(f"cannot read {self.path / rel}: {exc}") from exc

    def names(self, prefix: str) -> list[str]:
        """Relative paths of the files under `prefix` (a directory name ending in '/')."""
        if self._members is not None:
            return sorted(name for name in self._members if name.startswith(prefix))
        folder = self.path / prefix
        if not folder.is_dir():
            return []
        return sorted(prefix + p.name for p in folder.iterdir() if p.is_file())

    def read_tile(self, full: str, width: int) -> tuple[str, bytes] | None:
        """A tile or bundle of `width` items: the exact partial, else the full one, else a wider partial.

        tlog-tiles lets a log drop a partial tile once the full tile exists, so a client
        falls back to the full tile (or a later, wider partial) and uses its prefix.
        """
        candidates = [full] if width == tiles.TILE_WIDTH else [f"{full}.p/{width}", full]
        candidates += [f"{full}.p/{w}" for w in range(width + 1, tiles.TILE_WIDTH)]
        for rel in candidates:
            data = self.read(rel)
            if data is not None:
                return rel, data
        return None


# -- verifying -------------------------------------------------------------------------


@dataclass(frozen=True)
class Cosignature:
    """A trusted witness's verified cosignature of the export's checkpoint."""

    witness: str
    """`<name>+<key id hex>` of the witness key."""
    timestamp: int
    """When the witness cosigned, as a POSIX timestamp."""
    size: int | None = None
    """The size of the checkpoint the witness cosigned: the export's, a later one (consistent with
    it, so it vouches for all of it) or an earlier one (it vouches for that many entries only)."""

    @property
    def time(self) -> str:
        """The timestamp in UTC (ISO 8601), or as a number when no calendar date can express it."""
        try:
            return datetime.fromtimestamp(self.timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        except (OverflowError, ValueError, OSError):
            return f"POSIX time {self.timestamp}"

    def __str__(self) -> str:
        where = f", checkpoint of size {self.size}" if self.size is not None else ""
        return f"{self.witness} at {self.time}{where}"


@dataclass(frozen=True)
class Report:
    """The outcome of verifying an export. `bool(report)` is True when it is valid."""

    valid: bool
    reason: str = ""
    entry: int | None = None
    tile: str | None = None
    origin: str | None = None
    size: int | None = None
    root: bytes | None = None
    signers: tuple[str, ...] = ()
    """Trusted log keys that signed the checkpoint."""
    unverified_signers: tuple[str, ...] = ()
    """Keys of other signature lines, neither a trusted log key nor a trusted witness."""
    witnesses: tuple[Cosignature, ...] = ()
    """Trusted witnesses that cosigned the checkpoint, with the time each did."""
    quorum: Verdict | None = None
    """With a witness policy: which of its witnesses cosigned and whether its quorum is met."""
    quorum_size: int | None = None
    """With a witness policy: the largest size up to which the quorum cosigned (the whole
    checkpoint when the quorum is met; a prefix, or None, when it is not)."""

    def __bool__(self) -> bool:
        return self.valid


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Run the block without cyclic garbage collection (and restore it after).

    Hashing and scanning a run of entries allocate hundreds of thousands of short-lived objects
    that form no cycles; the collector's passes over them would cost a tenth of the time or more.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def split_bundle(data: bytes, width: int, exact: bool) -> tuple[list[memoryview], str]:
    """The first `width` entries of a bundle, as views into it, and what is wrong with it, if anything.

    `exact` says the bundle is the one of exactly `width` entries, so nothing may follow them.
    """
    entries = []
    view = memoryview(data)
    pos = 0
    total = len(data)
    for i in range(width):
        if pos + 2 > total:
            return entries, f"bundle ends after {i} of {width} entries"
        end = pos + 2 + (data[pos] << 8 | data[pos + 1])
        if end > total:
            return entries, f"entry {i} of the bundle is truncated ({total - pos - 2} of {end - pos - 2} bytes)"
        entries.append(view[pos + 2 : end])
        pos = end
    if exact and pos != total:
        return entries, f"{total - pos} bytes of trailing data after {width} entries"
    return entries, ""


def leaf_hashes(entries: Iterable[bytes | memoryview]) -> bytes:
    """RFC 9162 leaf hashes, SHA-256(0x00 || entry), of `entries`, back to back (`merkle.leaf_hash` in bulk)."""
    sha = merkle._sha256
    return b"".join([sha(b"\x00" + entry).digest() for entry in entries])


# Hash levels a job returns: 0 to 8, the heights inside one tile. A job covers whole
# bundles, so its subtrees of height <= 8 are exactly the global tree's.
_JOB_LEVELS = tiles.TILE_HEIGHT + 1
_JOB_BUNDLES = 64  # 16,384 entries: small runs, so that the last one keeps a core idle only briefly
_PARALLEL_MIN_ENTRIES = 1 << 17


def _hash_bundles(
    root: str | None, jobs: list[tuple[int, int, tuple[str, bytes] | None]]
) -> tuple[list[bytes], list[tuple[int, str, str]]]:
    """Hash a run of consecutive bundles: the tree levels 0-8 over them, and bundle problems.

    With `root` set, bundles are read from that export directory; otherwise they come
    with the job. Runs in a worker process for large exports.
    """
    src = Source(Path(root)) if root is not None else None
    leaves = bytearray()
    problems = []
    for n, width, given in jobs:
        found = src.read_tile(tiles.bundle_path(n), width) if src is not None else given
        if found is None:
            rel = tiles.bundle_path(n, width)
            problems.append((n, f"entry bundle {rel} is missing", rel))
            leaves += bytes(width * HASH_SIZE)
            continue
        used, data = found
        entries, problem = split_bundle(data, width, exact=used == tiles.bundle_path(n, width))
        if problem:
            problems.append((n, f"entry bundle {used}: {problem}", used))
        leaves += leaf_hashes(entries)
        leaves += bytes((width - len(entries)) * HASH_SIZE)
    levels = merkle.Tree.from_concatenated(leaves).levels[:_JOB_LEVELS]
    return [bytes(level) for level in levels], problems


def _verifiers(keys: Iterable[str | Verifier], cosigners: bool, what: str) -> list[Verifier]:
    out = []
    for key in keys:
        v = key if isinstance(key, Verifier) else Verifier(key)
        if v.is_cosigner != cosigners:
            want = "a witness (cosigner) key, type 0x04" if cosigners else "a log key, type 0x01"
            raise FormatError(f"{what} {v.name}+{v.key_id:08x} is not {want}")
        out.append(v)
    return out


def verify_export(
    path: str | os.PathLike[str],
    keys: Iterable[str | Verifier],
    witnesses: Iterable[str | Verifier] = (),
    min_witnesses: int | None = None,
    *,
    policy: Policy | None = None,
) -> Report:
    """Verify an export offline against trusted vkeys; the report names the first problem.

    The checkpoint must carry a valid signature by one of the log `keys` (type 0x01): a
    cosignature alone proves nothing about what the log wrote. `witnesses` are trusted
    cosigner vkeys (type 0x04); at least `min_witnesses` of them (by default all) must have
    cosigned the checkpoint. A bad signature or cosignature by any trusted key is invalid.

    With a witness `policy` (C2SP tlog-policy, `audit.policy`), its logs and witnesses are
    the trusted keys and its quorum decides instead of `min_witnesses`; the report's
    `quorum` says which witnesses cosigned and whether the quorum is met.

    Raises FormatError only when the input is unusable (no such export, unreadable, a
    malformed key, a key of the wrong type, an impossible `min_witnesses`); everything
    wrong inside the export is an invalid Report.
    """
    src = Source(Path(path))
    found, cp = check_checkpoint(src.read("checkpoint"), keys, witnesses, min_witnesses, policy=policy, src=src)
    if cp is None:
        return found
    return finish(found, Checker(src, cp).run())


def check_checkpoint(
    raw: bytes | None,
    keys: Iterable[str | Verifier],
    witnesses: Iterable[str | Verifier] = (),
    min_witnesses: int | None = None,
    *,
    policy: Policy | None = None,
    src: Source | None = None,
) -> tuple[Report, Checkpoint | None]:
    """The first half of `verify_export`: the checkpoint's signatures and witness quorum.

    Returns the (not yet valid) report with the checkpoint's facts and the parsed checkpoint
    to check the entries against, or an invalid report and None. Raises FormatError as
    `verify_export` does. With the export's `src`, the cosignatures of its other checkpoints
    (`cosigned/`) count too, each once its consistency with the checkpoint is proven.
    """
    if policy is not None:
        keys, witnesses, min_witnesses = [*keys, *policy.logs], [*witnesses, *policy.witness_verifiers()], 0
    verifiers = _verifiers(keys, cosigners=False, what="trusted log key")
    if not verifiers:
        raise FormatError("verifying an export needs at least one trusted vkey")
    cosigners = _verifiers(witnesses, cosigners=True, what="witness key")
    required = len(cosigners) if min_witnesses is None else min_witnesses
    if not 0 <= required <= len(cosigners):
        raise FormatError(f"min_witnesses is {min_witnesses}, but {len(cosigners)} witness keys were given")
    if raw is None:
        return Report(False, "checkpoint is missing", tile="checkpoint"), None
    try:
        note = open_note(raw, [*verifiers, *cosigners])
        cp = parse_checkpoint(note.text)
    except AuditError as exc:
        return Report(False, f"checkpoint: {exc}", tile="checkpoint"), None
    signers = tuple(s.key for s in note.signatures if s.timestamp is None)
    cosigned = tuple(Cosignature(s.key, s.timestamp, cp.size) for s in note.signatures if s.timestamp is not None)
    unverified = tuple(s.key for s in note.unverified)
    found = Report(False, "", None, "checkpoint", cp.origin, cp.size, cp.root, signers, unverified, cosigned)
    if not signers:
        logs = ", ".join(f"{v.name}+{v.key_id:08x}" for v in verifiers)
        reason = f"checkpoint: no signature by a trusted log key ({logs}); witness cosignatures alone do not count"
        return replace(found, reason=reason), None
    if src is not None:
        more, problem = _cosigned_checkpoints(src, cp, verifiers, cosigners)
        if problem is not None:
            return replace(found, reason=problem[0], tile=problem[1]), None
        cosigned += more
        found = replace(found, witnesses=cosigned)
    # Witnesses of the checkpoint itself, or of a later one proven consistent with it, vouch for all of it.
    covering = {c.witness for c in cosigned if c.size is not None and c.size >= cp.size}
    if policy is not None:
        verdict = policy.evaluate(covering)
        found = replace(found, quorum=verdict, quorum_size=_quorum_size(policy, cosigned, cp.size))
        if not verdict.met:
            prefix = found.quorum_size
            covered = f"; the quorum cosigned the first {prefix} entries only" if prefix else ""
            return replace(found, reason=f"checkpoint: witness quorum not met: {verdict.explanation}{covered}"), None
    if len(covering) < required:
        missing = ", ".join(k for v in cosigners if (k := f"{v.name}+{v.key_id:08x}") not in covering)
        return replace(
            found,
            reason=f"checkpoint: cosigned by {len(covering)} of the trusted witnesses, {required} required "
            f"(no cosignature by {missing})",
        ), None
    return found, cp


def _quorum_size(policy: Policy, cosigned: Sequence[Cosignature], size: int) -> int | None:
    """The largest size up to which the policy's quorum cosigned (a witness of size N vouches for N entries)."""
    sizes = sorted({c.size for c in cosigned if c.size is not None and c.size < size}, reverse=True)
    for candidate in [size, *sizes]:
        if policy.evaluate(c.witness for c in cosigned if c.size is not None and c.size >= candidate).met:
            return candidate
    return None


def _read_proof(src: Source, rel: str) -> tuple[bytes, ...] | str:
    data = src.read(rel)
    if data is None:
        return f"{rel} is missing"
    hashes = []
    for number, line in enumerate(data.decode("ascii", errors="replace").splitlines(), start=1):
        try:
            h = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            return f"{rel} line {number} is not base64"
        if len(h) != HASH_SIZE:
            return f"{rel} line {number} is {len(h)} bytes, want {HASH_SIZE}"
        hashes.append(h)
    return tuple(hashes)


def _cosigned_checkpoints(
    src: Source, cp: Checkpoint, logs: Sequence[Verifier], witnesses: Sequence[Verifier]
) -> tuple[tuple[Cosignature, ...], tuple[str, str] | None]:
    """Cosignatures of the export's other checkpoints (`cosigned/`), each proven consistent with it.

    Returns the cosignatures by trusted witnesses, or (reason, file) for the first problem: a
    note not signed by a trusted log key, a bad signature by a trusted key, another origin, or a
    checkpoint that is not consistent with the export's (the log forked).
    """
    found: list[Cosignature] = []
    for rel in src.names(COSIGNED_DIR):
        if rel.endswith(".proof"):
            continue
        raw = src.read(rel)
        try:
            note = open_note(raw or b"", [*logs, *witnesses])
            other = parse_checkpoint(note.text)
        except AuditError as exc:
            return (), (f"{rel}: {exc}", rel)
        if not any(s.timestamp is None for s in note.signatures):
            return (), (f"{rel}: not signed by a trusted log key", rel)
        if other.origin != cp.origin:
            return (), (f"{rel}: a checkpoint of {other.origin!r}, not of {cp.origin!r}", rel)
        if other.size == cp.size:
            if other.root != cp.root:
                return (), (f"{rel}: another root hash at the export's size {cp.size}: the log forked", rel)
        else:
            proof = _read_proof(src, f"{COSIGNED_DIR}{other.size}.proof")
            if isinstance(proof, str):
                return (), (f"{rel}: {proof}", rel)
            small, large = sorted((other, cp), key=lambda c: c.size)
            try:
                if small.size == 0:
                    if proof:
                        raise ProofError("a consistency proof from size 0 must be empty")
                else:
                    merkle.verify_consistency(small.size, large.size, proof, small.root, large.root)
            except ProofError as exc:
                return (), (
                    f"{rel}: the checkpoint of size {other.size} is not consistent with the export's of size "
                    f"{cp.size}: {exc} (the log forked, or the proof is wrong)",
                    rel,
                )
        found += [Cosignature(s.key, s.timestamp, other.size) for s in note.signatures if s.timestamp is not None]
    return tuple(found), None


def finish(found: Report, problem: tuple[str, int | None, str | None] | None) -> Report:
    """The final report: `found` made valid, or invalid at the entries check's first problem."""
    if problem is None:
        return replace(found, valid=True, tile=None)
    reason, entry, tile = problem
    return replace(found, reason=reason, entry=entry, tile=tile)


class Checker:
    """Checks entries and tiles of one export against its (already verified) checkpoint."""

    def __init__(self, src: Source, cp: Checkpoint) -> None:
        self.src = src
        self.cp = cp
        self.bundle_problems: list[tuple[int, str, str]] = []  # (bundle index, message, path)
        self._tile_cache: dict[tuple[int, int], bytes | None] = {}

    def run(
        self, tree: merkle.Tree | None = None, bundle_problems: Sequence[tuple[int, str, str]] = ()
    ) -> tuple[str, int | None, str | None] | None:
        """The first problem with the entries and tiles, or None. `tree` (with `bundle_problems`)
        is the entries' tree when the caller has already hashed them."""
        size = self.cp.size
        if tree is None:
            tree = self._entry_tree()
        else:
            self.bundle_problems = list(bundle_problems)
        if tree.root(size) == self.cp.root:
            if self.bundle_problems:
                _, message, rel = self.bundle_problems[0]
                return message, None, rel
            # The entries are exactly what the checkpoint commits to; now every tile must match them.
            for level, n, width in tiles.tiles(size):
                rel = tiles.tile_path(level, n, width)
                found = self.src.read_tile(tiles.tile_path(level, n), width)
                if found is None:
                    return f"hash tile {rel} is missing", None, rel
                used, data = found
                hashes = tree.levels[tiles.TILE_HEIGHT * level]
                start = n * tiles.TILE_WIDTH * HASH_SIZE
                want = hashes[start : start + width * HASH_SIZE]
                if used == rel and len(data) != len(want):
                    return f"hash tile {rel} is {len(data)} bytes, want {len(want)}", None, rel
                if data[: len(want)] != want or len(data) < len(want):
                    return f"hash tile {used} does not match the entries", None, used
            return None
        return self._locate_bad_entry(tree)

    def _entry_tree(self) -> merkle.Tree:
        """The Merkle tree of the export's entries; unreadable entries get an all-zero leaf hash.

        Large exports are hashed in worker processes, one run of bundles each, and the
        runs' lower levels joined: hashing dominates verification and this machine has
        more than one core.
        """
        bundles = list(tiles.bundles(self.cp.size))
        runs = [bundles[i : i + _JOB_BUNDLES] for i in range(0, len(bundles), _JOB_BUNDLES)]
        workers = min(os.cpu_count() or 1, len(runs))
        directory = str(self.src.path) if self.src.is_directory else None

        def job(run: list[tuple[int, int]]) -> tuple[str | None, list[tuple[int, int, tuple[str, bytes] | None]]]:
            if directory is not None:
                return directory, [(n, w, None) for n, w in run]
            return None, [(n, w, self.src.read_tile(tiles.bundle_path(n), w)) for n, w in run]

        # Fork only from a single-threaded process (forking a threaded one can deadlock the
        # child); spawn and forkserver would re-import the caller's main module.
        if workers > 1 and self.cp.size >= _PARALLEL_MIN_ENTRIES and threading.active_count() == 1:
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                results = list(pool.map(_hash_bundles, *zip(*(job(run) for run in runs), strict=True)))
        else:
            results = [_hash_bundles(*job(run)) for run in runs]
        levels: list[bytearray] = [bytearray() for _ in range(_JOB_LEVELS)]
        for run_levels, problems in results:
            for h, level in enumerate(run_levels):
                levels[h] += level
            self.bundle_problems += problems
        while levels and not levels[-1]:
            levels.pop()
        return merkle.Tree.from_levels(levels)

    def _tile_hashes(self, level: int, start: int, count: int) -> bytes | None:
        """`count` claimed hashes at tile level `level` from index `start` (within one tile)."""
        n = start // tiles.TILE_WIDTH
        if (level, n) not in self._tile_cache:
            available = tiles.level_count(self.cp.size, level) - n * tiles.TILE_WIDTH
            width = min(tiles.TILE_WIDTH, available)
            found = self.src.read_tile(tiles.tile_path(level, n), width) if width > 0 else None
            self._tile_cache[(level, n)] = found[1] if found else None
        data = self._tile_cache[(level, n)]
        lo = (start % tiles.TILE_WIDTH) * HASH_SIZE
        if data is None or len(data) < lo + count * HASH_SIZE:
            return None
        return data[lo : lo + count * HASH_SIZE]

    def _claimed(self, start: int, end: int) -> bytes | None:
        """MTH(D[start:end]) as the export's hash tiles claim it, or None where tiles are missing."""
        n = end - start
        if n & (n - 1) == 0 and start % n == 0:
            height = n.bit_length() - 1
            level, rest = divmod(height, tiles.TILE_HEIGHT)
            hashes = self._tile_hashes(level, start >> (tiles.TILE_HEIGHT * level), 1 << rest)
            return None if hashes is None else merkle.Tree.from_concatenated(hashes).root()
        k = merkle._split(n)
        left, right = self._claimed(start, start + k), self._claimed(start + k, end)
        return None if left is None or right is None else merkle.node_hash(left, right)

    def _locate_bad_entry(self, tree: merkle.Tree) -> tuple[str, int | None, str | None]:
        """Find the first entry that the checkpoint's root does not vouch for.

        Walks down the tree from the signed root. At each node it takes the children's
        hashes from the tiles; if they hash to the node's authenticated hash they are
        authenticated too, and the walk enters the first child whose hash, computed from
        the entries, differs. Where the tiles were altered as well, the walk stops at the
        smallest range it can still vouch for.
        """
        start, end, expected = 0, self.cp.size, self.cp.root
        if end == 0:
            return "checkpoint of an empty log has a root other than the empty tree hash", None, "checkpoint"
        while end - start > 1:
            k = merkle._split(end - start)
            left, right = self._claimed(start, start + k), self._claimed(start + k, end)
            if left is None or right is None or merkle.node_hash(left, right) != expected:
                break
            if tree.subtree_hash(start, start + k) != left:
                end, expected = start + k, left
            else:
                start, expected = start + k, right
        note = ""
        for n, message, _ in self.bundle_problems:
            if n == start // tiles.TILE_WIDTH:
                note = f" ({message})"
                break
        if end - start == 1:
            return f"entry {start} does not match the checkpoint{note}", start, None
        return (
            f"an entry in [{start}, {end}) does not match the checkpoint, and the hash tiles covering "
            f"that range were altered too{note}",
            start,
            None,
        )
