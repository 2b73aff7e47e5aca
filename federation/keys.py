"""SuperNode authentication keys in the formats Flower 1.42 reads.

`flower-supernode --auth-supernode-private-key` loads the private key with
`cryptography`'s `load_ssh_private_key` and requires an elliptic-curve key; `flwr supernode register`
loads the public key with `load_ssh_public_key` and requires a NIST curve (P-256, P-384, P-521; Flower's
docs use P-384, which is also our default). Both files are therefore OpenSSH encoded: the private key
as an unencrypted ``-----BEGIN OPENSSH PRIVATE KEY-----`` block, the public key as one
``ecdsa-sha2-nistp384 AAAA... comment`` line. The SuperLink itself stores and compares the public key
as PEM SubjectPublicKeyInfo (`public_key_pem`), which is what `fingerprint` hashes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sitewarden.files import write_new_file

__all__ = ["SuperNodeKeys", "generate_supernode_keys", "public_key_pem"]

_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
}


@dataclass(frozen=True)
class SuperNodeKeys:
    """Where a SuperNode's key pair lives: `private_key` for the SuperNode, `public_key` for registration."""

    private_key: Path
    public_key: Path

    def fingerprint(self) -> str:
        """SHA-256 of the public key as the SuperLink stores it (PEM SubjectPublicKeyInfo), in hex."""
        return hashlib.sha256(public_key_pem(self.public_key)).hexdigest()


def generate_supernode_keys(directory: Path, name: str, *, curve: str = "P-384") -> SuperNodeKeys:
    """Write a fresh EC key pair as `<directory>/<name>` (private, mode 0600) and `<directory>/<name>.pub`."""
    if curve not in _CURVES:
        raise ValueError(f"curve must be one of {sorted(_CURVES)}, not {curve!r}")
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(_CURVES[curve]())
    keys = SuperNodeKeys(directory / name, directory / f"{name}.pub")
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    # Created exclusively with mode 0600 (never through a planted file or link, never readable by others).
    keys.private_key.unlink(missing_ok=True)
    write_new_file(keys.private_key, private_bytes)
    public_line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    keys.public_key.write_bytes(public_line + f" sitewarden-{name}\n".encode())
    return keys


def public_key_pem(public_key_file: Path) -> bytes:
    """The OpenSSH public key in `public_key_file` as PEM SubjectPublicKeyInfo, the SuperLink's form."""
    key = serialization.load_ssh_public_key(public_key_file.read_bytes())
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{public_key_file} does not hold an elliptic-curve public key")
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
