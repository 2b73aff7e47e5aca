"""A small client of the controller's REST API, for the CLI and for tests.

Errors come back as RFC 9457 problem details; `ApiError` carries them.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from sitewarden.errors import SitewardenError

CHUNK = 8 << 20
PART = 256 << 20  # bytes per PATCH request: well under the controller's body limit
_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


class ApiError(SitewardenError):
    """The controller refused a request or could not be reached."""

    def __init__(self, status: int, message: str, problem: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.problem = problem or {}


@dataclass(frozen=True)
class LocalFile:
    path: str
    source: Path
    sha256: str
    size: int


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def release_files(directory: Path) -> list[Path]:
    """Regular files under `directory`, sorted; symbolic links are refused rather than followed."""
    files = []
    for path in sorted(directory.rglob("*")):
        if path.is_symlink():
            raise ValueError(f"{path} is a symbolic link; a release holds regular files only")
        if path.is_file():
            files.append(path)
    return files


class Client:
    def __init__(self, url: str, token: str | None = None, ca_cert: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify: Any = ssl.create_default_context(cafile=ca_cert) if ca_cert else True
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, verify=verify, timeout=_TIMEOUT)

    @classmethod
    def from_env(cls, url: str | None = None, token: str | None = None, ca_cert: str | None = None) -> Client:
        url = url or os.environ.get("SITEWARDEN_URL")
        if not url:
            raise ApiError(0, "no controller URL: pass --url or set SITEWARDEN_URL")
        return cls(url, token or os.environ.get("SITEWARDEN_TOKEN"), ca_cert or os.environ.get("SITEWARDEN_CA_CERT"))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(0, f"cannot reach the controller at {self.http.base_url}: {exc}") from exc
        if response.status_code >= 400:
            raise _problem(response)
        return response

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        return self.request("POST", path, json=body, **kwargs).json()

    def paginate(self, path: str, **params: Any) -> Iterator[dict[str, Any]]:
        after = None
        while True:
            page = self.get(path, params={**params, **({"after": after} if after else {})})
            yield from page["items"]
            after = page.get("next")
            if not after:
                return

    def upload(self, file: LocalFile, progress: Callable[[int], None] | None = None) -> None:
        """Upload one file as a blob, resuming from wherever an earlier attempt stopped."""
        info = self.post("/api/v1/uploads", {"sha256": file.sha256, "size": file.size})
        if info["complete"]:
            if progress:
                progress(file.size)
            return
        offset = info["offset"]
        if progress and offset:
            progress(offset)
        failures = 0
        while True:
            try:
                info = self._send_from(info["id"], file, offset, progress)
                if info["complete"]:
                    return
                if info["offset"] > offset:
                    offset = info["offset"]
                    continue
                failures += 1  # the controller took nothing: do not loop forever
                if failures == 5:
                    raise ApiError(0, f"upload of {file.path} makes no progress at offset {offset}")
                continue
            except ApiError as exc:
                failures += 1
                if exc.status not in (0, 409) or failures == 5:
                    raise
            # Interrupted or out of step: ask where the bytes stopped and continue from there.
            current = self.get(f"/api/v1/uploads/{info['id']}")
            if current["complete"]:
                return
            if progress:
                progress(current["offset"] - offset)
            offset = current["offset"]

    def _send_from(
        self, upload_id: str, file: LocalFile, offset: int, progress: Callable[[int], None] | None
    ) -> dict[str, Any]:
        """Send the next part of a file, at most PART bytes from `offset`."""
        length = min(PART, file.size - offset)

        def body() -> Iterator[bytes]:
            with open(file.source, "rb") as f:
                f.seek(offset)
                left = length
                while left and (chunk := f.read(min(CHUNK, left))):
                    left -= len(chunk)
                    if progress:
                        progress(len(chunk))
                    yield chunk

        return self.request(
            "PATCH",
            f"/api/v1/uploads/{upload_id}",
            content=body(),
            headers={
                "Upload-Offset": str(offset),
                "Content-Type": "application/offset+octet-stream",
                "Content-Length": str(length),
            },
            timeout=httpx.Timeout(600.0, connect=10.0),
        ).json()


def _problem(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    detail = body.get("detail") or response.text[:200] or response.reason_phrase
    fields = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in body.get("errors", []) if isinstance(e, dict))
    message = f"{response.status_code} {body.get('title', response.reason_phrase)}: {detail}"
    return ApiError(response.status_code, f"{message} ({fields})" if fields else message, body)
