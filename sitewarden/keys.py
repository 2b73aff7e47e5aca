"""Site identity keys: Ed25519 key files and the public-key encoding sent to the controller.

A site generates its key on site; the private key never leaves it. The public key travels
as base64 of its 32 raw bytes.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sitewarden.errors import CredentialError
from sitewarden.files import write_new_file


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write a PKCS#8 PEM private key with mode 0600, refusing to replace an existing file."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        write_new_file(path, pem)
    except FileExistsError as exc:
        raise CredentialError(f"{path} already exists; refusing to overwrite a key") from exc


def generate_key(path: Path) -> Ed25519PrivateKey:
    """Create a new Ed25519 key at `path` (mode 0600) and return it."""
    key = Ed25519PrivateKey.generate()
    write_private_key(path, key)
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CredentialError(f"cannot load private key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise CredentialError(f"{path} is not an Ed25519 private key")
    return key


def encode_public_key(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """Base64 of the 32 raw public key bytes."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(public.public_bytes_raw()).decode()


def decode_public_key(text: str) -> Ed25519PublicKey:
    """Parse base64 of 32 raw Ed25519 public key bytes."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CredentialError("public key is not valid base64") from exc
    if len(raw) != 32:
        raise CredentialError(f"Ed25519 public key must be 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)
