"""Appending to an `audit.Log` from asyncio code without a thread per waiting request.

A web service that audits every request before answering would otherwise park one
worker thread per request in `Log.append` while the group commit runs. `AsyncAppender`
keeps the waiting on the event loop instead: requests queue their entries, one writer
thread appends whatever has queued with one `append_many` (one O_DSYNC write), and the
event loop resolves the batch's futures. While a write is in progress the next batch
gathers, so batches grow with the load and the per-request cost falls.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from audit.log import Log


class AsyncAppender:
    """Durable appends awaited on one event loop; `await append(entry)` returns the entry's index.

    Use it from one event loop at a time: a new loop (a server restarted in the same
    process) starts afresh, and anything a stopped loop left queued is written first.
    Other threads may still call `Log.append` directly; the log orders both.
    """

    def __init__(self, log: Log) -> None:
        self.log = log
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-append")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[tuple[bytes, asyncio.Future[int]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def append(self, entry: bytes) -> int:
        """Append one entry; return its index once it is durable (raises what `Log.append` raises)."""
        Log.check_entry(entry)  # one bad entry must not fail the others of its batch
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._adopt(loop)
        future: asyncio.Future[int] = loop.create_future()
        self._pending.append((entry, future))
        if self._writer is None:
            self._writer = loop.create_task(self._write())
        # A cancelled caller (a client that went away) still gets its entry written.
        return await future

    def _adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._pending:  # queued on a loop that stopped before writing them
            self.log.append_many([entry for entry, _ in self._pending])
        self._loop, self._pending, self._writer = loop, [], None

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    indices = await loop.run_in_executor(
                        self._executor, self.log.append_many, [entry for entry, _ in batch]
                    )
                except Exception as exc:  # every waiter of the batch gets the failure
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for (_, future), index in zip(batch, indices, strict=True):
                        if not future.done():
                            future.set_result(index)
        finally:
            self._writer = None

    def close(self) -> None:
        """Stop the writer thread (after its current write). The log stays open."""
        self._executor.shutdown(wait=True)
