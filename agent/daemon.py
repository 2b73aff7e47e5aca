"""The running agent: its parts and the loops that keep the site in step with the controller.

- sync loop: long-poll the desired state; apply each new version (in a worker thread);
- heartbeat loop: report observed state every `HEARTBEAT_S` and after every change;
- witness loop: sign audit checkpoints when due and have the controller cosign them;
- status loop: reload the app keys when they change and write `status.json` (what
  `sitewarden agent status` reads) every few seconds.

Serving never waits on any of these: a controller that is away only delays them. Each
loop logs its outcomes at the default level (INFO), and a failure once when it starts
and once when it ends, not at every retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from typing import Any

from starlette.concurrency import run_in_threadpool

from agent.apps import AppKeys
from agent.channel import ChannelError, ControllerChannel
from agent.config import SiteConfig
from agent.errors import ConfigError
from agent.federation import Trainer
from agent.guard import Guard, PolicyGuard
from agent.identity import DataDir, Identity
from agent.site_audit import SiteAudit
from agent.status import STATUS_S, refusals
from agent.sync import ActivePolicy, ActiveRelease, Syncer
from policies import Bundle, BundleError, CompiledPolicy
from policies.check import check as check_bundle
from sitewarden import __version__, witnessing
from sitewarden.files import write_atomically
from sitewarden.wire import ArtifactState, StatusReport

log = logging.getLogger("sitewarden.agent")

HEARTBEAT_S = 15.0
WITNESS_S = 1.0
RETRY_MAX_S = 30.0
TRAINING_S = 1.0


class Agent:
    def __init__(self, data: DataDir, config: SiteConfig) -> None:
        self.data = data
        self.config = config
        self.identity: Identity = data.identity()
        self.key = data.site_key()
        self.site = {"id": self.identity.site_id, "name": self.identity.site_name}
        self.audit = SiteAudit(data, self.identity, config.audit)
        self.apps = AppKeys(data.apps_file)
        self.local_policy = load_local_policy(config)
        # Replaced, never changed: a request reads it once and sees one policy version throughout.
        self.guard: Guard = PolicyGuard(None, self.local_policy)
        ca = str(config.controller_ca) if config.controller_ca else None
        self.trainer = Trainer(data, config, self.identity, self.audit.record)
        self.syncer = Syncer(
            data,
            self.identity,
            trusted_approvers=config.approver_keys,
            guard=lambda: self.guard,
            record=self.audit.record,
            ca_cert=ca,
            on_policy=self._policy_activated,
            trainer=self.trainer,
        )
        self.channel = ControllerChannel(self.identity, self.key, ca)
        self.controller_reachable = False
        self.last_sync_error = ""
        self.last_contact_at: float | None = None
        self.started_at = time.time()
        self._witness_failing = ""
        self._report_failing = ""
        self._changed = asyncio.Event()
        self._status_due = asyncio.Event()  # write status.json now: something an operator looks at changed
        self._tasks: list[asyncio.Task[None]] = []
        # Readiness (Kubernetes /readyz): true between the end of start() and the start of stop().
        self.serving = False
        self.last_report_at = 0.0  # Unix time of the last status report the controller took

    @property
    def active(self) -> ActiveRelease | None:
        return self.syncer.active

    def _policy_activated(self, policy: ActivePolicy | None) -> None:
        if policy is None:
            self.guard = PolicyGuard(None, self.local_policy)
            return
        release = {"name": policy.name, "version": policy.version}
        self.guard = PolicyGuard(policy.compiled, self.local_policy, central_release=release)

    async def start(self) -> None:
        await run_in_threadpool(self.syncer.start)
        self._tasks = [
            asyncio.create_task(self._sync_loop(), name="sync"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._witness_loop(), name="witness"),
            asyncio.create_task(self._training_loop(), name="training"),
            asyncio.create_task(self._status_loop(), name="status"),
        ]
        self.serving = True

    async def stop(self) -> None:
        self.serving = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await run_in_threadpool(self.trainer.stop_all)
        await self.channel.close()
        await run_in_threadpool(self.audit.close)

    # -- loops ---------------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        delay = 1.0
        while True:
            try:
                pointer = await self.channel.desired(after=self.syncer.state.desired_version)
                if not self.controller_reachable:
                    log.info("controller %s reachable; desired state %d", self.identity.controller_url, pointer.version)
                    self._status_due.set()
                self.controller_reachable, self.last_sync_error, delay = True, "", 1.0
                self.last_contact_at = time.time()
            except ChannelError as exc:
                if self.controller_reachable or not self.last_sync_error:
                    log.warning("controller unreachable: %s; retrying (serving goes on)", exc)
                    self._status_due.set()
                self.controller_reachable, self.last_sync_error = False, str(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if pointer.changed:
                await run_in_threadpool(self.syncer.apply, pointer.version, pointer.target)
                await self._send_answers()
                self._changed.set()
                self._status_due.set()

    async def _send_answers(self) -> None:
        """Send the site's answers to new federated jobs (a job no longer pending refuses it: dropped)."""
        for job_id, answer in list(self.syncer.answers.items()):
            try:
                await self.channel.participate(job_id, answer)
            except ChannelError as exc:
                if 400 <= exc.status < 500:
                    log.warning("the controller did not take the answer to job %s: %s", job_id, exc)
                    self.syncer.answers.pop(job_id, None)
                continue  # unreachable: sent again after the next desired state
            log.info("job %s: answered %s", job_id, "join" if answer.join else "decline: " + "; ".join(answer.reasons))
            self.syncer.answers.pop(job_id, None)

    async def _training_loop(self) -> None:
        """Audit the rounds the ClientApps report and notice a SuperNode that died."""
        while True:
            await asyncio.sleep(TRAINING_S)
            try:
                before = self.trainer.artifacts()
                await run_in_threadpool(self.trainer.check)
                if await run_in_threadpool(self.trainer.drain) or self.trainer.artifacts() != before:
                    self._changed.set()
            except Exception as exc:  # keep the loop alive; the log says what went wrong
                log.warning("federated training bookkeeping failed: %s: %s", exc.__class__.__name__, exc)

    async def _heartbeat_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), HEARTBEAT_S)
            self._changed.clear()
            try:
                await self.channel.report(self.status_report())
                self.last_report_at = time.time()
            except ChannelError as exc:
                if str(exc) != self._report_failing:
                    log.warning("status report to the controller failed: %s", exc)
                self._report_failing = str(exc)
            else:
                if self._report_failing:
                    log.info("status reports reach the controller again")
                self._report_failing = ""

    async def _witness_loop(self) -> None:
        while True:
            await asyncio.sleep(WITNESS_S)
            try:
                if self.audit.checkpoint_due():
                    await run_in_threadpool(self.audit.checkpoint)
                    log.info("audit checkpoint signed at size %d", self.audit.log.size)
                cosigned = await self.witness_once()
            except Exception as exc:  # keep the loop alive whatever happens; the lag shows it
                self.audit.witness_error = f"{exc.__class__.__name__}: {exc}"
                cosigned = False
            if self.audit.witness_error and self.audit.witness_error != self._witness_failing:
                lag = self.audit.log.size - self.audit.witnessed_size
                log.warning("witnessing failed: %s (%d entries not yet cosigned)", self.audit.witness_error, lag)
            elif cosigned:
                log.info(
                    "the controller cosigned the audit checkpoint at size %d%s",
                    self.audit.witnessed_size,
                    " (witnessing resumed)" if self._witness_failing else "",
                )
            self._witness_failing = self.audit.witness_error

    async def _status_loop(self) -> None:
        """Reload the app keys when they change (logging what changed) and write `status.json`, every
        `STATUS_S` and at once when the controller's reachability or what the site runs changes."""
        while True:
            try:
                await run_in_threadpool(self.apps.refresh)
                await run_in_threadpool(self.write_status)
            except Exception as exc:  # keep the loop alive; the next round tries again
                log.warning("status bookkeeping failed: %s: %s", exc.__class__.__name__, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_due.wait(), STATUS_S)
            self._status_due.clear()

    def write_status(self) -> None:
        """`status.json` in the data dir: the status document, for `sitewarden agent status`."""
        write_atomically(self.data.root / "status.json", json.dumps(self.status(), indent=2).encode())

    async def witness_once(self) -> bool:
        """Send the latest checkpoint to the controller's witness; True when it was cosigned."""
        for _ in range(3):
            sent = self.audit.submission()
            if sent is None:
                return False
            try:
                lines = await self.channel.add_checkpoint(sent.body())
            except ChannelError as exc:
                if exc.status == 409 and exc.content_type.startswith(witnessing.SIZE_CONTENT_TYPE):
                    self.audit.witness_conflict(witnessing.conflict_size(exc.body))
                    continue
                self.audit.witness_error = str(exc)
                return False
            await run_in_threadpool(self.audit.cosigned, sent, lines, self.identity.witness_vkey)
            return True
        return False

    # -- status ---------------------------------------------------------------------------

    def status_report(self) -> StatusReport:
        state = self.syncer.state
        artifacts = [
            ArtifactState(
                name=key.rsplit("@", 1)[0],
                version=key.rsplit("@", 1)[1],
                kind=a["kind"],
                state=a["state"],
                reason=a.get("reason", "")[:2000],
            )
            for key, a in {**state.artifacts, **self.trainer.artifacts()}.items()
            if "@" in key
        ]
        return StatusReport(
            desired_version=state.desired_version,
            agent_version=__version__,
            checkpoint_size=self.audit.log.last_checkpoint().size if self.audit.log.last_checkpoint() else 0,
            artifacts=artifacts,
        )

    def status(self) -> dict[str, Any]:
        """What the agent runs and why: the document of `GET /sitewarden/status` and `sitewarden agent status`."""
        state = self.syncer.state
        artifacts = {**state.artifacts, **self.trainer.artifacts()}
        return {
            "site": {"id": self.identity.site_id, "name": self.identity.site_name},
            "agent": {
                "version": __version__,
                "pid": os.getpid(),
                "started_at": _iso(self.started_at),
                "updated_at": _iso(time.time()),
            },
            "controller": {
                "url": self.identity.controller_url,
                "reachable": self.controller_reachable,
                "last_contact_at": _iso(self.last_contact_at),
                "last_error": self.last_sync_error,
            },
            "desired_version": state.desired_version,
            "active": self.active.describe() if self.active else None,
            "policy": self.guard.policy,
            "last_good": state.last_good,
            "artifacts": artifacts,
            "refused": refusals(artifacts),
            "audit": self.audit.status(),
            "time": time.time(),
        }


def _iso(moment: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment)) if moment is not None else None


def load_local_policy(config: SiteConfig) -> CompiledPolicy | None:
    """The site's own policy modules, checked in a child process, compiled; ConfigError says what is wrong."""
    if config.local_policy is None:
        return None
    try:
        checked = check_bundle(config.local_policy, label=f"local policy {config.local_policy}")
        if checked.failed:
            detail = "; ".join(f"{r.package}.{r.rule}: {r.detail}" for r in checked.failed[:5])
            raise ConfigError(f"policy.local: {len(checked.failed)} of the local policy's Rego tests fail: {detail}")
        return CompiledPolicy(Bundle.load(config.local_policy), label=f"local policy {config.local_policy}")
    except BundleError as exc:
        raise ConfigError(f"policy.local: {exc}") from exc
