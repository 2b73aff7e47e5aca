"""The uvicorn server the controller, the agent and the Fleet gateway run: one that a pooled client cannot hold
up at shutdown."""

from __future__ import annotations

import socket
from collections.abc import Callable

import uvicorn


class Server(uvicorn.Server):
    """uvicorn's server, closing idle keep-alive connections at once when it shuts down.

    uvicorn closes them gracefully, which over TLS waits for the client's close_notify: a connection in a
    client's pool is not read until its next request, so each one holds the shutdown until the grace period
    ends (every HTTP client keeps one, the openai client included). Nothing is in flight on an idle
    connection, so it is aborted; requests still running get the grace period. `before_shutdown` runs first
    (the controller answers its parked long polls there: uvicorn waits for them before the app's lifespan
    shutdown could).
    """

    def __init__(self, config: uvicorn.Config, before_shutdown: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self._before_shutdown = before_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._before_shutdown is not None:
            self._before_shutdown()
        for connection in list(self.server_state.connections):
            cycle = getattr(connection, "cycle", None)
            if cycle is None or cycle.response_complete:
                connection.transport.abort()
        await super().shutdown(sockets)
