"""Revocations: an approver's signed statement that a release must no longer run anywhere.

A revocation names a release by name, version and the SHA-256 of its `release.json` (the
manifest approvals sign), with a reason and a time. The approver makes it on their own
machine with their P-256 key, like an approval (`sitewarden release revoke`); the controller
checks it against the key it registered for them and publishes it as the TUF target
`releases/<name>/<version>/revocations/<key fingerprint>.json`; a site looks that target up
for every approver key it trusts and refuses a release one of them revoked, even the one it
runs (then it falls back to its last-known-good release).

The document is a DSSE envelope (securesystemslib's `dsse.Envelope`, the signing format of
in-toto and Sigstore) whose payload is RFC 8785 JSON of payload type
`application/vnd.sitewarden.revocation+json`, signed ECDSA P-256 / SHA-256; the signature's
key id is the key's fingerprint (SHA-256 of its DER SubjectPublicKeyInfo, as approvals use).
Every failure is a `RevocationError` naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import rfc8785
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib import exceptions as sslib_exceptions
from securesystemslib.dsse import Envelope
from securesystemslib.signer import CryptoSigner, SSlibKey

from sitewarden import names
from sitewarden.errors import SitewardenError

PAYLOAD_TYPE = "application/vnd.sitewarden.revocation+json"
TYPE = "https://sitewarden.dev/revocation/v1"
MAX_BYTES = 16 << 10
MAX_REASON = 1000


class RevocationError(SitewardenError, ValueError):
    """A revocation cannot be made, is malformed, or is not signed by a trusted key."""


@dataclass(frozen=True)
class Revocation:
    """A verified revocation."""

    name: str
    version: str
    manifest_sha256: str
    reason: str
    revoked_at: str
    approver: str
    """Name under which the verifying key is trusted (the verifier's name for it)."""
    key_fingerprint: str

    def describe(self) -> dict[str, str]:
        return {
            "name": self.name,
            "version": self.version,
            "manifest_sha256": self.manifest_sha256,
            "approver": self.approver,
            "key_fingerprint": self.key_fingerprint,
            "reason": self.reason,
            "revoked_at": self.revoked_at,
        }


def fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def sign_revocation(
    private_key: ec.EllipticCurvePrivateKey, *, name: str, version: str, manifest_sha256: str, reason: str
) -> bytes:
    """The signed revocation of release `name` `version` whose manifest hashes to `manifest_sha256`."""
    try:
        names.check_release_name(name)
        names.check_version(version)
        names.check_sha256(manifest_sha256, "manifest digest")
    except names.InvalidName as exc:
        raise RevocationError(str(exc)) from exc
    if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(private_key.curve, ec.SECP256R1):
        raise RevocationError("a revocation is signed with an approver's P-256 key")
    if not reason.strip() or len(reason) > MAX_REASON:
        raise RevocationError(f"give a reason of 1 to {MAX_REASON} characters")
    payload = rfc8785.dumps(
        {
            "_type": TYPE,
            "name": name,
            "version": version,
            "manifest_sha256": manifest_sha256,
            "reason": reason.strip(),
            "revoked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    key = SSlibKey.from_crypto(private_key.public_key(), keyid=fingerprint(private_key.public_key()))
    envelope = Envelope(payload, PAYLOAD_TYPE, {})
    envelope.sign(CryptoSigner(private_key, key))
    return json.dumps(envelope.to_dict(), sort_keys=True).encode()


def verify_revocation(document: bytes, trusted_keys: Mapping[str, bytes]) -> Revocation:
    """Check that `document` is a revocation signed by one of `trusted_keys` (name -> P-256 PEM)."""
    if len(document) > MAX_BYTES:
        raise RevocationError(f"a revocation is at most {MAX_BYTES} bytes, this one {len(document)}")
    try:
        envelope = Envelope.from_dict(json.loads(document))
    except (ValueError, TypeError, KeyError, AttributeError, sslib_exceptions.FormatError) as exc:
        raise RevocationError(f"not a DSSE envelope: {exc.__class__.__name__}: {exc}") from exc
    if envelope.payload_type != PAYLOAD_TYPE:
        raise RevocationError(f"payload type {envelope.payload_type!r} is not {PAYLOAD_TYPE}")
    keys: dict[str, tuple[str, SSlibKey]] = {}
    for approver, pem in trusted_keys.items():
        try:
            public_key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError) as exc:
            raise RevocationError(f"trusted key {approver!r} is not a PEM public key") from exc
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
            raise RevocationError(f"trusted key {approver!r} is not a P-256 key")
        keyid = fingerprint(public_key)
        keys[keyid] = (approver, SSlibKey.from_crypto(public_key, keyid=keyid))
    if not keys:
        raise RevocationError("no trusted approver keys given")
    try:
        accepted = envelope.verify([key for _, key in keys.values()], 1)
    except (sslib_exceptions.VerificationError, ValueError) as exc:
        raise RevocationError(f"not signed by a trusted approver key: {exc}") from exc
    keyid = next(iter(accepted))
    statement = _statement(envelope.payload)
    return Revocation(
        name=statement["name"],
        version=statement["version"],
        manifest_sha256=statement["manifest_sha256"],
        reason=statement["reason"],
        revoked_at=statement["revoked_at"],
        approver=keys[keyid][0],
        key_fingerprint=keyid,
    )


def _statement(payload: bytes) -> dict[str, Any]:
    try:
        statement = json.loads(payload)
    except ValueError as exc:
        raise RevocationError("the signed payload is not JSON") from exc
    wanted = {"_type", "name", "version", "manifest_sha256", "reason", "revoked_at"}
    if not isinstance(statement, dict) or set(statement) != wanted or statement["_type"] != TYPE:
        raise RevocationError(f"the signed payload is not a {TYPE} statement")
    if not all(isinstance(statement[k], str) for k in wanted):
        raise RevocationError("the signed payload's fields must be strings")
    try:
        names.check_release_name(statement["name"])
        names.check_version(statement["version"])
        names.check_sha256(statement["manifest_sha256"], "manifest digest")
    except names.InvalidName as exc:
        raise RevocationError(f"the signed payload: {exc}") from exc
    if len(statement["reason"]) > MAX_REASON or len(statement["revoked_at"]) > 40:
        raise RevocationError("the signed payload's reason or time is too long")
    return statement
