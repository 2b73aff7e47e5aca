"""`sitewarden agent status --data DIR`: what a site's agent runs and why, read from its data dir.

The running agent writes its status document (`GET /sitewarden/status`) to `<data>/status.json` every few
seconds; this module reads it next to the files that are the truth on disk — `state.json` (what is active,
what was refused and why: the commit point of sync), the audit log (its size) and `witness.json` (what the
controller cosigned) — so that the answer is right whether the agent runs or not. Whether it runs is told by
the process id in `status.json` and the age of the document; controller reachability is known only while it
runs. `render` prints the document for a person.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from agent.errors import ConfigError
from agent.identity import DataDir
from audit import AuditError, Log
from sitewarden.output import print_table

STATUS_S = 5.0  # how often the running agent writes status.json
# A status document older than this, from a process that still exists, is from an agent that stalled.
STALE_S = 6 * STATUS_S


def refusals(artifacts: dict[str, dict[str, str]]) -> list[dict[str, str]]:
    """The artifacts the site refused or failed to run, with the reasons."""
    return [
        {"artifact": key, "kind": a.get("kind", ""), "state": a["state"], "reason": a.get("reason", "")}
        for key, a in sorted(artifacts.items())
        if a.get("state") in ("refused", "failed")
    ]


def _json(path: os.PathLike[str] | str) -> dict[str, Any] | None:
    try:
        with open(path) as handle:
            value = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return value if isinstance(value, dict) else None


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def read(data: DataDir, now: float | None = None) -> dict[str, Any]:
    """The status document of the site whose data dir this is, running or not; ConfigError if it is not one."""
    now = time.time() if now is None else now
    identity = data.identity()
    live = _json(data.root / "status.json") or {}
    state = _json(data.state_file) or {}
    witnessed = _json(data.witness_file) or {}
    agent = dict(live.get("agent") or {})
    age = now - float(live["time"]) if isinstance(live.get("time"), int | float) else None
    running = _alive(agent.get("pid")) and age is not None and age <= STALE_S
    agent |= {"running": running, "status_age_s": round(age, 1) if age is not None else None}
    controller = dict(live.get("controller") or {"url": identity.controller_url, "last_contact_at": None})
    if not running:
        controller |= {"reachable": None, "last_error": "unknown: the agent is not running"}
    artifacts = state.get("artifacts", {})
    if running:
        artifacts = {**artifacts, **{k: v for k, v in live.get("artifacts", {}).items() if k not in artifacts}}
    audit = _audit(data, witnessed, live.get("audit") or {}, now)
    policy = live.get("policy") if running else {"central": _described(state.get("policy")), "local": None}
    return {
        "site": {"id": identity.site_id, "name": identity.site_name},
        "agent": agent,
        "controller": controller,
        "desired_version": state.get("desired_version", 0),
        "active": _described(state.get("active")),
        "policy": policy,
        "last_good": _described(state.get("last_good")),
        "artifacts": artifacts,
        "refused": refusals(artifacts),
        "audit": audit,
        "time": now,
    }


def _described(release: dict[str, Any] | None) -> dict[str, Any] | None:
    """A release as `state.json` records it, without the local directory."""
    return {k: v for k, v in release.items() if k != "directory"} if release else None


def _audit(data: DataDir, witnessed: dict[str, Any], live: dict[str, Any], now: float) -> dict[str, Any]:
    size = checkpoint = 0
    if (data.audit_dir / "entries").exists():
        try:
            with Log.open(data.audit_dir, readonly=True) as log:
                size = log.size
                last = log.last_checkpoint()
                checkpoint = last.size if last else 0
        except AuditError as exc:
            raise ConfigError(f"cannot read the audit log {data.audit_dir}: {exc}") from exc
    witnessed_size = int(witnessed.get("size", 0))
    at = witnessed.get("at")
    return {
        "size": size,
        "checkpoint_size": checkpoint,
        "witnessed_size": witnessed_size,
        "witness_lag_entries": size - witnessed_size,
        "witness_lag_seconds": round(now - at, 1) if isinstance(at, int | float) else None,
        "witness_error": live.get("witness_error", ""),
    }


def render(console: Console, status: dict[str, Any]) -> None:
    """The status for a person: a few lines, then a table of every artifact with its state and reason."""
    site, agent, controller, audit = status["site"], status["agent"], status["controller"], status["audit"]
    console.print(f"site {site['name']} ({site['id']})", markup=False)
    if agent.get("running"):
        console.print(
            f"agent: running, pid {agent.get('pid')}, version {agent.get('version')}, since {agent.get('started_at')}",
            markup=False,
        )
    else:
        seen = f"; last status written {agent['status_age_s']:.0f} s ago" if agent.get("status_age_s") else ""
        console.print(f"agent: not running{seen}", markup=False)
    if controller.get("reachable") is True:
        reach = f"reachable, last contact {controller.get('last_contact_at')}"
    elif controller.get("reachable") is False:
        last = controller.get("last_contact_at") or "never"
        reach = f"UNREACHABLE ({controller.get('last_error')}), last contact {last}"
    else:
        reach = controller.get("last_error") or "unknown"
    console.print(f"controller {controller.get('url')}: {reach}", markup=False)
    console.print(f"desired state: version {status['desired_version']}", markup=False)
    active, last_good = status.get("active"), status.get("last_good")
    console.print(f"active: {_release(active) if active else 'nothing'}", markup=False)
    if last_good:
        console.print(f"last-known-good: {_release(last_good)}", markup=False)
    central = (status.get("policy") or {}).get("central")
    console.print(f"policy: {_release(central) if central else 'none (every request is denied)'}", markup=False)
    lag = f"{audit['witness_lag_entries']} entries"
    if audit.get("witness_lag_seconds") is not None:
        lag += f", last cosignature {audit['witness_lag_seconds']:.0f} s ago"
    console.print(
        f"audit log: {audit['size']} entries, checkpoint at {audit['checkpoint_size']}, cosigned by the controller "
        f"up to {audit['witnessed_size']} (witness lag {lag})"
        + (f"; witnessing failing: {audit['witness_error']}" if audit.get("witness_error") else ""),
        markup=False,
    )
    refused = status.get("refused") or []
    console.print(f"refused or failed: {len(refused)}", markup=False)
    table = Table("artifact", "kind", "state", "reason")
    for key, artifact in sorted(status.get("artifacts", {}).items()):
        table.add_row(key, artifact.get("kind", ""), artifact.get("state", ""), artifact.get("reason", ""))
    if status.get("artifacts"):
        print_table(console, table)


def _release(release: dict[str, Any]) -> str:
    text = f"{release.get('name')} {release.get('version')}"
    if release.get("approvers"):
        text += f" (approved by {', '.join(release['approvers'])})"
    return text
