"""Rego bundles compiled once and evaluated in-process with regopy (rego-cpp), failing closed.

A decision point `sitewarden/<point>` is answered by the rule `decision` in package
`sitewarden.<point>`. `CompiledPolicy` compiles a bundle's policy modules and data once
(`Interpreter.build` with the three entrypoints) and evaluates the compiled plan for every
request. `decide` never raises: an evaluation error, an undefined decision (the bundle has
no rule for the point, or it did not evaluate) or a malformed one is a deny whose reason
says what failed. Built-in errors (division by zero, type errors) are errors, not undefined.

Two limits of rego-cpp 1.5 (regopy 1.5.2) shape how bundles are written:
- `with input as ...` fails for rules that reference other rules ("shape rego-localref has
  no field rego-refhead"), so decisions are written as functions of their input
  (`decision := decide(input)`) and tests call `decide({...})`; `run_tests` names this
  limitation when a test hits it.
- reading a failed output crashes the process, so the engine reads the interpreter's last
  error instead and never touches a failed output.

An interpreter is not safe to share between threads; evaluations of one `CompiledPolicy`
take its lock (a decision takes a fraction of a millisecond).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any

from regopy import Input, Interpreter, RegoError
from regopy.rego_shared import rego_get_error

from policies.bundle import Bundle, Module
from policies.decision import DECISION_POINTS, Decision, MalformedDecision
from policies.errors import BundleError

WITH_LIMITATION = "rego-localref"


def entrypoint(point: str) -> str:
    return f"sitewarden/{point}/decision"


@dataclass(frozen=True)
class TestResult:
    module: str
    package: str
    rule: str
    passed: bool
    detail: str = ""


class CompiledPolicy:
    """A bundle compiled for evaluation: `decide(point, input)` for every request."""

    def __init__(self, bundle: Bundle, *, label: str = "bundle") -> None:
        self.bundle = bundle
        self.label = label
        self.digest = bundle.digest
        packages = {m.package for m in bundle.policy_modules}
        self.points = tuple(p for p in DECISION_POINTS if f"sitewarden.{p}" in packages)
        builder = _interpreter(bundle.policy_modules, bundle)
        try:
            self._plan = builder.build(None, [entrypoint(p) for p in self.points] or ["sitewarden"])
        except RegoError as exc:
            raise BundleError(f"{label} does not compile: {_message(str(exc))}") from None
        if not self._plan.ok():
            raise BundleError(f"{label} does not compile: {_message(rego_get_error(builder._impl))}")
        self._builder = builder  # the plan refers to it
        self._run = Interpreter()
        self._run.strict_built_in_errors = True
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"revision": self.bundle.revision, "digest": self.digest}

    def defines(self, point: str) -> bool:
        return point in self.points

    def decide(self, point: str, value: dict[str, Any]) -> Decision:
        """The bundle's decision for `point` on `value`; any failure is a deny that says what failed."""
        if point not in self.points:
            return Decision.deny(f"{self.label} defines no decision for sitewarden/{point} (rule decision)")
        try:
            term = Input(value)
        except (TypeError, ValueError, RegoError) as exc:
            return Decision.deny(f"the {point} input cannot be given to the policy: {exc}")
        with self._lock:
            self._run.set_input(term)
            output = self._run.query_bundle_entrypoint(self._plan, entrypoint(point))
            if not output.ok():
                detail = _message(rego_get_error(self._run._impl)) or "rego-cpp gave no detail"
                return Decision.deny(f"{self.label}: evaluating sitewarden/{point} failed: {detail}")
            text = str(output)
        if text == "undefined":
            return Decision.deny(f"{self.label}: sitewarden/{point} decision is undefined for this input")
        try:
            expressions = json.loads(text)["expressions"]
            return Decision.parse(expressions[0])
        except MalformedDecision as exc:
            return Decision.deny(f"{self.label}: malformed sitewarden/{point} decision: {exc}")
        except (ValueError, KeyError, IndexError, TypeError):
            return Decision.deny(f"{self.label}: sitewarden/{point} returned something that is not a decision")

    def run_tests(self) -> list[TestResult]:
        """Run the bundle's Rego unit tests: every `test_*` rule of its `_test.rego` modules must be true."""
        return run_tests(self.bundle)


def run_tests(bundle: Bundle) -> list[TestResult]:
    """Each `test_*` rule in the bundle's test modules, queried with every module and the data loaded."""
    results = []
    for module in bundle.test_modules:
        # One interpreter per test module: a module rego-cpp cannot evaluate fails only its own tests.
        interpreter = _interpreter((*bundle.policy_modules, module), bundle)
        interpreter.set_input_term("{}")
        for rule in module.test_rules():
            try:
                output = interpreter.query(f"x := data.{module.package}.{rule}")
            except RegoError as exc:
                results.append(TestResult(module.path, module.package, rule, False, _message(str(exc))))
                continue
            if not output.ok():
                detail = _message(rego_get_error(interpreter._impl)) or "evaluation failed"
                if WITH_LIMITATION in detail:
                    detail += (
                        " (rego-cpp cannot evaluate `with` over rules that use other rules: "
                        "call the decision as a function of its input, decide({...}))"
                    )
                results.append(TestResult(module.path, module.package, rule, False, detail))
                continue
            text = str(output)
            if text == "undefined":
                results.append(TestResult(module.path, module.package, rule, False, "undefined: a condition failed"))
                continue
            value = json.loads(text).get("bindings", {}).get("x")
            passed = value is True
            results.append(TestResult(module.path, module.package, rule, passed, "" if passed else f"= {value!r}"))
    return results


def _interpreter(modules: tuple[Module, ...], bundle: Bundle) -> Interpreter:
    interpreter = Interpreter()
    interpreter.strict_built_in_errors = True
    try:
        for module in modules:
            interpreter.add_module(module.path, module.text)
        interpreter.add_data_json(bundle.data_json())
    except RegoError as exc:
        raise BundleError(f"the bundle does not compile: {_message(str(exc))}") from None
    return interpreter


_ERROR = re.compile(r"\(error \d+:([^|\s]*)\|[^\n]*\n\s*\(errormsg \d+:([^\n]*?)\)\s*$", re.MULTILINE)


def _message(text: str) -> str:
    """A readable line from rego-cpp's error text ("file: message"), or the text itself."""
    found = _ERROR.findall(text)
    if found:
        return "; ".join(f"{where}: {what}" if where else what for where, what in found)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip() and not set(line.strip()) <= {"~"}]
    return " ".join(lines[:4])[:500]
