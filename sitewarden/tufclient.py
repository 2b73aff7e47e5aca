"""python-tuf's client pointed at a Sitewarden controller: an HTTPS fetcher that trusts the
site's configured CA, and an `Updater` bootstrapped from the root enrollment delivered.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
from tuf.api import exceptions
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

CHUNK = 1 << 20


class HttpxFetcher(FetcherInterface):
    """Fetches over HTTPS with httpx, verifying the controller's certificate against `ca_cert`."""

    def __init__(self, ca_cert: str | None = None, timeout_s: float = 30.0) -> None:
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_cert) if ca_cert else True
        self._client = httpx.Client(verify=verify, timeout=httpx.Timeout(timeout_s), follow_redirects=False)

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            request = self._client.build_request("GET", url)
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
) -> Updater:
    """An ngclient Updater for the controller's repository.

    `root` bootstraps trust the first time (the root.json enrollment checked against the
    join token); afterwards the client trusts the root it keeps in `metadata_dir`.
    """
    metadata_dir.mkdir(parents=True, exist_ok=True)
    base = controller_url.rstrip("/")
    return Updater(
        str(metadata_dir),
        f"{base}/tuf/metadata/",
        str(target_dir) if target_dir else None,
        f"{base}/tuf/targets/",
        fetcher or HttpxFetcher(ca_cert),
        UpdaterConfig(app_user_agent="sitewarden"),
        bootstrap=root,
    )
