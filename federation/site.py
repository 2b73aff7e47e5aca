"""A site's SuperNode for one job: `flower-supernode` in process isolation and the site's runner.

`start_site_node` starts the two processes the agent runs for a job it joined:

1. `flower-supernode --isolation process`: TLS to the Fleet API (verified with the given CA),
   authenticated with the site's SuperNode key, its Runtime API on a free loopback port, and in its
   node config the site's data set, the report spool and the terms the site accepted
   (`federation.terms`);
2. `python -m federation.runner serve`: takes the SuperNode's ClientApp tasks and runs each only on
   the approved FAB (`federation.runner`).

Both log to files under `logs`; `SiteNode.stop` stops both process trees.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from federation.superlink import LOOPBACK, ConfigValue, ManagedProcess, free_port, supernode_argv
from federation.terms import Terms

__all__ = ["SiteNode", "start_site_node"]


@dataclass
class SiteNode:
    supernode: ManagedProcess
    runner: ManagedProcess

    def running(self) -> bool:
        return self.supernode.running() and self.runner.running()

    def exit_reason(self) -> str:
        for process in (self.supernode, self.runner):
            if not process.running():
                return f"{process.name} exited ({process.popen.returncode}): {process.log_tail(5)}"
        return ""

    def stop(self) -> None:
        self.runner.stop()  # first: it would otherwise retry a SuperNode that went away
        self.supernode.stop()


def start_site_node(
    name: str,
    *,
    superlink: str,
    root_certificates: Path,
    private_key: Path,
    data_config: Mapping[str, ConfigValue],
    terms: Terms,
    approved_fab_sha256: str,
    report: Path,
    apps: Path,
    logs: Path,
    env: Mapping[str, str],
    cwd: Path,
    max_retries: int = 30,
) -> SiteNode:
    """Start the SuperNode (process isolation) and the runner that runs only the approved FAB."""
    bin_dir = Path(sys.executable).parent
    runtime_port = free_port()
    node_config = {**data_config, "report-path": str(report), **terms.to_node_config()}
    argv = supernode_argv(
        bin_dir,
        superlink=superlink,
        root_certificates=root_certificates,
        private_key=private_key,
        node_config=node_config,
        runtime_port=runtime_port,
        max_retries=max_retries,
        isolation="process",
    )
    supernode = ManagedProcess.start(f"supernode-{name}", argv, env, logs / f"{name}.supernode.log", cwd)
    runner_argv = [
        sys.executable,
        "-m",
        "federation.runner",
        "serve",
        "--runtime-api-address",
        f"{LOOPBACK}:{runtime_port}",
        "--approved-fab-sha256",
        approved_fab_sha256,
        "--report",
        str(report),
        "--apps",
        str(apps),
        "--supernode-pid",
        str(supernode.pid),
    ]
    try:
        runner = ManagedProcess.start(f"runner-{name}", runner_argv, env, logs / f"{name}.runner.log", cwd)
    except BaseException:
        supernode.stop()
        raise
    return SiteNode(supernode, runner)
