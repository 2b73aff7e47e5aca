"""Short-lived EdDSA JWTs with which an agent authenticates to the controller.

Claims: `iss` and `sub` are the site id, `aud` the controller's URL, `iat`/`exp` at most
five minutes apart, and a unique `jti` that the controller accepts only once (RFC 7519).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sitewarden.errors import CredentialError

ALGORITHM = "EdDSA"
MAX_LIFETIME_S = 300
LEEWAY_S = 30


def sign(key: Ed25519PrivateKey, site_id: str, audience: str, ttl_s: int = 120, now: float | None = None) -> str:
    """A fresh site JWT valid for `ttl_s` seconds (at most five minutes)."""
    if not 0 < ttl_s <= MAX_LIFETIME_S:
        raise ValueError(f"site JWT lifetime must be in (0, {MAX_LIFETIME_S}] seconds, got {ttl_s}")
    issued = int(now if now is not None else time.time())
    claims = {
        "iss": site_id,
        "sub": site_id,
        "aud": audience,
        "iat": issued,
        "exp": issued + ttl_s,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def unverified_site(token: str) -> str:
    """The `sub` claim, read without verification, to find which key to verify with."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise CredentialError(f"malformed site token: {exc}") from exc
    if header.get("alg") != ALGORITHM:
        raise CredentialError(f"site token must use {ALGORITHM}, not {header.get('alg')!r}")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise CredentialError("site token has no subject")
    return sub


def verify(token: str, key: Ed25519PublicKey, audience: str, now: float | None = None) -> dict[str, Any]:
    """Verify signature, audience and lifetime; return the claims. The caller checks `jti` reuse."""
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            audience=audience,
            leeway=LEEWAY_S,
            options={"require": ["exp", "iat", "sub", "jti", "aud"]},
        )
    except jwt.PyJWTError as exc:
        raise CredentialError(f"site token rejected: {exc}") from exc
    current = now if now is not None else time.time()
    if claims["exp"] - claims["iat"] > MAX_LIFETIME_S:
        raise CredentialError(f"site token lifetime exceeds {MAX_LIFETIME_S} s")
    if claims["iat"] > current + LEEWAY_S:
        raise CredentialError("site token is issued in the future")
    if claims.get("iss") != claims["sub"]:
        raise CredentialError("site token issuer and subject differ")
    return claims
