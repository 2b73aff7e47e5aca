"""audit.aio.AsyncAppender: durable appends awaited on the event loop, batched while a write runs."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from audit import EntryTooLargeError, Log, LogError
from audit import log as log_module
from audit.aio import AsyncAppender
from tests.conftest import make_entries


def test_concurrent_appends_get_their_own_indices_and_share_writes(log: Log, monkeypatch: pytest.MonkeyPatch) -> None:
    writes = []
    real_write = os.pwrite

    def counting_write(fd: int, data: bytes, offset: int) -> int:
        writes.append(len(data))
        return real_write(fd, data, offset)

    monkeypatch.setattr(log_module.os, "pwrite", counting_write)
    appender = AsyncAppender(log)
    entries = make_entries(2000)

    async def main() -> list[int]:
        return list(await asyncio.gather(*(appender.append(e) for e in entries)))

    indices = asyncio.run(main())
    appender.close()
    assert sorted(indices) == list(range(2000))
    assert all(log.entry(i) == e for i, e in zip(indices, entries, strict=True))
    assert len(writes) < 100, f"{len(writes)} writes for 2000 concurrent appends: no batching"


def test_a_bad_entry_is_refused_alone(log: Log) -> None:
    appender = AsyncAppender(log)

    async def main() -> list[object]:
        calls = [appender.append(b"a"), appender.append(b"x" * 65536), appender.append(b"b")]
        return list(await asyncio.gather(*calls, return_exceptions=True))

    first, bad, last = asyncio.run(main())
    appender.close()
    assert isinstance(bad, EntryTooLargeError)
    assert (log.entry(first), log.entry(last)) == (b"a", b"b")  # type: ignore[arg-type]
    assert log.size == 2


def test_a_failed_write_fails_every_waiter_of_its_batch(log: Log, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_write(fd: int, data: bytes, offset: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(log_module.os, "pwrite", failing_write)
    appender = AsyncAppender(log)

    async def main() -> list[object]:
        return list(await asyncio.gather(*(appender.append(e) for e in make_entries(10)), return_exceptions=True))

    results = asyncio.run(main())
    appender.close()
    assert all(isinstance(r, LogError) and "No space left" in str(r) for r in results), results
    assert log.size == 0


def test_a_cancelled_caller_still_gets_its_entry_written(log: Log) -> None:
    appender = AsyncAppender(log)

    async def main() -> None:
        task = asyncio.create_task(appender.append(b"client went away"))
        await asyncio.sleep(0)  # queued, the write started
        task.cancel()
        assert await appender.append(b"next") == 1

    asyncio.run(main())
    appender.close()
    assert log.entries(0, 2) == [b"client went away", b"next"]


def test_a_new_event_loop_starts_afresh(tmp_path: Path, keypair: tuple[str, str]) -> None:
    log = Log.open(tmp_path / "log", keypair[0])
    appender = AsyncAppender(log)
    assert asyncio.run(appender.append(b"first loop")) == 0
    assert asyncio.run(appender.append(b"second loop")) == 1
    appender.close()
    log.close()
    reopened = Log.open(tmp_path / "log", keypair[0])
    assert reopened.entries(0, 2) == [b"first loop", b"second loop"]
    reopened.close()
