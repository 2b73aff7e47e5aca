"""The decisions the agent asks before it acts: the central policy bundle, tightened by the site's own.

Every decision point takes an input document (`policies/schemas/<point>.input.schema.json`)
and returns `{allow, reasons, obligations}`. `PolicyGuard` asks the active central bundle
and, when the site's configuration has local policy modules that answer the same point,
those too: allowed only if both allow, obligations merged to the stricter
(`policies.decision.Decision.combine`). It fails closed: without an active central bundle
every decision is a deny that says so; errors and malformed decisions are denies
(`policies.engine`).

A guard is immutable. Activating a new bundle builds a new guard and swaps one reference,
and a request reads that reference once: no request sees half of one version.

Inference decisions are memoised per guard, keyed by everything the input is made of:
Rego decisions are functions of input and data (bundles are written that way, see
policies/README.md), so an identical input yields the identical decision.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from agent.lm import runtime as lm_runtime
from policies import CompiledPolicy, Decision

__all__ = ["SUPPORTED_RUNTIMES", "Decision", "Guard", "PolicyGuard"]

# transformers when the lm extra is installed (agent.lm); found without importing torch.
SUPPORTED_RUNTIMES = frozenset({"onnx"} | ({"transformers"} if lm_runtime.available() else set()))
CACHE_ENTRIES = 4096
NO_BUNDLE = "no policy bundle is active at this site: every decision is a deny until one is"


class Guard(Protocol):
    policy: dict[str, Any]

    def inference(self, request: dict[str, Any], key: tuple[Any, ...] | None = None) -> Decision: ...

    def remembered(self, key: tuple[Any, ...]) -> Decision | None: ...

    def accept(self, artifact: dict[str, Any]) -> Decision: ...

    def federation(self, job: dict[str, Any]) -> Decision: ...


class PolicyGuard:
    def __init__(
        self,
        central: CompiledPolicy | None,
        local: CompiledPolicy | None = None,
        *,
        central_release: dict[str, Any] | None = None,
    ) -> None:
        self.central = central
        self.local = local
        central_doc = None
        if central is not None:
            central_doc = {**(central_release or {}), **central.describe()}
        # What every decision entry in the audit log names: which bundle decided, and the site's own.
        self.policy: dict[str, Any] = {
            "central": central_doc,
            "local": local.describe() if local is not None else None,
        }
        self._cache: dict[tuple[Any, ...], Decision] = {}
        self._cache_lock = threading.Lock()

    def decide(self, point: str, value: dict[str, Any]) -> Decision:
        if self.central is None:
            return Decision.deny(NO_BUNDLE)
        decision = self.central.decide(point, value)
        if self.local is not None and self.local.defines(point):
            decision = Decision.combine(decision, self.local.decide(point, value))
        return decision

    def remembered(self, key: tuple[Any, ...]) -> Decision | None:
        """The inference decision already made for the input `key` stands for, if any."""
        return self._cache.get(key)

    def inference(self, request: dict[str, Any], key: tuple[Any, ...] | None = None) -> Decision:
        """The decision for one inference request; `key`, when given, must determine `request` entirely."""
        if key is None:
            return self.decide("inference", request)
        found = self._cache.get(key)
        if found is not None:
            return found
        decision = self.decide("inference", request)
        with self._cache_lock:
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = decision
        return decision

    def accept(self, artifact: dict[str, Any]) -> Decision:
        return self.decide("accept", artifact)

    def federation(self, job: dict[str, Any]) -> Decision:
        return self.decide("federation", job)
