"""The Fleet gateway: the only door from the sites to the controller's Flower SuperLink.

Flower 1.42 serves its Fleet API (what SuperNodes call), its Control API (start and stop runs,
register SuperNodes; no authentication in the open-source edition) and its ServerAppIo API on ONE
HTTPS port. The controller binds that port to 127.0.0.1 and puts this gateway in front of it for
the sites, with the controller's own TLS certificate. Every request is checked here, in order:

1. **The path is one of the Fleet API's methods, byte for byte.** `FLEET_METHODS` is the list of
   `POST /v1/fleet/<method>` routes of Flower 1.42's REST Fleet API
   (`flwr.superlink.routers.fleet.router`, which its SuperNode calls from
   `flwr.supernode.fleet_http_client`; a test holds the two to this list). The request's raw
   target (before any percent-decoding) must equal one of them exactly, with no query string:
   `..`, `.`, `//`, `%2f`, `%5c`, backslashes, any other encoding, any other method or path is a
   404 and nothing is sent upstream. The upstream URL is built from the allow-listed name, never
   from the request, so no normalisation on either side can turn a request into another API's.
2. **The body is bounded.** A `Content-Length` over `max_body` is refused (413) before a byte of
   the body is read; a body without one (chunked) is read with a running count and refused the
   moment it passes the limit. The body is kept in memory up to `SPOOL_IN_MEMORY` bytes and in an
   unnamed temporary file beyond (`tempfile.SpooledTemporaryFile`), so the controller's memory does
   not grow with a request's size, and only a complete body within the limit is forwarded
   (like nginx's default request buffering): the SuperLink never sees part of an oversized body.
3. **Concurrency is bounded.** At most `max_concurrent` requests are between reading their body
   and sending their answer; a request that finds no free slot within `slot_wait_s` is answered
   503 with `Retry-After`.

SuperNode authentication is end to end: the signature headers the SuperNode adds are forwarded
untouched and checked by the SuperLink. Hop-by-hop headers and `Forwarded`/`X-Forwarded-*` (which
the SuperLink's uvicorn would trust from a loopback peer) are not forwarded. Answers stream back.

It also counts the bytes that pass (`FleetGateway.traffic`), per direction: what a job
exchanged is read from there.
"""

from __future__ import annotations

import asyncio
import ssl
import tempfile
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import httpx
import uvicorn
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from sitewarden.httpserver import Server

__all__ = ["FLEET_METHODS", "FLEET_PREFIX", "MAX_BODY", "FleetGateway", "Traffic"]

FLEET_PREFIX = "/v1/fleet/"
# The Fleet API of Flower 1.42: every `@router.post` of flwr/superlink/routers/fleet/router.py.
FLEET_METHODS = (
    "register-node",
    "activate-node",
    "deactivate-node",
    "unregister-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)
_ALLOWED = {f"{FLEET_PREFIX}{name}".encode(): name for name in FLEET_METHODS}
# Headers that describe one hop of a connection, not the request (RFC 9110 section 7.6.1), and the
# proxy headers the SuperLink's uvicorn believes when they come from 127.0.0.1.
_NOT_FORWARDED = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding"}
    | {"upgrade", "host", "content-length", "forwarded", "x-forwarded-for", "x-forwarded-proto"}
    | {"x-forwarded-host", "x-forwarded-port", "x-forwarded-prefix", "x-real-ip"}
)
# Flower sends arrays in chunks of at most 5 MiB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE), one object per
# push-object request: no Fleet request of a SuperNode comes near this.
MAX_BODY = 64 << 20
MAX_CONCURRENT = 64
SPOOL_IN_MEMORY = 1 << 20
SLOT_WAIT_S = 10.0
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Traffic:
    """Bytes of request and response bodies that passed the gateway since it started."""

    requests: int
    from_sites: int
    to_sites: int

    def __sub__(self, earlier: Traffic) -> Traffic:
        return Traffic(
            self.requests - earlier.requests, self.from_sites - earlier.from_sites, self.to_sites - earlier.to_sites
        )


def fleet_method(raw_path: bytes, query_string: bytes) -> str | None:
    """The Fleet API method a request target names, or None: only an exact, unencoded match counts."""
    if query_string:
        return None
    return _ALLOWED.get(raw_path)


def _forwarded(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _NOT_FORWARDED}


def _refused(status: int, detail: str, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"detail": detail}, status_code=status, headers=dict(headers or {}))


class _BodyTooLarge(Exception):
    pass


class FleetGateway:
    """An HTTPS reverse proxy for the Fleet API of one SuperLink, run by uvicorn in its own thread."""

    def __init__(
        self,
        upstream: str,
        upstream_ca: str,
        *,
        host: str,
        port: int,
        certfile: str,
        keyfile: str,
        max_body: int = MAX_BODY,
        max_concurrent: int = MAX_CONCURRENT,
        slot_wait_s: float = SLOT_WAIT_S,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.host, self.port = host, port
        self.max_body = max_body
        self.max_concurrent = max_concurrent
        self.slot_wait_s = slot_wait_s
        self._upstream_tls = ssl.create_default_context(cafile=upstream_ca)
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._lock = threading.Lock()
        self._requests = self._from_sites = self._to_sites = 0
        self._server = Server(  # idle pooled connections do not hold up its stop
            uvicorn.Config(
                self._asgi,
                interface="asgi3",
                host=host,
                port=port,
                ssl_certfile=certfile,
                ssl_keyfile=keyfile,
                log_level="warning",
                server_header=False,
                timeout_graceful_shutdown=2,
                # Connections beyond this are answered 503 by uvicorn itself; requests are bounded below.
                limit_concurrency=max(4 * max_concurrent, 256),
            )
        )
        self._thread: threading.Thread | None = None

    @property
    def traffic(self) -> Traffic:
        with self._lock:
            return Traffic(self._requests, self._from_sites, self._to_sites)

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._server.run, name="fleet-gateway", daemon=True)
        self._thread.start()
        started = threading.Event()
        for _ in range(int(timeout / 0.05)):
            if self._server.started:
                started.set()
                break
            if not self._thread.is_alive():
                break
            started.wait(0.05)
        if not started.is_set():
            raise RuntimeError(f"the Fleet gateway did not start on {self.host}:{self.port}")

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- ASGI ---------------------------------------------------------------------------------

    async def _asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        checked = self._check(request)
        if isinstance(checked, Response):
            await checked(scope, receive, send)
            return
        assert self._slots is not None, "the gateway's lifespan creates it"
        try:
            await asyncio.wait_for(self._slots.acquire(), self.slot_wait_s)
        except TimeoutError:
            busy = _refused(503, "the Fleet gateway is at its limit of concurrent requests", {"Retry-After": "1"})
            await busy(scope, receive, send)
            return
        reply: httpx.Response | None = None
        try:
            response, reply = await self._forward(request, checked)
            await response(scope, receive, send)
        finally:
            if reply is not None:
                await reply.aclose()
            self._slots.release()

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._client = httpx.AsyncClient(verify=self._upstream_tls, timeout=120.0, trust_env=False)
                self._slots = asyncio.Semaphore(self.max_concurrent)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _check(self, request: Request) -> Response | str:
        """The Fleet method a request calls, or the answer that refuses it (nothing goes upstream)."""
        scope = request.scope
        raw_path = scope.get("raw_path") or scope["path"].encode("latin-1")
        query = scope.get("query_string", b"")
        if scope["method"] == "GET" and raw_path == b"/health" and not query:
            return JSONResponse({"status": "ok"})
        method = fleet_method(raw_path, query) if scope["method"] == "POST" else None
        if method is None:
            return _refused(404, "not served here: this port serves the Flower Fleet API only")
        declared = request.headers.get("content-length")
        if declared is not None and not declared.isdigit():
            return _refused(400, f"Content-Length {declared!r} is not a number of bytes")
        if declared is not None and int(declared) > self.max_body:
            return _refused(413, f"the request body must be at most {self.max_body} bytes")
        return method

    async def _forward(self, request: Request, method: str) -> tuple[Response, httpx.Response | None]:
        """Read the body (bounded), send it upstream, and stream the answer back (the caller closes it)."""
        assert self._client is not None
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
            try:
                size = await self._read_body(request, spool)
            except _BodyTooLarge:
                return _refused(413, f"the request body must be at most {self.max_body} bytes"), None
            except ClientDisconnect:
                return Response(status_code=400), None
            spool.seek(0)
            headers = {**_forwarded(request.headers), "content-length": str(size)}
            upstream = self._client.build_request(
                "POST", f"{self.upstream}{FLEET_PREFIX}{method}", content=_chunks(spool), headers=headers
            )
            try:
                # Returns once the whole body is sent and the answer's head is in.
                reply = await self._client.send(upstream, stream=True)
            except httpx.HTTPError as exc:
                return _refused(502, f"the SuperLink is unreachable: {exc.__class__.__name__}"), None
        with self._lock:
            self._requests += 1
            self._from_sites += size

        async def relay() -> AsyncIterator[bytes]:
            async for chunk in reply.aiter_raw():
                with self._lock:
                    self._to_sites += len(chunk)
                yield chunk

        # The body is relayed as it came (aiter_raw): its content coding stays true.
        headers = {k: v for k, v in reply.headers.items() if k.lower() not in _NOT_FORWARDED}
        return StreamingResponse(relay(), status_code=reply.status_code, headers=headers), reply

    async def _read_body(self, request: Request, spool: IO[bytes]) -> int:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise _BodyTooLarge
            spool.write(chunk)
        return size


async def _chunks(spool: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := spool.read(_CHUNK):
        yield chunk
