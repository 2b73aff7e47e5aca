"""audit.Log: durable appends with group commit, recovery, checkpoints that never contradict."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from audit import CheckpointRefusedError, EntryTooLargeError, Log, LogError, merkle
from audit import log as log_module
from audit.checkpoint import parse
from audit.note import ALG_COSIGNATURE_V1, Signer, generate_key, note_text, open_note, signature_lines
from tests.conftest import make_entries


def test_append_returns_indices_and_entries_read_back_exactly(log: Log) -> None:
    entries = make_entries(300)
    assert [log.append(e) for e in entries[:10]] == list(range(10))
    assert log.append_many(entries[10:]) == list(range(10, 300))
    assert log.size == 300
    assert log.entry(0) == entries[0]
    assert log.entries(100, 300) == entries[100:]
    assert log.root() == merkle.root(merkle.leaf_hash(e) for e in entries)


def test_empty_and_maximal_entries_are_accepted_oversized_refused(log: Log) -> None:
    assert log.append(b"") == 0
    assert log.append(b"x" * 65535) == 1
    with pytest.raises(EntryTooLargeError, match="65536 bytes exceeds the limit of 65535"):
        log.append(b"x" * 65536)
    assert log.size == 2
    assert log.entry(1) == b"x" * 65535


def test_concurrent_appends_share_writes_group_commit(
    tmp_path: Path, keypair: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = []
    real_write = os.pwrite

    def counting_write(fd: int, data: bytes, offset: int) -> int:
        writes.append(len(data))
        return real_write(fd, data, offset)

    log = Log.open(tmp_path / "log", keypair[0])
    monkeypatch.setattr(log_module.os, "pwrite", counting_write)
    threads, per_thread = 32, 100
    results: list[list[int]] = [[] for _ in range(threads)]

    def writer(t: int) -> None:
        for e in make_entries(per_thread, start=t * per_thread):
            results[t].append(log.append(e))

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    monkeypatch.undo()
    total = threads * per_thread
    assert sorted(i for r in results for i in r) == list(range(total))
    # Each thread's indices increase: an append returns only after it is stored in order.
    assert all(r == sorted(r) for r in results)
    assert len(writes) < total / 4, f"{len(writes)} writes for {total} appends: appends did not share writes"
    # Every acknowledged entry reads back with the bytes its writer appended.
    for t, r in enumerate(results):
        for k, index in enumerate(r):
            assert log.entry(index) == make_entries(1, start=t * per_thread + k)[0]
    log.close()


def test_entries_survive_reopen_and_checkpoint_is_stored_durably(tmp_path: Path, keypair: tuple[str, str]) -> None:
    skey, vkey = keypair
    with Log.open(tmp_path / "log", skey) as log:
        log.append_many(make_entries(1000))
        signed = log.checkpoint()
        root = log.root()
    assert (tmp_path / "log" / "checkpoint").read_text() == signed
    cp = parse(open_note(signed, [vkey]).text)
    assert (cp.origin, cp.size, cp.root) == ("sitewarden/test-site", 1000, root)
    with Log.open(tmp_path / "log", skey) as log:
        assert log.size == 1000
        assert log.root() == root
        assert log.entry(999) == make_entries(1, start=999)[0]
        assert log.recovered_bytes == 0


def test_a_second_writer_is_refused_while_the_log_is_open(tmp_path: Path, log: Log) -> None:
    with pytest.raises(LogError, match="open for writing by another process"):
        Log.open(log.path)


def test_readonly_open_reads_next_to_a_live_writer(log: Log) -> None:
    log.append_many(make_entries(10))
    log.checkpoint()
    log.append_many(make_entries(5, start=10))
    reader = Log.open(log.path, readonly=True)
    assert reader.size == 15
    assert reader.last_checkpoint().size == 10
    with pytest.raises(LogError, match="read-only"):
        reader.append(b"x")
    reader.close()


def test_torn_last_record_is_cut_off_on_reopen(tmp_path: Path, keypair: tuple[str, str]) -> None:
    path = tmp_path / "log"
    with Log.open(path, keypair[0]) as log:
        log.append_many(make_entries(20))
        log.checkpoint()
        log.append_many(make_entries(5, start=20))
    torn = log_module.encode_record(b'{"half":"written"}')
    with open(path / "entries", "ab") as f:
        f.write(torn[: len(torn) // 2])
    with Log.open(path, keypair[0]) as log:
        assert log.size == 25
        assert log.recovered_bytes == len(torn) // 2
        assert log.append(b"next") == 25
        log.checkpoint()
    with Log.open(path, keypair[0]) as log:
        assert log.entry(25) == b"next"


def test_an_open_log_writes_zeros_ahead_and_a_clean_close_cuts_them(tmp_path: Path) -> None:
    path = tmp_path / "log"
    entries = make_entries(20)
    records_end = len(log_module.MAGIC) + sum(len(log_module.encode_record(e)) for e in entries)
    log = Log.open(path)
    for e in entries:
        log.append(e)
    data = (path / "entries").read_bytes()
    assert len(data) > records_end
    assert data[records_end:].count(0) == len(data) - records_end
    log.close()
    assert (path / "entries").stat().st_size == records_end
    with Log.open(path) as reopened:
        assert reopened.recovered_bytes == 0
        assert reopened.entries(0, 20) == entries


def test_a_log_copied_while_open_as_a_crash_leaves_it_opens_with_every_entry(tmp_path: Path) -> None:
    path = tmp_path / "log"
    entries = make_entries(30)
    records_end = len(log_module.MAGIC) + sum(len(log_module.encode_record(e)) for e in entries)
    with Log.open(path) as log:
        for e in entries:
            log.append(e)
        zeros = (path / "entries").stat().st_size - records_end
        assert zeros > 0
        shutil.copytree(path, tmp_path / "copy")
    with Log.open(tmp_path / "copy") as copy:
        assert copy.size == 30
        assert copy.recovered_bytes == zeros
        assert copy.entries(0, 30) == entries
        assert copy.append(b"next") == 30


def test_a_torn_record_before_the_zeros_ahead_is_cut_off_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with Log.open(path) as log:
        log.append_many(make_entries(20))
    torn = log_module.encode_record(b'{"half":"written"}')
    with open(path / "entries", "ab") as f:
        f.write(torn[: len(torn) // 2] + bytes(65536))
    with Log.open(path) as log:
        assert log.size == 20
        assert log.recovered_bytes == len(torn) // 2 + 65536
        assert log.append(b"next") == 20
    with Log.open(path) as log:
        assert log.entry(20) == b"next"


def test_data_after_the_zeros_ahead_is_damage_and_refuses_to_open(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with Log.open(path) as log:
        log.append_many(make_entries(20))
    torn = log_module.encode_record(b'{"half":"written"}')
    with open(path / "entries", "ab") as f:
        f.write(torn[: len(torn) // 2] + bytes(4096) + log_module.encode_record(b"late"))
    with pytest.raises(LogError, match=r"corrupt at byte .* not at the end of the file"):
        Log.open(path)


def test_zero_filled_tail_after_power_loss_is_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with Log.open(path) as log:
        log.append_many(make_entries(3))
    with open(path / "entries", "ab") as f:
        f.write(bytes(4096))
    with Log.open(path) as log:
        assert log.size == 3
        assert log.recovered_bytes == 4096


def test_damage_in_the_middle_refuses_to_open_and_keeps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with Log.open(path) as log:
        log.append_many(make_entries(50))
    data = bytearray((path / "entries").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "entries").write_bytes(bytes(data))
    with pytest.raises(LogError, match=r"corrupt at byte .* not at the end of the file"):
        Log.open(path)
    assert (path / "entries").read_bytes() == bytes(data)


def test_log_refuses_to_sign_after_restore_from_an_old_backup(tmp_path: Path, keypair: tuple[str, str]) -> None:
    path = tmp_path / "log"
    with Log.open(path, keypair[0]) as log:
        log.append_many(make_entries(100))
        log.checkpoint()
    shutil.copytree(path, tmp_path / "backup")
    with Log.open(path, keypair[0]) as log:
        log.append_many(make_entries(50, start=100))
        log.checkpoint()
    # The entries come back from the backup; the newer signed checkpoint stays.
    shutil.copy(tmp_path / "backup" / "entries", path / "entries")
    with Log.open(path, keypair[0]) as log:
        assert log.size == 100
        with pytest.raises(CheckpointRefusedError, match="holds 100 entries but its last signed checkpoint covers 150"):
            log.checkpoint()
        # Appending new entries does not make it consistent: the history differs.
        log.append_many(make_entries(60, start=1000))
        with pytest.raises(CheckpointRefusedError, match="no longer hash to the root"):
            log.checkpoint()
    assert parse(note_text((path / "checkpoint").read_text())).size == 150


def test_log_refuses_to_sign_with_another_key(tmp_path: Path, keypair: tuple[str, str]) -> None:
    path = tmp_path / "log"
    with Log.open(path, keypair[0]) as log:
        log.append(b"a")
        log.checkpoint()
    other, _ = generate_key("sitewarden/test-site")
    with Log.open(path, other) as log, pytest.raises(CheckpointRefusedError, match="does not verify with key"):
        log.checkpoint()


def test_damaged_index_is_rebuilt_from_the_entries(tmp_path: Path, keypair: tuple[str, str]) -> None:
    path = tmp_path / "log"
    with Log.open(path, keypair[0]) as log:
        log.append_many(make_entries(600))
        log.checkpoint()
        root = log.root()
    leaves = bytearray((path / "index.leaves").read_bytes())
    leaves[32 * 17] ^= 0x01
    (path / "index.leaves").write_bytes(bytes(leaves))
    with Log.open(path, keypair[0]) as log:
        assert log.root() == root
        log.append(b"more")
        log.checkpoint()


def test_write_failure_stops_the_log_and_reopen_recovers(
    tmp_path: Path, keypair: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "log"
    log = Log.open(path, keypair[0])
    log.append_many(make_entries(10))

    def failing_write(fd: int, data: bytes, offset: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(log_module.os, "pwrite", failing_write)
    with pytest.raises(LogError, match="No space left on device"):
        log.append(b"lost")
    monkeypatch.undo()
    with pytest.raises(LogError, match="cannot append"):
        log.append(b"after")
    log.close()
    with Log.open(path, keypair[0]) as reopened:
        assert reopened.size == 10


def test_concurrent_appenders_all_return_when_a_write_fails_midway(
    tmp_path: Path, keypair: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No appender hangs or gets an index for an entry that was not stored."""
    path = tmp_path / "log"
    log = Log.open(path, keypair[0])
    real_write = os.pwrite
    calls = {"n": 0}

    def write_then_fail(fd: int, data: bytes, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] > 40:
            raise OSError(5, "Input/output error")
        return real_write(fd, data, offset)

    monkeypatch.setattr(log_module.os, "pwrite", write_then_fail)
    acknowledged: dict[int, bytes] = {}
    failures: list[str] = []

    def writer(t: int) -> None:
        for e in make_entries(200, start=t * 200):
            try:
                acknowledged[log.append(e)] = e
            except LogError as exc:
                failures.append(str(exc))
                return

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(32)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
        assert not w.is_alive(), "an appender hung after the write failure"
    monkeypatch.undo()
    assert len(failures) == 32  # every writer eventually hit the failure
    log.close()
    with Log.open(path, keypair[0]) as reopened:
        assert reopened.size == len(acknowledged)
        for index, entry in acknowledged.items():
            assert reopened.entry(index) == entry


def test_the_log_keeps_every_checkpoint_it_signed_with_its_latest_cosignatures(
    tmp_path: Path, keypair: tuple[str, str]
) -> None:
    witness = Signer(generate_key("sitewarden/witness/main", ALG_COSIGNATURE_V1)[0])
    with Log.open(tmp_path / "log", keypair[0]) as log:
        log.append_many(make_entries(10))
        first = log.checkpoint()
        cosigned = log.add_cosignatures(first + signature_lines(note_text(first), witness))
        log.append_many(make_entries(5, start=10))
        second = log.checkpoint()
        assert log.checkpoint_history() == [cosigned, second]
        assert log.checkpoint_history(size=12) == [cosigned]
    # A crash in the middle of appending a line leaves it torn: readers skip it.
    with (tmp_path / "log" / "checkpoints.jsonl").open("ab") as f:
        f.write(b'{"note": "sitewarden/te')
    with Log.open(tmp_path / "log", keypair[0]) as log:
        assert log.checkpoint_history() == [cosigned, second]
        third = log.checkpoint()
        assert log.checkpoint_history()[-1] == third
