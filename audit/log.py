"""An append-only, tamper-evident log in a directory.

`Log.append` returns an entry's index only once the entry is on stable storage; threads
appending at the same time share one durable write (group commit: whoever finds no write in
progress writes everything queued so far, the others wait for it). `Log.checkpoint` signs
the tree head as a C2SP checkpoint and stores it durably before returning it, and refuses
to sign one that contradicts the last checkpoint it signed. Proofs come from an in-memory
`merkle.Tree` rebuilt from the entries at open.

On disk, in the log's directory:

- `entries`: an 8-byte header, then one record per entry: uint16 length (big-endian), the
  entry, and a CRC-32 of both. While the log is open for writing, zeros follow the last
  record (space written ahead, see `Log._zero_ahead`); `close` cuts them off. A crash can
  leave a torn last record and those zeros; `open` cuts both off.
- `checkpoint`: the last signed checkpoint, replaced atomically (write, fsync, rename).
- `checkpoints.jsonl`: every checkpoint the log signed, one JSON line `{"note": ...}` each, appended
  after `checkpoint` is stored, and again when witnesses' cosignatures are added to it. Exports
  carry it, so that an auditor sees when each checkpoint was witnessed and that the log never signed
  a checkpoint its entries contradict. A crash can cut its last line; readers skip a torn line.
- `lock`: held with `flock` while a process has the log open for writing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import threading
import zlib
from _thread import allocate_lock as _allocate_lock
from array import array
from collections.abc import Iterator, Sequence
from itertools import accumulate
from pathlib import Path

from audit import merkle
from audit.checkpoint import Checkpoint
from audit.checkpoint import parse as parse_checkpoint
from audit.errors import (
    AuditError,
    CheckpointRefusedError,
    EntryTooLargeError,
    FormatError,
    LogError,
    SignatureError,
)
from audit.export import write_export
from audit.note import Signer, add_signatures, note_text, open_note, sign
from audit.proof import TlogProof
from audit.tiles import MAX_ENTRY_SIZE

MAGIC = b"SWALOG\x00\x01"
HISTORY = "checkpoints.jsonl"
_HEADER = struct.Struct(">H")
_CRC = struct.Struct(">I")
_RECORD_OVERHEAD = _HEADER.size + _CRC.size
_READ_CHUNK = 16 << 20
_MAX_LEAD_ROUNDS = 8
# Zeros written ahead of the last record: at least this much, growing with the file up to the maximum.
_ZERO_AHEAD_MIN = 64 << 10
_ZERO_AHEAD_MAX = 4 << 20


def read_history(data: bytes, size: int | None = None) -> list[str]:
    """The signed notes of a `checkpoints.jsonl`, oldest first: one per checkpoint text (the last
    line stored for it, which carries the most cosignatures), up to `size` entries; a torn or
    malformed line is skipped (verifying the notes is the reader's business)."""
    latest: dict[str, tuple[int, str]] = {}
    for line in data.split(b"\n"):
        try:
            note = json.loads(line)["note"]
            text = note_text(note)
            cp_size = parse_checkpoint(text).size
        except (ValueError, KeyError, TypeError, AuditError):
            continue
        if size is None or cp_size <= size:
            latest[text] = (cp_size, note)
    return [note for _, note in sorted(latest.values(), key=lambda item: item[0])]


def encode_record(entry: bytes) -> bytes:
    """One record of the entries file: length, entry, CRC-32 of both."""
    framed = len(entry).to_bytes(2, "big") + entry
    return framed + zlib.crc32(framed).to_bytes(4, "big")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _scan(fd: int, file_size: int, pos: int) -> tuple[array, bytes, int, str, int]:
    """Read every valid record from file offset `pos` on.

    Returns (record offsets, concatenated leaf hashes, end of the last good record,
    what stopped the scan early or "", where the bad record that stopped it claims to end).
    """
    offsets = array("Q")
    leaves: list[bytes] = []
    sha = merkle._sha256
    crc32 = zlib.crc32
    unpack_crc = _CRC.unpack_from
    chunk = max(_READ_CHUNK, MAX_ENTRY_SIZE + _RECORD_OVERHEAD)
    while pos < file_size:
        # A chunk always holds at least one whole record unless the file ends first.
        buf = os.pread(fd, chunk, pos)
        rel = 0
        limit = len(buf) - _HEADER.size
        while rel <= limit:
            end = rel + _HEADER.size + (buf[rel] << 8 | buf[rel + 1])
            if end + _CRC.size > len(buf):
                break
            entry = buf[rel + _HEADER.size : end]
            if crc32(entry, crc32(buf[rel : rel + _HEADER.size])) != unpack_crc(buf, end)[0]:
                return offsets, b"".join(leaves), pos + rel, "record checksum mismatch", pos + end + _CRC.size
            offsets.append(pos + rel)
            leaves.append(sha(b"\x00" + entry).digest())
            rel = end + _CRC.size
        if rel == 0:
            return offsets, b"".join(leaves), pos, "the last record runs past the end of the file", file_size
        pos += rel
    return offsets, b"".join(leaves), pos, "", file_size


def _only_zeros(fd: int, start: int, file_size: int) -> bool:
    """Whether bytes [start, file_size) of the file are all zero."""
    while start < file_size:
        chunk = os.pread(fd, min(file_size - start, 1 << 20), start)
        if not chunk:
            break
        if chunk.count(0) != len(chunk):
            return False
        start += len(chunk)
    return True


def _last_size(signed_checkpoint: str | None) -> tuple[int, bytes | None]:
    if signed_checkpoint is None:
        return 0, None
    try:
        cp = parse_checkpoint(note_text(signed_checkpoint))
    except FormatError:
        return 0, None  # checkpoint() will refuse and say why
    return cp.size, cp.root


def _recover(path: Path, fd: int, file_size: int, last: str | None) -> tuple[array, merkle.Tree, int, int]:
    """Find every valid record: (offsets, their tree, end of the last good record, trusted index size).

    The index is trusted only up to the last signed checkpoint (it was fsynced before that
    checkpoint was stored) and only if the record there checks out; entries after it are
    scanned and hashed again. If the tree then disagrees with the checkpoint, the index
    is discarded and everything is rescanned.
    """
    last_size, last_root = _last_size(last)
    trusted_offsets, trusted_leaves, resume = _Index.read_trusted(path, fd, file_size, last_size)
    for attempt in range(2):
        offsets, leaves, good_end, problem, stop = _scan(fd, file_size, resume)
        all_offsets = trusted_offsets + offsets
        tree = merkle.Tree.from_concatenated(trusted_leaves + leaves)
        stale = last_root is not None and tree.size >= last_size and tree.root(last_size) != last_root
        if attempt == 0 and len(trusted_offsets) and stale:
            trusted_offsets, trusted_leaves, resume = array("Q"), b"", len(MAGIC)
            continue
        break
    # A crash leaves a prefix of the last write followed by zeros (written ahead, or left by
    # power loss on some file systems); a bad record with data after it is damage.
    if good_end < file_size and not _only_zeros(fd, stop, file_size):
        raise LogError(
            f"audit log {path} is corrupt at byte {good_end} (entry {len(all_offsets)}): "
            f"{problem}, and the damage is not at the end of the file; refusing to open it"
        )
    return all_offsets, tree, good_end, len(trusted_offsets)


class _Index:
    """A cache of each entry's file offset and leaf hash, so that opening a log need not
    rehash it. Written lazily, fsynced before each checkpoint is stored; never trusted
    beyond the last checkpoint."""

    def __init__(self, offsets_fd: int, leaves_fd: int) -> None:
        self.offsets_fd = offsets_fd
        self.leaves_fd = leaves_fd
        self.count = 0

    @classmethod
    def open(cls, path: Path) -> _Index:
        offsets_fd = os.open(path / "index.offsets", os.O_RDWR | os.O_CREAT, 0o644)
        leaves_fd = os.open(path / "index.leaves", os.O_RDWR | os.O_CREAT, 0o644)
        return cls(offsets_fd, leaves_fd)

    @staticmethod
    def read_trusted(path: Path, fd: int, file_size: int, limit: int) -> tuple[array, bytes, int]:
        """Index entries [0, limit) if present and plausible: (offsets, leaf hashes, where to resume the scan)."""
        offsets = array("Q")
        try:
            raw_offsets = (path / "index.offsets").read_bytes()
            raw_leaves = (path / "index.leaves").read_bytes()
        except FileNotFoundError:
            return offsets, b"", len(MAGIC)
        n = min(limit, len(raw_offsets) // offsets.itemsize, len(raw_leaves) // merkle.HASH_SIZE)
        if n == 0:
            return offsets, b"", len(MAGIC)
        offsets.frombytes(raw_offsets[: n * offsets.itemsize])
        leaves = raw_leaves[: n * merkle.HASH_SIZE]
        # The last indexed record must be intact and hash to the indexed leaf.
        at = offsets[-1]
        head = os.pread(fd, _HEADER.size, at) if at + _HEADER.size <= file_size else b""
        if len(head) == _HEADER.size:
            end = at + _HEADER.size + _HEADER.unpack(head)[0]
            record = os.pread(fd, end + _CRC.size - at, at) if end + _CRC.size <= file_size else b""
            if (
                len(record) == end + _CRC.size - at
                and zlib.crc32(record[: -_CRC.size]) == _CRC.unpack(record[-_CRC.size :])[0]
                and merkle.leaf_hash(record[_HEADER.size : -_CRC.size]) == leaves[-merkle.HASH_SIZE :]
            ):
                return offsets, leaves, end + _CRC.size
        return array("Q"), b"", len(MAGIC)

    def truncate(self, count: int) -> None:
        os.ftruncate(self.offsets_fd, count * 8)
        os.ftruncate(self.leaves_fd, count * merkle.HASH_SIZE)
        self.count = count

    def write(self, offsets: array, leaves: bytes | bytearray, upto: int) -> None:
        """Add entries [count, upto) to the index."""
        if upto <= self.count:
            return
        chunk = offsets[self.count : upto].tobytes()
        os.pwrite(self.offsets_fd, chunk, self.count * 8)
        os.pwrite(
            self.leaves_fd,
            leaves[self.count * merkle.HASH_SIZE : upto * merkle.HASH_SIZE],
            self.count * merkle.HASH_SIZE,
        )
        self.count = upto

    def sync(self) -> None:
        os.fsync(self.offsets_fd)
        os.fsync(self.leaves_fd)

    def close(self) -> None:
        os.close(self.offsets_fd)
        os.close(self.leaves_fd)


def _wake_one(waiters: list[threading.Lock]) -> None:
    """Release one waiter of a durable batch; it wakes the next (see `Log._commit`)."""
    if waiters:
        waiters.pop().release()


class _Batch:
    """Records written together with one durable write, and the threads waiting for them."""

    __slots__ = ("error", "first", "leader", "records", "waiters")

    def __init__(self, first: int) -> None:
        self.first = first  # index of the batch's first record
        self.records: list[bytes] = []
        self.waiters: list[threading.Lock] = []
        self.leader: threading.Lock | None = None
        self.error: str | None = None


class Log:
    """An append-only Merkle log in a directory. Use `Log.open`; safe for many threads."""

    def __init__(
        self,
        *,
        path: Path,
        fd: int,
        lock_fd: int | None,
        index: _Index | None,
        signer: Signer | None,
        offsets: array,
        tree: merkle.Tree,
        end_offset: int,
        recovered_bytes: int,
        last_checkpoint: str | None,
    ) -> None:
        self.path = path
        self._fd = fd
        self._lock_fd = lock_fd
        self._index = index
        self._signer = signer
        self._offsets = offsets
        self._tree = tree
        self._end_offset = end_offset  # where the next batch goes; only the leader moves it
        self._zeroed_end = end_offset  # end of the durable zeros written ahead of that
        self.recovered_bytes = recovered_bytes
        """Bytes cut off the end of the entries file when the log was opened: a torn last record
        and the zeros written ahead of it, left by a crash (0 after a clean close)."""
        self._last_checkpoint = last_checkpoint
        self._mutex = threading.Lock()
        self._idle = threading.Condition(self._mutex)
        self._checkpoint_lock = threading.Lock()
        self._open = _Batch(tree.size)
        self._unhashed: list[bytes] = []  # records durable but not yet hashed into the tree
        self._durable = tree.size
        self._flushing = False
        self._failure: str | None = None
        self._closed = False

    # -- opening -------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        key: Signer | str | os.PathLike[str] | None = None,
        *,
        create: bool = True,
        readonly: bool = False,
    ) -> Log:
        """Open the log in directory `path`, creating it when missing (unless `create=False`).

        `key` (a `Signer`, a private key string or the path of a key file) is needed only
        to sign checkpoints. A writer holds an exclusive lock on the directory; a torn last
        record left by a crash is cut off. With `readonly=True` nothing is locked, written
        or cut: reads, proofs and exports work next to a live writer.
        """
        path = Path(path)
        signer = _load_signer(key)
        entries = path / "entries"
        if not path.is_dir():
            if readonly or not create:
                raise LogError(f"no audit log at {path}: directory does not exist")
            path.mkdir(parents=True)
        lock_fd = None
        if not readonly:
            lock_fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(lock_fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise LogError(f"audit log {path} is open for writing by another process") from exc
                raise
        try:
            return cls._open_locked(path, entries, signer, lock_fd, create=create, readonly=readonly)
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise

    @classmethod
    def _open_locked(
        cls, path: Path, entries: Path, signer: Signer | None, lock_fd: int | None, *, create: bool, readonly: bool
    ) -> Log:
        if not entries.exists():
            if readonly or not create:
                raise LogError(f"no audit log at {path}: {entries.name} is missing")
            write_atomically(entries, MAGIC)
        flags = os.O_RDONLY if readonly else os.O_RDWR | os.O_DSYNC
        fd = os.open(entries, flags)
        index = None
        try:
            header = os.pread(fd, len(MAGIC), 0)
            if header != MAGIC:
                raise LogError(f"{entries} is not a Sitewarden audit log (bad header {header!r})")
            last = None
            if (path / "checkpoint").exists():
                last = (path / "checkpoint").read_text(encoding="utf-8")
            if not readonly:
                index = _Index.open(path)
            file_size = os.fstat(fd).st_size
            offsets, tree, good_end, trusted = _recover(path, fd, file_size, last)
            recovered = 0
            if good_end < file_size:
                recovered = file_size - good_end
                if not readonly:
                    # The torn record was never acknowledged: its write had not returned.
                    os.ftruncate(fd, good_end)
                    os.fsync(fd)
            if index is not None:
                index.truncate(trusted)
            return cls(
                path=path,
                fd=fd,
                lock_fd=lock_fd,
                index=index,
                signer=signer,
                offsets=offsets,
                tree=tree,
                end_offset=good_end,
                recovered_bytes=recovered,
                last_checkpoint=last,
            )
        except BaseException:
            os.close(fd)
            if index is not None:
                index.close()
            raise

    def close(self) -> None:
        """Wait for queued appends, then release the files. Further calls raise LogError."""
        with self._mutex:
            while self._flushing:
                self._idle.wait()
            if self._closed:
                return
            self._closed = True
            failed = self._failure is not None
            self._failure = self._failure or "log is closed"
        if self._index is not None:
            self._update_index()
            self._index.close()
        if self._zeroed_end > self._end_offset and not failed:
            # A cleanly closed log ends with its last record (after a failure, `open` cuts).
            os.ftruncate(self._fd, self._end_offset)
            os.fsync(self._fd)
        os.close(self._fd)
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    def __enter__(self) -> Log:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- appending -----------------------------------------------------------------

    @staticmethod
    def check_entry(entry: bytes) -> None:
        """Raise what `append` would raise for this entry (TypeError, EntryTooLargeError), without appending."""
        if not isinstance(entry, (bytes, bytearray)):
            raise TypeError(f"entries must be bytes, got {type(entry).__name__}")
        if len(entry) > MAX_ENTRY_SIZE:
            raise EntryTooLargeError(f"entry of {len(entry)} bytes exceeds the limit of {MAX_ENTRY_SIZE} bytes")

    def append(self, entry: bytes) -> int:
        """Append one entry; return its index once it is durable."""
        self.check_entry(entry)
        return self._commit([encode_record(entry)])

    def append_many(self, entries: Sequence[bytes]) -> list[int]:
        """Append entries in order; return their indices once all are durable (one fsync)."""
        for entry in entries:
            self.check_entry(entry)
        records = [encode_record(entry) for entry in entries]
        if not records:
            return []
        first = self._commit(records)
        return list(range(first, first + len(records)))

    def _commit(self, records: list[bytes]) -> int:
        """Queue records and return the first one's index once all are durable.

        Group commit: the first appender to find no write in progress becomes the leader
        and writes its batch; appenders arriving meanwhile queue into the next batch and
        sleep on a lock of their own. Once a batch is durable the leader wakes one of its
        waiters (as its next write lets go of the GIL), and each woken waiter wakes the
        next: only one or two threads at a time compete with the leader for the GIL.
        """
        if self._lock_fd is None:
            raise LogError(f"audit log {self.path} is open read-only")
        with self._mutex:
            if self._failure:
                raise LogError(f"audit log {self.path} cannot append: {self._failure}")
            batch = self._open
            first = batch.first + len(batch.records)
            batch.records += records
            if self._flushing:
                waiter = _allocate_lock()
                waiter.acquire()
                batch.waiters.append(waiter)
            else:
                waiter = None
                self._flushing = True
                self._open = _Batch(first + len(records))
        if waiter is None:
            self._lead(batch)
        else:
            waiter.acquire()
            if batch.leader is waiter:
                with self._mutex:
                    # Take everything queued up to now, not just what was there at hand-off.
                    self._open = _Batch(batch.first + len(batch.records))
                self._lead(batch)
            else:
                _wake_one(batch.waiters)
        if batch.error:
            raise LogError(f"audit log {self.path} failed to store entries: {batch.error}")
        return first

    def _lead(self, batch: _Batch) -> None:
        """Write detached batches until the queue is empty or the lead has gone on long enough.

        The leader writes its own batch, publishes it, and (up to `_MAX_LEAD_ROUNDS` more
        times) goes straight on to the batch that queued meanwhile: it already holds the
        GIL, where a woken successor would first have to win it from the waking threads.
        Then it hands the lead to the first waiter of the next batch, so no thread leads
        for long.
        """
        rounds = 0
        durable = None  # the batch published last round
        while True:
            data = b"".join(batch.records)
            offset = self._end_offset
            if durable is not None:
                # Woken just before this write lets go of the GIL, the first waiter of the last
                # batch finds it free instead of sleeping again until the leader lets go.
                _wake_one(durable.waiters)
            error = None
            try:
                if offset + len(data) > self._zeroed_end:
                    self._zero_ahead(offset, len(data))
                # The file is opened with O_DSYNC: the write returns once its data is on stable
                # storage, like write + fdatasync but in one system call (one GIL round trip).
                view, at = memoryview(data), offset
                while view:
                    written = os.pwrite(self._fd, view, at)
                    view, at = view[written:], at + written
            except OSError as exc:
                error = exc
            take = None
            with self._mutex:
                nxt = self._open
                if error is not None:
                    # After a failed write the page cache cannot be trusted (the kernel may
                    # have dropped the dirty pages): stop; reopening recovers what is durable.
                    self._failure = f"write to {self.path / 'entries'} failed: {error}; reopen the log"
                    batch.error = nxt.error = self._failure
                    for waiters in (batch.waiters, nxt.waiters):
                        while waiters:
                            waiters.pop().release()
                    self._flushing = False
                else:
                    # Hashing waits until someone needs the tree: this section is on every
                    # appender's critical path.
                    starts = list(accumulate(map(len, batch.records), initial=offset))
                    self._end_offset = starts.pop()
                    self._offsets.extend(starts)
                    self._unhashed += batch.records
                    self._durable = batch.first + len(batch.records)
                    if nxt.records and rounds < _MAX_LEAD_ROUNDS:
                        take = nxt
                        self._open = _Batch(nxt.first + len(nxt.records))
                    elif nxt.waiters:
                        nxt.leader = nxt.waiters.pop(0)
                        nxt.leader.release()
                    else:
                        self._flushing = False
                if not self._flushing:
                    self._idle.notify_all()
            if take is None:
                _wake_one(batch.waiters)
                return
            durable, batch = batch, take
            rounds += 1

    def _zero_ahead(self, offset: int, size: int) -> None:
        """Put durable zeros past a write of `size` bytes at `offset`, with room to spare.

        A batch written over zeros already on disk leaves the file's size and block map as
        they were, so its O_DSYNC write flushes the data alone; a write that extends the
        file also has to write the inode, a second synchronous disk write every time. The
        zeros run ahead by an eighth of the file (between `_ZERO_AHEAD_MIN` and
        `_ZERO_AHEAD_MAX`): every byte is zeroed once, in few large writes, and a small
        log stays small. A batch of `_ZERO_AHEAD_MIN` or more (a bulk `append_many`) just
        extends the file: next to its own write the inode's is small, and zeroing first
        would write it twice.
        """
        if size >= _ZERO_AHEAD_MIN:
            return
        ahead = min(max(offset // 8, _ZERO_AHEAD_MIN), _ZERO_AHEAD_MAX)
        start = max(self._zeroed_end, offset)
        zeros = memoryview(bytes(offset + size + ahead - start))
        try:
            while zeros:
                written = os.pwrite(self._fd, zeros, start)
                zeros, start = zeros[written:], start + written
        except OSError:
            pass  # no room for the zeros, say: the batch's own write tells whether it fits
        finally:
            self._zeroed_end = start

    # -- reading -------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of durable entries."""
        return self._durable

    def entry(self, index: int) -> bytes:
        """The entry at `index`, exactly as appended."""
        if not 0 <= index < self._durable:
            raise IndexError(f"entry {index} is outside the log (size {self._durable})")
        return self.entries(index, index + 1)[0]

    def entries(self, start: int, end: int) -> list[bytes]:
        """Entries [start, end) read with one disk read."""
        if not 0 <= start <= end <= self._durable:
            raise IndexError(f"entries [{start}, {end}) are outside the log (size {self._durable})")
        if start == end:
            return []
        base = self._offsets[start]
        last = self._offsets[end - 1]
        tail = os.pread(self._fd, _HEADER.size, last)
        stop = last + _RECORD_OVERHEAD + _HEADER.unpack(tail)[0]
        data = os.pread(self._fd, stop - base, base)
        out = []
        pos = 0
        for _ in range(end - start):
            length = data[pos] * 256 + data[pos + 1]
            out.append(data[pos + _HEADER.size : pos + _HEADER.size + length])
            pos += _RECORD_OVERHEAD + length
        return out

    def iter_entries(self, start: int = 0, end: int | None = None, batch: int = 4096) -> Iterator[bytes]:
        end = self._durable if end is None else end
        for lo in range(start, end, batch):
            yield from self.entries(lo, min(lo + batch, end))

    @property
    def tree(self) -> merkle.Tree:
        """The Merkle tree over every durable entry.

        Only read it: the hashes of complete subtrees never change, so a reader may use
        them while appends continue.
        """
        with self._mutex:
            if self._unhashed:
                sha = merkle._sha256
                leaves = [sha(b"\x00" + rec[_HEADER.size : -_CRC.size]).digest() for rec in self._unhashed]
                self._tree.extend_concatenated(b"".join(leaves))
                self._unhashed = []
            return self._tree

    def _update_index(self) -> None:
        tree = self.tree
        assert self._index is not None
        self._index.write(self._offsets, tree.levels[0], tree.size)

    def _tree_for(self, size: int) -> merkle.Tree:
        if not 0 <= size <= self._durable:
            raise merkle.ProofError(f"tree size {size} is beyond the log's {self._durable} durable entries")
        return self.tree

    def leaf_hashes(self, size: int) -> bytes:
        """Leaf hashes of the first `size` entries, back to back."""
        return bytes(self._tree_for(size).levels[0][: size * merkle.HASH_SIZE])

    def root(self, size: int | None = None) -> bytes:
        size = self._durable if size is None else size
        return self._tree_for(size).root(size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        size = self._durable if size is None else size
        return merkle.inclusion_proof(index, size, self._tree_for(size))

    def consistency_proof(self, size1: int, size2: int | None = None) -> list[bytes]:
        size2 = self._durable if size2 is None else size2
        return merkle.consistency_proof(size1, size2, self._tree_for(size2))

    # -- checkpoints ---------------------------------------------------------------

    @property
    def origin(self) -> str | None:
        """The log's checkpoint origin: the signing key's name, or the last checkpoint's origin."""
        if self._signer is not None:
            return self._signer.name
        last = self.last_checkpoint()
        return last.origin if last else None

    @property
    def vkey(self) -> str | None:
        return self._signer.vkey if self._signer else None

    @property
    def signed_checkpoint(self) -> str | None:
        """The last signed checkpoint as a signed note, or None if none was ever signed."""
        return self._last_checkpoint

    def last_checkpoint(self) -> Checkpoint | None:
        if self._last_checkpoint is None:
            return None
        return parse_checkpoint(note_text(self._last_checkpoint))

    def checkpoint(self) -> str:
        """Sign a checkpoint of every durable entry, store it durably, and return the signed note.

        Refuses (CheckpointRefusedError) when the entries no longer extend the last signed
        checkpoint: fewer entries than it covers, or a different tree head at its size.
        """
        if self._signer is None:
            raise LogError(f"audit log {self.path} was opened without a signing key")
        if self._lock_fd is None:
            raise LogError(f"audit log {self.path} is open read-only")
        with self._checkpoint_lock:
            size = self._durable
            tree = self._tree_for(size)
            self._check_consistent_with_last(tree, size)
            body = Checkpoint(self._signer.name, size, tree.root(size)).format()
            signed = sign(body, self._signer)
            if self._index is not None:
                # The index is trusted up to the stored checkpoint: make it durable first.
                self._update_index()
                self._index.sync()
            write_atomically(self.path / "checkpoint", signed.encode())
            self._last_checkpoint = signed
            self._append_history(signed)
            return signed

    def _check_consistent_with_last(self, tree: merkle.Tree, size: int) -> None:
        if self._last_checkpoint is None:
            return
        signer = self._signer
        assert signer is not None
        try:
            open_note(self._last_checkpoint, [signer.verifier()])
        except (SignatureError, FormatError) as exc:
            raise CheckpointRefusedError(
                f"the stored checkpoint of {self.path} does not verify with key {signer.vkey} ({exc}); "
                "refusing to sign: the log was signed with another key or the file was altered"
            ) from exc
        last = parse_checkpoint(note_text(self._last_checkpoint))
        if last.origin != signer.name:
            raise CheckpointRefusedError(
                f"last checkpoint has origin {last.origin!r} but the key is for {signer.name!r}"
            )
        if last.size > size:
            raise CheckpointRefusedError(
                f"the log holds {size} entries but its last signed checkpoint covers {last.size}: "
                "entries were lost (restored from an old backup?); signing would contradict that checkpoint"
            )
        if tree.root(last.size) != last.root:
            raise CheckpointRefusedError(
                f"the first {last.size} entries no longer hash to the root of the last signed checkpoint: "
                "the log's history was changed; signing would fork it"
            )

    def add_cosignatures(self, cosigned: str) -> str:
        """Store the last signed checkpoint with the signature lines of `cosigned` merged in.

        `cosigned` is the last signed checkpoint plus witness cosignatures that the caller
        has verified (`sitewarden.witnessing`); exports and tlog-proofs then carry them.
        Refuses (LogError) when its text is not the last signed checkpoint's, e.g. when a
        newer checkpoint was signed meanwhile. Returns the stored note.
        """
        if self._lock_fd is None:
            raise LogError(f"audit log {self.path} is open read-only")
        with self._checkpoint_lock:
            last = self._last_checkpoint
            if last is None or note_text(last) != note_text(cosigned):
                raise LogError(f"the cosigned checkpoint is not the last one {self.path} signed; nothing was stored")
            merged = add_signatures(last, cosigned[len(note_text(cosigned)) + 1 :])
            write_atomically(self.path / "checkpoint", merged.encode())
            self._last_checkpoint = merged
            self._append_history(merged)
            return merged

    def _append_history(self, signed: str) -> None:
        line = (json.dumps({"note": signed}, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path / HISTORY, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def checkpoint_history(self, size: int | None = None) -> list[str]:
        """Every checkpoint the log signed (up to `size` entries), oldest first, each with the most
        cosignatures stored for it."""
        return read_history((self.path / HISTORY).read_bytes() if (self.path / HISTORY).exists() else b"", size)

    def tlog_proof(self, index: int) -> TlogProof:
        """A C2SP tlog-proof that entry `index` is in the tree of the last signed checkpoint."""
        last = self.last_checkpoint()
        if last is None or self._last_checkpoint is None:
            raise LogError(f"audit log {self.path} has no signed checkpoint; sign one first")
        if not 0 <= index < last.size:
            raise LogError(
                f"entry {index} is not covered by the last signed checkpoint (size {last.size}); sign a new one"
            )
        hashes = merkle.inclusion_proof(index, last.size, self.tree)
        return TlogProof(index, tuple(hashes), self._last_checkpoint)

    # -- export --------------------------------------------------------------------

    def export(self, dest: str | os.PathLike[str], extra_keys: Sequence[str] = ()) -> Path:
        """Write the last signed checkpoint and its entries in the C2SP tlog-tiles layout.

        `dest` is a new directory, or a file ending in .tar, .tar.gz or .tgz.
        """
        if self._last_checkpoint is None:
            raise LogError(f"audit log {self.path} has no signed checkpoint to export; sign one first")
        vkeys = [self.vkey] if self.vkey else []
        return write_export(self, self._last_checkpoint, dest, [*vkeys, *extra_keys])


def _load_signer(key: Signer | str | os.PathLike[str] | None) -> Signer | None:
    if key is None or isinstance(key, Signer):
        return key
    if isinstance(key, str) and key.startswith("PRIVATE+KEY+"):
        return Signer(key)
    return Signer.from_file(key)
