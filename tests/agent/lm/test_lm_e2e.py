"""The language-model runtime end to end: a controller, an agent process, tiny models built here, the real
openai client.

One world for the module: a tiny Llama base, LoRA adapters trained for a few steps, a tiny embedding model,
all pushed, approved by alice and rolled out with the bank policy pack; the site adds its own policy
(per app: a token cap, a redaction, a rate limit, an unsatisfiable policy requirement). The tests talk to
the agent over HTTP as an application would, and read its audit log as an auditor would.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from audit import Log
from policies import Bundle
from policies.bundle import BUNDLE_FILE
from sitewarden import approval
from tests.agent.lm.conftest import TinyModels
from tests.agent_harness import BANK_PACK, POLICY, AgentProcess, app_bindings, enroll_agent, wait_for
from tests.controller_server import sitewarden, start_controller
from tests.tls import TestPKI

BASE, ADAPTER, EMBED = "tiny-chat", "tiny-router", "tiny-embed"
META = {"purpose": "service", "data_class": "internal"}  # the bank's service purpose: checked sampling
PLAIN = {"purpose": "fraud", "data_class": "internal"}  # no sampling obligation: plain decoding (base only)
CARD = {
    "owner": "customer-service-analytics",
    "intended_purposes": ["service", "fraud"],
    "data_classes": ["public", "internal", "confidential"],
    "risk_tier": "low",
    "evaluation": {"accuracy": 0.0},
    "evaluation_thresholds": {"accuracy": 0.0},
    "licence": "Apache-2.0",
}
LOCAL_POLICY = """package sitewarden.inference
import rego.v1

# The site's own rules, per app: a token cap, a redaction of every word, a rate limit, and a sampling
# requirement no text can meet. Everything else: no further obligation.
decision := decide(input)

decide(inp) := {"allow": true, "reasons": ["site: capped"], "obligations": {"max_output_tokens": 4}} if {
    inp.caller.app == "capped-app"
} else := {"allow": true, "reasons": ["site: redacted"], "obligations": {"redact": {"patterns": [`\\S+`]}}} if {
    inp.caller.app == "redact-app"
} else := {"allow": true, "reasons": ["site: limited"], "obligations": {"rate_limit": 2}} if {
    inp.caller.app == "limited-app"
} else := {"allow": true, "reasons": ["site: strict"], "obligations": {"sampling": {"requirements": [
    "site_never",
]}}} if {
    inp.caller.app == "strict-app"
} else := {"allow": true, "reasons": ["site: no further obligation"], "obligations": {}}
"""
LOCAL_DATA = {"sitewarden": {"requirements": {"site_never": {"type": "regex", "pattern": "^NEVER$"}}}}
APPS = ("capped-app", "redact-app", "limited-app", "strict-app", "swap-app")


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, pki: TestPKI, request: pytest.FixtureRequest
) -> Iterator[dict[str, Any]]:
    """The controller, the agent and the releases. What can overlap does (the agent's start, the policy
    push with its Rego tests, building the tiny models and pushing them): most of it is waiting."""
    base = tmp_path_factory.mktemp("lm-e2e")
    controller = start_controller(base, pki)
    keys = base / "approvers"
    approval.generate_approver_key(keys / "alice.pem", keys / "alice.pub.pem")
    added = sitewarden(
        "approver", "add", "alice", "--public-key", str(keys / "alice.pub.pem"), env=controller.cli_env()
    )
    assert added.returncode == 0, added.stderr
    local = base / "site-policy"
    local.mkdir()
    (local / "local.rego").write_text(LOCAL_POLICY)
    (local / "data.json").write_text(json.dumps(LOCAL_DATA))
    agent = enroll_agent(
        controller,
        base,
        "branch-lm",
        {"region": "eu-west"},
        {"alice": keys / "alice.pub.pem"},
        extra_config=f'[policy]\nlocal = "{local}"\n\n[lm]\nmax_batch = 16\nbatch_window_ms = 20\n',
        apps=app_bindings(("fraud-app", *APPS)),
    )
    world: dict[str, Any] = {
        "base": base,
        "controller": controller,
        "agent": agent,
        "operator": controller.token("operator", "bob"),
        "alice": controller.token("approver", "alice"),
        "key": keys / "alice.pem",
    }
    pool = concurrent.futures.ThreadPoolExecutor(3)
    try:
        started = pool.submit(agent.start)
        policy = pool.submit(push_bank_pack, world)
        keys_made = pool.submit(
            lambda: {
                app: sitewarden("agent", "app-key", "create", app, "--data", str(agent.data)).stdout.strip()
                for app in APPS
            }
        )
        tiny_models: TinyModels = request.getfixturevalue("tiny_models")
        world["models"] = tiny_models
        push(world, tiny_models.base, BASE, "1.0.0", {**CARD, "task": "chat"}, kind="model")
        world["base_digest"] = digest(world, BASE, "1.0.0")
        world["base_ref"] = {"name": BASE, "version": "1.0.0", "digest": world["base_digest"]}
        push(world, tiny_models.router_v1, ADAPTER, "1.0.0", adapter_card(world, tiny_models.router_v1), kind="adapter")
        push(world, tiny_models.embedding, EMBED, "1.0.0", {**CARD, "task": "embeddings"}, kind="model")
        world["v1"] = digest(world, ADAPTER, "1.0.0")
        world["apps"] = keys_made.result()
        policy.result()
        started.result()
        rollout(world, f"{BASE}@1.0.0", f"{ADAPTER}@1.0.0", f"{EMBED}@1.0.0")
        wait_for(lambda: serving(agent, ADAPTER) == world["v1"], what="the agent to serve the adapter", timeout=400)
        yield world
    finally:
        pool.shutdown(wait=True)
        agent.stop()
        controller.stop()


def push_bank_pack(world: dict[str, Any]) -> None:
    """The bank pack as a policy release, pushed as `sitewarden policy push` does but without running its Rego
    tests again (tests/policies runs them; under load they take a minute), and approved by alice."""
    directory = world["base"] / "bank-pack"
    directory.mkdir()
    (directory / BUNDLE_FILE).write_bytes(Bundle.load(BANK_PACK).tarball())
    card = world["base"] / "bank-pack.card.json"
    card.write_text(json.dumps({"owner": "compliance", "description": "the bank policy pack"}))
    args = ["release", "push", str(directory), "--name", POLICY, "--version", "1.0.0", "--kind", "policy"]
    env = world["controller"].cli_env(world["operator"])
    assert (done := sitewarden(*args, "--runtime", "rego", "--metadata", str(card), env=env)).returncode == 0, (
        done.stderr
    )
    args = ["release", "approve", POLICY, "1.0.0", "--key", str(world["key"])]
    assert (done := sitewarden(*args, env=world["controller"].cli_env(world["alice"]))).returncode == 0, done.stderr


def adapter_card(world: dict[str, Any], directory: Path, base_ref: dict[str, str] | None = None) -> dict[str, Any]:
    """The release card of an adapter: what training wrote beside it, the owner's facts, and its base."""
    written = directory.with_name(directory.name + ".card.json")
    card = json.loads(written.read_text()) if written.exists() else {}
    card.update({k: v for k, v in CARD.items() if k != "evaluation"})
    card.setdefault("evaluation", CARD["evaluation"])  # an untrained adapter: the bank's accept asks for one
    card.update({"intended_purposes": ["service"], "base": base_ref or world["base_ref"]})
    return card


def push(
    world: dict[str, Any],
    directory: Path,
    name: str,
    version: str,
    card: dict[str, Any],
    *,
    kind: str,
    approve: bool = True,
) -> None:
    card_path = world["base"] / f"{name}-{version}.card.json"
    card_path.write_text(json.dumps(card))
    env = world["controller"].cli_env(world["operator"])
    args = ["release", "push", str(directory), "--name", name, "--version", version, "--kind", kind]
    args += ["--runtime", "transformers", "--metadata", str(card_path)]
    assert (done := sitewarden(*args, env=env)).returncode == 0, done.stderr
    if approve:
        args = ["release", "approve", name, version, "--key", str(world["key"])]
        assert (done := sitewarden(*args, env=world["controller"].cli_env(world["alice"]))).returncode == 0, done.stderr


def digest(world: dict[str, Any], name: str, version: str) -> str:
    with world["controller"].http(world["operator"]) as http:
        return http.get(f"/api/v1/releases/{name}/{version}").json()["manifest_sha256"]


def rollout(world: dict[str, Any], *releases: str) -> None:
    args = [
        "rollout",
        "create",
        f"lm-{uuid.uuid4().hex[:8]}",
        "--policy",
        f"{POLICY}@1.0.0",
        "--selector",
        "region=eu-west",
    ]
    for release in releases:
        args += ["--release", release]
    done = sitewarden(*args, env=world["controller"].cli_env(world["operator"]))
    assert done.returncode == 0, done.stderr


def serving(agent: AgentProcess, name: str) -> str | None:
    adapter = (agent.status().get("lm") or {}).get("adapters", {}).get(name)
    return adapter["manifest_sha256"] if adapter else None


def pushed(world: dict[str, Any], *args: str) -> Any:
    return sitewarden("release", "push", *args, env=world["controller"].cli_env(world["operator"]))


def client(world: dict[str, Any], app: str | None = None) -> openai.OpenAI:
    key = world["apps"][app] if app else world["agent"].app_key
    return openai.OpenAI(base_url=f"{world['agent'].url}/v1", api_key=key, max_retries=0, timeout=60)


def chat(world: dict[str, Any], app: str | None = None, **extra: Any) -> Any:
    params: dict[str, Any] = {
        "model": ADAPTER,
        "messages": [{"role": "user", "content": "My card was stolen in Leeds"}],
        "max_tokens": 8,
        "metadata": META,
    }
    params.update(extra)
    return client(world, app).chat.completions.create(**params)


def entry(agent: AgentProcess, index: int) -> dict[str, Any]:
    with Log.open(agent.data / "audit", readonly=True) as log:
        return json.loads(log.entry(index))


def raw(world: dict[str, Any], body: dict[str, Any], app: str | None = None) -> httpx.Response:
    key = world["apps"][app] if app else world["agent"].app_key
    return httpx.post(
        f"{world['agent'].url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


# --- the API through the openai client ---------------------------------------------------------------


def test_models_lists_the_base_its_adapter_with_parent_and_the_embedding_model(world: dict[str, Any]) -> None:
    models = {m.id: m for m in client(world).models.list().data}
    assert set(models) >= {BASE, ADAPTER, EMBED}
    assert models[ADAPTER].model_extra["parent"] == BASE
    assert models[BASE].model_extra["sitewarden"]["digest"] == world["base_digest"]
    assert client(world).models.retrieve(EMBED).model_extra["sitewarden"]["task"] == "embeddings"


def test_chat_answers_with_usage_and_names_the_digests_it_ran_on_in_its_audit_entry(world: dict[str, Any]) -> None:
    answer = chat(world, temperature=0)
    assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
    assert (
        answer.usage.prompt_tokens > 0
        and answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    )
    facts = answer.model_extra["sitewarden"]
    assert facts["base"]["digest"] == world["base_digest"]
    assert facts["adapter"]["digest"] == serving(world["agent"], ADAPTER)
    record = entry(world["agent"], facts["audit_index"])
    assert record["model"]["adapter"]["digest"] == facts["adapter"]["digest"]
    assert record["model"]["base"]["digest"] == world["base_digest"]
    assert record["sampling"]["temperature"] == 0 and record["seeds"]
    assert record["requirements"]["candidates"]  # the bank's service purpose checks every answer
    assert record["requirements"]["drawn"] == 1  # greedy: more candidates would all be the same text
    assert record["tokens"]["prompt"] == answer.usage.prompt_tokens
    assert record["tokens"]["completion"] == answer.usage.completion_tokens  # the returned choice's
    drawn = sum(c["tokens"] for c in record["requirements"]["candidates"])
    assert record["tokens"]["drawn"] == drawn >= answer.usage.completion_tokens  # and every candidate's
    assert len(record["prompt_digest"]) == 64 and len(record["output_digest"]) == 64
    assert record["trace_id"] is None or isinstance(record["trace_id"], str)
    assert "content" not in record and record["decision"]["allow"] is True


def test_the_base_alone_answers_too(world: dict[str, Any]) -> None:
    answer = chat(world, model=BASE, metadata=PLAIN)
    assert "adapter" not in answer.model_extra["sitewarden"] and "requirements" not in answer.model_extra["sitewarden"]


def test_stream_sends_token_deltas_then_a_usage_chunk_and_done(world: dict[str, Any]) -> None:
    question = [{"role": "user", "content": "a payment I never made"}]
    stream = client(world).chat.completions.create(
        model=BASE,
        messages=question,
        max_tokens=6,
        metadata=PLAIN,
        stream=True,
        stream_options={"include_usage": True},
        seed=3,
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens > 0
    assert len(deltas) > 1  # token by token, not one replayed chunk
    index = last.model_extra["sitewarden"]["audit_index"]
    assert entry(world["agent"], index)["status"] == 200
    same = chat(world, model=BASE, messages=question, max_tokens=6, seed=3, metadata=PLAIN)
    assert "".join(deltas) == same.choices[0].message.content  # streamed and whole, the same seeded tokens
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    lines = [line for line in raw(world, {**body, "metadata": PLAIN}).text.splitlines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_a_checked_answer_streams_once_checked_and_audited(world: dict[str, Any]) -> None:
    chunks = list(
        client(world).chat.completions.create(
            model=ADAPTER, messages=[{"role": "user", "content": "loan"}], max_tokens=6, metadata=META, stream=True
        )
    )
    facts = chunks[-1].model_extra["sitewarden"]
    assert facts["requirements"]["requirements_met"] and entry(world["agent"], facts["audit_index"])["status"] == 200
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    chosen = facts["requirements"]["chosen"][0]
    assert chosen in {c["index"] for c in facts["requirements"]["candidates"]} and isinstance(text, str)


def test_n_draws_several_choices_and_a_seed_reproduces_them(world: dict[str, Any]) -> None:
    first = chat(world, model=BASE, metadata=PLAIN, n=3, seed=42, temperature=1.0, max_tokens=10)
    again = chat(world, model=BASE, metadata=PLAIN, n=3, seed=42, temperature=1.0, max_tokens=10)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # distinct seeds per choice
    assert entry(world["agent"], first.model_extra["sitewarden"]["audit_index"])["seeds"] == [42, 43, 44]


def test_n_with_checked_sampling_returns_n_checked_choices(world: dict[str, Any]) -> None:
    answer = chat(world, n=3, seed=7, temperature=1.0, extra_body={"strategy": "best"})
    report = answer.model_extra["sitewarden"]["requirements"]
    assert len(answer.choices) == 3 and report["n"] == 3 and len(report["chosen"]) == 3
    assert report["strategy"] == "first"  # the bank's service obligation decides the strategy, not the caller
    assert report["budget"] == 4 and report["drawn"] >= 3
    passed = {c["index"]: c["failed"] for c in report["candidates"]}
    assert all(passed[i] == [] for i in report["chosen"])
    texts = [c.message.content for c in answer.choices]
    by_index = {c["index"]: c for c in report["candidates"]}
    assert [by_index[i]["seed"] for i in report["chosen"]] == [7 + i for i in report["chosen"]]
    assert len(texts) == 3


def test_response_format_json_schema_is_a_checked_requirement(world: dict[str, Any]) -> None:
    schema = {"type": "object", "required": ["queue"], "properties": {"queue": {"enum": ["cards", "loans"]}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "route", "schema": schema}}
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        chat(world, response_format=fmt, extra_body={"candidates": 3})
    body = caught.value.response.json()
    report = body["sitewarden"]["requirements"]
    assert body["error"]["code"] == "requirements_not_met" and "choices" not in body
    assert report["drawn"] >= 3 and all("response_format:route" in c["failed"] for c in report["candidates"])
    marked = chat(world, response_format=fmt, extra_body={"candidates": 2, "on_fail": "best", "strategy": "best"})
    assert marked.model_extra["sitewarden"]["requirements"]["requirements_met"] is False
    remote = {"type": "json_schema", "json_schema": {"name": "r", "schema": {"$ref": "https://example.com/s.json"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        chat(world, response_format=remote)
    assert "remote $ref refused" in refused.value.message


def test_embeddings_in_float_and_base64(world: dict[str, Any]) -> None:
    api = client(world)
    floats = api.embeddings.create(
        model=EMBED, input=["my card", "a loan"], encoding_format="float", extra_body={"metadata": META}
    )
    assert len(floats.data) == 2 and len(floats.data[0].embedding) == 32
    packed = api.embeddings.create(model=EMBED, input="my card", extra_body={"metadata": META})  # base64 by default
    assert np.allclose(packed.data[0].embedding, floats.data[0].embedding, atol=1e-6)
    wire = httpx.post(
        f"{world['agent'].url}/v1/embeddings",
        json={"model": EMBED, "input": "my card", "encoding_format": "base64", "metadata": META},
        headers={"Authorization": f"Bearer {world['agent'].app_key}"},
    ).json()
    vector = np.frombuffer(base64.b64decode(wire["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vector, floats.data[0].embedding, atol=1e-6) and floats.usage.prompt_tokens > 0
    record = entry(world["agent"], wire["sitewarden"]["audit_index"])
    assert record["api"] == "openai.embeddings" and record["model"]["embedding"]["name"] == EMBED


def test_errors_come_in_openai_shape_with_the_right_status(world: dict[str, Any]) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        chat(world, model="no-such-model")
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(openai.BadRequestError) as unsupported:
        chat(world, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert unsupported.value.param == "tools" and "not supported" in unsupported.value.message
    with pytest.raises(openai.BadRequestError) as no_purpose:
        chat(world, metadata={})
    assert no_purpose.value.param == "metadata.purpose"
    with pytest.raises(openai.BadRequestError) as embedding:
        chat(world, model=EMBED)
    assert "use /v1/embeddings" in embedding.value.message
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{world['agent'].url}/v1", api_key="swa_bad_key", max_retries=0).models.list()
    response = raw(
        world, {"model": ADAPTER, "messages": [{"role": "user", "content": "x"}], "temperature": 9, "metadata": META}
    )
    error = response.json()["error"]
    assert response.status_code == 400 and set(error) == {"message", "type", "param", "code"}
    assert error["param"] == "temperature" and error["type"] == "invalid_request_error"
    assert entry(world["agent"], response.json()["sitewarden"]["audit_index"])["status"] == 400  # refusals audited
    malformed = httpx.post(
        f"{world['agent'].url}/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {world['agent'].app_key}"},
    )
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]["message"]


def test_unknown_fields_are_ignored(world: dict[str, Any]) -> None:
    body = {"model": BASE, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "metadata": PLAIN}
    assert raw(world, {**body, "some_future_field": {"a": 1}, "service_tier": "auto"}).status_code == 200


# --- requirement-checked sampling --------------------------------------------------------------------


def test_caller_requirements_are_reported_per_candidate(world: dict[str, Any]) -> None:
    checks = [
        {"name": "short", "type": "max_length", "value": 10_000},
        {"name": "not-empty", "type": "min_length", "value": 0},
        {"name": "no-iban", "type": "not_regex", "pattern": "[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){3}"},
    ]
    answer = chat(
        world,
        model=BASE,
        metadata=PLAIN,
        extra_body={"requirements": checks, "candidates": 3, "strategy": "best"},
        seed=1,
        temperature=1.0,
    )
    report = answer.model_extra["sitewarden"]["requirements"]
    assert report["requirements_met"] and report["strategy"] == "best" and report["drawn"] == 3
    assert [r["name"] for r in report["requirements"]] == ["short", "not-empty", "no-iban"]
    assert report["chosen"][0] in {c["index"] for c in report["candidates"]}
    assert len({c["seed"] for c in report["candidates"]}) == 3
    first = chat(world, model=BASE, metadata=PLAIN, extra_body={"requirements": checks[:1], "candidates": 4}, seed=1)
    assert first.model_extra["sitewarden"]["requirements"]["drawn"] == 2  # the first round of two passed
    with pytest.raises(openai.UnprocessableEntityError) as failed:
        chat(world, extra_body={"requirements": [{"type": "one_of", "values": ["zzz-not-a-word"]}], "candidates": 2})
    body = failed.value.response.json()
    assert "choices" not in body and "the request's requirements" in body["error"]["message"]
    assert entry(world["agent"], body["sitewarden"]["audit_index"])["status"] == 422


def test_a_pattern_re2_cannot_run_in_linear_time_is_refused_when_the_request_arrives(world: dict[str, Any]) -> None:
    for pattern in ("(a)\\1", "(?=a)a", "(?<!a)b"):
        with pytest.raises(openai.BadRequestError) as refused:
            chat(world, extra_body={"requirements": [{"type": "regex", "pattern": pattern}]})
        assert refused.value.param == "requirements" and "not valid RE2 syntax" in refused.value.message


def test_the_bank_policy_adds_requirements_the_caller_cannot_remove(world: dict[str, Any]) -> None:
    answer = chat(world, extra_body={"requirements": [], "candidates": 1, "strategy": "majority"})
    report = answer.model_extra["sitewarden"]["requirements"]
    policy = {r["name"] for r in report["requirements"] if r["source"] == "policy"}
    assert policy == {"no_account_numbers", "no_guarantees"}
    assert report["budget"] == 4 and report["strategy"] == "first"  # the policy's floor and strategy hold


def test_no_candidate_meeting_a_policy_requirement_is_a_422_without_text_and_audited(world: dict[str, Any]) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        chat(world, "strict-app", extra_body={"on_fail": "best", "requirements": []})
    body = caught.value.response.json()
    assert "choices" not in body and "a policy requirement" in body["error"]["message"]
    report = body["sitewarden"]["requirements"]
    assert report["chosen"] == [] and report["policy_requirements_met"] is False
    assert all("site_never" in c["failed"] for c in report["candidates"])
    record = entry(world["agent"], body["sitewarden"]["audit_index"])
    assert record["status"] == 422 and record["requirements"]["chosen"] == [] and "output_digest" not in record


# --- obligations ------------------------------------------------------------------------------------------


def test_max_output_tokens_caps_generation(world: dict[str, Any]) -> None:
    answer = chat(world, "capped-app", max_tokens=50, temperature=1.0, seed=5)
    assert answer.usage.completion_tokens <= 4
    assert answer.model_extra["sitewarden"]["max_tokens_capped"] == {"asked": 50, "allowed": 4}
    record = entry(world["agent"], answer.model_extra["sitewarden"]["audit_index"])
    assert record["sampling"]["max_tokens"] == 4 and record["max_tokens_capped"]["asked"] == 50


def test_redaction_applies_to_generated_text_whole_and_streamed(world: dict[str, Any]) -> None:
    answer = chat(world, "redact-app", max_tokens=8, temperature=1.0, seed=11)
    text = answer.choices[0].message.content
    assert text and set(text.split()) <= {"[REDACTED]"}
    assert answer.model_extra["sitewarden"].get("redactions", 0) == len(text.split())
    stream = client(world, "redact-app").chat.completions.create(
        model=ADAPTER, messages=[{"role": "user", "content": "loan"}], max_tokens=8, metadata=META, stream=True, seed=2
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed and set(streamed.split()) <= {"[REDACTED]"}  # no raw token ever left before redaction


def test_rate_limit_answers_429(world: dict[str, Any]) -> None:
    statuses = []
    for _ in range(4):
        try:
            chat(world, "limited-app", max_tokens=1)
            statuses.append(200)
        except openai.RateLimitError as exc:
            statuses.append(429)
            assert exc.response.headers["retry-after"]
            assert entry(world["agent"], exc.response.json()["sitewarden"]["audit_index"])["status"] == 429
    assert statuses[:2] == [200, 200] and 429 in statuses[2:]


def test_n_over_the_bank_limit_is_denied(world: dict[str, Any]) -> None:
    with pytest.raises(openai.PermissionDeniedError) as denied:
        chat(world, model=BASE, metadata=PLAIN, n=9)
    assert "the bank allows at most 8" in json.dumps(denied.value.response.json()["sitewarden"]["reasons"])
    with pytest.raises(openai.PermissionDeniedError):  # candidates count as what the request draws
        chat(world, extra_body={"candidates": 12})


# --- adapters: refusals and the hot swap -------------------------------------------------------------------


def test_the_registry_refuses_an_adapter_whose_base_digest_is_not_its_base(world: dict[str, Any]) -> None:
    models: TinyModels = world["models"]
    card = world["base"] / "wrong-digest.card.json"
    card.write_text(json.dumps(adapter_card(world, models.router_v1, {**world["base_ref"], "digest": "0" * 64})))
    done = pushed(world, str(models.router_v1), "--name", "wrong", "--version", "1.0.0", "--kind", "adapter",
                  "--runtime", "transformers", "--metadata", str(card))  # fmt: skip
    assert done.returncode != 0 and "manifest digest 000000000000" in " ".join(done.stderr.split())
    card.write_text(json.dumps(adapter_card(world, models.router_v1, {**world["base_ref"], "version": "9.9.9"})))
    done = pushed(world, str(models.router_v1), "--name", "wrong", "--version", "1.0.0", "--kind", "adapter",
                  "--runtime", "transformers", "--metadata", str(card))  # fmt: skip
    assert done.returncode != 0 and "not a release of this registry" in " ".join(done.stderr.split())


def test_adapters_that_do_not_fit_are_refused_audited_and_serving_goes_on(world: dict[str, Any]) -> None:
    models: TinyModels = world["models"]
    agent = world["agent"]
    push(world, models.router_v1, "unapproved", "1.0.0", adapter_card(world, models.router_v1), kind="adapter",
         approve=False)  # fmt: skip
    push(world, models.other_base, "other", "1.0.0", {**CARD, "task": "chat"}, kind="model")
    other_ref = {"name": "other", "version": "1.0.0", "digest": digest(world, "other", "1.0.0")}
    foreign = adapter_card(world, models.other_adapter, other_ref)
    push(world, models.other_adapter, "other-base", "1.0.0", foreign, kind="adapter")
    # another base's adapter whose card names the active base: its weights do not fit the base's modules
    push(world, models.other_adapter, "liar", "1.0.0", adapter_card(world, models.other_adapter), kind="adapter")
    current = f"{ADAPTER}@{'1.0.0' if serving(agent, ADAPTER) == world['v1'] else '1.1.0'}"
    bad = ["unapproved@1.0.0", "other-base@1.0.0", "liar@1.0.0"]
    rollout(world, f"{BASE}@1.0.0", current, f"{EMBED}@1.0.0", *bad)

    def refused() -> dict[str, str] | None:
        artifacts = agent.status()["artifacts"]
        states = {b: artifacts.get(b, {}) for b in bad}
        return (
            {b: s["reason"] for b, s in states.items()}
            if all(s.get("state") == "refused" for s in states.values())
            else None
        )

    reasons = wait_for(refused, what="the three adapters to be refused", timeout=300)
    assert "no approval" in reasons["unapproved@1.0.0"] or "approv" in reasons["unapproved@1.0.0"]
    assert "not the active base" in reasons["other-base@1.0.0"]
    assert "does not attach" in reasons["liar@1.0.0"] or "fit no module" in reasons["liar@1.0.0"]
    with Log.open(agent.data / "audit", readonly=True) as log:
        refusals = [json.loads(e) for e in log.iter_entries() if b'"release.refused"' in e]
    assert {r["release"] for r in refusals} >= set(bad)
    assert chat(world).model_extra["sitewarden"]["adapter"]["name"] == ADAPTER  # serving goes on
    assert set(agent.status()["lm"]["adapters"]) == {ADAPTER}
    assert len(agent.status()["lm"]["attached"]) == 1  # nothing of the refused adapters stayed attached


def test_hot_swap_under_eight_clients_fails_no_request(world: dict[str, Any]) -> None:
    models: TinyModels = world["models"]
    agent = world["agent"]
    push(world, models.router_v2, ADAPTER, "1.1.0", adapter_card(world, models.router_v2), kind="adapter")
    new = digest(world, ADAPTER, "1.1.0")
    seen: dict[int, list[str]] = {i: [] for i in range(8)}
    failures: list[str] = []
    stop = threading.Event()

    def client_loop(number: int) -> None:
        api = client(world, "swap-app")
        while not stop.is_set():
            try:
                seen[number].append(chat_with(api).model_extra["sitewarden"]["adapter"]["digest"])
            except Exception as exc:
                failures.append(f"{exc.__class__.__name__}: {exc}")

    def answers() -> int:
        return sum(len(v) for v in seen.values())

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        running = [pool.submit(client_loop, i) for i in range(8)]
        try:
            wait_for(lambda: answers() >= 16, what="requests to flow")
            rollout(world, f"{BASE}@1.0.0", f"{ADAPTER}@1.1.0", f"{EMBED}@1.0.0")
            wait_for(lambda: serving(agent, ADAPTER) == new, what="the new adapter version to serve", timeout=300)
            mark = answers()
            wait_for(lambda: answers() >= mark + 16, what="requests on the new version")
        finally:
            stop.set()
        for future in running:
            future.result()
    assert failures == []
    everything = [d for v in seen.values() for d in v]
    assert set(everything) == {world["v1"], new}  # requests flowed on both versions
    for digests in seen.values():  # each client moved from the old version to the new one, never back
        assert digests == sorted(digests, key=lambda d: d == new)
    wait_for(lambda: agent.status()["lm"]["attached"] == [new], what="the old version to be dropped")
    with Log.open(agent.data / "audit", readonly=True) as log:
        detached = [json.loads(e) for e in log.iter_entries() if b'"lm.detached"' in e]
    assert any(d["release"]["digest"] == world["v1"] for d in detached)


def chat_with(api: openai.OpenAI) -> Any:
    return api.chat.completions.create(
        model=ADAPTER, messages=[{"role": "user", "content": "loan"}], max_tokens=4, metadata=META, temperature=0
    )
