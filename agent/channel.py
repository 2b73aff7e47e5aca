"""The agent's calls to the controller: outbound HTTPS only, each with a fresh site JWT.

Long poll for the desired state, status reports, witnessing of the site's audit checkpoints,
and the site's witnessing of the controller's own log (public checkpoint and proofs, fetched
without credentials; cosignatures and refusals posted with them).
Nothing here is needed to serve: when the controller is away these calls fail and the
agent retries later.
"""

from __future__ import annotations

import ssl
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from agent.identity import Identity
from sitewarden import sitejwt
from sitewarden.wire import DesiredPointer, JobParticipation, StatusReport

LONG_POLL_S = 30
MAX_POINTER_BYTES = 4096  # a desired-state pointer is a few dozen bytes; more is not an answer


class ChannelError(Exception):
    """The controller could not be reached or answered with an error."""

    def __init__(self, message: str, status: int = 0, body: bytes = b"", content_type: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.content_type = content_type


class ControllerChannel:
    def __init__(self, identity: Identity, key: Ed25519PrivateKey, ca_cert: str | None) -> None:
        self.identity = identity
        self.key = key
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_cert) if ca_cert else True
        self.http = httpx.AsyncClient(
            base_url=identity.controller_url.rstrip("/"),
            verify=verify,
            timeout=httpx.Timeout(LONG_POLL_S + 15, connect=10),
        )

    def _auth(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {sitejwt.sign(self.key, self.identity.site_id, self.identity.controller_url)}"
        }

    async def _request(self, method: str, path: str, *, auth: bool = True, **kwargs: Any) -> httpx.Response:
        headers = {**(self._auth() if auth else {}), **kwargs.pop("headers", {})}
        try:
            response = await self.http.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise ChannelError(f"cannot reach the controller: {exc.__class__.__name__}: {exc}") from exc
        if response.status_code >= 400:
            raise ChannelError(
                f"the controller answered {response.status_code} to {method} {path}: {response.text[:300]}",
                response.status_code,
                response.content,
                response.headers.get("content-type", ""),
            )
        return response

    async def desired(self, after: int, wait: int = LONG_POLL_S, audit_after: int | None = None) -> DesiredPointer:
        """The long poll; a truncated, oversized or malformed answer is a ChannelError that says so."""
        params = {"after": after, "wait": wait}
        if audit_after is not None:
            params["audit_after"] = audit_after  # also woken by a new checkpoint of the controller's log
        path = "/api/v1/agent/desired"
        try:
            async with self.http.stream("GET", path, params=params, headers=self._auth()) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_POINTER_BYTES:
                        raise ChannelError(f"the long-poll answer is over {MAX_POINTER_BYTES} bytes: refused")
        except httpx.HTTPError as exc:
            raise ChannelError(f"cannot reach the controller: {exc.__class__.__name__}: {exc}") from exc
        if response.status_code >= 400:
            raise ChannelError(
                f"the controller answered {response.status_code} to the long poll: {bytes(body[:300])!r}",
                response.status_code,
                bytes(body),
                response.headers.get("content-type", ""),
            )
        try:
            return DesiredPointer.model_validate_json(bytes(body))
        except ValidationError as exc:
            error = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(p) for p in error["loc"]) or "body"
            detail = f"{where}: {error['msg']}"
            raise ChannelError(f"the long-poll answer is malformed ({len(body)} bytes): {detail}") from exc

    async def report(self, report: StatusReport) -> None:
        await self._request(
            "POST",
            "/api/v1/agent/status",
            content=report.model_dump_json(),
            headers={"Content-Type": "application/json"},
        )

    async def participate(self, job_id: str, answer: JobParticipation) -> None:
        await self._request(
            "POST",
            f"/api/v1/agent/jobs/{job_id}/participation",
            content=answer.model_dump_json(),
            headers={"Content-Type": "application/json"},
        )

    async def add_checkpoint(self, body: bytes) -> bytes:
        response = await self._request(
            "POST", "/api/v1/witness/add-checkpoint", content=body, headers={"Content-Type": "text/plain"}
        )
        return response.content

    async def audit_checkpoint(self) -> bytes:
        """The controller's latest audit checkpoint (a signed note; public)."""
        return (await self._request("GET", "/api/v1/audit/checkpoint", auth=False)).content

    async def audit_consistency(self, old: int, new: int) -> bytes:
        """A consistency proof between two of the controller's checkpoints (base64 lines; public)."""
        params = {"old": old, "new": new}
        return (await self._request("GET", "/api/v1/audit/consistency", auth=False, params=params)).content

    async def post_cosignature(self, body: bytes) -> None:
        await self._request(
            "POST", "/api/v1/agent/audit-cosignatures", content=body, headers={"Content-Type": "text/plain"}
        )

    async def report_refusal(self, report: dict[str, Any]) -> None:
        await self._request("POST", "/api/v1/agent/audit-refusals", json=report)

    async def close(self) -> None:
        await self.http.aclose()
