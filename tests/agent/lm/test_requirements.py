"""Requirement checks and the strategies that choose among candidates (agent.lm.requirements), without a model.

Every kind passes and fails on the texts it should; malformed requirements are refused naming what is wrong;
RE2 refuses what it cannot run in linear time and runs a classic catastrophic pattern in time that grows
linearly with the text; the strategies choose as documented, and a candidate failing a policy requirement is
never chosen.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import pytest

from agent.lm import requirements as checks
from agent.lm.requirements import Candidate, RequirementError


def requirement(raw: dict[str, Any], source: str = "request") -> checks.Requirement:
    return checks.parse(raw, source=source, where="requirements[0]", default_name="r")


@pytest.mark.parametrize(
    ("raw", "passes", "fails"),
    [
        ({"type": "regex", "pattern": "^(cards|loans)$"}, ["cards"], ["cards!", "fraud"]),
        ({"type": "regex", "pattern": "[0-9]{4}"}, ["pin 1234 ok"], ["pin 12 34"]),
        ({"type": "not_regex", "pattern": "[A-Z]{2}[0-9]{2}"}, ["no iban"], ["iban DE89"]),
        ({"type": "json"}, ['{"a": 1}', "[1, 2]", "3"], ["{a: 1}", "", "cards"]),
        ({"type": "json", "object": True}, ['{"a": 1}'], ["[1]", '"x"']),
        (
            {
                "type": "json_schema",
                "schema": {"type": "object", "required": ["q"], "properties": {"q": {"enum": ["a"]}}},
            },
            ['{"q": "a"}', ' {"q": "a", "x": 1} '],
            ['{"q": "b"}', "{}", "not json", '["q"]'],
        ),
        (
            {
                "type": "json_schema",
                "schema": {
                    "$defs": {"q": {"type": "integer"}},
                    "type": "object",
                    "properties": {"n": {"$ref": "#/$defs/q"}},
                },
            },
            ['{"n": 3}'],
            ['{"n": "3"}'],
        ),
        ({"type": "one_of", "values": ["cards", "loans"]}, ["cards", " loans\n"], ["Cards", "cards loans"]),
        ({"type": "one_of", "values": ["cards"], "ignore_case": True}, ["CARDS", "Cards "], ["card"]),
        ({"type": "contains", "terms": ["card", "blocked"]}, ["your card is blocked"], ["your card is fine"]),
        ({"type": "contains", "terms": ["CARD"], "ignore_case": True}, ["my card"], ["my loan"]),
        ({"type": "not_contains", "terms": ["guarantee", "risk-free"]}, ["no promise"], ["a risk-free loan"]),
        ({"type": "not_contains", "terms": ["guarantee"], "ignore_case": True}, ["maybe"], ["GUARANTEED"]),
        ({"type": "min_length", "value": 3}, ["abc", "abcd"], ["ab", ""]),
        ({"type": "max_length", "value": 3}, ["", "abc"], ["abcd"]),
    ],
)
def test_each_kind_of_requirement_passes_and_fails_the_texts_it_should(
    raw: dict[str, Any], passes: list[str], fails: list[str]
) -> None:
    check = requirement(raw)
    assert [check.check(t) for t in passes] == [True] * len(passes)
    assert [check.check(t) for t in fails] == [False] * len(fails)
    assert check.describe() == {"name": "r", "type": raw["type"], "source": "request"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"type": "glob", "pattern": "*"}, "type 'glob' is not one of"),
        ("regex", "must be an object with a type"),
        ({"type": "regex"}, "pattern must be a non-empty string"),
        ({"type": "regex", "pattern": "a", "flags": "i"}, "regex takes no flags"),
        ({"type": "regex", "pattern": "(a)\\1"}, "not valid RE2 syntax"),  # backreference
        ({"type": "regex", "pattern": "a(?=b)"}, "not valid RE2 syntax"),  # lookahead
        ({"type": "regex", "pattern": "(?<=a)b"}, "not valid RE2 syntax"),  # lookbehind
        ({"type": "regex", "pattern": "x" * 5000}, "longer than 4096"),
        ({"type": "json_schema", "schema": {"$ref": "https://example.com/s.json"}}, "remote $ref refused"),
        ({"type": "json_schema", "schema": {"items": {"$ref": "file:///etc/passwd"}}}, "remote $ref refused"),
        ({"type": "json_schema", "schema": {"$dynamicRef": "other.json#x"}}, "remote $ref refused"),
        ({"type": "json_schema", "schema": {"type": "no-such-type"}}, "not a valid JSON Schema"),
        ({"type": "json_schema", "schema": "object"}, "schema must be a JSON Schema object"),
        ({"type": "one_of", "values": []}, "values must be a non-empty list of strings"),
        ({"type": "contains", "terms": ["a", 1]}, "terms must be a non-empty list of strings"),
        ({"type": "contains", "terms": ["t"] * 300}, "more than 256"),
        ({"type": "min_length", "value": -1}, "non-negative integer"),
        ({"type": "max_length", "value": True}, "non-negative integer"),
        ({"type": "max_length", "value": 3, "name": ""}, "name must be a string of 1-100 characters"),
    ],
)
def test_a_malformed_requirement_is_refused_naming_what_is_wrong(raw: Any, message: str) -> None:
    with pytest.raises(RequirementError) as refused:
        requirement(raw)
    assert message in str(refused.value) and "requirements[0]" in str(refused.value)


def test_a_list_of_requirements_is_bounded_and_names_are_unique() -> None:
    assert checks.parse_list(None, source="request", param="requirements") == []
    with pytest.raises(RequirementError, match="more than 32"):
        checks.parse_list([{"type": "json"}] * 33, source="request", param="requirements")
    with pytest.raises(RequirementError, match="'x' is used twice"):
        checks.parse_list([{"type": "json", "name": "x"}] * 2, source="request", param="requirements")
    with pytest.raises(RequirementError, match="must be a list"):
        checks.parse_list({"type": "json"}, source="request", param="requirements")


def test_policy_requirements_are_named_in_the_bundle_and_marked_as_the_policys() -> None:
    defined = {"no_iban": {"type": "not_regex", "pattern": "[A-Z]{2}[0-9]{2}"}}
    [found] = checks.named(["no_iban"], defined)
    assert found.source == "policy" and found.name == "no_iban" and not found.check("DE89")
    with pytest.raises(RequirementError, match="does not define"):
        checks.named(["undefined"], defined)
    with pytest.raises(RequirementError, match="policy requirement 'bad'"):
        checks.named(["bad"], {"bad": {"type": "regex", "pattern": "(a)\\1"}})


def test_a_check_that_breaks_on_a_text_fails_that_text_only() -> None:
    broken = checks.Requirement("boom", "regex", "request", {}, lambda _t: 1 / 0 > 0)
    candidate = Candidate(0, "text", 1, 1, -1.0, "stop")
    checks.evaluate(candidate, [broken, requirement({"type": "min_length", "value": 1})])
    assert candidate.passed == {"boom": False, "r": True}


# -- RE2: linear time --------------------------------------------------------------------------------


def _seconds(search: Any, text: str) -> float:
    search(text)  # warm: RE2 builds its DFA states lazily
    best = float("inf")
    for _ in range(5):  # the least of five: the machine is shared, interference only adds time
        started = time.perf_counter()
        search(text)
        best = min(best, time.perf_counter() - started)
    return best


def _slope(sizes: list[int], times: list[float]) -> float:
    """The exponent k of time ~ size**k, fitted by least squares on the logarithms."""
    xs, ys = [math.log(n) for n in sizes], [math.log(t) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


@pytest.mark.parametrize(
    ("pattern", "char"), [("(a+)+b", "a"), ("(x+x+)+y", "x"), ("^(a|aa)*c$", "a"), ("(a|a)*b", "a")]
)
def test_a_catastrophic_backtracking_pattern_runs_in_linear_time(pattern: str, char: str) -> None:
    """Each pattern takes time exponential in the text's length in a backtracking engine (shown below
    with Python's `re`); as a requirement (RE2) its time grows linearly: a fitted exponent near 1 over
    texts from 100,000 to 1,600,000 characters, nowhere near 2 (quadratic)."""
    check = requirement({"type": "regex", "pattern": pattern})
    sizes = [100_000, 200_000, 400_000, 800_000, 1_600_000]
    times = [_seconds(check.check, char * n) for n in sizes]
    assert _slope(sizes, times) < 1.4, f"time grew faster than linearly: {dict(zip(sizes, times, strict=True))}"
    assert check.check(char * 40) is False  # what a backtracking engine would need years for


def test_the_same_pattern_is_exponential_in_a_backtracking_engine() -> None:
    """The contrast that makes the test above mean something: Python's `re` on `(a+)+b`, two more
    characters, about four times the time."""
    pattern = re.compile("(a+)+b")
    sizes = [12, 14, 16, 18]
    times = [_seconds(pattern.search, "a" * n) for n in sizes]
    assert times[-1] / times[0] > 8, times  # 2**6 = 64 in theory; linear would be 1.5


# -- strategies ----------------------------------------------------------------------------------------


def drawer(texts: list[str], logprobs: list[float] | None = None) -> tuple[Any, list[tuple[int, int]]]:
    """A draw function over fixed texts (what the engine would generate), recording each round."""
    rounds: list[tuple[int, int]] = []

    def draw(count: int, first: int) -> list[Candidate]:
        rounds.append((count, first))
        return [
            Candidate(i, texts[i], 100 + i, 3, (logprobs or [-1.0] * len(texts))[i], "stop")
            for i in range(first, first + count)
        ]

    return draw, rounds


QUEUE = {"name": "queue", "type": "one_of", "values": ["cards", "loans", "fraud"]}
SHORT = {"name": "short", "type": "max_length", "value": 5}


def test_first_draws_rounds_and_stops_at_the_first_passing_candidate() -> None:
    draw, rounds = drawer(["hello", "oops", "cards", "loans", "fraud", "x", "y", "z"])
    outcome = checks.sample(draw, [requirement(QUEUE)], strategy="first", budget=8, on_fail="error")
    assert rounds == [(4, 0)] and [c.index for c in outcome.chosen] == [2] and outcome.met
    report = outcome.report()
    assert report["drawn"] == 4 and report["chosen"] == [2] and report["candidates"][0]["failed"] == ["queue"]


def test_first_draws_another_round_when_none_passes_and_stops_at_the_budget() -> None:
    draw, rounds = drawer(["a", "b", "c", "cards", "e", "f"])
    outcome = checks.sample(draw, [requirement(QUEUE)], strategy="first", budget=6, on_fail="error")
    assert rounds == [(3, 0), (3, 3)] and [c.index for c in outcome.chosen] == [3]
    draw, rounds = drawer(["a"] * 5)
    outcome = checks.sample(draw, [requirement(QUEUE)], strategy="first", budget=5, on_fail="error")
    assert rounds == [(2, 0), (2, 2), (1, 4)] and outcome.chosen == [] and not outcome.met


def test_best_keeps_the_candidate_passing_most_checks_ties_by_log_probability() -> None:
    texts = ["cards are fine", "fraud", "loans", "nothing at all"]
    draw, rounds = drawer(texts, [-0.1, -2.0, -0.5, -0.01])
    reqs = [requirement(QUEUE), requirement({**SHORT, "name": "short"})]
    outcome = checks.sample(draw, reqs, strategy="best", budget=4, on_fail="error")
    assert rounds == [(4, 0)] and [c.index for c in outcome.chosen] == [2]  # both pass both; -0.5 > -2.0
    outcome = checks.sample(drawer(texts, [-0.1, -2.0, -0.5, -0.01])[0], reqs, strategy="best", budget=4,
                            on_fail="error", n=2)  # fmt: skip
    assert [c.index for c in outcome.chosen] == [2, 1]


def test_best_with_on_fail_best_returns_the_closest_candidate_marked_as_failing() -> None:
    draw, _ = drawer(["cards and more", "nope nope", "x"], [-0.2, -0.1, -3.0])
    reqs = [requirement(QUEUE), requirement(SHORT)]
    outcome = checks.sample(draw, reqs, strategy="best", budget=3, on_fail="best")
    assert [c.index for c in outcome.chosen] == [2] and not outcome.met  # "x" passes one check, the others none
    assert outcome.report()["requirements_met"] is False
    failing = checks.sample(drawer(["a", "b"])[0], reqs, strategy="best", budget=2, on_fail="error")
    assert failing.chosen == [] and failing.policy_met  # no policy requirement: only the caller's failed


def test_majority_keeps_the_most_frequent_passing_answer() -> None:
    draw, _ = drawer(["loans", " cards", "cards ", "fraud", "cards", "zzz"], [-0.1, -1.0, -0.9, -0.05, -2.0, 0.0])
    outcome = checks.sample(draw, [requirement(QUEUE)], strategy="majority", budget=6, on_fail="error")
    assert [c.index for c in outcome.chosen] == [2]  # three "cards"; the likeliest of them
    outcome = checks.sample(
        drawer(["loans", "cards", "cards", "fraud"], [-0.1, -1.0, -0.9, -0.05])[0],
        [requirement(QUEUE)],
        strategy="majority",
        budget=4,
        on_fail="error",
        n=3,
    )
    assert [c.index for c in outcome.chosen] == [2, 3, 0]  # then the other answers, likeliest first


def test_a_candidate_failing_a_policy_requirement_is_never_chosen() -> None:
    policy = checks.named(["no_iban"], {"no_iban": {"type": "not_regex", "pattern": "DE[0-9]{2}"}})
    reqs = [*policy, requirement(QUEUE)]
    draw, _ = drawer(["DE89 cards", "DE12", "hello"], [0.0, 0.0, -5.0])
    outcome = checks.sample(draw, reqs, strategy="best", budget=3, on_fail="best")
    assert [c.index for c in outcome.chosen] == [2] and outcome.policy_met and not outcome.met
    draw, _ = drawer(["DE89 cards", "DE12"])
    outcome = checks.sample(draw, reqs, strategy="best", budget=2, on_fail="best")
    assert outcome.chosen == [] and not outcome.policy_met
    assert outcome.report()["policy_requirements_met"] is False and outcome.report()["chosen"] == []


def test_n_choices_with_on_fail_error_needs_n_passing_candidates() -> None:
    draw, rounds = drawer(["cards", "x", "loans", "y", "fraud", "z"])
    outcome = checks.sample(draw, [requirement(QUEUE)], strategy="first", budget=6, on_fail="error", n=2)
    assert rounds == [(3, 0)] and [c.index for c in outcome.chosen] == [0, 2]
    draw, _ = drawer(["cards", "x", "y", "z"])
    outcome = checks.sample(draw, [requirement(QUEUE)], strategy="best", budget=4, on_fail="error", n=2)
    assert outcome.chosen == [] and not outcome.met
    draw, _ = drawer(["cards", "x", "y", "z"], [-1.0, -0.5, -0.2, -3.0])
    outcome = checks.sample(draw, [requirement(QUEUE)], strategy="best", budget=4, on_fail="best", n=2)
    assert [c.index for c in outcome.chosen] == [0, 2]  # the passing one, then the likeliest of the rest
    with pytest.raises(RequirementError, match="between 1 and the candidate budget"):
        checks.sample(draw, [], strategy="best", budget=2, on_fail="error", n=3)


def test_seeds_beyond_json_safe_integers_are_reported_as_text() -> None:
    candidate = Candidate(0, "x", 2**60, 1, float("-inf"), "length")
    report = candidate.report()
    assert report["seed"] == str(2**60) and report["mean_logprob"] is None
