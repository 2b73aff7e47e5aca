"""The running agent: its parts and the loops that keep the site in step with the controller.

- sync loop: long-poll the desired state; apply each new version (in a worker thread); retry a
  version whose application failed for a transient reason, with backoff, until it is applied or
  refused; between desired states, check the releases the site holds against revocations;
- heartbeat loop: report observed state every `HEARTBEAT_S` and after every change;
- witness loop: sign audit checkpoints when due and have the controller cosign them;
- audit loop: while the audit log cannot write, try to recover it (`SiteAudit.recover`);
- app-key loop: record in the site's audit log every app key created or revoked (`agent.apps`);
- controller-witness loop: witness the controller's own audit log (`agent.controller_witness`)
  after every long-poll answer (the poll also answers when the controller signs a new
  checkpoint) and every `[controller] witness_seconds`;
- status loop: reload the app keys when they change and write `status.json` (what
  `sitewarden agent status` reads) every few seconds.

Serving never waits on any of these: a controller that is away only delays them. No exception
ends a loop: a failure is reported in status (`sync`, `audit`) and metrics, audited when it
changes, logged once when it starts and once when it ends (not at every retry), and the loop
goes on after a backoff. Each loop logs its outcomes at the default level (INFO).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool

from agent import apps as apps_mod
from agent.apps import AppKeys
from agent.channel import ChannelError, ControllerChannel
from agent.config import SiteConfig
from agent.controller_witness import ControllerWitness
from agent.errors import ConfigError
from agent.federation import Trainer
from agent.guard import Guard, PolicyGuard
from agent.identity import DataDir, Identity
from agent.lm import site as lm_site
from agent.site_audit import SiteAudit
from agent.status import STATUS_S, refusals
from agent.sync import ActivePolicy, ActiveRelease, Syncer
from policies import Bundle, BundleError, CompiledPolicy
from policies.check import check as check_bundle
from sitewarden import __version__, witnessing
from sitewarden.files import is_within, write_atomically
from sitewarden.wire import ArtifactState, StatusReport

log = logging.getLogger("sitewarden.agent")

HEARTBEAT_S = 15.0
WITNESS_S = 1.0
RETRY_MAX_S = 30.0
TRAINING_S = 1.0
AUDIT_RECOVERY_S = 0.5
MIN_POLL_S = 1.0  # a long poll answered at once with nothing new waits this long before the next one
REVOCATION_CHECK_S = 60.0
APP_KEYS_S = 0.5


class Backoff:
    """Exponential backoff with jitter: 1 s, 2 s, 4 s ... up to `cap`, each between half and 1.5 times."""

    def __init__(self, first: float = 1.0, cap: float = RETRY_MAX_S) -> None:
        self.first, self.cap, self.delay = first, cap, first

    def next(self) -> float:
        delay = min(self.delay * (0.5 + random.random()), self.cap)  # noqa: S311 - jitter, not a secret
        self.delay = min(self.delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.delay = self.first


def check_trust_paths(data: DataDir, config: SiteConfig, config_path: Path | None) -> None:
    """Refuse a configuration whose trust anchors (the configuration itself, approver keys, the
    controller's CA, the local policy) lie inside the data dir: the agent writes there, on behalf of
    a controller it does not trust, and must never be able to change what it trusts."""
    anchors: dict[str, Path | None] = {
        "the site configuration": config_path,
        "controller.ca_cert": config.controller_ca,
        "policy.local": config.local_policy,
        **{f"approvers.{name}": path for name, path in config.approvers.items()},
    }
    for what, path in anchors.items():
        if path is not None and is_within(path, data.root):
            raise ConfigError(
                f"{what} ({path}) lies inside the data dir {data.root}, which the agent writes: "
                "keep trust anchors in a place the agent never writes"
            )


class Agent:
    def __init__(self, data: DataDir, config: SiteConfig, config_path: Path | None = None) -> None:
        check_trust_paths(data, config, config_path)
        self.data = data
        self.config = config
        self.identity: Identity = data.identity()
        self.key = data.site_key()
        self.site = {"id": self.identity.site_id, "name": self.identity.site_name}
        self.audit = SiteAudit(data, self.identity, config.audit)
        self.apps = AppKeys(data.apps_file, config.apps)
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
            fetch_timeout_s=config.fetch_timeout_s,
            lm=self.lm,
        )
        self.channel = ControllerChannel(self.identity, self.key, ca)
        self.controller_witness = ControllerWitness(
            data.controller_witness_file,
            self.identity.site_id,
            self.key,
            self.identity.controller_audit_vkey or config.controller_audit_vkey,
            self.audit.record,
        )
        self.controller_reachable = False
        self.last_sync_error = ""
        # The sync loop's own state, for status and metrics.
        self.sync_failing_since: float | None = None
        self.sync_failure_kind = ""
        self.sync_attempts = 0
        self.sync_next_attempt: float | None = None
        self.sync_failures: Counter[str] = Counter()
        self._sync_audited = ""
        self._retry: tuple[int, bool] | None = None  # (version, force) to apply again
        self._backoff = Backoff()
        self._revocations_checked = time.monotonic()
        self.revocation_error = ""
        self._changed = asyncio.Event()
        self._controller_checkpoint = asyncio.Event()
        self._skip_audit = False  # poll once without audit_after: the controller's checkpoint did not verify
        self.last_contact_at: float | None = None
        self.started_at = time.time()
        self._witness_failing = ""
        self._report_failing = ""
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
        await run_in_threadpool(self.audit_app_keys)  # changes made while the agent was stopped
        await run_in_threadpool(self.syncer.start)
        self._tasks = [
            asyncio.create_task(self._app_keys_loop(), name="app-keys"),
            asyncio.create_task(self._sync_loop(), name="sync"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._witness_loop(), name="witness"),
            asyncio.create_task(self._controller_witness_loop(), name="controller-witness"),
            asyncio.create_task(self._training_loop(), name="training"),
            asyncio.create_task(self._audit_loop(), name="audit"),
            asyncio.create_task(self._status_loop(), name="status"),
        ]
        self.serving = True

    async def stop(self) -> None:
        self.serving = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await run_in_threadpool(self.trainer.stop_all)
        self.apps.close()
        await self.channel.close()
        if self.lm is not None:
            await run_in_threadpool(self.lm.close)
        await run_in_threadpool(self.audit.close)

    # -- loops ---------------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        while True:
            try:
                delay = await self._sync_step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # nothing ends the loop: reported, audited on change, retried
                log.exception("sync step failed")
                delay = self._sync_failed("error", f"{exc.__class__.__name__}: {exc}")
            if delay > 0:
                await asyncio.sleep(delay)

    async def _sync_step(self) -> float:
        """One step of the sync loop; returns how long to wait before the next one."""
        syncer = self.syncer
        if self._retry is None and syncer.reapply:
            self._retry = (syncer.state.desired_version, True)
        if self._retry is None:
            witness = self.controller_witness
            witnessing = witness.verifier is not None and witness.state.refused is None and not self._skip_audit
            self._skip_audit = False
            started = time.monotonic()
            try:
                pointer = await self.channel.desired(
                    after=syncer.state.desired_version, audit_after=witness.size if witnessing else None
                )
            except ChannelError as exc:
                if self.controller_reachable or not self.last_sync_error:
                    self._status_due.set()  # an operator looks at this: status.json at once
                self.controller_reachable, self.last_sync_error = False, str(exc)
                return self._sync_failed("poll", f"controller unreachable (serving goes on): {exc}")
            if not self.controller_reachable:
                log.info("controller %s reachable; desired state %d", self.identity.controller_url, pointer.version)
                self._status_due.set()
            self.controller_reachable, self.last_sync_error = True, ""
            self.last_contact_at = time.time()
            if witnessing and pointer.audit_size is not None and pointer.audit_size > witness.size:
                # Witnessed before the next poll, which would otherwise answer at once again.
                await self._witness_controller()
                self._skip_audit = witness.size < pointer.audit_size  # not advanced: poll once without it
            else:
                self._controller_checkpoint.set()  # after each long-poll answer, witness the controller's log
            if pointer.version <= syncer.state.desired_version:  # nothing new (whatever `changed` says)
                self._sync_ok()
                if time.monotonic() - self._revocations_checked >= REVOCATION_CHECK_S:
                    await self._check_revocations()
                return max(0.0, MIN_POLL_S - (time.monotonic() - started))
            version, force = pointer.version, False
        else:
            version, force = self._retry
        if not self.audit.writable:  # nothing is applied that could not be audited
            self._retry = (version, force)
            return self._sync_failed("audit", f"the audit log cannot write: {self.audit.failure}")
        outcome = await run_in_threadpool(syncer.apply, version, force=force)
        self._changed.set()
        self._status_due.set()
        await self._send_answers()
        if outcome.result == "retry":
            self._retry = (version, force)
            return self._sync_failed("apply", outcome.reason, audited=True)
        self._retry = None
        self._revocations_checked = time.monotonic()
        self._sync_ok()
        return 0.0

    def _sync_failed(self, kind: str, reason: str, *, audited: bool = False) -> float:
        """Report a failed sync step (status, metrics; audit and log once per change of reason)."""
        self.sync_failures[kind] += 1
        self.sync_attempts += 1
        if self.sync_failing_since is None:
            self.sync_failing_since = time.time()
        self.sync_failure_kind, self.last_sync_error = kind, reason
        if reason != self._sync_audited:
            self._sync_audited = reason
            log.warning("sync: %s (%s); retrying with backoff", reason, kind)
            if not audited:
                self.audit.record({"type": "sync.error", "stage": kind, "reason": reason[:2000]})
        delay = self._backoff.next()
        self.sync_next_attempt = time.time() + delay
        return delay

    def _sync_ok(self) -> None:
        if self.sync_failing_since is not None:
            log.warning("sync: working again after %.0f s", time.time() - self.sync_failing_since)
            recovered = {"type": "sync.recovered", "after": self.sync_failure_kind, "attempts": self.sync_attempts}
            self.audit.record(recovered)
        self.sync_failing_since, self.sync_failure_kind, self.sync_attempts, self.sync_next_attempt = None, "", 0, None
        self._sync_audited = ""
        self._backoff.reset()

    async def _check_revocations(self) -> None:
        self._revocations_checked = time.monotonic()
        try:
            if await run_in_threadpool(self.syncer.check_revocations):
                self._changed.set()
                self._status_due.set()
            self.revocation_error = ""
        except Exception as exc:  # reported; the next check comes
            self.revocation_error = f"{exc.__class__.__name__}: {exc}"
            log.info("revocation check failed: %s", self.revocation_error)

    async def _audit_loop(self) -> None:
        """While the audit log cannot write, try to recover it; the first success resumes serving."""
        while True:
            await asyncio.sleep(AUDIT_RECOVERY_S)
            if self.audit.writable:
                continue
            try:
                if await run_in_threadpool(self.audit.recover):
                    self._changed.set()
                    self._status_due.set()
            except Exception:  # keep the loop alive; the failure stays visible in status
                log.exception("audit recovery attempt failed")

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
            except Exception:  # keep the loop alive; the next report comes
                log.exception("status report could not be made")
            else:
                if self._report_failing:
                    log.info("status reports reach the controller again")
                self._report_failing = ""

    def audit_app_keys(self) -> int:
        """Record app keys created or revoked since the last generation audited; returns how many changes.

        A key already refuses or works from the request after the change (`AppKeys.app_for`);
        this only puts the change in the site's audit log and notes the generation for the CLI.
        """
        audited = apps_mod.audited_generation(self.data.root)
        generation, events = self.apps.unaudited(audited)
        if generation == audited:
            return 0
        if generation < audited:  # an older apps.json put back: its keys are the ones in force now
            events = [{"type": "app_keys.replaced", "from_generation": audited, "to_generation": generation}]
        for event in events:
            self.audit.record(event)
        self.apps.note_audited(self.data.root, generation)
        return len(events)

    async def _app_keys_loop(self) -> None:
        while True:
            await asyncio.sleep(APP_KEYS_S)
            try:
                await run_in_threadpool(self.audit_app_keys)
            except Exception as exc:  # keep the loop alive; the next round tries again
                log.warning("recording app key changes failed: %s: %s", exc.__class__.__name__, exc)

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

    async def _controller_witness_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._controller_checkpoint.wait(), self.config.controller_witness_s)
            self._controller_checkpoint.clear()
            await self._witness_controller()

    async def _witness_controller(self) -> None:
        try:
            await self.controller_witness.run_once(self.channel)
        except Exception as exc:  # the controller is away, say: witnessed later; serving goes on
            self.controller_witness.error = f"{exc.__class__.__name__}: {exc}"
            log.info("witnessing the controller's audit log failed: %s", exc)

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

    def not_ready(self) -> list[str]:
        """Why the agent cannot serve now (empty when it can)."""
        reasons = []
        if self.active is None:
            reasons.append("no model is active")
        if not self.audit.writable:
            reasons.append(f"the audit log cannot write: {self.audit.failure}")
        return reasons

    def sync_status(self) -> dict[str, Any]:
        failing = self.sync_failing_since is not None
        return {
            "state": "retrying" if failing else "ok",
            "stage": self.sync_failure_kind,
            "error": self.last_sync_error if failing else "",
            "failing_since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.sync_failing_since))
            if failing
            else None,
            "attempts": self.sync_attempts,
            "retrying_version": self._retry[0] if self._retry else None,
            "next_attempt_in_s": round(max(0.0, self.sync_next_attempt - time.time()), 1)
            if self.sync_next_attempt
            else None,
            "failures": dict(self.sync_failures),
            "revocation_check_error": self.revocation_error,
        }

    def collector(self) -> Collector:
        """Prometheus metrics of sync, readiness and the audit log's health."""
        return _AgentCollector(self)

    def status(self) -> dict[str, Any]:
        """What the agent runs and why: the document of `GET /sitewarden/status` and `sitewarden agent status`."""
        state = self.syncer.state
        artifacts = {**state.artifacts, **self.trainer.artifacts()}
        return {
            "site": {"id": self.identity.site_id, "name": self.identity.site_name},
            "ready": not self.not_ready(),
            "not_ready": self.not_ready(),
            "sync": self.sync_status(),
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
            "controller_witness": self.controller_witness.status(),
            "lm": self.lm.describe() if self.lm is not None else None,
            "time": time.time(),
        }


class _AgentCollector(Collector):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        agent, audit = self.agent, self.agent.audit
        yield GaugeMetricFamily(
            "sitewarden_ready",
            "1 when the agent can serve (a model active, audit writable)",
            value=0.0 if agent.not_ready() else 1.0,
        )
        yield GaugeMetricFamily(
            "sitewarden_audit_writable", "1 while the audit log can write", value=float(audit.writable)
        )
        yield CounterMetricFamily(
            "sitewarden_audit_refused_requests",
            "Requests refused because the audit log could not write",
            value=audit.refused_total,
        )
        yield GaugeMetricFamily(
            "sitewarden_audit_kept_entries",
            "Entries kept in memory until the audit log writes again",
            value=audit.status()["kept_entries"],
        )
        yield GaugeMetricFamily(
            "sitewarden_audit_queue_depth",
            "Entries waiting for the audit writer (async mode)",
            value=audit.status()["queued"],
        )
        failures = CounterMetricFamily(
            "sitewarden_sync_failures", "Failed sync steps, by stage (poll, apply, audit, error)", labels=["stage"]
        )
        for stage in ("poll", "apply", "audit", "error"):
            failures.add_metric([stage], agent.sync_failures.get(stage, 0))
        yield failures
        yield GaugeMetricFamily(
            "sitewarden_sync_retrying",
            "1 while a sync step is being retried",
            value=float(agent.sync_failing_since is not None),
        )
        yield GaugeMetricFamily(
            "sitewarden_desired_version",
            "The desired-state version the agent handled last",
            value=agent.syncer.state.desired_version,
        )


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
