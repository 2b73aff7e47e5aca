"""Compile a bundle and run its Rego tests in a child process: `python -m policies.check PATH`.

rego-cpp can crash the process on some valid Rego (a bus error while compiling, seen with
regopy 1.5.2). So a bundle is first compiled and tested here, in a throwaway process;
only a bundle that survived this is compiled in the agent's own process. The child
prints one JSON object on its last line: `{"ok": true, "points": [...], "digest": ..., "tests": [...]}`
or `{"ok": false, "error": "..."}`.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from policies.bundle import Bundle
from policies.engine import CompiledPolicy, TestResult
from policies.errors import BundleError

TIMEOUT_S = 120.0


@dataclass(frozen=True)
class CheckResult:
    digest: str
    points: tuple[str, ...]
    tests: tuple[TestResult, ...]

    @property
    def failed(self) -> list[TestResult]:
        return [t for t in self.tests if not t.passed]


def check(path: Path, *, label: str = "the bundle", run_tests: bool = True) -> CheckResult:
    """Compile (and test) the bundle at `path` in a child process; BundleError says what went wrong."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "policies.check", str(path), *([] if run_tests else ["--no-tests"])],
            capture_output=True,
            timeout=TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BundleError(f"{label}: compiling and testing took longer than {TIMEOUT_S:.0f} s") from None
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        raise BundleError(f"{label}: the Rego engine (rego-cpp) crashed on this bundle ({name})")
    lines = done.stdout.strip().splitlines()  # rego-cpp prints its own diagnostics first; the report is last
    try:
        report = json.loads(lines[-1])
    except (ValueError, IndexError):
        detail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise BundleError(f"{label}: the check failed: {detail[0]}") from None
    if not report["ok"]:
        raise BundleError(f"{label}: {report['error']}")
    return CheckResult(report["digest"], tuple(report["points"]), tuple(TestResult(**t) for t in report["tests"]))


def main(argv: list[str]) -> int:
    path = Path(argv[0])
    try:
        compiled = CompiledPolicy(Bundle.load(path), label=str(path))
        tests = compiled.run_tests() if "--no-tests" not in argv else []
    except BundleError as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        return 0
    report = {
        "ok": True,
        "digest": compiled.digest,
        "points": list(compiled.points),
        "tests": [dataclasses.asdict(t) for t in tests],
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
