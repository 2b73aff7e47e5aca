"""`sitewarden audit ...`: keys, appends, checkpoints, exports, proofs and offline verification.

Exit codes: 0 success (a valid export or proof); 1 the thing checked is invalid, or the
log refused the operation; 2 unusable input (missing file, malformed key or JSON line).
Results go to standard output, explanations to standard error.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from audit import entry as audit_entry
from audit import policy as audit_policy
from audit import proof as tlog_proof
from audit.errors import (
    AuditError,
    CheckpointRefusedError,
    EntryTooLargeError,
    FormatError,
    LogError,
    ProofError,
    SignatureError,
)
from audit.export import verify_export
from audit.log import Log
from audit.note import Signer, Verifier, write_key_pair

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Tamper-evident audit logs: append, sign checkpoints, export, prove and verify offline.",
)

EXIT_INVALID = 1
EXIT_USAGE = 2
_READ_SIZE = 1 << 20


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _exit_code(exc: AuditError) -> int:
    if isinstance(exc, (LogError, CheckpointRefusedError, ProofError, SignatureError)):
        return EXIT_INVALID
    return EXIT_USAGE


def _load_vkeys(values: list[str], option: str = "--key") -> list[Verifier]:
    """Each --key (or --witness) is a vkey, or a file holding vkeys one per line."""
    verifiers = []
    for value in values:
        candidates = [value]
        if "+" not in value or os.path.exists(value):
            try:
                candidates = [line.strip() for line in Path(value).read_text().splitlines() if line.strip()]
            except OSError as exc:
                _fail(f"{option} {value!r} is neither a vkey nor a readable file: {exc.strerror}", EXIT_USAGE)
            if not candidates:
                _fail(f"{option} file {value} holds no vkey", EXIT_USAGE)
        for vkey in candidates:
            try:
                verifiers.append(Verifier(vkey))
            except FormatError as exc:
                _fail(str(exc), EXIT_USAGE)
    return verifiers


LogDir = Annotated[Path, typer.Option("--log", help="Directory of the audit log.")]
KeyFile = Annotated[Path, typer.Option("--key", help="Private key file written by `keygen`.")]


@app.command()
def keygen(
    name: Annotated[str, typer.Option("--name", help="Key name, which is the log's origin, e.g. sitewarden/site-1.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for log.key (mode 0600) and log.vkey.")],
) -> None:
    """Create an Ed25519 signing key for a log; print its vkey."""
    try:
        key_path, vkey = write_key_pair(name, out)
    except FormatError as exc:
        _fail(str(exc), EXIT_USAGE)
    typer.echo(f"private key written to {key_path} (mode 0600); give auditors the vkey below", err=True)
    typer.echo(vkey)


def _open_log(path: Path, key: Path | None, *, readonly: bool = False, create: bool = False) -> Log:
    try:
        return Log.open(path, key, readonly=readonly, create=create)
    except AuditError as exc:
        _fail(str(exc), _exit_code(exc))


def _read_lines(fd: int):  # type: ignore[no-untyped-def]
    """Yield lists of complete lines as they arrive: lines that arrive together come together."""
    pending = b""
    while True:
        chunk = os.read(fd, _READ_SIZE)
        if not chunk:
            if pending:
                yield [pending]
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if lines:
            yield lines


@app.command()
def append(log: LogDir, key: KeyFile) -> None:
    """Append JSON objects from standard input, one per line, as canonical JSON (RFC 8785).

    Prints each entry's index once it is durable; lines that arrive together share one
    fsync. Input is taken in order up to the first bad line: everything before it is
    appended, nothing from it on. Creates the log when missing.
    """
    opened: Log | None = None
    line_no = 0
    try:
        for lines in _read_lines(sys.stdin.fileno()):
            batch = []
            bad: str | None = None
            for raw in lines:
                line_no += 1
                if not raw.strip():
                    continue
                try:
                    batch.append(audit_entry.encode(raw))
                except (FormatError, EntryTooLargeError) as exc:
                    bad = f"line {line_no}: {exc}"
                    break
            if batch:
                if opened is None:
                    opened = _open_log(log, key, create=True)
                indices = opened.append_many(batch)
                sys.stdout.write("".join(f"{i}\n" for i in indices))
                sys.stdout.flush()
            if bad is not None:
                done = "the lines before it were appended" if opened else "nothing was appended"
                _fail(f"{bad}; {done}, nothing from line {line_no} on", EXIT_USAGE)
    except AuditError as exc:
        _fail(str(exc), _exit_code(exc))
    finally:
        if opened is not None:
            opened.close()


@app.command()
def checkpoint(log: LogDir, key: KeyFile) -> None:
    """Sign a checkpoint of every durable entry, store it, and print it."""
    opened = _open_log(log, key)
    try:
        signed = opened.checkpoint()
    except AuditError as exc:
        _fail(str(exc), _exit_code(exc))
    finally:
        opened.close()
    typer.echo(signed, nl=False)


@app.command()
def export(
    log: LogDir,
    out: Annotated[Path, typer.Option("--out", help="New directory, or a file ending in .tar, .tar.gz or .tgz.")],
) -> None:
    """Export the last signed checkpoint and its entries in the C2SP tlog-tiles layout.

    Works next to a running writer: only what the checkpoint covers is exported.
    """
    opened = _open_log(log, None, readonly=True)
    try:
        last = opened.last_checkpoint()
        dest = opened.export(out)
    except AuditError as exc:
        _fail(str(exc), _exit_code(exc))
    finally:
        opened.close()
    assert last is not None
    typer.echo(f"exported {last.size} entries of {last.origin} to {dest}", err=True)
    typer.echo(str(dest))


def load_policy(
    policy_file: Path | None, keys: list[str], witnesses: list[str], quorum: int | None
) -> audit_policy.Policy:
    """The witness policy of the command line: a tlog-policy file (plus any --key/--witness given
    beside it), or the shorthand --key … --witness … [--quorum K] (all witnesses by default)."""
    log_keys = _load_vkeys(keys)
    cosigners = _load_vkeys(witnesses, option="--witness")
    if policy_file is not None:
        if quorum is not None:
            _fail("--quorum is part of the policy file; give one or the other", EXIT_USAGE)
        try:
            text = policy_file.read_bytes()
        except OSError as exc:
            _fail(f"--policy {policy_file}: {exc.strerror}", EXIT_USAGE)
        try:
            parsed = audit_policy.parse(text)
        except FormatError as exc:
            _fail(f"--policy {policy_file}: {exc}", EXIT_USAGE)
        if cosigners:
            _fail("witnesses given with --witness must be in the policy file instead", EXIT_USAGE)
        if not parsed.logs and not log_keys:
            _fail(f"--policy {policy_file} names no log; add a 'log <vkey>' line or --key", EXIT_USAGE)
        return dataclasses.replace(parsed, logs=(*parsed.logs, *log_keys), log_urls=())
    if not log_keys:
        _fail("give the trusted log key with --key, or a tlog-policy file with --policy", EXIT_USAGE)
    try:
        return audit_policy.from_keys(log_keys, cosigners, quorum)
    except FormatError as exc:
        _fail(str(exc), EXIT_USAGE)


PolicyOption = Annotated[
    Path | None,
    typer.Option(
        "--policy",
        help="Witness policy in C2SP tlog-policy form: trusted log keys, witnesses, groups and the quorum.",
    ),
]
KeyOption = Annotated[list[str] | None, typer.Option("--key", help="Trusted log vkey, or a file of vkeys; repeatable.")]
WitnessOption = Annotated[
    list[str] | None,
    typer.Option(
        "--witness",
        help="Trusted witness (cosigner, type 0x04) vkey, or a file of them; repeatable. Without --quorum, "
        "each one given must have cosigned the checkpoint.",
    ),
]
QuorumOption = Annotated[
    int | None, typer.Option("--quorum", min=0, help="How many of the --witness keys must have cosigned.")
]


@app.command()
def verify(
    export_path: Annotated[Path, typer.Argument(metavar="EXPORT", help="Export directory or tar archive.")],
    key: KeyOption = None,
    witness: WitnessOption = None,
    quorum: QuorumOption = None,
    policy: PolicyOption = None,
) -> None:
    """Verify an export offline: log signature, witness cosignatures and quorum, entries, hash tiles.

    The checkpoint must be signed by a trusted log key (a cosignature alone is not enough) and cosigned as the
    witness policy says: --policy FILE (C2SP tlog-policy), or --witness keys of which --quorum K (default: all)
    must have cosigned.

    Exit 0 valid, 1 invalid, 2 unusable input.
    """
    trusted = load_policy(policy, key or [], witness or [], quorum)
    try:
        report = verify_export(export_path, [], policy=trusted)
    except AuditError as exc:
        _fail(str(exc), EXIT_USAGE)
    if report.quorum is not None and trusted.witnesses and report.quorum.met:
        typer.echo(f"witness quorum: {report.quorum.explanation}")
    if not report.valid:
        where = f"entry {report.entry}" if report.entry is not None else report.tile
        typer.echo(f"INVALID at {where}: {report.reason}")
        raise typer.Exit(EXIT_INVALID)
    assert report.root is not None
    typer.echo(f"valid: {report.size} entries of {report.origin}, root {report.root.hex()}")
    typer.echo(f"signed by: {', '.join(report.signers)}")
    if report.witnesses:
        typer.echo(f"cosigned by: {', '.join(str(c) for c in report.witnesses)}")
    if report.unverified_signers:
        typer.echo(f"other signatures (keys not given): {', '.join(report.unverified_signers)}")


@app.command()
def report(
    exports: Annotated[
        list[Path],
        typer.Argument(metavar="EXPORT...", help="Exports (directories or tarballs) of site and controller logs."),
    ],
    out: Annotated[Path, typer.Option("--out", help="New directory for the report.")],
    policy: PolicyOption = None,
    key: KeyOption = None,
    witness: WitnessOption = None,
    quorum: QuorumOption = None,
    period_from: Annotated[
        str | None, typer.Option("--from", help="Start of the period (UTC date YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS).")
    ] = None,
    period_to: Annotated[
        str | None, typer.Option("--to", help="End of the period, exclusive (same forms as --from).")
    ] = None,
    sample: Annotated[int, typer.Option("--sample", min=0, help="How many entries to draw with proofs.")] = 20,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the draw (record it to reproduce the report).")] = 0,
    retention_months: Annotated[
        int, typer.Option("--retention-months", min=1, help="Retention period to check each log against.")
    ] = 6,
    gap_hours: Annotated[
        float, typer.Option("--gap-hours", min=0.02, help="Report stretches longer than this without an entry.")
    ] = 24.0,
    entry: Annotated[
        list[str] | None, typer.Option("--entry", help="LOG:INDEX of an entry to prove as well; repeatable.")
    ] = None,
    sign_key: Annotated[
        Path | None, typer.Option("--sign-key", help="Sign manifest.json as a C2SP signed note with this key.")
    ] = None,
    pdf: Annotated[bool, typer.Option("--pdf/--no-pdf", help="Also write report.pdf (PDF/A-3b).")] = True,
) -> None:
    """Write the auditor's evidence report from exported logs, offline.

    Verifies every export first (as `audit verify` does, witness quorum included), then writes
    report.html, report.pdf, data/*.csv and *.json, proofs/ and manifest.json to --out, whatever
    the verdict. Exit 0 all verified, 1 a verification failure (the report's first finding),
    2 unusable input.
    """
    from audit.report import EntryRef, ReportOptions, make_report  # noqa: PLC0415
    from sitewarden import __version__  # noqa: PLC0415

    trusted = load_policy(policy, key or [], witness or [], quorum)
    policy_text = policy.read_bytes() if policy is not None else trusted.format().encode()
    try:
        refs = [EntryRef.parse(e) for e in entry or []]
        signer = Signer.from_file(sign_key) if sign_key is not None else None
        options = ReportOptions(
            exports=exports,
            policy=trusted,
            policy_text=policy_text,
            out=out,
            period_from=_period_bound(period_from, "--from"),
            period_to=_period_bound(period_to, "--to"),
            sample=sample,
            seed=seed,
            retention_months=retention_months,
            gap_hours=gap_hours,
            entries=refs,
            sign_key=signer,
            pdf=pdf,
            command=_reproduce(sys.argv),
            tool_version=__version__,
        )
        outcome = make_report(options)
    except (AuditError, OSError) as exc:
        _fail(str(exc), EXIT_USAGE)
    failures = [f for f in outcome.findings if f.severity == "failure"]
    if failures:
        first = failures[0]
        typer.echo(f"INVALID: {first.log} at {first.where}: {first.message}")
        typer.echo(f"report written to {outcome.out} ({outcome.files} files); {len(failures)} verification failure(s)")
        raise typer.Exit(EXIT_INVALID)
    typer.echo(f"all logs verified; report written to {outcome.out} ({outcome.files} files)")


def _period_bound(text: str | None, option: str) -> str | None:
    """A --from/--to value as 'YYYY-MM-DDTHH:MM:SS' (UTC); a date means its midnight."""
    if text is None:
        return None
    import datetime as dt  # noqa: PLC0415

    for form in ("%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return dt.datetime.strptime(text, form).strftime("%Y-%m-%dT%H:%M:%S")
        except ValueError:
            continue
    _fail(f"{option} {text!r}: want a UTC date YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS", EXIT_USAGE)


def _reproduce(argv: list[str]) -> str:
    """The command line that makes this report again (as given, the program named `sitewarden`)."""
    import shlex  # noqa: PLC0415

    args = list(argv[1:])
    for i, arg in enumerate(args):  # the report directory is the rerun's own choice, not an input
        if arg == "--out" and i + 1 < len(args):
            args[i + 1] = "NEW_REPORT_DIR"
        elif arg.startswith("--out="):
            args[i] = "--out=NEW_REPORT_DIR"
    return shlex.join(["sitewarden", *args])


@app.command()
def proof(
    log: LogDir,
    index: Annotated[int, typer.Option("--index", min=0, help="Entry index.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the .tlog-proof file.")],
    entry_out: Annotated[
        Path | None, typer.Option("--entry-out", help="Also write the entry's exact bytes here.")
    ] = None,
) -> None:
    """Write a C2SP tlog-proof that an entry is in the last signed checkpoint."""
    opened = _open_log(log, None, readonly=True)
    try:
        made = opened.tlog_proof(index)
        entry_bytes = opened.entry(index)
    except AuditError as exc:
        _fail(str(exc), _exit_code(exc))
    finally:
        opened.close()
    out.write_text(made.format())
    if entry_out is not None:
        entry_out.write_bytes(entry_bytes)
    typer.echo(str(out))


@app.command("verify-proof")
def verify_proof(
    proof_file: Annotated[Path, typer.Argument(metavar="FILE", help="A .tlog-proof file.")],
    key: Annotated[list[str], typer.Option("--key", help="Trusted vkey, or a file of vkeys; repeatable.")],
    entry: Annotated[Path, typer.Option("--entry", help="File holding the entry's exact bytes.")],
) -> None:
    """Verify a tlog-proof for an entry offline. Exit 0 valid, 1 invalid, 2 unusable input."""
    verifiers = _load_vkeys(key)
    try:
        text = proof_file.read_text(encoding="utf-8")
        entry_bytes = entry.read_bytes()
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read input: {exc}", EXIT_USAGE)
    try:
        parsed = tlog_proof.parse(text)
    except FormatError as exc:
        _fail(str(exc), EXIT_USAGE)
    try:
        cp, note = tlog_proof.verify(parsed, entry_bytes, verifiers)
    except AuditError as exc:
        typer.echo(f"INVALID: {exc}")
        raise typer.Exit(EXIT_INVALID) from None
    signers = ", ".join(f"{s.name}+{s.key_id:08x}" for s in note.signatures)
    typer.echo(f"valid: entry {parsed.index} is in {cp.origin} at size {cp.size}, signed by {signers}")
