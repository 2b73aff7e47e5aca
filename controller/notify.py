"""Wake long-polling agents when their desired state changes, or when the controller signs a new
checkpoint of its audit log (agents that witness it ask to be woken for that too).

Service code runs in worker threads; agents wait in the event loop. A waiter subscribes
before it reads the current version, so a change between the read and the wait is not
missed. `notify` may be called from any thread. `close` (at shutdown, in the event loop)
wakes every waiter and every later subscriber at once, so that parked long polls answer
within the server's grace period instead of being cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator


class DesiredNotifier:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, set[asyncio.Future[None]]] = defaultdict(set)
        self._checkpoint_waiters: set[asyncio.Future[None]] = set()
        self._closed = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @contextlib.contextmanager
    def subscribe(self, site_id: str) -> Iterator[asyncio.Future[None]]:
        """A future resolved at the site's next change; unsubscribed on exit."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_result(None)
        self._waiters[site_id].add(future)
        try:
            yield future
        finally:
            waiters = self._waiters.get(site_id)
            if waiters is not None:
                waiters.discard(future)
                if not waiters:
                    del self._waiters[site_id]

    def notify(self, site_ids: Iterable[str]) -> None:
        ids = list(site_ids)
        if self._loop is not None and ids:
            self._loop.call_soon_threadsafe(self._wake, ids)

    def _wake(self, site_ids: list[str]) -> None:
        for site_id in site_ids:
            for future in self._waiters.get(site_id, ()):
                if not future.done():
                    future.set_result(None)

    @contextlib.contextmanager
    def subscribe_checkpoint(self) -> Iterator[asyncio.Future[None]]:
        """A future resolved when the next checkpoint of the controller's audit log is signed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_result(None)
        self._checkpoint_waiters.add(future)
        try:
            yield future
        finally:
            self._checkpoint_waiters.discard(future)

    def notify_checkpoint(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has stopped: nobody waits any more
                self._loop.call_soon_threadsafe(self._wake_checkpoint)

    def _wake_checkpoint(self) -> None:
        for future in list(self._checkpoint_waiters):
            if not future.done():
                future.set_result(None)

    def close(self) -> None:
        """Wake every waiter now and every later subscriber at once (the server is shutting down)."""
        self._closed = True
        self._wake(list(self._waiters))
        self._wake_checkpoint()

    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())
