"""One-time join tokens: how a new site learns whom to trust without trusting on first use.

A token is `swj1.<payload>.<secret>`: the payload (base64url JSON) tells the agent the
controller's URL, the SHA-256 of the controller's TUF `root.json`, the site name and the
expiry; the secret (base64url, 32 random bytes) proves to the controller that an admin
issued it. The controller stores only a hash of the secret and accepts it once.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sitewarden.errors import CredentialError

PREFIX = "swj1"
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class JoinToken:
    token_id: str
    secret: str
    controller_url: str
    root_sha256: str
    site: str
    expires_at: datetime

    def encode(self) -> str:
        payload = {
            "i": self.token_id,
            "u": self.controller_url,
            "r": self.root_sha256,
            "s": self.site,
            "e": int(self.expires_at.timestamp()),
        }
        body = _b64e(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        return f"{PREFIX}.{body}.{self.secret}"

    def expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= self.expires_at


def new_secret() -> str:
    return _b64e(secrets.token_bytes(32))


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse(token: str) -> JoinToken:
    """Parse a join token; CredentialError names what is malformed. Expiry is checked by callers."""
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise CredentialError(f"not a Sitewarden join token (want {PREFIX}.<payload>.<secret>)")
    try:
        payload = json.loads(_b64d(parts[1]))
        secret_bytes = _b64d(parts[2])
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CredentialError("join token is malformed: payload or secret is not base64url JSON") from exc
    if not isinstance(payload, dict):
        raise CredentialError("join token payload is not an object")
    try:
        token_id, url, root, site, expiry = payload["i"], payload["u"], payload["r"], payload["s"], payload["e"]
    except KeyError as exc:
        raise CredentialError(f"join token payload lacks {exc.args[0]!r}") from exc
    texts = (token_id, url, root, site)
    if not all(isinstance(v, str) and v for v in texts) or not isinstance(expiry, int) or isinstance(expiry, bool):
        raise CredentialError("join token payload has fields of the wrong type")
    if not url.startswith(("https://", "http://")):
        raise CredentialError(f"join token controller URL {url!r} is not an http(s) URL")
    if not _HEX64.fullmatch(root):
        raise CredentialError("join token root hash is not a SHA-256 hex digest")
    if len(secret_bytes) != 32:
        raise CredentialError("join token secret has the wrong length")
    try:
        expires_at = datetime.fromtimestamp(expiry, UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise CredentialError(f"join token expiry {expiry} is not a time a calendar can hold") from exc
    return JoinToken(token_id, parts[2], url, root, site, expires_at)
