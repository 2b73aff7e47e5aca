"""`checkov --framework kubernetes` over every ci/*-values.yaml render of both charts.

checkov pins dozens of packages (boto3, an old packaging, networkx 2, ...) that do not fit flwr's
pins, so it lives in its own tool venv, `.venv-tools/`, made here on first use and kept between
runs. It runs with `--skip-download`: nothing leaves the machine. Every finding must be one of
the reasoned skips in checkov-skips.txt (by check and scope), and every skip must still match a
finding, so the list stays short and true.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helm.charts import CHARTS, ci_values, load_values, render

CHECKOV = "checkov==3.3.30"
TOOLS = Path(__file__).resolve().parents[2] / ".venv-tools"
SKIPS = Path(__file__).with_name("checkov-skips.txt")


@pytest.fixture(scope="session")
def checkov() -> Path:
    program = TOOLS / "bin" / "checkov"
    stamp = TOOLS / f".installed-{CHECKOV}"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(TOOLS)], check=True, timeout=120)
        subprocess.run(
            [str(TOOLS / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", CHECKOV],
            check=True,
            timeout=900,
        )
        stamp.touch()
    return program


def skips() -> list[tuple[str, str]]:
    rows = []
    for line in SKIPS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            check, scope, reason = line.split(maxsplit=2)
            assert scope in ("all", "helm-test-pods", "openshift") and len(reason) > 20, line
            rows.append((check, scope))
    return rows


def scope_of(finding: dict, files: dict[str, bool]) -> set[str]:
    scopes = {"all"}
    if finding["resource"].startswith("Pod.") and "-test-" in finding["resource"]:
        scopes.add("helm-test-pods")
    if files[Path(finding["file_path"]).name]:
        scopes.add("openshift")
    return scopes


def test_checkov_finds_nothing_beyond_the_reasoned_skips(checkov: Path, tmp_path: Path) -> None:
    files: dict[str, bool] = {}
    for chart in CHARTS:
        for case, path in ci_values(chart).items():
            rendered = render(chart, load_values(path))
            docs = [
                d for name, text in rendered.items() if not name.endswith("NOTES.txt") for d in yaml.safe_load_all(text)
            ]
            name = f"{chart}-{case}.yaml"
            (tmp_path / name).write_text(yaml.safe_dump_all([d for d in docs if d]))
            files[name] = case == "openshift"
    done = subprocess.run(
        [
            str(checkov),
            "--framework",
            "kubernetes",
            "-d",
            str(tmp_path),
            "--skip-download",
            "--compact",
            "--quiet",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr[-3000:]
    reports = json.loads(done.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert sum(r["summary"]["resource_count"] for r in reports) > 100 and not any(
        r["summary"]["parsing_errors"] for r in reports
    )
    allowed = skips()
    used: set[tuple[str, str]] = set()
    unexplained = []
    for report in reports:
        for finding in report["results"]["failed_checks"]:
            matches = {(finding["check_id"], s) for s in scope_of(finding, files)} & set(allowed)
            if matches:
                used |= matches
            else:
                unexplained.append(
                    f"{finding['check_id']} {finding['check_name']}: {finding['resource']} in {finding['file_path']}"
                )
    assert not unexplained, "\n".join(unexplained)
    assert set(allowed) == used, f"skips that match no finding any more: {set(allowed) - used}"
