"""C2SP signed notes, keys, checkpoints and tlog-proof files."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from audit import FormatError, SignatureError, merkle
from audit import proof as tlog_proof
from audit.checkpoint import Checkpoint, parse
from audit.note import Signer, Verifier, generate_key, open_note, sign, write_key_pair

TEXT = "sitewarden/test-site\n3\n" + base64.b64encode(b"\x01" * 32).decode() + "\n"


def test_note_signed_by_trusted_key_opens_and_unknown_signatures_are_set_aside() -> None:
    skey, vkey = generate_key("log")
    other_skey, _ = generate_key("witness")
    signed = sign(TEXT, Signer(skey), Signer(other_skey))
    opened = open_note(signed, [vkey])
    assert opened.text == TEXT
    assert [s.name for s in opened.signatures] == ["log"]
    assert [s.name for s in opened.unverified] == ["witness"]


def test_note_without_a_trusted_signature_is_rejected() -> None:
    skey, _ = generate_key("log")
    _, stranger = generate_key("log")  # same name, different key
    with pytest.raises(SignatureError, match="no signature by a trusted key"):
        open_note(sign(TEXT, Signer(skey)), [stranger])


def test_bad_signature_by_a_trusted_key_is_an_error_not_ignored() -> None:
    skey, vkey = generate_key("log")
    signed = sign(TEXT, Signer(skey))
    tampered = signed.replace("\n3\n", "\n4\n")
    with pytest.raises(SignatureError, match="invalid signature"):
        open_note(tampered, [vkey])


@pytest.mark.parametrize(
    "msg",
    [
        TEXT,  # no signature block
        TEXT + "\n",  # empty signature block
        TEXT + "\nnot a signature line\n",
        TEXT + "\n\u2014 log !!!notbase64\n",
        TEXT + "\n\u2014 log AAAA\n",  # too short for key id + signature
        TEXT + "\n\u2014 log AAAAAAAA",  # no final newline
        "bad\x01control\n\n\u2014 log AAAAAAAA\n",
        b"\xff\xfe\n\n",
    ],
)
def test_malformed_notes_raise_format_error(msg: str | bytes) -> None:
    _, vkey = generate_key("log")
    with pytest.raises(FormatError):
        open_note(msg, [vkey])


@pytest.mark.parametrize(
    "vkey",
    [
        "",
        "name",
        "name+zzzzzzzz+AQ==",
        "na me+00000000+" + base64.b64encode(b"\x01" + b"\x00" * 32).decode(),
        "name+00000000+" + base64.b64encode(b"\x02" + b"\x00" * 32).decode(),
        "name+00000000+" + base64.b64encode(b"\x01" + b"\x00" * 32).decode(),  # key id mismatch
        "name+00000000+not*base64",
    ],
)
def test_malformed_vkeys_are_refused_with_a_reason(vkey: str) -> None:
    with pytest.raises(FormatError, match="vkey"):
        Verifier(vkey)


def test_key_pair_files_private_key_is_mode_0600_and_never_overwritten(tmp_path: Path) -> None:
    key_path, vkey = write_key_pair("sitewarden/site-1", tmp_path)
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert Signer.from_file(key_path).vkey == vkey == (tmp_path / "log.vkey").read_text().strip()
    with pytest.raises(FormatError, match="refusing to overwrite"):
        write_key_pair("sitewarden/site-1", tmp_path)
    assert Signer.from_file(key_path).vkey == vkey


def test_checkpoint_round_trip_with_extensions() -> None:
    cp = Checkpoint("example.com/log", 123456, bytes(range(32)), ("ext one",))
    assert parse(cp.format()) == cp
    assert cp.format().startswith("example.com/log\n123456\n")


@pytest.mark.parametrize(
    "text",
    [
        "origin\n12\n",
        "\n12\n" + base64.b64encode(bytes(32)).decode() + "\n",
        "origin\n012\n" + base64.b64encode(bytes(32)).decode() + "\n",
        "origin\n-1\n" + base64.b64encode(bytes(32)).decode() + "\n",
        "origin\n12\n" + base64.b64encode(bytes(31)).decode() + "\n",
        "origin\n12\n" + base64.b64encode(bytes(32)).decode(),
        "origin\n12\n" + base64.b64encode(bytes(32)).decode() + "\n\n",
    ],
)
def test_malformed_checkpoints_are_refused(text: str) -> None:
    with pytest.raises(FormatError):
        parse(text)


def test_tlog_proof_format_round_trip_and_verification() -> None:
    skey, vkey = generate_key("sitewarden/test-site")
    entries = [f"entry {i}".encode() for i in range(11)]
    tree = merkle.Tree(merkle.leaf_hash(e) for e in entries)
    signed = sign(Checkpoint("sitewarden/test-site", 11, tree.root()).format(), Signer(skey))
    made = tlog_proof.TlogProof(7, tuple(merkle.inclusion_proof(7, 11, tree)), signed, extra=b"ctx")
    text = made.format()
    assert text.startswith("c2sp.org/tlog-proof@v1\nextra ")
    parsed = tlog_proof.parse(text)
    assert parsed == made
    cp, _ = tlog_proof.verify(parsed, entries[7], [vkey])
    assert cp.size == 11
    with pytest.raises(merkle.ProofError):
        tlog_proof.verify(parsed, entries[6], [vkey])


@pytest.mark.parametrize(
    "text",
    [
        "c2sp.org/tlog-proof@v2\nindex 1\n\ncp",
        "c2sp.org/tlog-proof@v1\nindex 01\n\ncp",
        "c2sp.org/tlog-proof@v1\nindex 1\nAAAA\n\ncp",
        "c2sp.org/tlog-proof@v1\nindex 1",
    ],
)
def test_malformed_tlog_proofs_are_refused(text: str) -> None:
    with pytest.raises(FormatError):
        tlog_proof.parse(text)
