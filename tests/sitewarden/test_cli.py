"""`sitewarden audit ...` as a real process: happy paths, exit codes, and bad input."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from audit import Log, verify_export
from audit.entry import canonicalize
from tests.conftest import run_cli


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, str]:
    done = run_cli("audit", "keygen", "--name", "sitewarden/cli-site", "--out", str(tmp_path / "keys"))
    assert done.returncode == 0, done.stderr
    vkey = done.stdout.decode().strip()
    return tmp_path / "keys" / "log.key", vkey


def test_keygen_writes_a_private_key_0600_and_prints_the_vkey(keys: tuple[Path, str]) -> None:
    key_path, vkey = keys
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert vkey.startswith("sitewarden/cli-site+")
    again = run_cli("audit", "keygen", "--name", "x", "--out", str(key_path.parent))
    assert again.returncode == 2
    assert b"refusing to overwrite" in again.stderr


def test_append_checkpoint_export_verify_proof_end_to_end(tmp_path: Path, keys: tuple[Path, str]) -> None:
    key_path, vkey = keys
    log_dir = tmp_path / "log"
    lines = [{"i": i, "purpose": "fraud", "b": 1, "a": [1.5, "x"]} for i in range(50)]
    stdin = "".join(json.dumps(obj) + "\n" for obj in lines).encode()
    done = run_cli("audit", "append", "--log", str(log_dir), "--key", str(key_path), stdin=stdin)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == [str(i) for i in range(50)]

    done = run_cli("audit", "checkpoint", "--log", str(log_dir), "--key", str(key_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().startswith("sitewarden/cli-site\n50\n")

    export = tmp_path / "export.tar.gz"
    done = run_cli("audit", "export", "--log", str(log_dir), "--out", str(export))
    assert done.returncode == 0, done.stderr
    done = run_cli("audit", "verify", str(export), "--key", vkey)
    assert done.returncode == 0, done.stdout
    assert b"valid: 50 entries of sitewarden/cli-site" in done.stdout

    proof_file, entry_file = tmp_path / "e7.tlog-proof", tmp_path / "e7.json"
    done = run_cli(
        "audit",
        "proof",
        "--log",
        str(log_dir),
        "--index",
        "7",
        "--out",
        str(proof_file),
        "--entry-out",
        str(entry_file),
    )
    assert done.returncode == 0, done.stderr
    # Entries are stored as RFC 8785 canonical JSON.
    assert entry_file.read_bytes() == canonicalize(lines[7])
    assert entry_file.read_bytes().startswith(b'{"a":[1.5,"x"],"b":1,"i":7')
    done = run_cli("audit", "verify-proof", str(proof_file), "--key", vkey, "--entry", str(entry_file))
    assert done.returncode == 0, done.stdout
    entry_file.write_bytes(canonicalize(lines[8]))
    done = run_cli("audit", "verify-proof", str(proof_file), "--key", vkey, "--entry", str(entry_file))
    assert done.returncode == 1
    assert b"INVALID" in done.stdout


def test_append_of_100000_piped_lines_takes_seconds_not_minutes(tmp_path: Path, keys: tuple[Path, str]) -> None:
    key_path, _ = keys
    stdin = b"".join(b'{"seq":%d,"decision":"allow","purpose":"aml"}\n' % i for i in range(100_000))
    started = time.monotonic()
    done = run_cli("audit", "append", "--log", str(tmp_path / "log"), "--key", str(key_path), stdin=stdin)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    indices = done.stdout.split()
    assert len(indices) == 100_000 and indices[-1] == b"99999"
    assert elapsed < 60, f"100,000 lines took {elapsed:.1f} s"
    with Log.open(tmp_path / "log", readonly=True) as log:
        assert log.size == 100_000


def test_malformed_json_is_refused_naming_the_line_and_nothing_of_it_is_written(
    tmp_path: Path, keys: tuple[Path, str]
) -> None:
    key_path, _ = keys
    log_dir = tmp_path / "log"
    done = run_cli("audit", "append", "--log", str(log_dir), "--key", str(key_path), stdin=b'{"a": 1,\n')
    assert done.returncode == 2
    assert b"line 1: invalid JSON" in done.stderr
    assert b"nothing was appended" in done.stderr
    assert not log_dir.exists()

    for bad, why in [
        (b"[1, 2]", b"want a JSON object"),
        (b'{"a":1,"a":2}', b"duplicate member name"),
        (b'{"x": NaN}', b"NaN is not valid JSON"),
        (b'{"big": 9007199254740993}', b"canonicalise"),
        (b'{"pad":"' + b"x" * 70000 + b'"}', b"over the limit of 65535"),
    ]:
        stdin = b'{"ok": 1}\n' + bad + b'\n{"never": true}\n'
        done = run_cli("audit", "append", "--log", str(log_dir), "--key", str(key_path), stdin=stdin)
        assert done.returncode == 2, bad
        assert b"line 2:" in done.stderr and why in done.stderr, done.stderr
    with Log.open(log_dir, readonly=True) as log:
        assert [log.entry(i) for i in range(log.size)] == [b'{"ok":1}'] * 5


def test_verify_exit_codes_valid_invalid_unusable(tmp_path: Path, keys: tuple[Path, str]) -> None:
    key_path, vkey = keys
    with Log.open(tmp_path / "log", str(key_path)) as log:
        log.append_many([b'{"n":%d}' % i for i in range(10)])
        log.checkpoint()
        export = log.export(tmp_path / "export")
    assert run_cli("audit", "verify", str(export), "--key", vkey).returncode == 0
    vkey_file = tmp_path / "trusted.vkeys"
    vkey_file.write_text(vkey + "\n")
    assert run_cli("audit", "verify", str(export), "--key", str(vkey_file)).returncode == 0

    bundle = export / "tile/entries/000.p/10"
    bundle.write_bytes(bundle.read_bytes().replace(b'{"n":4}', b'{"n":5}'))
    done = run_cli("audit", "verify", str(export), "--key", vkey)
    assert done.returncode == 1
    assert b"INVALID at entry 4" in done.stdout

    done = run_cli("audit", "verify", str(tmp_path / "missing"), "--key", vkey)
    assert (done.returncode, b"does not exist" in done.stderr) == (2, True)
    done = run_cli("audit", "verify", str(export), "--key", "name+12345678+bm90IGEga2V5")
    assert done.returncode == 2
    assert b"malformed vkey" in done.stderr
    done = run_cli("audit", "verify", str(export), "--key", str(tmp_path / "no-such-file"))
    assert done.returncode == 2
    assert b"neither a vkey nor a readable file" in done.stderr
    unreadable = tmp_path / "unreadable.tar"
    unreadable.write_bytes(b"\x00garbage")
    done = run_cli("audit", "verify", str(unreadable), "--key", vkey)
    assert done.returncode == 2
    assert b"neither a directory nor a readable tar archive" in done.stderr


def test_export_refuses_existing_destination_and_a_log_without_checkpoint(
    tmp_path: Path, keys: tuple[Path, str]
) -> None:
    key_path, vkey = keys
    with Log.open(tmp_path / "log", str(key_path)) as log:
        log.append(b"{}")
    done = run_cli("audit", "export", "--log", str(tmp_path / "log"), "--out", str(tmp_path / "e"))
    assert done.returncode == 1
    assert b"no signed checkpoint" in done.stderr
    assert not (tmp_path / "e").exists()
    with Log.open(tmp_path / "log", str(key_path)) as log:
        log.checkpoint()
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "precious").write_text("keep")
    done = run_cli("audit", "export", "--log", str(tmp_path / "log"), "--out", str(tmp_path / "e"))
    assert done.returncode == 2
    assert b"refusing to overwrite" in done.stderr
    assert (tmp_path / "e" / "precious").read_text() == "keep"
    done = run_cli("audit", "export", "--log", str(tmp_path / "log"), "--out", str(tmp_path / "ok"))
    assert done.returncode == 0
    assert verify_export(tmp_path / "ok", [vkey]).valid


def test_checkpoint_with_a_missing_key_file_fails_clearly(tmp_path: Path) -> None:
    done = run_cli("audit", "checkpoint", "--log", str(tmp_path / "log"), "--key", str(tmp_path / "nope.key"))
    assert done.returncode == 2
    assert b"cannot read private key" in done.stderr


def test_demo_runs_and_passes(tmp_path: Path) -> None:
    """`make demo`'s job: controller and two agents, rollout, 1,000 requests, refusal, verified export. The
    language-model part (minutes on SmolLM2) is left out here: tests/agent/lm covers it with tiny models."""
    try:  # about 2.5 minutes alone; on CI's two cores it shares them with the other test worker
        done = run_cli("demo", "--workdir", str(tmp_path / "demo"), "--no-language-models", timeout=600)
    except subprocess.TimeoutExpired as exc:
        shown = (exc.output or b"").decode(errors="replace")[-6000:]
        raise AssertionError(f"the demo did not end within 600 s; the end of its output:\n{shown}") from None
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert "demo passed" in out
    assert out.count("refused 1.1.0") == 2
    assert "INVALID" in out and "cosigned by" in out
    assert "did not stop" not in out  # every process the demo started ended on SIGTERM
