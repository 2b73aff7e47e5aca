"""Decisions the agent asks before it acts, and the built-in rules it uses until a policy bundle
is active.

Every decision point takes an input document and returns `{allow, reasons, obligations}`;
the policy engine (Rego bundles) answers the same questions with the same shapes.
Decisions fail closed: an error is a deny whose reason says what failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

SUPPORTED_RUNTIMES = frozenset({"onnx"})


@dataclass(frozen=True)
class Decision:
    allow: bool
    reasons: tuple[str, ...] = ()
    obligations: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"allow": self.allow, "reasons": list(self.reasons), "obligations": self.obligations}


class Guard(Protocol):
    name: str

    def inference(self, request: dict[str, Any]) -> Decision: ...

    def accept(self, artifact: dict[str, Any]) -> Decision: ...


class BuiltinGuard:
    """The rules every site applies even without a policy bundle."""

    name = "builtin"

    def inference(self, request: dict[str, Any]) -> Decision:
        card = request.get("model", {}).get("card", {})
        purpose, data_class = request.get("purpose"), request.get("data_class")
        reasons = []
        purposes = card.get("intended_purposes") or []
        if purposes and purpose not in purposes:
            reasons.append(f"purpose {purpose!r} is not among the model's intended purposes ({', '.join(purposes)})")
        classes = card.get("data_classes") or []
        if classes and data_class not in classes:
            reasons.append(f"data class {data_class!r} is not allowed for this model ({', '.join(classes)})")
        if reasons:
            return Decision(False, tuple(reasons))
        return Decision(True, (f"purpose {purpose} and data class {data_class} allowed for the model",))

    def accept(self, artifact: dict[str, Any]) -> Decision:
        reasons = []
        if not artifact.get("approvals"):
            reasons.append("no valid approval by an approver this site trusts")
        if artifact.get("runtime") not in SUPPORTED_RUNTIMES:
            reasons.append(f"runtime {artifact.get('runtime')!r} is not supported here")
        if not artifact.get("files_complete"):
            reasons.append("the release's files are incomplete")
        if reasons:
            return Decision(False, tuple(reasons))
        approvers = ", ".join(a["approver"] for a in artifact["approvals"])
        return Decision(True, (f"approved by {approvers}", "runtime supported", "files complete"))
