"""What every API the agent serves to local apps takes from a request before its own work starts.

- **Who calls**: `authenticate` checks the `Authorization: Bearer <app key>` header against the site's app
  keys and names the app; a refusal (`Unauthenticated`, HTTP 401 with `WWW-Authenticate: Bearer`, RFC 6750
  §3) says whether the key was missing, not known here, or revoked, and carries the app of a revoked key so
  that the audit entry of the refusal can name it.
- **The body**: `read_body` reads it up to the site's limit and undoes a `Content-Encoding` of `gzip` or
  `deflate` (RFC 9110 §8.4), applying the limit to the decompressed size as it inflates, so that a small
  compressed body cannot expand into memory (a zip bomb is a 413 after at most the limit plus one chunk).
- **Under which terms**: `stated_terms` reads the purpose and data class from the request's parameters or
  the `X-Sitewarden-Purpose` / `X-Sitewarden-Data-Class` headers; stating one twice with different values
  is a 400, never a silent choice.

Plain functions of their inputs, so that the OIP v2 routes and the OpenAI-compatible ones (`agent/lm/`) share
them; each refusal is an `InferenceError` with the status to answer.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from agent.apps import AppKeys
from agent.errors import InferenceError

PURPOSE_HEADER = "x-sitewarden-purpose"
DATA_CLASS_HEADER = "x-sitewarden-data-class"
REALM = "sitewarden-agent"
# wbits for zlib.decompressobj: gzip's framing (RFC 1952), and zlib's (RFC 1950), which HTTP calls deflate.
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class Unauthenticated(InferenceError):
    """No valid app key: 401 with a `WWW-Authenticate: Bearer` challenge.

    `app` is the app whose key was presented when the key is known but revoked (the caller proved it holds
    the secret), `key_id` the key's public id when it has the form of one; both go into the audit entry.
    """

    def __init__(self, message: str, *, error: str | None, app: str | None = None, key_id: str | None = None):
        challenge = f'Bearer realm="{REALM}"' + (f', error="{error}"' if error else "")
        super().__init__(401, message, headers={"WWW-Authenticate": challenge})
        self.app = app
        self.key_id = key_id


def authenticate(keys: AppKeys, authorization: str | None) -> str:
    """The app an `Authorization` header's bearer key belongs to; `Unauthenticated` says why not."""
    if not authorization:
        raise Unauthenticated(
            "an app key is required: send 'Authorization: Bearer <app key>' (the site admin creates keys with "
            "`sitewarden agent app-key create`)",
            error=None,
        )
    scheme, _, credential = authorization.partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <app key>'", error="invalid_request")
    check = keys.identify(credential.strip())
    if check.app is not None and check.revoked_at is None:
        return check.app
    if check.revoked_at is not None:
        raise Unauthenticated(
            f"the app key {check.key_id} of app {check.app!r} was revoked at {check.revoked_at}; ask the site "
            "admin for a new one",
            error="invalid_token",
            app=check.app,
            key_id=check.key_id,
        )
    raise Unauthenticated("the app key is not known at this site", error="invalid_token", key_id=check.key_id)


@dataclass(frozen=True)
class Terms:
    """What a request says it is for."""

    purpose: str
    data_class: str


def stated_terms(parameters: Mapping[str, Any], headers: Mapping[str, str]) -> Terms:
    """The purpose and data class a request states, in its parameters or headers (the same value if both)."""
    values = {}
    for key, header, shown in (
        ("purpose", PURPOSE_HEADER, "X-Sitewarden-Purpose"),
        ("data_class", DATA_CLASS_HEADER, "X-Sitewarden-Data-Class"),
    ):
        in_parameters = parameters.get(key)
        in_header = headers.get(header) or None
        if in_parameters is not None and not isinstance(in_parameters, str):
            raise InferenceError(400, f"{key} must be a string")
        if in_parameters and in_header and in_parameters != in_header:
            raise InferenceError(
                400,
                f"{key} is stated twice with different values: {in_parameters!r} in the parameters, "
                f"{in_header!r} in the {shown} header; state it once",
            )
        values[key] = in_parameters or in_header
    for key in ("purpose", "data_class"):
        if not values[key]:
            raise InferenceError(400, f"every request states its {key}: OIP parameters or the X-Sitewarden-* headers")
    return Terms(values["purpose"], values["data_class"])


def content_encoding(headers: Mapping[str, str]) -> str | None:
    """The body's `Content-Encoding` (lower case; None for none or identity); 415 for one not supported."""
    value = (headers.get("content-encoding") or "").strip().lower()
    if value in ("", "identity"):
        return None
    if value not in _WBITS:
        raise InferenceError(
            415, f"Content-Encoding {value!r} is not supported: send the body as is, or gzip or deflate it"
        )
    return value


async def read_body(chunks: AsyncIterator[bytes], limit: int, *, length: str | None, encoding: str | None) -> bytes:
    """The request body, decompressed when `encoding` says so; 413 once it passes `limit` bytes either way.

    `length` is the Content-Length header: a body announced over the limit is refused before it is read.
    """
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise InferenceError(413, f"request body over {limit} bytes")
    received = 0
    body = bytearray()
    inflater = zlib.decompressobj(_WBITS[encoding]) if encoding else None
    async for chunk in chunks:
        received += len(chunk)
        if received > limit:
            raise InferenceError(413, f"request body over {limit} bytes")
        if inflater is None:
            body += chunk
            continue
        try:
            # At most one byte over the limit per call: what would inflate further stays compressed in
            # unconsumed_tail, and one byte over is a 413, so the tail is never carried to the next chunk.
            body += inflater.decompress(chunk, limit + 1 - len(body))
        except zlib.error as exc:
            raise InferenceError(400, f"the {encoding} request body is corrupt: {exc}") from None
        if len(body) > limit:
            raise InferenceError(413, f"request body over {limit} bytes once decompressed ({encoding})")
    if inflater is not None:
        if not inflater.eof:
            raise InferenceError(400, f"the {encoding} request body ends before its compressed stream does")
        if inflater.unused_data:
            raise InferenceError(400, f"the {encoding} request body has bytes after its compressed stream")
    return bytes(body)
