"""Witness policies (C2SP tlog-policy): parsing by the specification's rules, quorum evaluation,
and `audit verify` deciding by a policy file or by --witness … --quorum K."""

from __future__ import annotations

from pathlib import Path

import pytest

from audit import Log, verify_export
from audit.errors import FormatError
from audit.note import ALG_COSIGNATURE_V1, Signer, generate_key, signature_lines
from audit.policy import from_keys, parse
from tests.conftest import make_entries, run_cli


def _witnesses(count: int) -> list[Signer]:
    return [Signer(generate_key(f"witness-{i}.example", ALG_COSIGNATURE_V1)[0]) for i in range(count)]


@pytest.fixture
def cosigned_export(tmp_path: Path, keypair: tuple[str, str]) -> tuple[Path, list[Signer]]:
    """An export whose checkpoint carries cosignatures by witnesses 0 and 1 of four."""
    witnesses = _witnesses(4)
    with Log.open(tmp_path / "log", keypair[0]) as log:
        log.append_many(make_entries(40))
        signed = log.checkpoint()
        text = signed[: signed.index("\n\n") + 1]
        log.add_cosignatures(signed + signature_lines(text, witnesses[0], witnesses[1]))
        dest = log.export(tmp_path / "export")
    return dest, witnesses


def test_the_specifications_example_policy_parses_and_decides_by_groups() -> None:
    _, log_vkey = generate_key("example.com/log")
    x, y = _witnesses(3), _witnesses(3)
    text = (
        "# two organisations\n"
        f"log {log_vkey} https://example.com/log\n\n"
        + "".join(f"witness X{i} {w.vkey}\n" for i, w in enumerate(x))
        + "group X-witnesses 2 X0 X1 X2\n"
        + "".join(f"\twitness Y{i}   {w.vkey}\n" for i, w in enumerate(y))
        + "group Y-witnesses any Y0 Y1 Y2\n"
        "group X-and-Y all X-witnesses Y-witnesses\n"
        "quorum X-and-Y\n"
    )
    policy = parse(text)
    assert [v.vkey for v in policy.logs] == [log_vkey] and policy.log_urls == ("https://example.com/log",)
    key = {f"X{i}": w for i, w in enumerate(x)} | {f"Y{i}": w for i, w in enumerate(y)}

    def keys(*names: str) -> list[str]:
        return [f"{key[n].name}+{key[n].key_id:08x}" for n in names]

    assert policy.evaluate(keys("X0", "X2", "Y1")).met
    verdict = policy.evaluate(keys("X0", "Y0", "Y1", "Y2"))
    assert not verdict.met and verdict.cosigned == ("X0", "Y0", "Y1", "Y2")
    assert "group X-and-Y needs 2 of 2, has 1: not met" in verdict.explanation
    assert not policy.evaluate(keys("X0", "X1")).met
    assert parse(policy.format()).evaluate(keys("X1", "X2", "Y2")).met


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["witness A {w0}", "group G 2 A", "quorum G"], "threshold 2 is outside 1..1"),
        (["witness A {w0}", "group G 0 A", "quorum G"], "threshold '0'"),
        (["witness A {w0}", "quorum B"], "'B' is not a witness or group defined on an earlier line"),
        (["group G any A", "witness A {w0}", "quorum G"], "'A' is not a witness or group"),
        (["witness A {w0}", "witness B {w0}", "quorum A"], "duplicate key"),
        (["witness A {w0}", "witness A {w1}", "quorum A"], "'A' is already defined"),
        (["witness A {w0}", "group G any A A", "quorum G"], "listed more than once"),
        (["witness A {w0}", "group G any none", "quorum G"], "'none' cannot be a group member"),
        (["witness none {w0}", "quorum none"], "'none' is predefined"),
        (["witness A {w0}"], "no quorum line"),
        (["quorum none", "quorum none"], "exactly one quorum line"),
        (["witness A {log}", "quorum A"], "is not a witness (cosigner) key"),
        (["log {w0}", "quorum none"], "is not a log key"),
        (["witness A notakey", "quorum A"], "malformed vkey"),
        (["trust everyone", "quorum none"], "unknown keyword 'trust'"),
        (["quorum none\x0b"], "control character 0x0b"),
    ],
)
def test_malformed_policies_are_refused_naming_the_line(lines: list[str], message: str) -> None:
    w0, w1 = _witnesses(2)
    _, log_vkey = generate_key("example.com/log")
    text = "\n".join(lines).format(w0=w0.vkey, w1=w1.vkey, log=log_vkey) + "\n"
    with pytest.raises(FormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(text)


def test_verify_export_decides_by_the_policys_quorum(
    cosigned_export: tuple[Path, list[Signer]], keypair: tuple[str, str]
) -> None:
    export, witnesses = cosigned_export
    lines = [f"log {keypair[1]}", *(f"witness w{i} {w.vkey}" for i, w in enumerate(witnesses))]
    met = parse("\n".join([*lines, "group two 2 w0 w1 w2 w3", "quorum two"]))
    report = verify_export(export, [], policy=met)
    assert report.valid and report.quorum is not None and report.quorum.cosigned == ("w0", "w1")
    short = parse("\n".join([*lines, "group three 3 w0 w1 w2 w3", "quorum three"]))
    report = verify_export(export, [], policy=short)
    assert not report.valid and "witness quorum not met" in report.reason and "missing w2, w3" in report.reason
    assert verify_export(export, [], policy=parse(f"log {keypair[1]}\nquorum none\n")).valid
    # The log's key is still required: a policy naming another log refuses the export.
    _, other = generate_key("sitewarden/test-site")
    assert not verify_export(export, [], policy=parse(f"log {other}\nquorum none\n")).valid


def test_shorthand_quorum_counts_the_given_witnesses(cosigned_export: tuple[Path, list[Signer]]) -> None:
    _, witnesses = cosigned_export
    verifiers = [w.verifier() for w in witnesses]
    assert from_keys([], verifiers, 2).evaluate([f"{w.name}+{w.key_id:08x}" for w in witnesses[:2]]).met
    assert not from_keys([], verifiers).evaluate([f"{w.name}+{w.key_id:08x}" for w in witnesses[:3]]).met
    with pytest.raises(FormatError, match="--quorum 5"):
        from_keys([], verifiers, 5)


def test_audit_verify_command_takes_a_policy_file_or_a_quorum(
    cosigned_export: tuple[Path, list[Signer]], keypair: tuple[str, str], tmp_path: Path
) -> None:
    export, witnesses = cosigned_export
    witness_args = [arg for w in witnesses for arg in ("--witness", w.vkey)]
    ok = run_cli("audit", "verify", str(export), "--key", keypair[1], *witness_args, "--quorum", "2")
    assert ok.returncode == 0, ok.stderr
    assert b"witness quorum: group witnesses needs 2 of 4, has 2: met" in ok.stdout
    short = run_cli("audit", "verify", str(export), "--key", keypair[1], *witness_args, "--quorum", "3")
    assert short.returncode == 1 and b"witness quorum not met" in short.stdout
    every = run_cli("audit", "verify", str(export), "--key", keypair[1], *witness_args)
    assert every.returncode == 1

    policy = tmp_path / "sites.policy"
    policy.write_text(
        f"log {keypair[1]}\n"
        + "".join(f"witness site-{i} {w.vkey}\n" for i, w in enumerate(witnesses))
        + "group sites 2 site-0 site-1 site-2 site-3\nquorum sites\n"
    )
    by_file = run_cli("audit", "verify", str(export), "--policy", str(policy))
    assert by_file.returncode == 0, by_file.stderr
    assert b"(by site-0, site-1)" in by_file.stdout
    policy.write_text(policy.read_text().replace("group sites 2", "group sites 3"))
    assert run_cli("audit", "verify", str(export), "--policy", str(policy)).returncode == 1
    policy.write_text("quorum sites\n")
    bad = run_cli("audit", "verify", str(export), "--policy", str(policy))
    assert bad.returncode == 2 and b"line 1" in bad.stderr
    neither = run_cli("audit", "verify", str(export))
    assert neither.returncode == 2 and b"--policy" in neither.stderr


def test_one_key_may_sign_a_log_and_cosign_another_but_not_play_one_role_twice() -> None:
    """A Sitewarden site signs its own log and cosigns the controller's with one Ed25519 key, under two key
    names and signature types: an auditor's policy names it as a log and as a witness."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415

    key = Ed25519PrivateKey.generate()
    site_log = Signer.from_ed25519("sitewarden/site-1", key)
    site_witness = Signer.from_ed25519("sitewarden/site-1/witness", key, ALG_COSIGNATURE_V1)
    policy = parse(f"log {site_log.vkey}\nwitness site-1 {site_witness.vkey}\nquorum site-1\n")
    assert [v.vkey for v in policy.logs] == [site_log.vkey]
    with pytest.raises(FormatError, match="duplicate key"):
        parse(f"log {site_log.vkey}\nlog {site_log.vkey}\nquorum none\n")
