"""Sitewarden's policy engine: Rego v1 bundles evaluated in-process with regopy.

- `policies.bundle`: the OPA bundle layout, read from a directory or a tarball, written deterministically.
- `policies.engine`: a bundle compiled once (`CompiledPolicy`), decisions that fail closed, Rego unit tests.
- `policies.decision`: `Decision` and `Obligations`, and how a site's local decision tightens a central one.
- `policies/schemas/`: JSON Schemas of each decision point's input and of a decision.
- `policies/packs/bank/`: the default bank policy pack.
"""

from policies.bundle import Bundle
from policies.decision import DECISION_POINTS, Decision, Obligations
from policies.engine import CompiledPolicy, TestResult
from policies.errors import BundleError, PolicyError

__all__ = [
    "DECISION_POINTS",
    "Bundle",
    "BundleError",
    "CompiledPolicy",
    "Decision",
    "Obligations",
    "PolicyError",
    "TestResult",
]
