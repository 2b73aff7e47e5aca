"""Approvals: an approver's signature over exactly the files of a release.

An approval is an OpenSSF model-signing signature (the `model-signing` package, v1 predicate
`https://model_signing/signature/v1.0`) made with an approver's P-256 key: a Sigstore bundle
(`application/vnd.dev.sigstore.bundle.v0.3+json`) holding a DSSE envelope over an in-toto
statement whose predicate lists every file of the release by relative POSIX path with its SHA-256
(serialization method `files`, never `shards`). Signing uses model-signing's own hashing and
elliptic-key signer, so the bundle has the format its CLI writes; nothing here touches the network
(the Sigstore signer and verifier are never constructed). Verification works from the bundle and
an expected {path: sha256} map, because the controller holds releases as content-addressed blobs
rather than as a directory: model-signing's public `verifying.Config.verify` only checks a
directory, so this module calls the layer beneath it, `sign_ec_key.Verifier.verify(signature)`,
which checks the DSSE signature over the PAE encoding and returns the signed manifest, and then
compares that manifest with the expected map itself. A directory on disk (the agent's case) is
hashed with the same model-signing serializer and compared the same way. Every failure is an
`ApprovalError` naming what is wrong with which input.

An approver's private key is PKCS#8 PEM, unencrypted or encrypted with a passphrase: PBES2
(RFC 8018) with PBKDF2-HMAC-SHA256 at `KDF_ROUNDS` rounds (OWASP's figure; `cryptography`
only writes PKCS#8 at 2,048, so the structure is built with asn1crypto) and AES-256-CBC,
which `cryptography` and OpenSSL read. `load_approver_key` opens either kind, and
`PassphraseRequired` says when a passphrase is needed.
"""

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType

from asn1crypto import algos as asn1_algos
from asn1crypto import keys as asn1_keys
from asn1crypto import pem as asn1_pem
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from model_signing import hashing
from model_signing import manifest as ms_manifest
from model_signing._signing import sign_ec_key, sign_sigstore_pb, signing
from pydantic import ValidationError
from sigstore_models.bundle import v1 as bundle_v1

from sitewarden.errors import SitewardenError
from sitewarden.files import write_new_file

__all__ = [
    "KDF_ROUNDS",
    "MIN_PASSPHRASE",
    "Approval",
    "ApprovalError",
    "PassphraseRequired",
    "digest_release",
    "encrypt_private_key",
    "generate_approver_key",
    "is_encrypted",
    "key_fingerprint",
    "load_approver_key",
    "sign_release",
    "verify_approval",
    "verify_approval_dir",
]

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_MAX_PROBLEMS_SHOWN = 20
_ENCRYPTED_PEM = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
MIN_PASSPHRASE = 12
KDF_ROUNDS = 600_000


class ApprovalError(SitewardenError, ValueError):
    """An approval cannot be made, or does not approve the release it is checked against."""


class PassphraseRequired(ApprovalError):
    """The approver key is encrypted and no passphrase was given."""


@dataclass(frozen=True)
class Approval:
    """A verified approval: who approved, with which key, and exactly which files."""

    approver: str
    """Name under which the verifying key is trusted (the caller's name for it, not read from the bundle)."""
    key_fingerprint: str
    """Lowercase hex SHA-256 of the DER SubjectPublicKeyInfo of the key that verified."""
    files: Mapping[str, str]
    """Relative POSIX path -> lowercase hex SHA-256, as signed (read-only)."""


@dataclass(frozen=True)
class _TrustedKey:
    name: str
    public_key: ec.EllipticCurvePublicKey
    fingerprint: str
    hint: str


class _PrivateKeySigner(sign_ec_key.Signer):
    """model-signing's elliptic-key signer, given a loaded key instead of a key file.

    The upstream constructor reads the PEM file itself and takes its password as text; an
    approver key is loaded here (encrypted or not, checked to be P-256) and the one attribute
    that constructor sets is set, as `_PublicKeyVerifier` does for verification. Everything that
    signs is inherited unchanged.
    """

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        self._private_key = private_key


class _PublicKeyVerifier(sign_ec_key.Verifier):
    """model-signing's elliptic-key verifier, given a loaded key instead of a key file.

    The upstream constructor only reads a PEM file; trusted keys come from the controller's database
    or the site's configuration, so we set the one attribute that constructor sets rather than write
    keys to temporary files. Everything that verifies is inherited unchanged.
    """

    def __init__(self, public_key: ec.EllipticCurvePublicKey) -> None:
        self._public_key = public_key


def key_fingerprint(public_key_pem: bytes) -> str:
    """Lowercase hex SHA-256 of the DER SubjectPublicKeyInfo of a P-256 public key in PEM."""
    return _fingerprint(_load_public_key("public key", public_key_pem))


def generate_approver_key(private_path: Path, public_path: Path, passphrase: bytes | None = None) -> str:
    """Create a new P-256 approver key and return its fingerprint.

    The private key (PKCS#8 PEM, encrypted with `passphrase` when one is given) is created with
    mode 0600 and the public key (SubjectPublicKeyInfo PEM) next to it; neither file may exist
    beforehand (O_EXCL), so an existing key is never overwritten: `ApprovalError` is raised and
    nothing is left behind. A passphrase has at least `MIN_PASSPHRASE` characters.
    """
    if passphrase is not None and len(passphrase) < MIN_PASSPHRASE:
        raise ApprovalError(f"the passphrase must have at least {MIN_PASSPHRASE} characters")
    key = ec.generate_private_key(ec.SECP256R1())
    if passphrase:
        private_pem = encrypt_private_key(key, passphrase)
    else:
        private_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new_file(Path(private_path), private_pem, 0o600)
    try:
        _write_new_file(Path(public_path), public_pem, 0o644)
    except BaseException:
        Path(private_path).unlink()
        raise
    return _fingerprint(key.public_key())


def sign_release(
    directory: Path,
    private_key: Path | ec.EllipticCurvePrivateKey,
    *,
    ignore: Iterable[str] = (),
    passphrase: bytes | None = None,
) -> bytes:
    """Sign every regular file under `directory` and return the model-signing bundle (JSON bytes).

    `private_key` is a loaded key (`load_approver_key`) or the path of a PEM key file (an
    encrypted one needs `passphrase`). Unlike model-signing's default, nothing is left out
    silently: dot files and `.git` are signed like any other file, because the release is exactly
    its files and an unsigned file beside signed ones is what an attacker would use. Symbolic
    links are refused. Paths in `ignore` (relative release paths; a directory covers everything
    under it) are left out, for a caller that keeps the bundle inside the directory; they are
    recorded in the signed predicate as `ignore_paths`.
    """
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        key = _checked_private_key(private_key, "the approver key")
    else:
        key = load_approver_key(Path(private_key), passphrase)  # a wrong key is refused before hashing gigabytes
    signed_manifest = _hash_directory(Path(directory), ignore)
    if next(signed_manifest.resource_descriptors(), None) is None:
        raise ApprovalError(f"{directory} holds no files to sign")
    signature = _PrivateKeySigner(key).sign(signing.Payload(signed_manifest))
    return signature.bundle.to_json().encode("utf-8")


def digest_release(directory: Path, *, ignore: Iterable[str] = ()) -> dict[str, str]:
    """The {relative POSIX path: sha256 hex} map of a release directory, by the rules `sign_release` signs with."""
    return _manifest_files(_hash_directory(Path(directory), ignore))


def verify_approval(bundle: bytes, expected_files: Mapping[str, str], trusted_keys: Mapping[str, bytes]) -> Approval:
    """Check that `bundle` is an approval, by one of `trusted_keys`, of exactly `expected_files`.

    `expected_files` maps each relative POSIX path of the release to its lowercase hex SHA-256;
    `trusted_keys` maps an approver's name to their P-256 public key in PEM. The signature is checked
    first; only then is the signed file list compared, so a file missing from the approval, a file
    the approval covers that the release lacks, and a digest that differs are all refused by path.
    """
    expected = _checked_expected_files(expected_files)
    key, signed = _verify_signature(bundle, trusted_keys)
    _compare_files(signed, expected)
    return Approval(approver=key.name, key_fingerprint=key.fingerprint, files=MappingProxyType(signed))


def verify_approval_dir(
    bundle: bytes, directory: Path, trusted_keys: Mapping[str, bytes], *, ignore: Iterable[str] = ()
) -> Approval:
    """`verify_approval` against the files in `directory`, hashed as `digest_release` does.

    Every regular file under `directory` must be covered, so keep the bundle outside it (or name it in
    `ignore`). The signature is checked before any file is read.
    """
    key, signed = _verify_signature(bundle, trusted_keys)
    _compare_files(signed, digest_release(directory, ignore=ignore))
    return Approval(approver=key.name, key_fingerprint=key.fingerprint, files=MappingProxyType(signed))


def _verify_signature(bundle: bytes, trusted_keys: Mapping[str, bytes]) -> tuple[_TrustedKey, dict[str, str]]:
    keys = _load_trusted_keys(trusted_keys)
    signature = _parse_bundle(bundle)
    # The hint (SHA-256 of the signer's PEM public key, as model-signing writes it) is not signed: it
    # only picks the key to try. Rewriting it to name another trusted key makes the check fail below.
    hint = signature.bundle.verification_material.public_key.hint
    key = next((k for k in keys if k.hint == hint), None)
    if key is None:
        raise ApprovalError(
            f"unknown key: the approval is signed by a key that no trusted approver holds (hint {hint})"
        )
    try:
        signed_manifest = _PublicKeyVerifier(key.public_key).verify(signature)
    except InvalidSignature as exc:
        raise ApprovalError(f"bad signature: the approval names {key.name}'s key but does not verify with it") from exc
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        # A wrong media type is caught before the signature is checked, anything else after it (the
        # approver signed something that is not a model-signing manifest). Either way no parser's
        # exception may escape: callers handle ApprovalError only.
        detail = f"missing field {exc}" if isinstance(exc, KeyError) else _brief(exc)
        raise ApprovalError(f"malformed bundle: not a model-signing approval: {detail}") from exc
    return key, _manifest_files(signed_manifest)


def _parse_bundle(bundle: bytes) -> sign_sigstore_pb.Signature:
    # Strict pydantic models (extra fields forbidden, base64 decoded) are the parser model-signing uses.
    try:
        parsed = bundle_v1.Bundle.from_json(bundle)
    except ValidationError as exc:
        # Without the offending input: it may be large, and it is the caller's own bytes anyway.
        where = "; ".join(
            f"{'.'.join(map(str, error['loc'])) or 'bundle'}: {error['msg']}"
            for error in exc.errors(include_url=False, include_input=False)[:5]
        )
        raise ApprovalError(f"malformed bundle: {_brief(where)}") from exc
    except (ValueError, TypeError) as exc:
        raise ApprovalError(f"malformed bundle: {_brief(exc)}") from exc
    if parsed.dsse_envelope is None:
        raise ApprovalError("malformed bundle: it holds no DSSE envelope")
    if not parsed.dsse_envelope.signatures:
        raise ApprovalError("malformed bundle: its DSSE envelope holds no signature")
    public_key = parsed.verification_material.public_key
    if public_key is None or not public_key.hint:
        # Certificate and Sigstore bundles carry no key hint, and nor do bundles in model-signing's
        # older key format (for which upstream prints a warning to stdout and tries the key anyway).
        raise ApprovalError(
            "malformed bundle: it is not signed with an approver key (no verificationMaterial.publicKey.hint)"
        )
    return sign_sigstore_pb.Signature(parsed)


def _load_trusted_keys(trusted_keys: Mapping[str, bytes]) -> list[_TrustedKey]:
    if not trusted_keys:
        raise ApprovalError("no trusted approver keys given")
    keys: list[_TrustedKey] = []
    by_fingerprint: dict[str, str] = {}
    for name, pem in trusted_keys.items():
        if not isinstance(name, str) or not name:
            raise ApprovalError(f"approver name {name!r} is not a non-empty string")
        public_key = _load_public_key(f"trusted key {name!r}", pem)
        fingerprint = _fingerprint(public_key)
        # One key under two names would make the approver ambiguous, and the four-eyes rule compares
        # approver and uploader by name.
        if fingerprint in by_fingerprint:
            raise ApprovalError(f"trusted keys {by_fingerprint[fingerprint]!r} and {name!r} are the same key")
        by_fingerprint[fingerprint] = name
        pem_spki = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        keys.append(_TrustedKey(name, public_key, fingerprint, hashlib.sha256(pem_spki).hexdigest()))
    return keys


def _load_public_key(what: str, pem: bytes) -> ec.EllipticCurvePublicKey:
    try:
        public_key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ApprovalError(f"{what} is not a PEM public key: {_brief(exc)}") from exc
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
        raise ApprovalError(f"{what} is not a P-256 key")
    return public_key


def encrypt_private_key(key: ec.EllipticCurvePrivateKey, passphrase: bytes, rounds: int = KDF_ROUNDS) -> bytes:
    """PEM `ENCRYPTED PRIVATE KEY` (RFC 5958 EncryptedPrivateKeyInfo) of `key` under `passphrase`.

    PBES2 (RFC 8018 §6.2) with PBKDF2-HMAC-SHA256 (`rounds` rounds, 16-byte random salt) and
    AES-256-CBC (random IV, PKCS#7 padding) over the key's PKCS#8 DER: the form OpenSSL writes,
    at a work factor `cryptography`'s own PKCS#8 writer does not offer.
    """
    if not passphrase:
        raise ApprovalError("an empty passphrase encrypts nothing")
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    salt, iv = os.urandom(16), os.urandom(16)
    secret = PBKDF2HMAC(hashes.SHA256(), 32, salt, rounds).derive(passphrase)
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(secret), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padder.update(der) + padder.finalize()) + encryptor.finalize()
    info = asn1_keys.EncryptedPrivateKeyInfo(
        {
            "encryption_algorithm": {
                "algorithm": "pbes2",
                "parameters": {
                    "key_derivation_func": {
                        "algorithm": "pbkdf2",
                        "parameters": {
                            "salt": asn1_algos.Pbkdf2Salt(name="specified", value=salt),
                            "iteration_count": rounds,
                            "prf": {"algorithm": "sha256"},
                        },
                    },
                    "encryption_scheme": {"algorithm": "aes256_cbc", "parameters": iv},
                },
            },
            "encrypted_data": ciphertext,
        }
    )
    return asn1_pem.armor("ENCRYPTED PRIVATE KEY", info.dump())


def is_encrypted(path: Path) -> bool:
    """Whether the PEM key file at `path` is an encrypted PKCS#8 key (it needs a passphrase)."""
    try:
        return _ENCRYPTED_PEM in Path(path).read_bytes()
    except OSError as exc:
        raise ApprovalError(f"cannot read the approver key {path}: {exc.strerror}") from exc


def load_approver_key(path: Path, passphrase: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    """The P-256 approver key in the PEM file `path`, decrypted with `passphrase` when it is encrypted.

    `PassphraseRequired` when the key is encrypted and `passphrase` is None; `ApprovalError` for a
    wrong passphrase, an unreadable file or a key that is not P-256.
    """
    path = Path(path)
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ApprovalError(f"cannot read the approver key {path}: {exc.strerror}") from exc
    encrypted = _ENCRYPTED_PEM in pem
    if encrypted and passphrase is None:
        raise PassphraseRequired(f"{path} is encrypted: a passphrase is needed")
    try:
        private_key = serialization.load_pem_private_key(pem, password=passphrase if encrypted else None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        if encrypted:
            raise ApprovalError(f"cannot decrypt {path}: wrong passphrase, or not a PKCS#8 key") from exc
        raise ApprovalError(f"{path} is not a PEM private key: {_brief(exc)}") from exc
    return _checked_private_key(private_key, str(path))


def _checked_private_key(private_key: object, what: str) -> ec.EllipticCurvePrivateKey:
    if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(private_key.curve, ec.SECP256R1):
        raise ApprovalError(f"{what} is not a P-256 private key")
    return private_key


def _fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _hash_directory(directory: Path, ignore: Iterable[str]) -> ms_manifest.Manifest:
    if directory.is_symlink() or not directory.is_dir():
        raise ApprovalError(f"{directory} is not a directory")
    ignored = [PurePosixPath(_checked_release_path(path)) for path in ignore]
    config = (
        hashing.Config()
        .set_ignored_paths(paths=ignored, ignore_git_paths=False)
        .use_file_serialization(hashing_algorithm="sha256")
    )
    try:
        return config.hash(directory)
    except ValueError as exc:  # a symlink or special file in the release
        raise ApprovalError(f"cannot hash release {directory}: {_brief(exc)}") from exc


def _manifest_files(signed_manifest: ms_manifest.Manifest) -> dict[str, str]:
    serialization_type = signed_manifest.serialization_type
    if serialization_type.get("method") != "files" or serialization_type.get("hash_type") != "sha256":
        raise ApprovalError(
            f"approval does not hash each file with sha256 (serialization {serialization_type}); "
            "sign with file serialization, not shards"
        )
    files: dict[str, str] = {}
    for descriptor in signed_manifest.resource_descriptors():
        if descriptor.digest.algorithm != "sha256" or descriptor.digest.digest_size != 32:
            raise ApprovalError(f"approval gives {descriptor.identifier} a digest that is not sha256")
        files[descriptor.identifier] = descriptor.digest.digest_hex
    return files


def _checked_expected_files(expected_files: Mapping[str, str]) -> dict[str, str]:
    if not expected_files:
        raise ApprovalError("the release lists no files")
    for path, digest in expected_files.items():
        _checked_release_path(path)
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
            raise ApprovalError(f"expected digest for {path} is not a lowercase hex sha256: {digest!r}")
    return dict(expected_files)


def _checked_release_path(path: str) -> str:
    # model-signing names files by str(PurePosixPath(relative path)), so only canonical relative
    # paths can ever match; refusing the others here gives a clear error instead of a spurious diff.
    pure = PurePosixPath(path) if isinstance(path, str) else None
    if pure is None or not path or pure.is_absolute() or pure.as_posix() != path or ".." in pure.parts:
        raise ApprovalError(f"{path!r} is not a canonical relative POSIX path inside the release")
    return path


def _compare_files(signed: Mapping[str, str], expected: Mapping[str, str]) -> None:
    problems = [f"file {path} missing from the approval" for path in sorted(expected.keys() - signed.keys())]
    problems += [
        f"extra file {path} in the approval, not in the release" for path in sorted(signed.keys() - expected.keys())
    ]
    problems += [
        f"digest mismatch for {path}: approved {signed[path]}, release has {expected[path]}"
        for path in sorted(signed.keys() & expected.keys())
        if signed[path] != expected[path]
    ]
    if problems:
        # A wholly different release would otherwise produce one line per file.
        shown = problems[:_MAX_PROBLEMS_SHOWN]
        if len(problems) > _MAX_PROBLEMS_SHOWN:
            shown.append(f"and {len(problems) - _MAX_PROBLEMS_SHOWN} more")
        raise ApprovalError("approval does not match the release: " + "; ".join(shown))


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    try:
        write_new_file(path, data, mode)
    except FileExistsError as exc:
        raise ApprovalError(f"{path} already exists; refusing to overwrite a key") from exc


def _brief(exc: BaseException) -> str:
    # pydantic and model-signing messages span lines; an error message stays on one.
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
