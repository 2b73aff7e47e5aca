"""The README's walk-through runs as written: its shell blocks, in order, in an empty directory, against the
installed `sitewarden`, from `dev pki` to a verified audit export. So the README cannot drift from the code.

The only change made to the text is the two loopback ports (8443, 9443), replaced by free ones so that the
test does not depend on them being free. Every process the script starts runs in a session of its own,
ended (by its process group id) whatever happens.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.controller_server import free_port
from tests.system import require

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Walk-through: from an empty directory to a verified audit export"


def walkthrough_blocks(text: str) -> list[str]:
    """The ```sh blocks of the walk-through section, in order."""
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else len(text)]
    return re.findall(r"^```sh\n(.*?)^```$", section, flags=re.S | re.M)


def test_the_walkthrough_is_one_ordered_sequence_of_shell_blocks() -> None:
    blocks = walkthrough_blocks(README.read_text())
    assert blocks[0].startswith("mkdir sitewarden-trial && cd sitewarden-trial")
    script = "\n".join(blocks)
    order = ["dev pki", "controller init", "controller serve", "approver add", "example fraud-model"]
    order += ["policy push --pack bank", "release approve", "agent enroll", "agent run", "rollout create"]
    order += ["/infer", "agent audit export", "audit verify", "kill"]
    positions = [script.index(step) for step in order]
    assert positions == sorted(positions), order


def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    require("bash", "curl")
    script = "\n".join(walkthrough_blocks(README.read_text()))
    controller_port, agent_port = free_port(), free_port()
    script = re.sub(r"\b8443\b", str(controller_port), script)
    script = re.sub(r"\b9443\b", str(agent_port), script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SITEWARDEN_", "OTEL_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    process = subprocess.Popen(
        ["bash", "-c", f"set -euo pipefail\n{script}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=540)
    finally:
        stop_group(process.pid)
    trial = tmp_path / "sitewarden-trial"
    logs = "".join(
        f"\n--- {name} (last lines)\n{(trial / name).read_text(errors='replace')[-3000:]}"
        for name in ("controller.log", "agent.log")
        if (trial / name).exists()
    )
    assert process.returncode == 0, f"the walk-through failed:\n{output[-6000:]}{logs}"
    assert '"audit_index"' in output and '"model_version":"1.0.0"' in output
    assert "HTTP 403" in output and "denied by policy: " in output
    assert "may not state data class 'restricted'" in output  # outside the binding, before any policy
    assert "rollout first: complete" in output
    assert "active: fraud-scorer 1.0.0 (approved by alice)" in output
    assert re.search(r"^valid: \d+ entries of sitewarden/", output, re.M), output[-2000:]


def stop_group(pgid: int) -> None:
    """End what is left of the script's session (the controller and the agent if it stopped early)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
