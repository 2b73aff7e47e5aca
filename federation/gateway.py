"""The Fleet gateway: the only door from the sites to the controller's Flower SuperLink.

Flower 1.42 serves its Fleet API (what SuperNodes call), its Control API (start and stop runs,
register SuperNodes) and its ServerAppIo API on ONE HTTPS port. The controller binds that port
to 127.0.0.1 and puts this gateway in front of it for the sites: it serves `POST /v1/fleet/*`
(and `GET /health`) with the controller's own TLS certificate, forwards each request to the
SuperLink, and answers 404 to everything else, so that the Control API is reachable only from
the controller itself. SuperNode authentication is end to end: the signature headers the
SuperNode adds are forwarded untouched and checked by the SuperLink.

It also counts the bytes that pass (`FleetGateway.traffic`), per direction: what a job
exchanged is read from there.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["FleetGateway", "Traffic"]

FLEET_PREFIX = "/v1/fleet/"
# Headers that describe one hop of a connection, not the request (RFC 9110 section 7.6.1).
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding"}
    | {"upgrade", "host", "content-length"}
)
MAX_BODY = 1 << 30


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


def _forwarded(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}


class FleetGateway:
    """An HTTPS reverse proxy for the Fleet API of one SuperLink, run by uvicorn in its own thread."""

    def __init__(self, upstream: str, upstream_ca: str, *, host: str, port: int, certfile: str, keyfile: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.host, self.port = host, port
        self._upstream_tls = ssl.create_default_context(cafile=upstream_ca)
        self._client: httpx.AsyncClient | None = None
        self._lock = threading.Lock()
        self._requests = self._from_sites = self._to_sites = 0
        app = Starlette(
            routes=[
                Route("/health", self._health, methods=["GET"]),
                Route("/v1/fleet/{call:path}", self._fleet, methods=["POST"]),
                Route("/{other:path}", self._elsewhere, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
            ],
            lifespan=self._lifespan,
        )
        self._server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                ssl_certfile=certfile,
                ssl_keyfile=keyfile,
                log_level="warning",
                server_header=False,
                timeout_graceful_shutdown=2,
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

    # -- routes -----------------------------------------------------------------------------

    async def _health(self, _request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _elsewhere(self, request: Request) -> Response:
        return JSONResponse(
            {"detail": f"{request.url.path} is not served here: this port serves the Flower Fleet API only"},
            status_code=404,
        )

    async def _fleet(self, request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY:
            return JSONResponse({"detail": f"request body over {MAX_BODY} bytes"}, status_code=413)
        assert self._client is not None, "the gateway's lifespan opens the client"
        try:
            reply = await self._client.post(
                f"{self.upstream}{request.url.path}", content=body, headers=_forwarded(request.headers)
            )
        except httpx.HTTPError as exc:
            return JSONResponse({"detail": f"the SuperLink is unreachable: {exc.__class__.__name__}"}, status_code=502)
        with self._lock:
            self._requests += 1
            self._from_sites += len(body)
            self._to_sites += len(reply.content)
        # httpx has decoded any content coding already: what goes back is the plain body.
        headers = {k: v for k, v in _forwarded(reply.headers).items() if k.lower() != "content-encoding"}
        return Response(reply.content, status_code=reply.status_code, headers=headers)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self._client = httpx.AsyncClient(verify=self._upstream_tls, timeout=120.0, trust_env=False)
        try:
            yield
        finally:
            await self._client.aclose()
