"""The policy engine: bundles, compiled decisions that fail closed, site-local tightening, obligations."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

from agent.config import SiteConfig
from agent.daemon import load_local_policy
from agent.errors import ConfigError, InferenceError
from agent.guard import NO_BUNDLE, PolicyGuard
from agent.obligations import REDACTED, RateLimiter, after, before
from policies import Bundle, BundleError, CompiledPolicy, Decision, Obligations
from policies.check import check
from policies.decision import MalformedDecision
from tests.agent_harness import BANK_PACK
from tests.conftest import run_cli

HEADER = "package sitewarden.inference\nimport rego.v1\n"


def bundle(modules: dict[str, str], data: dict[str, Any] | None = None, revision: str = "r1") -> Bundle:
    files = {name: text.encode() for name, text in modules.items()}
    files[".manifest"] = json.dumps({"revision": revision, "roots": ["sitewarden"]}).encode()
    if data is not None:
        files["data.json"] = json.dumps(data).encode()
    return Bundle.from_files(files, source="test bundle")


def decision_module(decision: str, package: str = "sitewarden.inference") -> str:
    return f"package {package}\nimport rego.v1\ndecision := {decision}\n"


ALLOW = '{"allow": true, "reasons": ["ok"], "obligations": {}}'


# -- bundles ------------------------------------------------------------------------------


def test_a_bundle_reads_the_same_from_a_directory_and_from_its_tarball(tmp_path: Path) -> None:
    (tmp_path / "b" / "sub").mkdir(parents=True)
    (tmp_path / "b" / ".manifest").write_text('{"revision": "7", "roots": ["sitewarden"]}')
    (tmp_path / "b" / "sub" / "inference.rego").write_text(decision_module(ALLOW))
    (tmp_path / "b" / "data.json").write_text('{"sitewarden": {"limits": {"max_batch": 3}}}')
    (tmp_path / "b" / "README.md").write_text("left out")
    from_dir = Bundle.load(tmp_path / "b")
    raw = from_dir.tarball()
    assert raw == from_dir.tarball(), "the tarball is deterministic"
    from_tar = Bundle.from_tarball(raw)
    assert from_tar == from_dir and from_tar.digest == from_dir.digest
    assert from_dir.revision == "7" and from_dir.data == {"sitewarden": {"limits": {"max_batch": 3}}}
    assert [m.path for m in from_dir.modules] == ["sub/inference.rego"]


def _tar(members: list[tarfile.TarInfo], contents: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info in members:
            tar.addfile(info, io.BytesIO(contents.get(info.name, b"")))
    return buffer.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        ({"p.rego": "package elsewhere\nx := 1\n"}, "outside the bundle's roots"),
        ({"p.rego": "x := 1\n"}, "has no package declaration"),
        ({".manifest": "{not json", "p.rego": decision_module(ALLOW)}, ".manifest is not valid JSON"),
        ({"p.rego": decision_module(ALLOW), "data.json": '{"other": 1}'}, "data key other is outside"),
        ({"p_test.rego": "package sitewarden.t\ntest_x := true\n"}, "holds no policy module"),
    ],
)
def test_a_malformed_bundle_is_refused_naming_the_problem(files: dict[str, str], problem: str) -> None:
    raw = {k: v.encode() for k, v in files.items()}
    raw.setdefault(".manifest", b'{"revision": "1", "roots": ["sitewarden"]}')
    with pytest.raises(BundleError, match=problem.replace(".", r"\.")):
        Bundle.from_files(raw, source="b")


def test_a_tarball_with_links_escapes_or_strangers_is_refused() -> None:
    link = tarfile.TarInfo("sitewarden/x.rego")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(BundleError, match="not a regular file"):
        Bundle.from_tarball(_tar([link], {}))
    info, data = _file("../evil.rego", b"package sitewarden.x\n")
    with pytest.raises(BundleError, match="leaves the bundle"):
        Bundle.from_tarball(_tar([info], {info.name: data}))
    info, data = _file("run.sh", b"#!/bin/sh\n")
    with pytest.raises(BundleError, match=r"unexpected file 'run\.sh'"):
        Bundle.from_tarball(_tar([info], {info.name: data}))
    with pytest.raises(BundleError, match=r"not a gzipped tarball|not a readable tarball"):
        Bundle.from_tarball(b"\x1f\x8bnot gzip at all")


def test_a_bundle_that_does_not_compile_is_refused_naming_the_file() -> None:
    broken = bundle({"sitewarden/inference.rego": HEADER + "decision := {\n"})
    with pytest.raises(BundleError, match=r"inference\.rego"):
        CompiledPolicy(broken)


# -- decisions fail closed -------------------------------------------------------------------


def test_a_decision_is_compiled_once_and_answers_each_input() -> None:
    policy = CompiledPolicy(
        bundle(
            {
                "i.rego": HEADER + "decision := decide(input)\n"
                'decide(inp) := {"allow": inp.purpose == "fraud", "reasons": [inp.purpose], '
                '"obligations": {"max_batch": data.sitewarden.limits.max_batch}}\n'
            },
            {"sitewarden": {"limits": {"max_batch": 5}}},
        )
    )
    assert policy.points == ("inference",)
    yes = policy.decide("inference", {"purpose": "fraud"})
    no = policy.decide("inference", {"purpose": "marketing"})
    assert yes == Decision(True, ("fraud",), Obligations(max_batch=5))
    assert not no.allow and no.reasons == ("marketing",)


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        ('{"allow": 1 / input.zero == 1, "reasons": [], "obligations": {}}', "evaluating sitewarden/inference failed"),
        ('{"allow": true, "reasons": []} if input.never', "decision is undefined"),
        ('{"allow": "yes", "reasons": [], "obligations": {}}', "allow must be true or false"),
        ('{"allow": true, "reasons": [], "obligations": {"max_btach": 3}}', "unknown obligation(s) max_btach"),
        ('{"allow": true, "reasons": [], "obligations": {"max_batch": 0}}', "max_batch must be a positive integer"),
        ('{"allow": true, "reasons": "ok", "obligations": {}}', "reasons must be a list of strings"),
        ('{"allow": true, "reasons": []}', "the decision lacks obligations"),
        (
            '{"allow": true, "reasons": [], "obligations": {"redact": {"patterns": ["(unclosed"]}}}',
            "is not a valid regular expression",
        ),
    ],
)
def test_errors_undefined_and_malformed_decisions_are_denies_saying_what_failed(rule: str, reason: str) -> None:
    policy = CompiledPolicy(bundle({"i.rego": HEADER + f"decision := {rule}\n"}))
    decision = policy.decide("inference", {"zero": 0})
    assert not decision.allow
    assert reason in decision.reasons[0]


def test_a_point_the_bundle_does_not_answer_and_a_missing_bundle_are_denies() -> None:
    policy = CompiledPolicy(bundle({"i.rego": decision_module(ALLOW)}))
    assert "defines no decision for sitewarden/federation" in policy.decide("federation", {}).reasons[0]
    guard = PolicyGuard(None)
    for decision in (guard.inference({}), guard.accept({}), guard.federation({})):
        assert decision == Decision.deny(NO_BUNDLE)


def test_rego_unit_tests_run_and_report_failures_and_the_with_limitation() -> None:
    tests = (
        "package sitewarden.inference_test\nimport rego.v1\nimport data.sitewarden.inference\n"
        'test_fraud if { inference.decide({"purpose": "fraud"}).allow }\n'
        'test_wrong if { inference.decide({"purpose": "marketing"}).allow }\n'
    )
    with_tests = (
        "package sitewarden.with_test\nimport rego.v1\n"
        'test_with if { data.sitewarden.inference.decision.allow with input as {"purpose": "fraud"} }\n'
    )
    policy = HEADER + 'decision := decide(input)\ndecide(inp) := {"allow": inp.purpose == "fraud", "reasons": [], '
    policy += '"obligations": {}}\n'
    results = CompiledPolicy(bundle({"i.rego": policy, "i_test.rego": tests, "w_test.rego": with_tests})).run_tests()
    outcome = {r.rule: (r.passed, r.detail) for r in results}
    assert outcome["test_fraud"] == (True, "")
    assert outcome["test_wrong"][0] is False and "undefined" in outcome["test_wrong"][1]
    assert outcome["test_with"][0] is False and "decision as a function of its input" in outcome["test_with"][1]


# -- site-local tightening -------------------------------------------------------------------


def _guard(central: str, local: str | None) -> PolicyGuard:
    c = CompiledPolicy(bundle({"i.rego": HEADER + central}), label="central")
    lo = CompiledPolicy(bundle({"l.rego": HEADER + local}), label="local") if local else None
    return PolicyGuard(c, lo, central_release={"name": "bank", "version": "1.0.0"})


def test_a_local_module_cannot_loosen_a_central_deny() -> None:
    central = (
        'decision := {"allow": false, "reasons": ["marketing never sees restricted data"], "obligations": {}} '
        'if input.purpose == "marketing"\n'
        'else := {"allow": true, "reasons": ["ok"], "obligations": {}}\n'
    )
    local = 'default allow := true\ndecision := {"allow": true, "reasons": ["the site allows everything"], '
    local += '"obligations": {}}\n'
    guard = _guard(central, local)
    denied = guard.inference({"purpose": "marketing"})
    assert not denied.allow
    assert denied.reasons == ("marketing never sees restricted data", "site: the site allows everything")
    assert guard.inference({"purpose": "fraud"}).allow
    assert guard.policy["central"]["name"] == "bank" and guard.policy["local"]["digest"]


def test_a_local_deny_wins_and_obligations_merge_to_the_stricter() -> None:
    central = (
        'decision := {"allow": true, "reasons": ["central ok"], "obligations": {"max_batch": 50, "rate_limit": 100, '
        '"redact": {"patterns": ["A"]}, "sampling": {"n": 8, "requirements": ["x"]}}}\n'
    )
    local = (
        'decision := {"allow": input.purpose != "kyc", "reasons": ["site rule"], "obligations": {"max_batch": 80, '
        '"rate_limit": 10, "redact": {"patterns": ["B"], "outputs": ["score"]}, "human_review": true, '
        '"log_content": true, "sampling": {"n": 4, "requirements": ["y"]}}}\n'
    )
    guard = _guard(central, local)
    merged = guard.inference({"purpose": "fraud"})
    assert merged.allow
    assert merged.obligations.to_json() == {
        "redact": {"outputs": ["score"], "patterns": ["A", "B"]},
        "max_batch": 50,
        "rate_limit": 10,
        "log_content": True,
        "human_review": True,
        "sampling": {"n": 4, "requirements": ["x", "y"]},
    }
    refused = guard.inference({"purpose": "kyc"})
    assert not refused.allow and "site: site rule" in refused.reasons


def test_a_local_policy_without_a_rule_for_a_point_leaves_it_to_the_central_bundle() -> None:
    central = 'decision := {"allow": true, "reasons": ["central"], "obligations": {}}\n'
    local = CompiledPolicy(bundle({"l.rego": decision_module(ALLOW, "sitewarden.federation")}))
    guard = PolicyGuard(CompiledPolicy(bundle({"i.rego": HEADER + central})), local)
    assert guard.inference({}).reasons == ("central",)


def test_inference_decisions_are_memoised_per_guard() -> None:
    guard = _guard('decision := {"allow": true, "reasons": [input.purpose], "obligations": {}}\n', None)
    first = guard.inference({"purpose": "fraud"}, key=("k",))
    assert guard.inference({"purpose": "other"}, key=("k",)) is first
    assert guard.inference({"purpose": "other"}, key=("j",)).reasons == ("other",)


# -- obligations ----------------------------------------------------------------------------


def test_obligations_parse_strictly() -> None:
    with pytest.raises(MalformedDecision, match="redact must be an object"):
        Obligations.parse({"redact": ["iban"]})
    with pytest.raises(MalformedDecision, match="human_review must be true or false"):
        Obligations.parse({"human_review": "yes"})
    with pytest.raises(MalformedDecision, match="sampling must be an object"):
        Obligations.parse({"sampling": {"k": 1}})


def test_rate_limits_are_per_app_per_minute() -> None:
    now = [0.0]
    limiter = RateLimiter(lambda: now[0])
    assert [limiter.take("a", 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a", 3) == pytest.approx(20.0)
    assert limiter.take("b", 3) == 0.0, "another app has its own budget"
    now[0] = 20.0
    assert limiter.take("a", 3) == 0.0
    duties = Obligations(rate_limit=1, max_batch=2)
    before(duties, app="c", batch=2, limiter=limiter)
    with pytest.raises(InferenceError) as caught:
        before(duties, app="c", batch=1, limiter=limiter)
    assert caught.value.status == 429 and caught.value.headers["Retry-After"] == "60"
    with pytest.raises(InferenceError) as caught:
        before(duties, app="d", batch=3, limiter=limiter)
    assert caught.value.status == 403 and "max_batch" in caught.value.reasons[0]


def test_redaction_and_token_limits_apply_to_text_outputs() -> None:
    duties = Obligations.parse(
        {"redact": {"outputs": ["score"], "patterns": [r"\bDE\d{20}\b", r"\b\d{10}\b"]}, "max_output_tokens": 4}
    )
    outputs = [
        {"name": "reply", "datatype": "BYTES", "shape": [2], "data": ["pay DE89370400440532013000 now", "a b c d e f"]},
        {"name": "score", "datatype": "FP32", "shape": [1], "data": [0.3]},
        {"name": "account", "datatype": "BYTES", "shape": [1], "data": ["acct 1234567890"]},
    ]
    parameters: dict[str, Any] = {}
    kept = after(duties, outputs, parameters)
    assert [o["name"] for o in kept] == ["reply", "account"]
    assert kept[0]["data"] == [f"pay {REDACTED} now", "a b c d"]
    assert kept[1]["data"] == [f"acct {REDACTED}"]
    assert parameters == {"redacted_outputs": "score", "redactions": 2, "truncated_outputs": 1}


def test_a_bundle_that_crashes_the_rego_engine_is_refused_not_fatal(tmp_path: Path) -> None:
    crashing = Path(__file__).parent.parent / "vectors" / "rego_crash"
    with pytest.raises(BundleError, match=r"the Rego engine \(rego-cpp\) crashed on this bundle \(SIG"):
        check(crashing, label="draft")
    good = tmp_path / "good"
    good.mkdir()
    (good / "i.rego").write_text(decision_module(ALLOW))
    (good / "i_test.rego").write_text("package sitewarden.i_test\nimport rego.v1\ntest_ok if { 1 == 1 }\n")
    result = check(good)
    assert result.points == ("inference",) and [t.rule for t in result.tests] == ["test_ok"] and not result.failed


# -- the bank pack and the policy CLI ---------------------------------------------------------------


def test_the_bank_packs_rego_tests_pass() -> None:
    result = check(BANK_PACK, label="bank pack")
    assert result.points == ("inference", "accept", "federation")
    assert len(result.tests) >= 80, "the pack's unit tests ran"
    assert not result.failed, [(t.rule, t.detail) for t in result.failed]


def test_policy_build_and_test_on_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "bank.tar.gz"
    built = run_cli("policy", "build", str(BANK_PACK), "--out", str(out), "--revision", "ci-1")
    assert built.returncode == 0, built.stderr
    assert Bundle.load(out).revision == "ci-1"
    again = tmp_path / "again.tar.gz"
    assert run_cli("policy", "build", str(BANK_PACK), "--out", str(again), "--revision", "ci-1").returncode == 0
    assert again.read_bytes() == out.read_bytes(), "building is deterministic"
    tested = run_cli("policy", "test", str(out))
    assert tested.returncode == 0 and b"passed" in tested.stdout
    failing = tmp_path / "failing"
    shutil.copytree(BANK_PACK, failing)
    (failing / "zz_test.rego").write_text("package sitewarden.zz_test\nimport rego.v1\ntest_never if { 1 == 2 }\n")
    tested = run_cli("policy", "test", str(failing))
    assert tested.returncode == 1 and b"test_never" in tested.stdout
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "i.rego").write_text(HEADER + "decision := {\n")
    built = run_cli("policy", "build", str(broken), "--out", str(tmp_path / "broken.tar.gz"))
    assert built.returncode == 2 and b"i.rego" in built.stderr
    assert not (tmp_path / "broken.tar.gz").exists(), "a bundle that does not compile leaves no file"


def test_a_local_policy_that_fails_its_tests_or_does_not_compile_stops_the_agent_from_starting(tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    (local / "l.rego").write_text(decision_module(ALLOW))
    config = SiteConfig(local_policy=local)
    assert load_local_policy(config) is not None
    (local / "l_test.rego").write_text("package sitewarden.l_test\nimport rego.v1\ntest_bad if { 1 == 2 }\n")
    with pytest.raises(ConfigError, match=r"policy\.local: 1 of the local policy's Rego tests fail: .*test_bad"):
        load_local_policy(config)
    (local / "l_test.rego").unlink()
    (local / "l.rego").write_text(HEADER + "decision := {\n")
    with pytest.raises(ConfigError, match=r"policy\.local: .*l\.rego"):
        load_local_policy(config)
    assert load_local_policy(SiteConfig()) is None
