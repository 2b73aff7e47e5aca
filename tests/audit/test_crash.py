"""Crash test: a 16-thread writer is killed with SIGKILL at random moments, round after round.

After every kill, every index the writer acknowledged must be in the log with identical
bytes, and the next checkpoint must be consistent with the last one signed before the
crash.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from audit import Log, merkle
from audit.checkpoint import parse
from audit.note import note_text, write_key_pair
from tests.crash_writer import entry

ROUNDS = 12


def _read_acks(proc: subprocess.Popen[bytes], deadline: float, kill_at: float) -> list[tuple[int, int, int]]:
    """Read acknowledgements until the kill moment, then SIGKILL and read the rest of the pipe."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == b"ready\n", f"writer did not start: {line!r}"
    start = time.monotonic()
    while time.monotonic() - start < kill_at:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    out = proc.stdout.read()
    proc.wait(timeout=30)
    acks = []
    for raw in out.split(b"\n")[:-1]:  # a line cut by the kill has no newline: not acknowledged
        index, thread, n = map(int, raw.split())
        acks.append((index, thread, n))
    return acks


def test_acknowledged_entries_survive_sigkill_and_checkpoints_stay_consistent(tmp_path: Path) -> None:
    rng = random.Random(20261129)
    key_path, _ = write_key_pair("sitewarden/crash-site", tmp_path / "keys")
    log_dir = tmp_path / "log"
    expected: dict[int, bytes] = {}
    previous: tuple[int, bytes] | None = None
    total_acks = 0
    for round_ in range(ROUNDS):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.crash_writer", str(log_dir), str(key_path), str(round_)],
            stdout=subprocess.PIPE,
        )
        try:
            acks = _read_acks(proc, time.monotonic() + 60, kill_at=rng.uniform(0.05, 0.6))
        finally:
            if proc.poll() is None:
                proc.kill()
        total_acks += len(acks)
        for index, thread, n in acks:
            assert index not in expected, f"index {index} acknowledged twice"
            expected[index] = entry(round_, thread, n)

        with Log.open(log_dir, key_path) as log:
            assert log.size >= max(expected) + 1
            for index, want in expected.items():
                assert log.entry(index) == want, f"round {round_}: entry {index} differs"
            stored = parse(note_text((log_dir / "checkpoint").read_text()))
            signed = parse(note_text(log.checkpoint()))
            # The checkpoint after the crash extends the last one signed before it ...
            merkle.verify_consistency(
                stored.size, signed.size, log.consistency_proof(stored.size, signed.size), stored.root, signed.root
            )
            # ... and the one this test signed after the previous round.
            if previous is not None:
                size0, root0 = previous
                merkle.verify_consistency(
                    size0, signed.size, log.consistency_proof(size0, signed.size), root0, signed.root
                )
            previous = (signed.size, signed.root)
    assert total_acks > ROUNDS * 50, f"only {total_acks} acknowledgements in {ROUNDS} rounds: the writer barely ran"
