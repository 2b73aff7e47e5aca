"""A hostile network against the Fleet gateway: whoever can reach the Fleet port tries to reach the
rest of the SuperLink (its unauthenticated Control API, its ServerAppIo API) or to exhaust the
controller.

- A live `FleetGateway` (uvicorn, TLS) in front of a recording upstream that stands in for the
  SuperLink and writes down every request that reaches it, raw target included. Requests are
  written byte for byte on a TLS socket, since httpx (like browsers) would normalise `..`, `.` and
  `//` away before sending. None of a table of traversal and encoding variants reaches the upstream;
  each is a 404 (or a 400 from the HTTP parser, for targets it cannot parse at all). Every Fleet
  API method does reach it, at exactly its own path, with its body and authentication headers.
- Bodies: over the limit by `Content-Length` (refused before a byte is read) or chunked (refused as
  soon as the count passes it); and concurrency over the bound (503 with Retry-After).
- The real controller (`sitewarden controller serve --fleet-port`): an oversized upload to its
  Fleet port is refused without its resident memory growing by anything like the upload's size.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import httpx
import psutil
import pytest
import uvicorn

from federation.gateway import FLEET_METHODS, FleetGateway
from tests.controller_server import free_port, start_controller
from tests.tls import TestPKI

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20


@dataclass
class Seen:
    method: str
    raw_path: bytes
    query: bytes
    headers: dict[str, str]
    body: bytes


@dataclass
class RecordingUpstream:
    """Stands in for the SuperLink: records every request and answers 200 (optionally holding it)."""

    pki: TestPKI
    port: int = field(default_factory=free_port)
    seen: list[Seen] = field(default_factory=list)
    hold: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.seen.append(Seen(scope["method"], scope["raw_path"], scope["query_string"], headers, body))
        while self.hold.is_set() and not self.release.is_set():
            await asyncio.sleep(0.01)
        answer = b"upstream saw " + scope["raw_path"]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": answer})

    def start(self) -> None:
        config = uvicorn.Config(
            self,
            host="127.0.0.1",
            port=self.port,
            ssl_certfile=str(self.pki.server_cert),
            ssl_keyfile=str(self.pki.server_key),
            log_level="warning",
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            assert time.monotonic() < deadline, "the recording upstream did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def upstream(pki: TestPKI) -> Iterator[RecordingUpstream]:
    server = RecordingUpstream(pki)
    server.start()
    yield server
    server.stop()


def _gateway(pki: TestPKI, upstream: RecordingUpstream, **limits: Any) -> FleetGateway:
    gateway = FleetGateway(
        f"https://127.0.0.1:{upstream.port}",
        str(pki.ca_cert),
        host="127.0.0.1",
        port=free_port(),
        certfile=str(pki.server_cert),
        keyfile=str(pki.server_key),
        **limits,
    )
    gateway.start()
    return gateway


@pytest.fixture(scope="module")
def gateway(pki: TestPKI, upstream: RecordingUpstream) -> Iterator[FleetGateway]:
    started = _gateway(pki, upstream, max_body=1 * MiB, max_concurrent=2, slot_wait_s=0.5)
    yield started
    started.stop()


# --- a client that sends exactly the bytes it is given -------------------------------------------


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]
    sent: int  # body bytes the client got out before the server answered or closed


def raw_request(port: int, ca: Path, head: bytes, body: Iterable[bytes] = (), *, timeout: float = 30.0) -> Answer:
    """Write `head` and then `body` on a TLS connection, stopping as soon as the server answers or
    closes; parse the answer with h11. No client library in between to normalise the target."""
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as plain,
        context.wrap_socket(plain, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(head)
        sent, early = 0, None
        for chunk in body:
            early = _early_answer(tls)
            if early is not None:
                break  # the server answered (or closed) before the body was complete
            try:
                tls.sendall(chunk)
            except (OSError, ssl.SSLError):
                break
            sent += len(chunk)
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
        client.send(h11.EndOfMessage())
        if early is not None:
            client.receive_data(early)
        status, headers, data = 0, {}, b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = client.next_event()
            if event is h11.NEED_DATA:
                try:
                    client.receive_data(tls.recv(65536))
                except (OSError, ssl.SSLError):
                    client.receive_data(b"")
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                data += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        return Answer(status, data, headers, sent)


def _early_answer(tls: ssl.SSLSocket) -> bytes | None:
    """Bytes of an answer already waiting (b"" if the server closed), or None. TLS 1.3 session tickets
    make the socket readable without any answer, so readability alone says nothing."""
    readable, _, _ = select.select([tls], [], [], 0)
    if not readable and not tls.pending():
        return None
    previous = tls.gettimeout()
    tls.settimeout(0.0)
    try:
        return tls.recv(65536)
    except (ssl.SSLWantReadError, BlockingIOError):
        return None
    except (OSError, ssl.SSLError):
        return b""
    finally:
        tls.settimeout(previous)


def post(
    gateway: FleetGateway, ca: Path, target: str, body: bytes = b"", method: str = "POST", **headers: str
) -> Answer:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return raw_request(gateway.port, ca, head + body)


def chunked(total: int, piece: int = MiB) -> Iterator[bytes]:
    """A chunked request body of `total` bytes, framed (RFC 9112 section 7.1), ending with the last chunk."""
    block = b"\x5a" * piece
    left = total
    while left > 0:
        size = min(piece, left)
        yield f"{size:x}\r\n".encode() + block[:size] + b"\r\n"
        left -= size
    yield b"0\r\n\r\n"


# --- the allow-list is Flower's Fleet API -------------------------------------------------------


def test_the_allow_list_is_exactly_the_fleet_api_of_the_installed_flower() -> None:
    """Read from flwr's own sources: the SuperLink's REST Fleet router and the SuperNode's client."""
    import inspect  # noqa: PLC0415
    import re  # noqa: PLC0415

    from flwr.superlink.routers.fleet.router import router  # noqa: PLC0415
    from flwr.supernode import fleet_http_client  # noqa: PLC0415

    served = sorted(route.path for route in router.routes)
    called = sorted(set(re.findall(r'path="(/v1/fleet/[a-z-]+)"', inspect.getsource(fleet_http_client))))
    allowed = sorted(f"/v1/fleet/{name}" for name in FLEET_METHODS)
    assert served == allowed
    assert called == allowed
    assert all(getattr(route, "methods", None) == {"POST"} for route in router.routes)


# --- traversal and encodings ---------------------------------------------------------------------

TRAVERSALS = [
    "/v1/fleet/%2e%2e/control/register-node",
    "/v1/fleet/%2E%2E/control/list-runs",
    "/v1/fleet/../control/register-node",
    "/v1/fleet/..%2fcontrol/register-node",
    "/v1/fleet/..%2Fcontrol%2Fstop-run",
    "/v1/fleet/%2e%2e%2fcontrol%2fstart-run",
    "/v1/fleet/.%2e/control/register-node",
    "/v1/fleet/%2e./control/list-nodes",
    "/v1/fleet/%252e%252e/control/register-node",
    "/v1/fleet/%2e%2e%2f%2e%2e%2fhealth",
    "/v1/fleet/./pull-messages",
    "/v1/fleet/%2e/pull-messages",
    "/v1/fleet/pull-messages/.",
    "/v1/fleet//pull-messages",
    "/v1//fleet/pull-messages",
    "//v1/fleet/pull-messages",
    "/v1/fleet/%2fpull-messages",
    "/v1/fleet%2fpull-messages",
    "/v1%2Ffleet%2Fpull-messages",
    "/v1/fleet/pull-messages%2f..%2f..%2fcontrol%2flist-runs",
    "/v1/fleet/pull-messages/",
    "/v1/fleet/pull-messages/..",
    "/v1/fleet/pull-messages/../../control/list-runs",
    "/v1/fleet/%5c..%5ccontrol%5clist-runs",
    "/v1/fleet/..%5Ccontrol/list-runs",
    "/v1/fleet/\\..\\control\\list-runs",
    "/v1/fleet\\pull-messages",
    "/v1/fleet/pull-messages\\",
    "/v1/fleet/%c0%ae%c0%ae/control/list-runs",
    "/v1/fleet/%e0%80%ae%e0%80%ae/control/list-runs",
    "/v1/fleet/%u002e%u002e/control/list-runs",
    "/v1/fleet/pull%2dmessages",
    "/v1/fleet/PULL-MESSAGES",
    "/V1/FLEET/pull-messages",
    "/v1/fleet/pull-messages;x=1",
    "/v1/fleet/pull-messages%00",
    "/v1/fleet/pull-messages%20",
    "/v1/fleet/pull-messages?next=/v1/control/list-runs",
    "/v1/fleet/",
    "/v1/fleet",
    "/v1/control/list-runs",
    "/v1/control/register-node",
    "/v1/runtime/pull-messages",
    "/health/../v1/control/list-runs",
    "/docs",
    "/openapi.json",
    "http://127.0.0.1/v1/fleet/../control/list-runs",
    "https://127.0.0.1/v1/fleet/%2e%2e/control/list-runs",
    "*",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_no_traversal_or_encoding_reaches_the_superlink(
    gateway: FleetGateway, upstream: RecordingUpstream, pki: TestPKI, target: str
) -> None:
    before = len(upstream.seen)
    answer = post(gateway, pki.ca_cert, target, b"\x0a\x02hi")
    # 404 from the gateway; 400 only where the HTTP parser cannot read the request line at all.
    assert answer.status in (404, 400), (target, answer)
    if answer.status == 404:
        assert b"Fleet API only" in answer.body
    assert len(upstream.seen) == before, f"{target!r} reached the upstream as {upstream.seen[before:]}"


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_other_methods_on_fleet_paths_are_refused(
    gateway: FleetGateway, upstream: RecordingUpstream, pki: TestPKI, method: str
) -> None:
    before = len(upstream.seen)
    answer = post(gateway, pki.ca_cert, "/v1/fleet/pull-messages", method=method)
    assert answer.status == 404
    assert len(upstream.seen) == before


def test_every_fleet_method_reaches_the_superlink_at_its_own_path(
    gateway: FleetGateway, upstream: RecordingUpstream, pki: TestPKI
) -> None:
    for name in FLEET_METHODS:
        before = len(upstream.seen)
        body = f"protobuf of {name}".encode()
        answer = post(
            gateway,
            pki.ca_cert,
            f"/v1/fleet/{name}",
            body,
            Content_Type="application/protobuf",
            Flwr_Public_Key="site-key",
            Flwr_Signature="c2lnbmF0dXJl",
            X_Forwarded_For="10.6.6.6",
            Forwarded="for=10.6.6.6",
        )
        assert answer.status == 200, (name, answer)
        assert answer.body == f"upstream saw /v1/fleet/{name}".encode()
        [seen] = upstream.seen[before:]
        assert (seen.method, seen.raw_path, seen.query) == ("POST", f"/v1/fleet/{name}".encode(), b"")
        assert seen.body == body
        assert seen.headers["content-length"] == str(len(body)) and "transfer-encoding" not in seen.headers
        # SuperNode authentication passes untouched; a site cannot speak for another client address.
        assert seen.headers["flwr-public-key"] == "site-key" and seen.headers["flwr-signature"] == "c2lnbmF0dXJl"
        assert "x-forwarded-for" not in seen.headers and "forwarded" not in seen.headers
    assert gateway.traffic.requests >= len(FLEET_METHODS)


def test_health_is_answered_by_the_gateway_itself(gateway: FleetGateway, upstream: RecordingUpstream) -> None:
    before = len(upstream.seen)
    with httpx.Client(verify=str(upstream.pki.ca_cert), timeout=10) as http:
        assert http.get(f"https://127.0.0.1:{gateway.port}/health").json() == {"status": "ok"}
    assert len(upstream.seen) == before


# --- bodies and concurrency -----------------------------------------------------------------------


def test_a_declared_oversized_body_is_refused_before_it_is_read(
    gateway: FleetGateway, upstream: RecordingUpstream, pki: TestPKI
) -> None:
    before = len(upstream.seen)
    head = b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (64 * MiB)
    answer = raw_request(gateway.port, pki.ca_cert, head, (b"\0" * MiB for _ in range(64)))
    assert answer.status == 413 and b"at most 1048576 bytes" in answer.body
    assert answer.sent < 32 * MiB  # answered at the header: most of the body was never taken
    assert len(upstream.seen) == before


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(
    gateway: FleetGateway, upstream: RecordingUpstream, pki: TestPKI
) -> None:
    before = len(upstream.seen)
    head = b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = raw_request(gateway.port, pki.ca_cert, head, chunked(64 * MiB, piece=64 << 10))
    assert answer.status == 413
    assert answer.sent < 32 * MiB
    assert len(upstream.seen) == before  # not a byte of it, not even the part within the limit


def test_a_chunked_body_within_the_limit_is_forwarded_whole(
    gateway: FleetGateway, upstream: RecordingUpstream, pki: TestPKI
) -> None:
    before = len(upstream.seen)
    head = b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = raw_request(gateway.port, pki.ca_cert, head, chunked(MiB, piece=100_000))
    assert answer.status == 200
    [seen] = upstream.seen[before:]
    assert seen.body == b"\x5a" * MiB and seen.headers["content-length"] == str(MiB)


def test_requests_beyond_the_concurrency_bound_wait_then_get_503(
    gateway: FleetGateway, upstream: RecordingUpstream, pki: TestPKI
) -> None:
    """Two requests held at the upstream fill the gateway's two slots; a third is turned away."""
    upstream.release.clear()
    upstream.hold.set()
    answers: list[Answer] = []
    held = [
        threading.Thread(target=lambda: answers.append(post(gateway, pki.ca_cert, "/v1/fleet/pull-messages", b"x")))
        for _ in range(2)
    ]
    try:
        for thread in held:
            thread.start()
        deadline = time.monotonic() + 20
        while sum(1 for s in upstream.seen if s.body == b"x") < 2:
            assert time.monotonic() < deadline, "the two held requests did not reach the upstream"
            time.sleep(0.02)
        before = len(upstream.seen)
        turned_away = post(gateway, pki.ca_cert, "/v1/fleet/pull-messages", b"y")
        assert turned_away.status == 503 and turned_away.headers.get("retry-after") == "1"
        assert len(upstream.seen) == before
    finally:
        upstream.release.set()
        for thread in held:
            thread.join(timeout=20)
        upstream.hold.clear()
    assert [a.status for a in answers] == [200, 200]
    assert post(gateway, pki.ca_cert, "/v1/fleet/pull-messages", b"z").status == 200  # the slots came back


def test_the_superlink_being_away_is_a_502(pki: TestPKI) -> None:
    gateway = FleetGateway(
        f"https://127.0.0.1:{free_port()}",
        str(pki.ca_cert),
        host="127.0.0.1",
        port=free_port(),
        certfile=str(pki.server_cert),
        keyfile=str(pki.server_key),
    )
    gateway.start()
    try:
        answer = post(gateway, pki.ca_cert, "/v1/fleet/get-run", b"x")
        assert answer.status == 502 and b"unreachable" in answer.body
    finally:
        gateway.stop()


# --- the controller's own process ----------------------------------------------------------------


def test_an_oversized_upload_does_not_grow_the_controllers_memory(tmp_path: Path, pki: TestPKI) -> None:
    """The real controller with its Fleet port: 256 MiB sent chunked (the limit is 64 MiB) and 1 GiB
    declared. Both are refused; the controller's resident memory, sampled all along, stays within a
    few MiB of where it was (the body goes to a temporary file, never to memory)."""
    controller = start_controller(tmp_path, pki)
    try:
        process = psutil.Process(controller.process.pid)
        port = controller.fleet_port
        head = b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        # Warm up the path once (a small body: forwarded, and a 502 as no SuperLink runs before a job).
        assert raw_request(port, pki.ca_cert, head, chunked(2 * MiB)).status == 502
        before = process.memory_info().rss
        peak = [before]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            streamed = raw_request(port, pki.ca_cert, head, chunked(256 * MiB), timeout=60)
            declared = raw_request(
                port,
                pki.ca_cert,
                b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (1 << 30),
                (b"\0" * MiB for _ in range(256)),
                timeout=60,
            )
        finally:
            sampling.set()
            sampler.join()
        assert streamed.status == 413 and declared.status == 413
        assert streamed.sent < 200 * MiB and declared.sent < 200 * MiB  # refused while they were sending
        grown = (peak[0] - before) / MiB
        print(f"controller RSS {before / MiB:.0f} MiB, peak {peak[0] / MiB:.0f} MiB during the uploads")
        assert grown < 24, f"the controller's memory grew by {grown:.0f} MiB"
    finally:
        controller.stop()
