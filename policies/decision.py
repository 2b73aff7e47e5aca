"""Decisions and their obligations, parsed strictly, and the rule that a site may only tighten.

A decision is `{allow, reasons, obligations}` (`policies/schemas/decision.schema.json`).
`Decision.parse` turns what a policy returned into a `Decision` or raises `MalformedDecision`
naming what is wrong: a typo in an obligation's name must not silently drop it.

`Decision.combine(central, local)`: allowed only if both allow; reasons of both (the site's
prefixed `site:`); obligations merged to the stricter: the lower of each limit, the union of
redactions and sampling requirements, and `log_content` and `human_review` when either asks.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

DECISION_POINTS = ("inference", "accept", "federation")


class MalformedDecision(ValueError):
    """What a policy returned is not a decision; the message says what is wrong."""


@dataclass(frozen=True)
class Sampling:
    n: int | None = None
    strategy: str | None = None
    requirements: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.n is not None:
            out["n"] = self.n
        if self.strategy is not None:
            out["strategy"] = self.strategy
        if self.requirements:
            out["requirements"] = list(self.requirements)
        return out


@dataclass(frozen=True)
class Obligations:
    """What the agent must do when it serves an allowed request (see decision.schema.json)."""

    redact_outputs: tuple[str, ...] = ()
    redact_patterns: tuple[str, ...] = ()
    max_batch: int | None = None
    max_output_tokens: int | None = None
    rate_limit: int | None = None
    log_content: bool = False
    human_review: bool = False
    sampling: Sampling | None = None
    _compiled: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def parse(cls, raw: Any) -> Obligations:
        if not isinstance(raw, dict):
            raise MalformedDecision("obligations must be an object")
        unknown = sorted(set(raw) - KNOWN_OBLIGATIONS)
        if unknown:
            raise MalformedDecision(f"unknown obligation(s) {', '.join(unknown)}")
        outputs: tuple[str, ...] = ()
        patterns: tuple[str, ...] = ()
        if "redact" in raw:
            redact = raw["redact"]
            if not isinstance(redact, dict) or set(redact) - {"outputs", "patterns"}:
                raise MalformedDecision("redact must be an object with outputs and/or patterns")
            outputs = _strings(redact.get("outputs", []), "redact.outputs")
            patterns = _strings(redact.get("patterns", []), "redact.patterns")
        compiled = []
        for pattern in patterns:
            try:
                compiled.append(re.compile(pattern))
            except re.error as exc:
                raise MalformedDecision(
                    f"redact pattern {pattern!r} is not a valid regular expression: {exc}"
                ) from None
        sampling = None
        if "sampling" in raw:
            s = raw["sampling"]
            if not isinstance(s, dict) or set(s) - {"n", "strategy", "requirements"}:
                raise MalformedDecision("sampling must be an object with n, strategy and requirements")
            strategy = s.get("strategy")
            if strategy is not None and not isinstance(strategy, str):
                raise MalformedDecision("sampling.strategy must be a string")
            sampling = Sampling(
                _positive(s.get("n"), "sampling.n"),
                strategy,
                _strings(s.get("requirements", []), "sampling.requirements"),
            )
        return cls(
            redact_outputs=outputs,
            redact_patterns=patterns,
            max_batch=_positive(raw.get("max_batch"), "max_batch"),
            max_output_tokens=_positive(raw.get("max_output_tokens"), "max_output_tokens"),
            rate_limit=_positive(raw.get("rate_limit"), "rate_limit"),
            log_content=_boolean(raw.get("log_content", False), "log_content"),
            human_review=_boolean(raw.get("human_review", False), "human_review"),
            sampling=sampling,
            _compiled=tuple(compiled),
        )

    @property
    def patterns(self) -> tuple[re.Pattern[str], ...]:
        return self._compiled

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.redact_outputs or self.redact_patterns:
            out["redact"] = {}
            if self.redact_outputs:
                out["redact"]["outputs"] = list(self.redact_outputs)
            if self.redact_patterns:
                out["redact"]["patterns"] = list(self.redact_patterns)
        for name in ("max_batch", "max_output_tokens", "rate_limit"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.log_content:
            out["log_content"] = True
        if self.human_review:
            out["human_review"] = True
        if self.sampling is not None:
            out["sampling"] = self.sampling.to_json()
        return out

    def stricter(self, other: Obligations) -> Obligations:
        """Both sets of obligations at once: lower limits, unions, either's flags."""
        sampling = self.sampling or other.sampling
        if self.sampling and other.sampling:
            sampling = Sampling(
                _lower(self.sampling.n, other.sampling.n),
                self.sampling.strategy or other.sampling.strategy,
                _union(self.sampling.requirements, other.sampling.requirements),
            )
        merged_patterns = _union(self.redact_patterns, other.redact_patterns)
        compiled = {p.pattern: p for p in (*self._compiled, *other._compiled)}
        return Obligations(
            redact_outputs=_union(self.redact_outputs, other.redact_outputs),
            redact_patterns=merged_patterns,
            max_batch=_lower(self.max_batch, other.max_batch),
            max_output_tokens=_lower(self.max_output_tokens, other.max_output_tokens),
            rate_limit=_lower(self.rate_limit, other.rate_limit),
            log_content=self.log_content or other.log_content,
            human_review=self.human_review or other.human_review,
            sampling=sampling,
            _compiled=tuple(compiled[p] for p in merged_patterns),
        )


KNOWN_OBLIGATIONS = frozenset(
    {"redact", "max_batch", "max_output_tokens", "rate_limit", "log_content", "human_review", "sampling"}
)
NO_OBLIGATIONS = Obligations()


@dataclass(frozen=True)
class Decision:
    allow: bool
    reasons: tuple[str, ...] = ()
    obligations: Obligations = NO_OBLIGATIONS

    @classmethod
    def deny(cls, reason: str) -> Decision:
        return cls(False, (reason,))

    @classmethod
    def parse(cls, raw: Any) -> Decision:
        if not isinstance(raw, dict):
            raise MalformedDecision(f"the decision must be an object, not {type(raw).__name__}")
        missing = [k for k in ("allow", "reasons", "obligations") if k not in raw]
        if missing:
            raise MalformedDecision(f"the decision lacks {', '.join(missing)}")
        extra = sorted(set(raw) - {"allow", "reasons", "obligations"})
        if extra:
            raise MalformedDecision(f"the decision has unknown field(s) {', '.join(extra)}")
        allow = raw["allow"]
        if not isinstance(allow, bool):
            raise MalformedDecision("allow must be true or false")
        return cls(allow, _strings(raw["reasons"], "reasons"), Obligations.parse(raw["obligations"]))

    def to_json(self) -> dict[str, Any]:
        """The decision as JSON (built once: a memoised decision goes into many audit entries; do not mutate)."""
        return self._json

    @functools.cached_property
    def _json(self) -> dict[str, Any]:
        return {"allow": self.allow, "reasons": list(self.reasons), "obligations": self.obligations.to_json()}

    @staticmethod
    def combine(central: Decision, local: Decision | None) -> Decision:
        """The central decision tightened by the site's own; a site can add denials, never remove one."""
        if local is None:
            return central
        reasons = (*central.reasons, *(f"site: {r}" for r in local.reasons))
        return Decision(central.allow and local.allow, reasons, central.obligations.stricter(local.obligations))


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MalformedDecision(f"{what} must be a list of strings")
    return tuple(value)


def _positive(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value < 1:
        raise MalformedDecision(f"{what} must be a positive integer, not {value!r}")
    return int(value)


def _boolean(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise MalformedDecision(f"{what} must be true or false, not {value!r}")
    return value


def _lower(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _union(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*a, *b)))
