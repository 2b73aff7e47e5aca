"""Fuzz targets (atheris, libFuzzer) for every parser of bytes that reach a site or the controller from outside.

Run one: `python -m tests.attacks.fuzz_targets TARGET [CORPUS_DIR] [libFuzzer flags]`, e.g.
`-max_total_time=60`. Each target feeds the fuzzer's bytes to one parser and lets through only
the errors that parser documents; anything else (an IndexError, a UnicodeDecodeError, a
RecursionError...) escapes, and libFuzzer reports it with the input that caused it and exits
non-zero. `seeds(TARGET)` gives well-formed inputs to start from, so that the fuzzer mutates
real notes, checkpoints and tokens rather than starting from nothing.

Targets and the documented errors each may raise:

- `note`: C2SP signed notes (`audit.note.open_note`): FormatError, SignatureError
- `checkpoint`: C2SP tlog-checkpoints (`audit.checkpoint.parse`): FormatError
- `tlog_proof`: C2SP tlog-proofs (`audit.proof.parse`, then `verify`): FormatError, SignatureError, ProofError
- `cosignature`: the witness's reply to a site (`sitewarden.witnessing.verify_cosignatures`,
  `conflict_size`): FormatError, SignatureError
- `add_checkpoint`: a site's tlog-witness request body (`controller.witness.parse_add_checkpoint`): BadRequest
- `oip_request`: an app's OIP v2 inference request (`agent.oip.parse_request`, `decode_inputs`,
  `requested_outputs`): InferenceInputError
- `join_token`: a join token (`sitewarden.jointoken.parse`): CredentialError
- `desired_state`: a desired-state document and a long-poll answer (`sitewarden.desired.DesiredState`,
  `sitewarden.wire.DesiredPointer`): pydantic's ValidationError
- `site_jwt`: a site JWT (`sitewarden.sitejwt.unverified_site`, `verify`; the controller's
  `auth._unverified_subject`): CredentialError, Unauthenticated
- `approval`: an approval bundle (`sitewarden.approval.verify_approval`): ApprovalError
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

INSTRUMENTED = ["audit", "sitewarden", "agent", "controller"]

# What every target needs is imported here; what only some need (numpy, FastAPI, SQLAlchemy,
# model-signing) is imported by those targets when first called, which `main` does inside
# `instrument_imports` too: a fuzzing process loads only what its target parses.
with atheris.instrument_imports(include=INSTRUMENTED):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from pydantic import ValidationError

    from audit import Log, merkle
    from audit.checkpoint import parse as parse_checkpoint
    from audit.errors import FormatError, ProofError, SignatureError
    from audit.note import (
        ALG_COSIGNATURE_V1,
        Signer,
        add_signatures,
        generate_key,
        open_note,
        sign,
        signature_lines,
    )
    from audit.proof import parse as parse_proof
    from audit.proof import verify as verify_proof
    from sitewarden import jointoken, sitejwt, witnessing
    from sitewarden.desired import DesiredState
    from sitewarden.errors import CredentialError
    from sitewarden.wire import DesiredPointer

# Fixed keys, so that a crash reproduces: the fuzzer mutates inputs, never keys.
_SEED = hashlib.sha256(b"sitewarden fuzz").digest()
LOG = Signer.from_ed25519("sitewarden/fuzz-site", Ed25519PrivateKey.from_private_bytes(_SEED))
LOG_VKEY = LOG.vkey
WITNESS = Signer.from_ed25519(
    "sitewarden/witness/fuzz", Ed25519PrivateKey.from_private_bytes(_SEED[::-1]), ALG_COSIGNATURE_V1
)
SITE_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"site key").digest())
SITE_ID = "0d9b6f8e-1c4a-4f0e-9a1b-2c3d4e5f6a7b"
AUDIENCE = "https://controller.example:8443"
OIP_DECLARATION = (
    [
        {"name": "features", "datatype": "FP32", "shape": [-1, 8]},
        {"name": "text", "datatype": "BYTES", "shape": [-1]},
    ],
    [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
    ],
)


class _NotText(Exception):
    """Bytes that are not UTF-8 never reach a parser of text: its caller decodes them strictly first."""


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _NotText from exc


def fuzz_note(data: bytes) -> None:
    with contextlib.suppress(FormatError, SignatureError):
        open_note(data, [LOG_VKEY, WITNESS.vkey])


def fuzz_checkpoint(data: bytes) -> None:
    with contextlib.suppress(FormatError, _NotText):
        parse_checkpoint(_text(data))


def fuzz_tlog_proof(data: bytes) -> None:
    with contextlib.suppress(FormatError, SignatureError, ProofError, _NotText):
        proof = parse_proof(_text(data))
        verify_proof(proof, b'{"fuzz":true}', [LOG_VKEY])


def fuzz_cosignature(data: bytes) -> None:
    checkpoint = _signed_checkpoint()
    with contextlib.suppress(FormatError, SignatureError):
        witnessing.verify_cosignatures(checkpoint, data, WITNESS.vkey)
    with contextlib.suppress(FormatError):
        witnessing.conflict_size(data)


def fuzz_add_checkpoint(data: bytes) -> None:
    from controller.errors import BadRequest  # noqa: PLC0415 - see INSTRUMENTED
    from controller.witness import parse_add_checkpoint  # noqa: PLC0415

    with contextlib.suppress(BadRequest):
        parse_add_checkpoint(data)


def fuzz_oip_request(data: bytes) -> None:
    from agent import oip  # noqa: PLC0415 - see INSTRUMENTED

    signature = _CACHE.get("oip") or _CACHE.setdefault("oip", oip.Signature.from_declaration(*OIP_DECLARATION))
    with contextlib.suppress(oip.InferenceInputError):
        request = oip.parse_request(data)
        oip.decode_inputs(request, signature)  # type: ignore[arg-type]
        oip.requested_outputs(request, signature)  # type: ignore[arg-type]


def fuzz_join_token(data: bytes) -> None:
    with contextlib.suppress(CredentialError, _NotText):
        jointoken.parse(_text(data))


def fuzz_desired_state(data: bytes) -> None:
    for model in (DesiredState, DesiredPointer):
        with contextlib.suppress(ValidationError):
            model.model_validate_json(data)


def fuzz_site_jwt(data: bytes) -> None:
    from controller import auth  # noqa: PLC0415 - see INSTRUMENTED
    from controller.errors import Unauthenticated  # noqa: PLC0415

    token = data.decode("latin-1")  # as Starlette hands the controller an Authorization header
    with contextlib.suppress(CredentialError):
        sitejwt.unverified_site(token)
    with contextlib.suppress(CredentialError):
        sitejwt.verify(token, SITE_KEY.public_key(), AUDIENCE)
    with contextlib.suppress(Unauthenticated):
        auth._unverified_subject(token)


_PUBLIC_PEM: bytes | None = None


def fuzz_approval(data: bytes) -> None:
    from sitewarden import approval  # noqa: PLC0415 - see INSTRUMENTED

    with contextlib.suppress(approval.ApprovalError):
        approval.verify_approval(data, {"release.json": "0" * 64}, {"alice": _approver_public_pem()})


TARGETS: dict[str, Callable[[bytes], None]] = {
    "note": fuzz_note,
    "checkpoint": fuzz_checkpoint,
    "tlog_proof": fuzz_tlog_proof,
    "cosignature": fuzz_cosignature,
    "add_checkpoint": fuzz_add_checkpoint,
    "oip_request": fuzz_oip_request,
    "join_token": fuzz_join_token,
    "desired_state": fuzz_desired_state,
    "site_jwt": fuzz_site_jwt,
    "approval": fuzz_approval,
}


# -- seeds: well-formed inputs to mutate ---------------------------------------------------------

_CACHE: dict[str, object] = {}


def _log_material() -> tuple[str, str]:
    """(a signed checkpoint of a 5-entry log, a tlog-proof of its entry 2), made once."""
    if "log" not in _CACHE:
        with tempfile.TemporaryDirectory() as tmp, Log.open(Path(tmp) / "log", LOG) as log:
            for i in range(5):
                log.append(json.dumps({"fuzz": i}).encode())
            signed = log.checkpoint()
            proof = log.tlog_proof(2).format()
        _CACHE["log"] = (signed, proof)
    return _CACHE["log"]  # type: ignore[return-value]


def _signed_checkpoint() -> str:
    return _log_material()[0]


def _approver_public_pem() -> bytes:
    if "approver" not in _CACHE:
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

        from sitewarden import approval  # noqa: PLC0415

        key = ec.derive_private_key(int.from_bytes(_SEED, "big") % (2**255), ec.SECP256R1())
        pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "release.json").write_bytes(b"{}")
            bundle = approval.sign_release(Path(tmp), key)
        _CACHE["approver"] = (pem, bundle)
    return _CACHE["approver"][0]  # type: ignore[index]


def seeds(target: str) -> list[bytes]:
    """Well-formed inputs of `target` (and a few near misses) for the fuzzer to start from."""
    signed, proof = _log_material()
    note_text_ = signed.split("\n\n", 1)[0] + "\n"
    if target == "note":
        witnessed = add_signatures(signed, signature_lines(note_text_, WITNESS, timestamp=1_700_000_000))
        return [signed.encode(), witnessed.encode(), sign("hello\n", Signer(generate_key("other")[0])).encode()]
    if target == "checkpoint":
        return [note_text_.encode(), b"sitewarden/x\n0\n" + base64.b64encode(merkle.EMPTY_ROOT) + b"\n"]
    if target == "tlog_proof":
        return [proof.encode()]
    if target == "cosignature":
        lines = signature_lines(note_text_, WITNESS, timestamp=1_700_000_000)
        return [lines.encode(), b"42\n"]
    if target == "add_checkpoint":
        h = base64.b64encode(hashlib.sha256(b"x").digest()).decode()
        return [f"old 0\n\n{signed}".encode(), f"old 3\n{h}\n{h}\n\n{signed}".encode()]
    if target == "oip_request":
        return [
            json.dumps(
                {
                    "id": "r1",
                    "parameters": {"purpose": "fraud", "data_class": "confidential"},
                    "inputs": [
                        {"name": "features", "shape": [1, 8], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6, 7, 8]},
                        {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"]},
                    ],
                    "outputs": [{"name": "label"}],
                }
            ).encode(),
            b'{"inputs": [{"name": "features", "shape": [2, 8], "datatype": "FP32", "data": [[1,2,3,4,5,6,7,8],'
            b"[1,2,3,4,5,6,7,8]]}]}",
        ]
    if target == "join_token":
        from datetime import UTC, datetime  # noqa: PLC0415

        token = jointoken.JoinToken(
            token_id="0123456789abcdef",
            secret=jointoken.new_secret(),
            controller_url=AUDIENCE,
            root_sha256="a" * 64,
            site="branch-1",
            expires_at=datetime(2030, 1, 1, tzinfo=UTC),
        )
        return [token.encode().encode()]
    if target == "desired_state":
        sha = "b" * 64
        ref = {"target": "releases/m/1.0.0/release.json", "sha256": sha, "size": 10}
        return [
            json.dumps(
                {
                    "site_id": SITE_ID,
                    "version": 3,
                    "generated_at": "2026-01-01T00:00:00Z",
                    "rollout": {"id": SITE_ID, "name": "r1"},
                    "releases": [
                        {
                            "name": "m",
                            "version": "1.0.0",
                            "kind": "model",
                            "runtime": "onnx",
                            "manifest": ref,
                            "files": [{**ref, "path": "model.onnx"}],
                            "approvals": [{**ref, "approver": "alice", "key_fingerprint": sha}],
                        }
                    ],
                }
            ).encode(),
            json.dumps(
                {"version": 3, "target": f"sites/{SITE_ID}/desired.json", "sha256": sha, "changed": True}
            ).encode(),
        ]
    if target == "site_jwt":
        return [sitejwt.sign(SITE_KEY, SITE_ID, AUDIENCE).encode(), b"eyJhbGciOiJub25lIn0.e30."]
    if target == "approval":
        _approver_public_pem()
        return [_CACHE["approver"][1]]  # type: ignore[index]
    raise KeyError(target)


def main(argv: list[str]) -> None:
    """`TARGET [CORPUS_DIR] [libFuzzer flags]`; an empty CORPUS_DIR is first filled with `seeds(TARGET)`."""
    if len(argv) < 2 or argv[1] not in TARGETS:
        raise SystemExit(f"usage: python -m tests.attacks.fuzz_targets {{{','.join(TARGETS)}}} [libFuzzer args]")
    name, flags = argv[1], argv[2:]
    target = TARGETS[name]
    with atheris.instrument_imports(include=INSTRUMENTED):
        started = seeds(name)  # also makes the fixtures, before any run
        for seed in started:
            target(seed)  # imports what the target needs, instrumented; a seed must pass, of course
    corpus = Path(flags[0]) if flags and not flags[0].startswith("-") else None
    if corpus is not None and corpus.is_dir() and not any(corpus.iterdir()):
        for i, seed in enumerate(started):
            (corpus / f"seed-{i}").write_bytes(seed)
    atheris.Setup([argv[0], *flags], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
