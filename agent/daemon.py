"""The running agent: its parts and the loops that keep the site in step with the controller.

- sync loop: long-poll the desired state; apply each new version (in a worker thread);
- heartbeat loop: report observed state every `HEARTBEAT_S` and after every change;
- witness loop: sign audit checkpoints when due and have the controller cosign them.

Serving never waits on any of these: a controller that is away only delays them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from agent.lm import site as lm_site
from agent.site_audit import SiteAudit
from agent.sync import ActivePolicy, ActiveRelease, Syncer
from policies import Bundle, BundleError, CompiledPolicy
from policies.check import check as check_bundle
from sitewarden import __version__, witnessing
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
        self.lm = lm_site.create(data.root / "lm.json", config.lm, self.audit.record)
        self.syncer = Syncer(
            data,
            self.identity,
            trusted_approvers=config.approver_keys,
            guard=lambda: self.guard,
            record=self.audit.record,
            ca_cert=ca,
            on_policy=self._policy_activated,
            trainer=self.trainer,
            lm=self.lm,
        )
        self.channel = ControllerChannel(self.identity, self.key, ca)
        self.controller_reachable = False
        self.last_sync_error = ""
        self._changed = asyncio.Event()
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
        ]
        self.serving = True

    async def stop(self) -> None:
        self.serving = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await run_in_threadpool(self.trainer.stop_all)
        await self.channel.close()
        if self.lm is not None:
            await run_in_threadpool(self.lm.close)
        await run_in_threadpool(self.audit.close)

    # -- loops ---------------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        delay = 1.0
        while True:
            try:
                pointer = await self.channel.desired(after=self.syncer.state.desired_version)
                self.controller_reachable, self.last_sync_error, delay = True, "", 1.0
            except ChannelError as exc:
                self.controller_reachable, self.last_sync_error = False, str(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if pointer.changed:
                await run_in_threadpool(self.syncer.apply, pointer.version, pointer.target)
                await self._send_answers()
                self._changed.set()

    async def _send_answers(self) -> None:
        """Send the site's answers to new federated jobs (a job no longer pending refuses it: dropped)."""
        for job_id, answer in list(self.syncer.answers.items()):
            try:
                await self.channel.participate(job_id, answer)
            except ChannelError as exc:
                if 400 <= exc.status < 500:
                    log.info("the controller did not take the answer to job %s: %s", job_id, exc)
                    self.syncer.answers.pop(job_id, None)
                continue  # unreachable: sent again after the next desired state
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
                log.info("status report failed: %s", exc)

    async def _witness_loop(self) -> None:
        while True:
            await asyncio.sleep(WITNESS_S)
            try:
                if self.audit.checkpoint_due():
                    await run_in_threadpool(self.audit.checkpoint)
                await self.witness_once()
            except Exception as exc:  # keep the loop alive whatever happens; the lag shows it
                self.audit.witness_error = f"{exc.__class__.__name__}: {exc}"
                log.warning("witnessing failed: %s", exc)

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
        return {
            "site": {"id": self.identity.site_id, "name": self.identity.site_name},
            "controller": {
                "url": self.identity.controller_url,
                "reachable": self.controller_reachable,
                "last_error": self.last_sync_error,
            },
            "desired_version": self.syncer.state.desired_version,
            "active": self.active.describe() if self.active else None,
            "policy": self.guard.policy,
            "last_good": self.syncer.state.last_good,
            "artifacts": self.syncer.state.artifacts,
            "audit": self.audit.status(),
            "lm": self.lm.describe() if self.lm is not None else None,
            "time": time.time(),
        }


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
