"""Approvals: real P-256 keys, real files, model-signing bundles; no mocks, and no network at any point."""

import base64
import hashlib
import json
import os
import random
import re
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import model_signing
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from sitewarden.approval import (
    Approval,
    ApprovalError,
    digest_release,
    generate_approver_key,
    key_fingerprint,
    sign_release,
    verify_approval,
    verify_approval_dir,
)
from sitewarden.errors import SitewardenError

BIG_FILE_SIZE = 1_500_000  # over 1 MiB, so model-signing reads it in more than one chunk


@dataclass(frozen=True)
class Approver:
    name: str
    private_key: Path
    public_pem: bytes
    fingerprint: str


@pytest.fixture(scope="module", autouse=True)
def no_network() -> Iterator[list[str]]:
    """Fail any test (and any fixture of this module) that tries to open a network connection."""
    attempts: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(repr(args[:2]))
        raise AssertionError(f"network access attempted: {args[:2]!r}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket.socket, "connect_ex", refuse)
        patch.setattr(socket, "create_connection", refuse)
        patch.setattr(socket, "getaddrinfo", refuse)
        yield attempts
    assert attempts == []


def _make_approver(directory: Path, name: str) -> Approver:
    private_key, public_key = directory / f"{name}.pem", directory / f"{name}.pub"
    fingerprint = generate_approver_key(private_key, public_key)
    return Approver(name, private_key, public_key.read_bytes(), fingerprint)


@pytest.fixture(scope="module")
def alice(tmp_path_factory: pytest.TempPathFactory) -> Approver:
    return _make_approver(tmp_path_factory.mktemp("alice"), "alice")


@pytest.fixture(scope="module")
def bob(tmp_path_factory: pytest.TempPathFactory) -> Approver:
    return _make_approver(tmp_path_factory.mktemp("bob"), "bob")


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model release: a big weights file, a config and a nested tokenizer directory."""
    directory = tmp_path_factory.mktemp("release") / "tiny-model"
    (directory / "tokenizer").mkdir(parents=True)
    (directory / "model.onnx").write_bytes(random.Random(1234).randbytes(BIG_FILE_SIZE))
    (directory / "config.json").write_text('{"hidden": 64}\n')
    (directory / "tokenizer" / "vocab.json").write_text('{"a": 0, "b": 1}\n')
    (directory / "tokenizer" / "merges.txt").write_text("a b\n")
    return directory


@pytest.fixture(scope="module")
def release_files(release: Path) -> dict[str, str]:
    """The release's {path: sha256}, computed here without model-signing."""
    return {
        path.relative_to(release).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in release.rglob("*")
        if path.is_file()
    }


@pytest.fixture(scope="module")
def alice_bundle(release: Path, alice: Approver) -> bytes:
    return sign_release(release, alice.private_key)


@pytest.fixture
def release_copy(release: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(release, tmp_path / "tiny-model"))


def _edit_bundle(bundle: bytes, edit: Callable[[dict], object]) -> bytes:
    document = json.loads(bundle)
    edit(document)
    return json.dumps(document).encode()


def _edit_payload(bundle: bytes, edit: Callable[[dict], object]) -> bytes:
    def rewrite(document: dict) -> None:
        envelope = document["dsseEnvelope"]
        statement = json.loads(base64.b64decode(envelope["payload"]))
        edit(statement)
        envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()

    return _edit_bundle(bundle, rewrite)


# --- signing and verifying ---------------------------------------------------------------------


def test_signed_release_verifies_against_its_file_map(
    alice_bundle: bytes, alice: Approver, release_files: dict[str, str]
) -> None:
    approval = verify_approval(alice_bundle, release_files, {"alice": alice.public_pem})

    assert approval == Approval(approver="alice", key_fingerprint=alice.fingerprint, files=release_files)


def test_signed_release_verifies_against_its_directory(
    alice_bundle: bytes, alice: Approver, release: Path, release_files: dict[str, str]
) -> None:
    approval = verify_approval_dir(alice_bundle, release, {"alice": alice.public_pem})

    assert approval.approver == "alice"
    assert dict(approval.files) == release_files


def test_manifest_names_each_file_by_relative_posix_path_with_its_sha256(
    alice_bundle: bytes, release: Path, release_files: dict[str, str]
) -> None:
    statement = json.loads(base64.b64decode(json.loads(alice_bundle)["dsseEnvelope"]["payload"]))

    assert statement["predicate"]["serialization"] == {
        "method": "files",
        "hash_type": "sha256",
        "allow_symlinks": False,
    }
    resources = {r["name"]: (r["algorithm"], r["digest"]) for r in statement["predicate"]["resources"]}
    assert resources == {path: ("sha256", digest) for path, digest in release_files.items()}
    assert "tokenizer/vocab.json" in resources
    assert digest_release(release) == release_files


def test_verified_file_map_cannot_be_modified(
    alice_bundle: bytes, alice: Approver, release_files: dict[str, str]
) -> None:
    approval = verify_approval(alice_bundle, release_files, {"alice": alice.public_pem})

    with pytest.raises(TypeError):
        approval.files["model.onnx"] = "0" * 64  # type: ignore[index]


def test_dot_files_and_git_files_are_signed_like_any_other(tmp_path: Path, alice: Approver) -> None:
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("[core]\n")
    (tmp_path / ".gitattributes").write_text("*.onnx filter=lfs\n")
    (tmp_path / "model.onnx").write_bytes(b"weights")

    bundle = sign_release(tmp_path, alice.private_key)

    assert set(digest_release(tmp_path)) == {".git/config", ".gitattributes", "model.onnx"}
    assert verify_approval_dir(bundle, tmp_path, {"alice": alice.public_pem}).approver == "alice"


def test_bundle_kept_inside_the_release_is_left_out_when_ignored(
    release_copy: Path, alice: Approver, release_files: dict[str, str]
) -> None:
    bundle = sign_release(release_copy, alice.private_key, ignore=["approval.sig"])
    (release_copy / "approval.sig").write_bytes(bundle)

    assert verify_approval(bundle, release_files, {"alice": alice.public_pem}).files == release_files
    assert verify_approval_dir(bundle, release_copy, {"alice": alice.public_pem}, ignore=["approval.sig"])
    with pytest.raises(ApprovalError, match=re.escape("file approval.sig missing from the approval")):
        verify_approval_dir(bundle, release_copy, {"alice": alice.public_pem})


def test_two_approvers_result_names_the_one_whose_key_verified(
    release: Path, release_files: dict[str, str], alice: Approver, bob: Approver, alice_bundle: bytes
) -> None:
    trusted = {"alice": alice.public_pem, "bob": bob.public_pem}
    bob_bundle = sign_release(release, bob.private_key)

    by_alice = verify_approval(alice_bundle, release_files, trusted)
    by_bob = verify_approval(bob_bundle, release_files, trusted)

    assert (by_alice.approver, by_alice.key_fingerprint) == ("alice", alice.fingerprint)
    assert (by_bob.approver, by_bob.key_fingerprint) == ("bob", bob.fingerprint)


# --- refusals: keys ------------------------------------------------------------------------------


def test_approval_by_a_key_not_trusted_is_refused(
    alice_bundle: bytes, bob: Approver, release_files: dict[str, str]
) -> None:
    with pytest.raises(ApprovalError, match="unknown key"):
        verify_approval(alice_bundle, release_files, {"bob": bob.public_pem})


def test_key_hint_rewritten_to_name_another_trusted_approver_is_refused(
    alice_bundle: bytes, alice: Approver, bob: Approver, release_files: dict[str, str]
) -> None:
    bob_hint = hashlib.sha256(bob.public_pem).hexdigest()
    forged = _edit_bundle(alice_bundle, lambda d: d["verificationMaterial"]["publicKey"].update(hint=bob_hint))

    with pytest.raises(ApprovalError, match="bad signature: the approval names bob's key"):
        verify_approval(forged, release_files, {"alice": alice.public_pem, "bob": bob.public_pem})


def test_one_key_trusted_under_two_names_is_refused(
    alice_bundle: bytes, alice: Approver, release_files: dict[str, str]
) -> None:
    with pytest.raises(ApprovalError, match="'alice' and 'alice2' are the same key"):
        verify_approval(alice_bundle, release_files, {"alice": alice.public_pem, "alice2": alice.public_pem})


def test_no_trusted_keys_is_refused(alice_bundle: bytes, release_files: dict[str, str]) -> None:
    with pytest.raises(ApprovalError, match="no trusted approver keys"):
        verify_approval(alice_bundle, release_files, {})


def test_trusted_key_that_is_not_a_p256_pem_is_refused_by_name(
    alice_bundle: bytes, alice: Approver, release_files: dict[str, str]
) -> None:
    p384 = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ApprovalError, match="trusted key 'carol' is not a PEM public key"):
        verify_approval(alice_bundle, release_files, {"alice": alice.public_pem, "carol": b"not a key"})
    with pytest.raises(ApprovalError, match="trusted key 'dave' is not a P-256 key"):
        verify_approval(alice_bundle, release_files, {"alice": alice.public_pem, "dave": p384})


def test_signing_with_a_key_that_is_not_p256_is_refused(release: Path, tmp_path: Path) -> None:
    p384 = tmp_path / "p384.pem"
    p384.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ApprovalError, match="not a P-256 private key"):
        sign_release(release, p384)


# --- refusals: files -----------------------------------------------------------------------------


def test_changed_file_digest_is_refused_naming_the_file(
    alice_bundle: bytes, alice: Approver, release_files: dict[str, str]
) -> None:
    changed = {**release_files, "tokenizer/vocab.json": hashlib.sha256(b"other vocabulary").hexdigest()}

    with pytest.raises(ApprovalError, match=re.escape("digest mismatch for tokenizer/vocab.json")):
        verify_approval(alice_bundle, changed, {"alice": alice.public_pem})


def test_changed_file_on_disk_is_refused_naming_the_file(
    alice_bundle: bytes, alice: Approver, release_copy: Path
) -> None:
    with (release_copy / "model.onnx").open("r+b") as weights:
        weights.seek(BIG_FILE_SIZE - 1)
        weights.write(b"\x00" if weights.read(1) != b"\x00" else b"\x01")

    with pytest.raises(ApprovalError, match=re.escape("digest mismatch for model.onnx")):
        verify_approval_dir(alice_bundle, release_copy, {"alice": alice.public_pem})


def test_release_with_a_file_the_approval_does_not_cover_is_refused(
    alice_bundle: bytes, alice: Approver, release_files: dict[str, str], release_copy: Path
) -> None:
    extra = {**release_files, "tokenizer/added.json": hashlib.sha256(b"{}").hexdigest()}
    with pytest.raises(ApprovalError, match=re.escape("file tokenizer/added.json missing from the approval")):
        verify_approval(alice_bundle, extra, {"alice": alice.public_pem})

    (release_copy / "tokenizer" / "added.json").write_text("{}")
    with pytest.raises(ApprovalError, match=re.escape("file tokenizer/added.json missing from the approval")):
        verify_approval_dir(alice_bundle, release_copy, {"alice": alice.public_pem})


def test_release_lacking_a_file_the_approval_covers_is_refused(
    alice_bundle: bytes, alice: Approver, release_files: dict[str, str], release_copy: Path
) -> None:
    fewer = {path: digest for path, digest in release_files.items() if path != "config.json"}
    with pytest.raises(ApprovalError, match=re.escape("extra file config.json in the approval, not in the release")):
        verify_approval(alice_bundle, fewer, {"alice": alice.public_pem})

    (release_copy / "config.json").unlink()
    with pytest.raises(ApprovalError, match=re.escape("extra file config.json in the approval")):
        verify_approval_dir(alice_bundle, release_copy, {"alice": alice.public_pem})


@pytest.mark.parametrize(
    "path", ["./config.json", "/config.json", "../config.json", "tokenizer//vocab.json", "tokenizer/", ""]
)
def test_expected_path_that_is_not_canonical_is_refused(alice_bundle: bytes, alice: Approver, path: str) -> None:
    with pytest.raises(ApprovalError, match="not a canonical relative POSIX path"):
        verify_approval(alice_bundle, {path: "0" * 64}, {"alice": alice.public_pem})


def test_expected_digest_that_is_not_lowercase_hex_sha256_is_refused(
    alice_bundle: bytes, alice: Approver, release_files: dict[str, str]
) -> None:
    upper = {**release_files, "config.json": release_files["config.json"].upper()}
    with pytest.raises(ApprovalError, match=re.escape("expected digest for config.json is not a lowercase hex sha256")):
        verify_approval(alice_bundle, upper, {"alice": alice.public_pem})


def test_release_with_a_symlink_is_refused(release_copy: Path, alice: Approver, alice_bundle: bytes) -> None:
    (release_copy / "link.onnx").symlink_to(release_copy / "model.onnx")

    with pytest.raises(ApprovalError, match="symlink"):
        sign_release(release_copy, alice.private_key)
    with pytest.raises(ApprovalError, match="symlink"):
        verify_approval_dir(alice_bundle, release_copy, {"alice": alice.public_pem})


def test_empty_directory_cannot_be_signed(tmp_path: Path, alice: Approver) -> None:
    with pytest.raises(ApprovalError, match="no files to sign"):
        sign_release(tmp_path, alice.private_key)


# --- refusals: tampered and malformed bundles ----------------------------------------------------


def test_flipped_signature_byte_is_refused(alice_bundle: bytes, alice: Approver, release_files: dict[str, str]) -> None:
    def flip(document: dict) -> None:
        signature = document["dsseEnvelope"]["signatures"][0]
        raw = bytearray(base64.b64decode(signature["sig"]))
        raw[len(raw) // 2] ^= 0x01
        signature["sig"] = base64.b64encode(bytes(raw)).decode()

    with pytest.raises(ApprovalError, match="bad signature"):
        verify_approval(_edit_bundle(alice_bundle, flip), release_files, {"alice": alice.public_pem})


def test_payload_rewritten_to_approve_other_content_is_refused(
    alice_bundle: bytes, alice: Approver, release_files: dict[str, str]
) -> None:
    swapped = hashlib.sha256(b"a different model").hexdigest()

    def approve_other_weights(statement: dict) -> None:
        for resource in statement["predicate"]["resources"]:
            if resource["name"] == "model.onnx":
                resource["digest"] = swapped

    forged = _edit_payload(alice_bundle, approve_other_weights)
    with pytest.raises(ApprovalError, match="bad signature"):
        verify_approval(forged, {**release_files, "model.onnx": swapped}, {"alice": alice.public_pem})


def test_flipped_payload_byte_is_refused(alice_bundle: bytes, alice: Approver, release_files: dict[str, str]) -> None:
    def flip(document: dict) -> None:
        envelope = document["dsseEnvelope"]
        raw = bytearray(base64.b64decode(envelope["payload"]))
        raw[len(raw) // 2] ^= 0x01
        envelope["payload"] = base64.b64encode(bytes(raw)).decode()

    with pytest.raises(ApprovalError, match="bad signature"):
        verify_approval(_edit_bundle(alice_bundle, flip), release_files, {"alice": alice.public_pem})


@settings(max_examples=300, derandomize=True, deadline=None)
@given(data=st.data())
def test_any_single_byte_change_in_a_bundle_is_refused_with_approval_error_or_changes_nothing(
    alice_bundle: bytes, alice: Approver, release_files: dict[str, str], data: st.DataObject
) -> None:
    """Base64 padding bits and JSON whitespace can change without changing what was signed; all else fails."""
    position = data.draw(st.integers(0, len(alice_bundle) - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="mask")
    tampered = bytearray(alice_bundle)
    tampered[position] ^= mask

    try:
        approval = verify_approval(bytes(tampered), release_files, {"alice": alice.public_pem})
    except ApprovalError:
        return
    assert approval == Approval("alice", alice.fingerprint, release_files)


@pytest.mark.parametrize(
    "garbage",
    [b"", b"garbage", b"\xff\xfe\x00\x01", b"null", b"[]", b"{}", b'{"mediaType": 1}', os.urandom(4096)],
    ids=["empty", "text", "binary", "null", "list", "empty-object", "wrong-types", "random"],
)
def test_garbage_bundle_is_refused_as_malformed(
    garbage: bytes, alice: Approver, release_files: dict[str, str], tmp_path: Path
) -> None:
    with pytest.raises(ApprovalError, match="malformed bundle"):
        verify_approval(garbage, release_files, {"alice": alice.public_pem})
    # The bundle is checked before the directory is even looked at.
    with pytest.raises(ApprovalError, match="malformed bundle"):
        verify_approval_dir(garbage, tmp_path / "absent", {"alice": alice.public_pem})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["verificationMaterial"].update(publicKey={"hint": None}),
            "no verificationMaterial.publicKey.hint",
        ),
        (lambda d: d["dsseEnvelope"].update(signatures=[]), "holds no signature"),
        (lambda d: d.pop("dsseEnvelope"), "dsseEnvelope"),
        (lambda d: d.update(extra="field"), "extra"),
        (lambda d: d["dsseEnvelope"].update(payload="QQ"), "malformed bundle: dsseEnvelope.payload"),
    ],
    ids=["no-key-hint", "no-signature", "no-envelope", "unknown-field", "bad-base64-padding"],
)
def test_structurally_broken_bundle_is_refused_as_malformed(
    alice_bundle: bytes,
    alice: Approver,
    release_files: dict[str, str],
    edit: Callable[[dict], object],
    message: str,
) -> None:
    with pytest.raises(ApprovalError, match=message):
        verify_approval(_edit_bundle(alice_bundle, edit), release_files, {"alice": alice.public_pem})


def test_validly_signed_payload_that_is_not_a_manifest_is_refused_as_malformed(
    alice_bundle: bytes, alice: Approver, release_files: dict[str, str]
) -> None:
    payload = json.dumps({"_type": "https://in-toto.io/Statement/v1", "subject": "not a list"}).encode()
    payload_type = b"application/vnd.in-toto+json"
    pae = b"DSSEv1 %d %s %d %s" % (len(payload_type), payload_type, len(payload), payload)
    private_key = serialization.load_pem_private_key(alice.private_key.read_bytes(), None)
    signature = private_key.sign(pae, ec.ECDSA(hashes.SHA256()))

    def resign(document: dict) -> None:
        document["dsseEnvelope"]["payload"] = base64.b64encode(payload).decode()
        document["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(signature).decode()

    with pytest.raises(ApprovalError, match="not a model-signing approval: missing field 'predicateType'"):
        verify_approval(_edit_bundle(alice_bundle, resign), release_files, {"alice": alice.public_pem})


# --- interoperability with model-signing's own public API ----------------------------------------


def test_bundle_from_model_signing_public_api_is_accepted(
    release: Path, alice: Approver, release_files: dict[str, str], tmp_path: Path
) -> None:
    signature_path = tmp_path / "model.sig"
    model_signing.signing.Config().use_elliptic_key_signer(private_key=alice.private_key).sign(release, signature_path)

    approval = verify_approval(signature_path.read_bytes(), release_files, {"alice": alice.public_pem})

    assert approval.approver == "alice"


def test_our_bundle_verifies_with_model_signing_public_api(
    release: Path, alice: Approver, alice_bundle: bytes, tmp_path: Path
) -> None:
    (tmp_path / "alice.pub").write_bytes(alice.public_pem)
    (tmp_path / "model.sig").write_bytes(alice_bundle)

    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=tmp_path / "alice.pub").verify(
        release, tmp_path / "model.sig"
    )


def test_sharded_bundle_is_refused(
    release: Path, alice: Approver, release_files: dict[str, str], tmp_path: Path
) -> None:
    signature_path = tmp_path / "model.sig"
    (
        model_signing.signing.Config()
        .use_elliptic_key_signer(private_key=alice.private_key)
        .set_hashing_config(model_signing.hashing.Config().use_shard_serialization(shard_size=1 << 20))
        .sign(release, signature_path)
    )

    with pytest.raises(ApprovalError, match="not shards"):
        verify_approval(signature_path.read_bytes(), release_files, {"alice": alice.public_pem})


# --- approver keys -------------------------------------------------------------------------------


def test_private_key_is_written_mode_0600(tmp_path: Path) -> None:
    generate_approver_key(tmp_path / "k.pem", tmp_path / "k.pub")

    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600


def test_fingerprint_is_sha256_of_der_subject_public_key_info(alice: Approver) -> None:
    public_key = serialization.load_pem_public_key(alice.public_pem)
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    assert alice.fingerprint == key_fingerprint(alice.public_pem) == hashlib.sha256(der).hexdigest()


def test_existing_private_key_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "k.pem").write_bytes(b"precious")

    with pytest.raises(ApprovalError, match="already exists; refusing to overwrite a key"):
        generate_approver_key(tmp_path / "k.pem", tmp_path / "k.pub")

    assert (tmp_path / "k.pem").read_bytes() == b"precious"
    assert not (tmp_path / "k.pub").exists()


def test_existing_public_key_is_never_overwritten_and_no_orphan_private_key_is_left(tmp_path: Path) -> None:
    (tmp_path / "k.pub").write_bytes(b"precious")

    with pytest.raises(ApprovalError, match="already exists; refusing to overwrite a key"):
        generate_approver_key(tmp_path / "k.pem", tmp_path / "k.pub")

    assert (tmp_path / "k.pub").read_bytes() == b"precious"
    assert not (tmp_path / "k.pem").exists()


def test_approval_errors_are_kernel_errors_and_value_errors() -> None:
    assert issubclass(ApprovalError, SitewardenError)
    assert issubclass(ApprovalError, ValueError)


def test_mismatch_report_for_a_wholly_different_release_stays_short(alice_bundle: bytes, alice: Approver) -> None:
    other = {f"shard-{i:03}.bin": hashlib.sha256(str(i).encode()).hexdigest() for i in range(100)}

    with pytest.raises(ApprovalError, match=r"and 84 more$"):
        verify_approval(alice_bundle, other, {"alice": alice.public_pem})
