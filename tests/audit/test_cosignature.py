"""Witness cosignatures (C2SP tlog-cosignature, Ed25519, type 0x04): keys, signing, opening mixed
notes, a published vector, exports that must carry the cosignatures an auditor requires."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from audit import FormatError, Log, LogError, SignatureError, verify_export
from audit.note import (
    ALG_COSIGNATURE_V1,
    ALG_ED25519,
    Signer,
    Verifier,
    add_signatures,
    cosignature_message,
    generate_key,
    key_id,
    note_text,
    open_note,
    sign,
    signature_lines,
    write_key_pair,
)
from sitewarden import witnessing
from tests.conftest import VECTORS, make_entries, run_cli

TEXT = "sitewarden/test-site\n3\n" + base64.b64encode(b"\x01" * 32).decode() + "\n"
WITNESS = "sitewarden/witness/main"
STAMP = 1_790_000_000


def _raw(line: str) -> bytes:
    return base64.b64decode(line.rstrip("\n").rsplit(" ", 1)[1])


@pytest.fixture
def witness() -> Signer:
    return Signer(generate_key(WITNESS, ALG_COSIGNATURE_V1)[0])


@pytest.fixture
def site() -> Signer:
    return Signer.from_ed25519("sitewarden/test-site", Ed25519PrivateKey.generate())


# -- a published vector ------------------------------------------------------------------


def test_a_published_checkpoint_cosigned_by_a_public_witness_verifies() -> None:
    vector = json.loads((VECTORS / "cosignature.json").read_text())
    opened = open_note(vector["note"], [vector["log_vkey"], vector["witness_vkey"]])
    assert opened.text == vector["text"]
    by_key = {s.key: s for s in opened.signatures}
    assert by_key["arche2025h1.staging.ct.transparency.dev+ba2f06c0"].timestamp is None
    assert by_key["remora.n621.de+da77ade7"].timestamp == vector["witness_timestamp"]
    assert [s.key for s in opened.unverified] == vector["unverified_keys"]
    assert Verifier(vector["witness_vkey"]).is_cosigner
    assert Verifier(vector["plus_vkey_0x01"]).key_type == ALG_ED25519
    with pytest.raises(SignatureError, match=r"invalid signature by trusted key remora\.n621\.de"):
        open_note(vector["note"].replace("1432088532", "1432088533"), [vector["witness_vkey"]])


# -- keys --------------------------------------------------------------------------------


def test_cosigner_keys_use_type_0x04_in_the_key_id_vkey_and_private_key(witness: Signer) -> None:
    name, hex_id, b64 = witness.vkey.split("+", 2)
    raw = base64.b64decode(b64)
    assert (name, raw[0], len(raw)) == (WITNESS, ALG_COSIGNATURE_V1, 33)
    want = hashlib.sha256(WITNESS.encode() + b"\n\x04" + raw[1:]).digest()[:4]
    assert hex_id == want.hex() and witness.key_id == int.from_bytes(want, "big")
    verifier = Verifier(witness.vkey)
    assert verifier.is_cosigner and verifier.key_type == ALG_COSIGNATURE_V1
    skey, vkey = generate_key(WITNESS, ALG_COSIGNATURE_V1)
    assert skey.startswith(f"PRIVATE+KEY+{WITNESS}+") and base64.b64decode(skey.split("+", 4)[4])[0] == 0x04
    assert Signer(skey).vkey == vkey and Signer(skey).is_cosigner
    # One public key, two types: two different key ids, so a note signature never passes for a cosignature.
    assert key_id(WITNESS, ALG_ED25519, raw[1:]) != key_id(WITNESS, ALG_COSIGNATURE_V1, raw[1:])


def test_cosigner_key_files_are_written_like_log_keys(tmp_path: Path) -> None:
    key_path, vkey = write_key_pair(WITNESS, tmp_path, stem="witness", key_type=ALG_COSIGNATURE_V1)
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert Signer.from_file(key_path).vkey == vkey == (tmp_path / "witness.vkey").read_text().strip()
    with pytest.raises(FormatError, match="refusing to overwrite"):
        write_key_pair(WITNESS, tmp_path, stem="witness", key_type=ALG_COSIGNATURE_V1)


def test_a_site_identity_key_signs_checkpoints_under_its_origin() -> None:
    identity = Ed25519PrivateKey.generate()
    signer = Signer.from_ed25519("sitewarden/site-1", identity)
    assert signer.public_key == identity.public_key().public_bytes_raw()
    assert signer.key_type == ALG_ED25519 and signer.vkey.startswith("sitewarden/site-1+")
    opened = open_note(sign(TEXT, signer), [signer.vkey])
    identity.public_key().verify(_raw(sign(TEXT, signer).split("\n\n")[1])[4:], TEXT.encode())
    assert opened.signatures[0].timestamp is None
    assert Signer.from_ed25519("sitewarden/site-1", identity, ALG_COSIGNATURE_V1).is_cosigner


@pytest.mark.parametrize("key_type", [0x00, 0x02, 0x05, 0x06])
def test_unsupported_key_types_are_refused_everywhere(key_type: int) -> None:
    public = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    kid = key_id("w", key_type, public)
    with pytest.raises(FormatError, match=f"unsupported key type 0x{key_type:02x}"):
        Verifier(f"w+{kid:08x}+{base64.b64encode(bytes([key_type]) + public).decode()}")
    with pytest.raises(FormatError, match="unsupported key type"):
        generate_key("w", key_type)
    with pytest.raises(FormatError, match="unsupported key type"):
        Signer(f"PRIVATE+KEY+w+{kid:08x}+{base64.b64encode(bytes([key_type]) + bytes(32)).decode()}")


# -- signing and opening -----------------------------------------------------------------


def test_a_cosignature_signs_its_timestamp_and_the_whole_note_text(witness: Signer) -> None:
    text = TEXT + "an extension line\n"
    line = signature_lines(text, witness, timestamp=STAMP)
    assert line.startswith(f"\u2014 {WITNESS} ")
    raw = _raw(line)
    kid, stamp = struct.unpack(">IQ", raw[:12])
    assert (kid, stamp, len(raw)) == (witness.key_id, STAMP, 4 + 8 + 64)
    message = b"cosignature/v1\ntime %d\n" % STAMP + text.encode()
    assert cosignature_message(text, STAMP) == message
    Ed25519PublicKey.from_public_bytes(witness.public_key).verify(raw[12:], message)  # independent check
    opened = open_note(text + "\n" + line, [witness.vkey])
    assert opened.signatures[0].timestamp == STAMP


def test_changing_the_timestamp_the_text_or_an_extension_breaks_the_cosignature(witness: Signer) -> None:
    text = TEXT + "an extension line\n"
    line = signature_lines(text, witness, timestamp=STAMP)
    raw = bytearray(_raw(line))
    raw[11] ^= 1  # the last byte of the timestamp
    restamped = f"\u2014 {WITNESS} {base64.b64encode(bytes(raw)).decode()}\n"
    for tampered in (
        text + "\n" + restamped,
        text.replace("\n3\n", "\n4\n") + "\n" + line,
        text.replace("extension", "extensiom") + "\n" + line,
    ):
        with pytest.raises(SignatureError, match="invalid signature by trusted key"):
            open_note(tampered, [witness.vkey])


def test_note_signatures_and_cosignatures_do_not_stand_in_for_each_other(site: Signer) -> None:
    seed_holder = Ed25519PrivateKey.generate()
    as_log = Signer.from_ed25519(WITNESS, seed_holder)
    as_witness = Signer.from_ed25519(WITNESS, seed_holder, ALG_COSIGNATURE_V1)
    with pytest.raises(SignatureError, match="no signature by a trusted key"):
        open_note(sign(TEXT, as_log), [as_witness.vkey])
    with pytest.raises(SignatureError, match="no signature by a trusted key"):
        open_note(sign(TEXT, as_witness), [as_log.vkey])


def test_a_mixed_note_opens_with_the_log_signature_and_the_cosignature(site: Signer, witness: Signer) -> None:
    signed = sign(TEXT, site, witness, timestamp=STAMP)
    opened = open_note(signed, [site.vkey, witness.vkey])
    assert [(s.name, s.timestamp) for s in opened.signatures] == [(site.name, None), (WITNESS, STAMP)]
    assert [s.name for s in open_note(signed, [site.vkey]).unverified] == [WITNESS]
    # A note that only a witness vouches for still opens: requiring the log's signature is policy.
    assert open_note(signed, [witness.vkey]).signatures[0].name == WITNESS


def test_witness_lines_merge_into_a_note_once(site: Signer, witness: Signer) -> None:
    signed = sign(TEXT, site)
    lines = signature_lines(TEXT, witness, timestamp=STAMP)
    merged = add_signatures(signed, lines)
    assert merged == signed + lines
    assert add_signatures(merged, lines) == merged
    # A later cosignature by the same key is not added: one signature per key.
    assert add_signatures(merged, signature_lines(TEXT, witness, timestamp=STAMP + 60)) == merged
    other = Signer(generate_key("sitewarden/witness/backup", ALG_COSIGNATURE_V1)[0])
    both = add_signatures(merged, signature_lines(TEXT, other).splitlines())
    assert [s.name for s in open_note(both, [site.vkey, witness.vkey, other.vkey]).signatures] == [
        site.name,
        WITNESS,
        other.name,
    ]
    with pytest.raises(FormatError, match="does not start with"):
        add_signatures(signed, "not a signature line\n")


def test_a_repeated_bad_line_by_a_trusted_key_is_an_error(site: Signer, witness: Signer) -> None:
    good = signature_lines(TEXT, witness, timestamp=STAMP)
    bad = signature_lines(TEXT.replace("\n3\n", "\n4\n"), witness, timestamp=STAMP)
    with pytest.raises(SignatureError, match="invalid signature"):
        open_note(sign(TEXT, site) + good + bad, [site.vkey, witness.vkey])


def test_timestamps_belong_to_cosigners_only(site: Signer, witness: Signer) -> None:
    with pytest.raises(ValueError, match="carry no timestamp"):
        site.sign(TEXT.encode(), timestamp=STAMP)
    with pytest.raises(ValueError, match="outside"):
        witness.sign(TEXT.encode(), timestamp=1 << 63)
    assert struct.unpack(">Q", witness.sign(TEXT.encode())[:8])[0] > STAMP  # now, by default


# -- exports that must carry cosignatures ----------------------------------------------------


def _cosigned_export(tmp_path: Path, site: Signer, *witnesses: Signer) -> Path:
    with Log.open(tmp_path / "log", site) as log:
        log.append_many(make_entries(300))
        log.checkpoint()
        for w in witnesses:
            sent = witnessing.submission(log, 0)
            witnessing.store_cosignatures(log, sent, signature_lines(note_text(sent.checkpoint), w), w.vkey)
        return log.export(tmp_path / "export")


def test_export_verifies_when_every_required_witness_cosigned(tmp_path: Path, site: Signer, witness: Signer) -> None:
    export = _cosigned_export(tmp_path, site, witness)
    report = verify_export(export, [site.vkey], witnesses=[witness.vkey])
    assert report.valid, report.reason
    assert report.signers == (f"{site.name}+{site.key_id:08x}",)
    assert [c.witness for c in report.witnesses] == [f"{WITNESS}+{witness.key_id:08x}"]
    assert report.witnesses[0].time.endswith("Z")
    # Without witness keys the cosignature is an unverified line, as before.
    plain = verify_export(export, [site.vkey])
    assert plain.valid and plain.witnesses == () and plain.unverified_signers == (report.witnesses[0].witness,)


def test_export_without_a_required_cosignature_is_invalid_at_the_checkpoint(
    tmp_path: Path, site: Signer, witness: Signer
) -> None:
    export = _cosigned_export(tmp_path, site, witness)
    absent = Signer(generate_key("sitewarden/witness/other", ALG_COSIGNATURE_V1)[0])
    report = verify_export(export, [site.vkey], witnesses=[witness.vkey, absent.vkey])
    assert not report.valid and report.tile == "checkpoint"
    assert "cosigned by 1 of the trusted witnesses, 2 required" in report.reason
    assert f"sitewarden/witness/other+{absent.key_id:08x}" in report.reason
    assert verify_export(export, [site.vkey], witnesses=[witness.vkey, absent.vkey], min_witnesses=1).valid
    assert not verify_export(export, [site.vkey], witnesses=[absent.vkey], min_witnesses=1).valid


def test_a_cosignature_alone_does_not_make_a_checkpoint_valid(tmp_path: Path, site: Signer, witness: Signer) -> None:
    export = _cosigned_export(tmp_path, site, witness)
    checkpoint = (export / "checkpoint").read_text()
    # Keep only the witness's line: the log's signature is gone.
    text = note_text(checkpoint)
    only_cosigned = text + "\n" + checkpoint.splitlines(keepends=True)[-1]
    (export / "checkpoint").write_text(only_cosigned)
    report = verify_export(export, [site.vkey], witnesses=[witness.vkey])
    assert not report.valid and report.tile == "checkpoint"
    assert "no signature by a trusted log key" in report.reason


def test_a_tampered_cosignature_by_a_trusted_witness_is_invalid(tmp_path: Path, site: Signer, witness: Signer) -> None:
    export = _cosigned_export(tmp_path, site, witness)
    checkpoint = (export / "checkpoint").read_text()
    *head, last = checkpoint.splitlines(keepends=True)
    raw = bytearray(_raw(last))
    raw[-1] ^= 1
    (export / "checkpoint").write_text("".join(head) + f"\u2014 {WITNESS} {base64.b64encode(bytes(raw)).decode()}\n")
    report = verify_export(export, [site.vkey], witnesses=[witness.vkey])
    assert not report.valid and "invalid signature by trusted key sitewarden/witness/main" in report.reason


def test_keys_of_the_wrong_type_or_an_impossible_quorum_are_unusable_input(
    tmp_path: Path, site: Signer, witness: Signer
) -> None:
    export = _cosigned_export(tmp_path, site, witness)
    with pytest.raises(FormatError, match="is not a log key"):
        verify_export(export, [witness.vkey])
    with pytest.raises(FormatError, match="is not a witness"):
        verify_export(export, [site.vkey], witnesses=[site.vkey])
    with pytest.raises(FormatError, match="min_witnesses"):
        verify_export(export, [site.vkey], witnesses=[witness.vkey], min_witnesses=2)


def test_store_cosignatures_refuses_lines_by_other_keys_and_stale_checkpoints(
    tmp_path: Path, site: Signer, witness: Signer
) -> None:
    with Log.open(tmp_path / "log", site) as log:
        log.append_many(make_entries(5))
        log.checkpoint()
        sent = witnessing.submission(log, 0)
        text = note_text(sent.checkpoint)
        impostor = Signer(generate_key(WITNESS, ALG_COSIGNATURE_V1)[0])
        with pytest.raises(SignatureError, match="no valid cosignature"):
            witnessing.store_cosignatures(log, sent, signature_lines(text, impostor), witness.vkey)
        # The log's own signature line is not a cosignature.
        with pytest.raises(SignatureError):
            witnessing.store_cosignatures(log, sent, sent.checkpoint.split("\n\n", 1)[1], witness.vkey)
        with pytest.raises(FormatError, match="not a cosigner key"):
            witnessing.store_cosignatures(log, sent, signature_lines(text, witness), site.vkey)
        log.append_many(make_entries(1, start=5))
        log.checkpoint()
        with pytest.raises(LogError, match="not the last one"):
            witnessing.store_cosignatures(log, sent, signature_lines(text, witness), witness.vkey)
        assert witnessing.submission(log, 5).proof == tuple(log.consistency_proof(5, 6))


def test_a_stored_cosignature_survives_reopening_and_the_next_checkpoint_replaces_it(
    tmp_path: Path, site: Signer, witness: Signer
) -> None:
    with Log.open(tmp_path / "log", site) as log:
        log.append_many(make_entries(5))
        log.checkpoint()
        sent = witnessing.submission(log, 0)
        stored = witnessing.store_cosignatures(
            log, sent, signature_lines(note_text(sent.checkpoint), witness), witness.vkey
        )
    with Log.open(tmp_path / "log", site) as log:
        assert log.signed_checkpoint == stored
        assert log.tlog_proof(2).checkpoint == stored  # per-entry proofs carry the cosignature too
        log.append_many(make_entries(1, start=5))
        signed = log.checkpoint()  # still consistent with the cosigned one
    assert len(open_note(signed, [site.vkey]).unverified) == 0


def test_submission_bodies_and_conflict_answers_follow_tlog_witness(tmp_path: Path, site: Signer) -> None:
    with Log.open(tmp_path / "log", site) as log:
        log.append_many(make_entries(9))
        log.checkpoint()
        first = witnessing.submission(log, 0)
        assert first.body().decode() == "old 0\n\n" + log.signed_checkpoint
        later = witnessing.submission(log, 4)
        lines = later.body().decode().split("\n\n", 1)[0].split("\n")
        assert lines[0] == "old 4" and [base64.b64decode(x) for x in lines[1:]] == list(log.consistency_proof(4, 9))
        assert witnessing.submission(log, 9).proof == ()
        with pytest.raises(LogError, match="lost entries"):
            witnessing.submission(log, 10)
    assert witnessing.conflict_size(b"1234\n") == 1234
    for bad in (b"", b"12", b"012\n", b"-1\n", b"12\n\n", b"size 12\n"):
        with pytest.raises(FormatError):
            witnessing.conflict_size(bad)


# -- the command line ----------------------------------------------------------------------


def test_cli_verify_requires_every_witness_given(tmp_path: Path, site: Signer, witness: Signer) -> None:
    export = _cosigned_export(tmp_path, site, witness)
    done = run_cli("audit", "verify", str(export), "--key", site.vkey, "--witness", witness.vkey)
    assert done.returncode == 0, done.stderr
    assert f"cosigned by: {WITNESS}+{witness.key_id:08x} at " in done.stdout.decode()
    witness_file = tmp_path / "witnesses"
    absent = generate_key("sitewarden/witness/other", ALG_COSIGNATURE_V1)[1]
    witness_file.write_text(f"{witness.vkey}\n{absent}\n")
    done = run_cli("audit", "verify", str(export), "--key", site.vkey, "--witness", str(witness_file))
    assert done.returncode == 1
    assert done.stdout.decode().startswith("INVALID at checkpoint: checkpoint: witness quorum not met")
    # A witness key where a log key belongs, or the reverse, or garbage: unusable input.
    for args in (
        ["--key", witness.vkey],
        ["--key", site.vkey, "--witness", site.vkey],
        ["--key", site.vkey, "--witness", "name+12345678+bm90IGEga2V5"],
        ["--key", site.vkey, "--witness", str(tmp_path / "missing")],
    ):
        done = run_cli("audit", "verify", str(export), *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stderr.decode().startswith("error: ")
