"""python-tuf's client pointed at a Sitewarden controller: an HTTPS fetcher that trusts the
site's configured CA and carries the caller's credential, and an `Updater` bootstrapped from
the root enrollment delivered.

The controller serves its TUF repository only to enrolled sites and to people with a role
(`controller.access`): each request carries `Authorization: Bearer <credential>`, a fresh
site JWT per request for an agent (`site_credential`: the controller accepts each `jti`
once) or a person's API token (`bearer`). The credential is sent only to the controller's
own origin (scheme, host and port) and redirects are not followed, so it never reaches
anyone else.
"""

from __future__ import annotations

import hashlib
import os
import queue
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tuf.api import exceptions
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from sitewarden import sitejwt
from sitewarden.files import PRIVATE_FILE

CHUNK = 1 << 20

Credential = Callable[[], str]
"""Returns the bearer credential for one request (called once per request)."""


def site_credential(key: Ed25519PrivateKey, site_id: str, controller_url: str) -> Credential:
    """A fresh site JWT for every request, as on the agent channel (each `jti` is accepted once)."""
    audience = controller_url.rstrip("/")
    return lambda: sitejwt.sign(key, site_id, audience)


def bearer(token: str) -> Credential:
    """A person's API token (any role may read the TUF repository)."""
    return lambda: token


def _origin(url: str) -> tuple[str, str, int | None]:
    parsed = httpx.URL(url)
    return parsed.scheme, parsed.host, parsed.port


class HttpxFetcher(FetcherInterface):
    """Fetches over HTTPS with httpx, verifying the controller's certificate against `ca_cert`.

    With a `credential`, every request to `origin` (the controller's URL) carries it as a bearer
    token; a URL elsewhere is refused rather than fetched without it or with it.
    """

    def __init__(
        self,
        ca_cert: str | None = None,
        timeout_s: float = 30.0,
        *,
        credential: Credential | None = None,
        origin: str | None = None,
    ) -> None:
        if credential is not None and origin is None:
            raise ValueError("a credential goes with the origin it is for (the controller's URL)")
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_cert) if ca_cert else True
        self._client = httpx.Client(verify=verify, timeout=httpx.Timeout(timeout_s), follow_redirects=False)
        self._credential = credential
        self._origin = _origin(origin) if origin is not None else None

    def _headers(self, url: str) -> dict[str, str]:
        if self._credential is None:
            return {}
        if _origin(url) != self._origin:
            raise exceptions.DownloadError(f"refusing to send the controller's credential to {url}")
        return {"Authorization": f"Bearer {self._credential()}"}

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            request = self._client.build_request("GET", url, headers=self._headers(url))
            response = self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise exceptions.SlowRetrievalError(str(exc)) from exc
        except httpx.HTTPError as exc:
            raise exceptions.DownloadError(f"cannot fetch {url}: {exc}") from exc
        if response.status_code >= 400:
            response.close()
            raise exceptions.DownloadHTTPError(f"HTTP {response.status_code} for {url}", response.status_code)
        return self._chunks(response)

    @staticmethod
    def _chunks(response: httpx.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes(CHUNK)
        except httpx.TimeoutException as exc:
            raise exceptions.SlowRetrievalError(str(exc)) from exc
        except httpx.HTTPError as exc:
            raise exceptions.DownloadError(str(exc)) from exc
        finally:
            response.close()

    def close(self) -> None:
        self._client.close()


def updater(
    metadata_dir: Path,
    controller_url: str,
    *,
    root: bytes | None = None,
    target_dir: Path | None = None,
    ca_cert: str | None = None,
    fetcher: FetcherInterface | None = None,
    credential: Credential | None = None,
) -> Updater:
    """An ngclient Updater for the controller's repository.

    `root` bootstraps trust the first time (the root.json enrollment checked against the
    join token); afterwards the client trusts the root it keeps in `metadata_dir`. Without a
    `fetcher`, one is made for `ca_cert` carrying `credential` to the controller.
    """
    metadata_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    base = controller_url.rstrip("/")
    return Updater(
        str(metadata_dir),
        f"{base}/tuf/metadata/",
        str(target_dir) if target_dir else None,
        f"{base}/tuf/targets/",
        fetcher or HttpxFetcher(ca_cert, credential=credential, origin=controller_url if credential else None),
        UpdaterConfig(app_user_agent="sitewarden"),
        bootstrap=root,
    )


def target_url(controller_url: str, info: TargetFile) -> str:
    """The consistent-snapshot URL of a target (the controller's repository always uses them)."""
    dirname, sep, basename = info.path.rpartition("/")
    return f"{controller_url.rstrip('/')}/tuf/targets/{dirname}{sep}{info.hashes['sha256']}.{basename}"


class IncompleteDownloadError(exceptions.DownloadError):
    """The connection ended before a target's signed length arrived: a network or server failure
    (retried), not a mismatch (refused)."""


def download_verified(fetcher: FetcherInterface, url: str, info: TargetFile, dest: Path) -> None:
    """Stream a target into a new file `dest` (see `download_to`); no file is left behind on failure."""
    # Created here, exclusively (a planted file or symbolic link is never written through), 0600.
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
        with os.fdopen(fd, "wb") as f:
            download_to(fetcher, url, info, f)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def download_to(fetcher: FetcherInterface, url: str, info: TargetFile, f: IO[bytes]) -> None:
    """Stream a target into the open file `f`, checking it against its signed length and SHA-256.

    python-tuf's `download_target` writes to a temporary file (in $TMPDIR, which can be
    RAM), hashes it, then copies it: three passes and twice the space for a large model.
    Here the bytes are written once while a second thread hashes and writes, and any
    mismatch raises python-tuf's own exceptions (the caller removes the file). A stream that
    ends early raises `IncompleteDownloadError`, a `DownloadError`: the network, not the bytes.
    """
    expected = info.hashes.get("sha256")
    if expected is None:
        raise exceptions.LengthOrHashMismatchError(f"{info.path}: the metadata gives no SHA-256")
    chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
    digest = hashlib.sha256()
    failure: list[BaseException] = []

    def write() -> None:
        try:
            while (chunk := chunks.get()) is not None:
                f.write(chunk)
                digest.update(chunk)
        except BaseException as exc:  # reported to the downloading thread
            failure.append(exc)
            while chunks.get() is not None:
                pass

    received = 0
    writer = threading.Thread(target=write, name="tuf-target-writer")
    writer.start()
    stream = fetcher.fetch(url)
    try:
        for chunk in stream:
            received += len(chunk)
            if received > info.length:
                raise exceptions.DownloadLengthMismatchError(
                    f"{info.path}: more than the {info.length} bytes its metadata signs"
                )
            if failure:
                break
            chunks.put(chunk)
    finally:
        chunks.put(None)
        writer.join()
        _close(stream)
    if failure:
        raise failure[0]
    f.flush()
    os.fsync(f.fileno())
    if received != info.length:
        raise IncompleteDownloadError(f"{info.path}: the transfer ended after {received} of {info.length} bytes")
    if digest.hexdigest() != expected:
        raise exceptions.LengthOrHashMismatchError(f"{info.path}: the bytes do not hash to the signed SHA-256")


def fetch_small(fetcher: FetcherInterface, url: str, info: TargetFile, limit: int) -> bytes:
    """A small target (a manifest, an approval, a revocation) in memory, checked against its signed
    length and SHA-256, refused (`DownloadLengthMismatchError`) when its metadata says it is over `limit`."""
    if info.length > limit:
        raise exceptions.DownloadLengthMismatchError(f"{info.path}: {info.length} bytes, more than the {limit} allowed")
    data = bytearray()
    stream = fetcher.fetch(url)
    try:
        for chunk in stream:
            data += chunk
            if len(data) > info.length:
                raise exceptions.DownloadLengthMismatchError(
                    f"{info.path}: more than the {info.length} bytes its metadata signs"
                )
    finally:
        _close(stream)
    if len(data) != info.length:
        raise IncompleteDownloadError(f"{info.path}: the transfer ended after {len(data)} of {info.length} bytes")
    info.verify_length_and_hashes(bytes(data))
    return bytes(data)


def _close(stream: Iterator[bytes]) -> None:
    """End a fetch early: the generator's `finally` closes the response (and its connection)."""
    close = getattr(stream, "close", None)
    if close is not None:
        close()
