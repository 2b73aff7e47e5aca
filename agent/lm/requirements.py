"""Requirement-checked sampling: programmatic checks on generated text, and the choice among candidates.

A requirement is one named check of a candidate's text (the caller's `requirements`, a
`response_format`, or a name the policy's `sampling` obligation gives and its bundle's data
defines under `sitewarden.requirements`):

| type | passes when |
|---|---|
| `regex` / `not_regex` | the RE2 `pattern` is found / not found in the text (search; anchor with `^…$`) |
| `json` | the text is one JSON value (`response_format: json_object` asks for an object) |
| `json_schema` | the text is JSON valid against `schema` (Draft 2020-12 unless `$schema` says otherwise; |
|  | a `$ref` that is not local to the schema is refused) |
| `one_of` | the stripped text equals one of `values` |
| `contains` / `not_contains` | every / none of `terms` occurs in the text |
| `min_length` / `max_length` | the text has at least / at most `value` characters |

`contains`, `not_contains` and `one_of` take `ignore_case`. Regexes are RE2 (google-re2): matching
is linear in the text, so no pattern can take exponential time, and RE2 refuses what it cannot
do in linear time (backreferences, lookaround) when the request arrives.

Strategies (`sample`) choose the request's `n` answers (one, usually) among the candidates:
`first` draws rounds of half the budget (at least `n`) and stops once `n` candidates pass every
check; `best` draws the whole budget in one batch and keeps the candidates that pass the most
checks (ties: the higher mean log-probability); `majority` draws the budget and keeps the most
frequent passing answers. A candidate that fails a policy requirement is never chosen; when none
passes them, no text is returned. The caller's own requirements are handled as `on_fail` says:
`error`, or `best` (the best candidates, marked as failing in the report).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import re2
import referencing
import referencing.exceptions

from agent.lm.errors import LMError

TYPES = ("regex", "not_regex", "json", "json_schema", "one_of", "contains", "not_contains", "min_length", "max_length")
STRATEGIES = ("first", "best", "majority")
ON_FAIL = ("error", "best")
MAX_PATTERN = 4096
MAX_TERMS = 256
RE2_MAX_MEM = 8 << 20


class RequirementError(LMError, ValueError):
    """A requirement is malformed (unknown type, bad pattern, remote $ref, ...); the message names it."""


@dataclass(frozen=True)
class Requirement:
    """One check; `source` is `request`, `response_format` or `policy` (which the caller cannot remove)."""

    name: str
    type: str
    source: str
    spec: dict[str, Any]
    check: Callable[[str], bool] = field(repr=False, compare=False)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "source": self.source}


def _re2(pattern: Any, where: str) -> Any:
    if not isinstance(pattern, str) or not pattern:
        raise RequirementError(f"{where}: pattern must be a non-empty string")
    if len(pattern) > MAX_PATTERN:
        raise RequirementError(f"{where}: pattern is longer than {MAX_PATTERN} characters")
    options = re2.Options()
    options.max_mem = RE2_MAX_MEM
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise RequirementError(f"{where}: pattern is not valid RE2 syntax: {detail}") from None


def _strings(value: Any, key: str, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise RequirementError(f"{where}: {key} must be a non-empty list of strings")
    if len(value) > MAX_TERMS:
        raise RequirementError(f"{where}: {key} holds more than {MAX_TERMS} strings")
    return value


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RequirementError(f"{where}: value must be a non-negative integer")
    return value


def _local_refs_only(schema: Any, where: str) -> None:
    """Refuse a schema that refers outside itself: resolving it would fetch or read something."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("$ref", "$dynamicRef", "$recursiveRef") and not (
                    isinstance(value, str) and value.startswith("#")
                ):
                    raise RequirementError(f"{where}: {key} {value!r} is not local to the schema: remote $ref refused")
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)


def _no_retrieval(uri: str) -> referencing.Resource[Any]:
    raise referencing.exceptions.NoSuchResource(ref=uri)


def _json_value(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text)
    except ValueError:
        return False, None


def _schema_check(schema: Any, where: str) -> Callable[[str], bool]:
    if not isinstance(schema, dict | bool):
        raise RequirementError(f"{where}: schema must be a JSON Schema object")
    _local_refs_only(schema, where)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise RequirementError(f"{where}: schema is not a valid JSON Schema: {exc.message}") from None
    validator = cls(schema, registry=referencing.Registry(retrieve=_no_retrieval))

    def check(text: str) -> bool:
        ok, value = _json_value(text)
        if not ok:
            return False
        try:
            return validator.is_valid(value)
        except (referencing.exceptions.Unresolvable, jsonschema.exceptions.SchemaError, RecursionError):
            return False

    return check


def parse(raw: Any, *, source: str, where: str, default_name: str) -> Requirement:
    """One requirement from its JSON form; RequirementError names `where` and what is wrong."""
    if not isinstance(raw, dict):
        raise RequirementError(f"{where} must be an object with a type")
    kind = raw.get("type")
    if kind not in TYPES:
        raise RequirementError(f"{where}: type {kind!r} is not one of {', '.join(TYPES)}")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name or len(name) > 100:
        raise RequirementError(f"{where}: name must be a string of 1-100 characters")
    allowed = {"name", "type", "description"} | {
        "regex": {"pattern"},
        "not_regex": {"pattern"},
        "json": {"object"},
        "json_schema": {"schema"},
        "one_of": {"values", "ignore_case"},
        "contains": {"terms", "ignore_case"},
        "not_contains": {"terms", "ignore_case"},
        "min_length": {"value"},
        "max_length": {"value"},
    }[kind]
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise RequirementError(f"{where}: {kind} takes no {', '.join(unknown)}")
    fold = bool(raw.get("ignore_case", False))
    check: Callable[[str], bool]
    if kind in ("regex", "not_regex"):
        pattern = _re2(raw.get("pattern"), where)
        found = kind == "regex"
        check = lambda text: (pattern.search(text) is not None) is found  # noqa: E731
    elif kind == "json":
        want_object = bool(raw.get("object", False))

        def check(text: str) -> bool:
            ok, value = _json_value(text)
            return ok and (not want_object or isinstance(value, dict))

    elif kind == "json_schema":
        check = _schema_check(raw.get("schema"), where)
    elif kind == "one_of":
        values = {v.strip().casefold() if fold else v.strip() for v in _strings(raw.get("values"), "values", where)}
        check = lambda text: (text.strip().casefold() if fold else text.strip()) in values  # noqa: E731
    elif kind in ("contains", "not_contains"):
        terms = [t.casefold() if fold else t for t in _strings(raw.get("terms"), "terms", where)]
        every = kind == "contains"

        def check(text: str) -> bool:
            haystack = text.casefold() if fold else text
            return all(t in haystack for t in terms) if every else not any(t in haystack for t in terms)

    else:
        limit = _count(raw.get("value"), where)
        check = (lambda text: len(text) >= limit) if kind == "min_length" else (lambda text: len(text) <= limit)
    spec = {k: v for k, v in raw.items() if k != "name"}
    return Requirement(name, kind, source, spec, check)


def parse_list(raw: Any, *, source: str, param: str) -> list[Requirement]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RequirementError(f"{param} must be a list of requirements")
    if len(raw) > 32:
        raise RequirementError(f"{param} holds more than 32 requirements")
    found = [
        parse(item, source=source, where=f"{param}[{i}]", default_name=f"{param}[{i}]") for i, item in enumerate(raw)
    ]
    names = Counter(r.name for r in found)
    repeated = [n for n, c in names.items() if c > 1]
    if repeated:
        raise RequirementError(f"{param}: requirement name {repeated[0]!r} is used twice")
    return found


def named(names: Sequence[str], definitions: dict[str, Any]) -> list[Requirement]:
    """The policy's named requirements, from the bundle's `sitewarden.requirements`; a name the bundle does
    not define (or defines badly) is a RequirementError: the policy is misconfigured and nothing is served."""
    out = []
    for name in names:
        if name not in definitions:
            raise RequirementError(f"the policy names requirement {name!r}, which its bundle's data does not define")
        out.append(parse(definitions[name], source="policy", where=f"policy requirement {name!r}", default_name=name))
        out[-1] = Requirement(name, out[-1].type, "policy", out[-1].spec, out[-1].check)
    return out


# -- candidates and the choice ----------------------------------------------------------------------


@dataclass
class Candidate:
    """One generated answer: its text, how it was drawn, and which checks it passed."""

    index: int
    text: str
    seed: int | None
    tokens: int
    mean_logprob: float
    finish_reason: str
    passed: dict[str, bool] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "seed": self.seed if self.seed is None or abs(self.seed) < 2**53 else str(self.seed),
            "passed": sorted(n for n, ok in self.passed.items() if ok),
            "failed": sorted(n for n, ok in self.passed.items() if not ok),
            "tokens": self.tokens,
            "mean_logprob": round(self.mean_logprob, 4) if math.isfinite(self.mean_logprob) else None,
            "finish_reason": self.finish_reason,
        }


@dataclass
class Outcome:
    """The result of checked sampling: the chosen candidates, one per choice (none when nothing may be
    returned)."""

    chosen: list[Candidate]
    candidates: list[Candidate]
    requirements: list[Requirement]
    strategy: str
    budget: int
    wanted: int  # choices asked for (the request's n)
    policy_met: bool  # some candidate passes every policy requirement
    met: bool  # every chosen candidate passes every requirement, and there are `wanted` of them

    def report(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "budget": self.budget,
            "drawn": len(self.candidates),
            "n": self.wanted,
            "chosen": [c.index for c in self.chosen],
            "requirements_met": self.met,
            "policy_requirements_met": self.policy_met,
            "requirements": [r.describe() for r in self.requirements],
            "candidates": [c.report() for c in self.candidates],
        }


def evaluate(candidate: Candidate, requirements: Sequence[Requirement]) -> None:
    for requirement in requirements:
        try:
            candidate.passed[requirement.name] = bool(requirement.check(candidate.text))
        except Exception:  # a check that breaks on a text fails that text, never the request
            candidate.passed[requirement.name] = False


def _score(candidate: Candidate) -> tuple[int, float]:
    logprob = candidate.mean_logprob if math.isfinite(candidate.mean_logprob) else -math.inf
    return sum(candidate.passed.values()), logprob


def rank(passing: list[Candidate], strategy: str) -> list[Candidate]:
    """Passing candidates in the order the strategy prefers them.

    `first`: as drawn. `best`: by checks passed, then mean log-probability. `majority`: the best of
    each group of equal answers (stripped text), the largest group first (ties: the group's best
    log-probability), then the other members of the groups in the same order.
    """
    if strategy == "first":
        return list(passing)
    if strategy == "best":
        return sorted(passing, key=_score, reverse=True)
    groups: dict[str, list[Candidate]] = {}
    for candidate in passing:
        groups.setdefault(candidate.text.strip(), []).append(candidate)
    ordered = sorted(
        (sorted(g, key=_score, reverse=True) for g in groups.values()),
        key=lambda g: (len(g), _score(g[0])[1]),
        reverse=True,
    )
    return [g[0] for g in ordered] + [c for g in ordered for c in g[1:]]


def sample(
    draw: Callable[[int, int], list[Candidate]],
    requirements: Sequence[Requirement],
    *,
    strategy: str,
    budget: int,
    on_fail: str,
    n: int = 1,
) -> Outcome:
    """Draw up to `budget` candidates with `draw(count, first_index)` and choose `n` as the strategy says.

    `first` draws rounds of half the budget (at least `n`) and stops once `n` candidates pass every
    check; `best` and `majority` draw the whole budget in one batch. A candidate that fails a policy
    requirement is never chosen. When fewer than `n` pass everything: with `on_fail` `error` none is
    chosen; with `best` the best of the rest that pass the policy's requirements fill the choices
    (there may then be fewer than `n`: text that fails a policy requirement never leaves).
    """
    if not 1 <= n <= budget:
        raise RequirementError(f"n ({n}) must be between 1 and the candidate budget ({budget})")
    policy = [r.name for r in requirements if r.source == "policy"]
    everything = [r.name for r in requirements]
    candidates: list[Candidate] = []
    round_size = max(n, budget // 2) if strategy == "first" else budget
    while len(candidates) < budget:
        batch = draw(min(round_size, budget - len(candidates)), len(candidates))
        for candidate in batch:
            evaluate(candidate, requirements)
        candidates.extend(batch)
        if not batch:
            break
        if strategy == "first" and sum(all(c.passed[r] for r in everything) for c in candidates) >= n:
            break
    eligible = [c for c in candidates if all(c.passed[r] for r in policy)]
    passing = [c for c in eligible if all(c.passed[r] for r in everything)]
    chosen = rank(passing, strategy)[:n]
    if len(chosen) < n:
        if on_fail == "best":
            taken = {c.index for c in chosen}
            rest = sorted((c for c in eligible if c.index not in taken), key=_score, reverse=True)
            chosen += rest[: n - len(chosen)]
        else:
            chosen = []
    return Outcome(
        chosen=chosen,
        candidates=candidates,
        requirements=list(requirements),
        strategy=strategy,
        budget=budget,
        wanted=n,
        policy_met=bool(eligible),
        met=len(passing) >= n,
    )
