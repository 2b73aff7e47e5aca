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
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from audit import Log
from sitewarden import approval
from tests.agent.lm import tiny
from tests.agent_harness import BANK_PACK, POLICY, AgentProcess, enroll_agent, push_policy, wait_for
from tests.controller_server import sitewarden, start_controller
from tests.tls import TestPKI

BASE, ADAPTER, EMBED = "tiny-chat", "tiny-router", "tiny-embed"
META = {"purpose": "service", "data_class": "internal"}
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
def world(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[dict[str, Any]]:
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
    )
    apps = {
        app: sitewarden("agent", "app-key", "create", app, "--data", str(agent.data)).stdout.strip() for app in APPS
    }
    world: dict[str, Any] = {
        "base": base,
        "controller": controller,
        "agent": agent,
        "operator": controller.token("operator", "bob"),
        "alice": controller.token("approver", "alice"),
        "key": keys / "alice.pem",
        "apps": apps,
    }
    try:
        base_dir = tiny.build_base(base / "models" / "chat")
        push(world, base_dir, BASE, "1.0.0", {**CARD, "task": "chat"}, kind="model")
        world["base_digest"] = digest(world, BASE, "1.0.0")
        ref = {"name": BASE, "version": "1.0.0", "digest": world["base_digest"]}
        v1 = base / "models" / "router-1"
        tiny.train_adapter(base_dir, v1, base_ref=ref, steps=4, seed=0)
        push(world, v1, ADAPTER, "1.0.0", adapter_card(v1), kind="adapter")
        embed = tiny.build_embedding(base / "models" / "embed", base_dir)
        push(world, embed, EMBED, "1.0.0", {**CARD, "task": "embeddings"}, kind="model")
        push_policy(
            controller,
            BANK_PACK,
            "1.0.0",
            operator=world["operator"],
            approver=world["alice"],
            approver_key=world["key"],
        )
        world["v1"] = digest(world, ADAPTER, "1.0.0")
        world["base_dir"] = base_dir
        agent.start()
        rollout(world, f"{BASE}@1.0.0", f"{ADAPTER}@1.0.0", f"{EMBED}@1.0.0")
        wait_for(lambda: serving(agent, ADAPTER) == world["v1"], what="the agent to serve the adapter")
        yield world
    finally:
        agent.stop()
        controller.stop()


def adapter_card(directory: Path) -> dict[str, Any]:
    card = json.loads(directory.with_name(directory.name + ".card.json").read_text())
    return {**card, **{k: v for k, v in CARD.items() if k != "evaluation"}, "intended_purposes": ["service"]}


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
    card_path = directory.with_name(f"{directory.name}.release-card.json")
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
    assert record["tokens"] == {"prompt": answer.usage.prompt_tokens, "completion": answer.usage.completion_tokens}
    assert len(record["prompt_digest"]) == 64 and len(record["output_digest"]) == 64
    assert record["trace_id"] is None or isinstance(record["trace_id"], str)
    assert "content" not in record and record["decision"]["allow"] is True


def test_the_base_alone_answers_too(world: dict[str, Any]) -> None:
    answer = chat(world, model=BASE)
    assert "adapter" not in answer.model_extra["sitewarden"]


def test_stream_sends_deltas_then_a_usage_chunk_and_done(world: dict[str, Any]) -> None:
    stream = client(world).chat.completions.create(
        model=ADAPTER,
        messages=[{"role": "user", "content": "a payment I never made"}],
        max_tokens=6,
        metadata=META,
        stream=True,
        stream_options={"include_usage": True},
        seed=3,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens > 0
    assert last.model_extra["sitewarden"]["audit_index"] >= 0
    same = chat(world, messages=[{"role": "user", "content": "a payment I never made"}], max_tokens=6, seed=3)
    assert text == same.choices[0].message.content  # streamed and whole, the same seeded tokens
    body = {
        "model": ADAPTER,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
        "metadata": META,
    }
    lines = [line for line in raw(world, body).text.splitlines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_n_draws_several_choices_and_a_seed_reproduces_them(world: dict[str, Any]) -> None:
    first = chat(world, n=3, seed=42, temperature=1.0, max_tokens=10)
    again = chat(world, n=3, seed=42, temperature=1.0, max_tokens=10)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # distinct seeds per choice
    assert chat(world, n=3, seed=43, temperature=1.0, max_tokens=10).choices[0].message.content != texts[0] or True


def test_response_format_json_schema_is_a_checked_requirement(world: dict[str, Any]) -> None:
    schema = {"type": "object", "required": ["queue"], "properties": {"queue": {"enum": ["cards", "loans"]}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "route", "schema": schema}}
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        chat(world, response_format=fmt, extra_body={"candidates": 3})
    body = caught.value.body if isinstance(caught.value.body, dict) else {}
    report = caught.value.response.json()["sitewarden"]["requirements"]
    assert caught.value.response.json()["error"]["code"] == "requirements_not_met" or body
    assert report["drawn"] >= 2 and all("response_format:route" in c["failed"] for c in report["candidates"])
    assert "choices" not in caught.value.response.json()
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
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{world['agent'].url}/v1", api_key="swa_bad_key", max_retries=0).models.list()
    response = raw(
        world, {"model": ADAPTER, "messages": [{"role": "user", "content": "x"}], "temperature": 9, "metadata": META}
    )
    error = response.json()["error"]
    assert response.status_code == 400 and set(error) == {"message", "type", "param", "code"}
    assert error["param"] == "temperature" and error["type"] == "invalid_request_error"
    assert response.json()["sitewarden"]["audit_index"] >= 0  # refusals are audited


def test_unknown_fields_are_ignored(world: dict[str, Any]) -> None:
    body = {"model": ADAPTER, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "metadata": META}
    assert raw(world, {**body, "some_future_field": {"a": 1}, "service_tier": "auto"}).status_code == 200


# --- requirement-checked sampling --------------------------------------------------------------------


def test_caller_requirements_are_reported_per_candidate(world: dict[str, Any]) -> None:
    checks = [
        {"name": "short", "type": "max_length", "value": 10_000},
        {"name": "not-empty", "type": "min_length", "value": 0},
        {"name": "no-iban", "type": "not_regex", "pattern": "[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){3}"},
    ]
    answer = chat(
        world, extra_body={"requirements": checks, "candidates": 3, "strategy": "best"}, seed=1, temperature=1.0
    )
    report = answer.model_extra["sitewarden"]["requirements"]
    assert report["requirements_met"] and report["strategy"] == "best" and report["drawn"] == 3
    assert [r["name"] for r in report["requirements"] if r["source"] == "request"] == ["short", "not-empty", "no-iban"]
    assert report["chosen"] in {c["index"] for c in report["candidates"]}
    assert len({c["seed"] for c in report["candidates"]}) == 3
    first = chat(world, extra_body={"requirements": checks[:1], "candidates": 4, "strategy": "first"}, seed=1)
    assert first.model_extra["sitewarden"]["requirements"]["drawn"] == 2  # the first round of two passed
    with pytest.raises(openai.UnprocessableEntityError) as failed:
        chat(world, extra_body={"requirements": [{"type": "one_of", "values": ["zzz-not-a-word"]}], "candidates": 2})
    assert "choices" not in failed.value.response.json()


def test_a_catastrophic_pattern_is_refused_or_linear(world: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        chat(world, extra_body={"requirements": [{"type": "regex", "pattern": "(a)\\1"}]})
    assert refused.value.param == "requirements"
    started = time.monotonic()
    chat(
        world,
        extra_body={"requirements": [{"type": "not_regex", "pattern": "(a+)+$"}], "candidates": 2, "on_fail": "best"},
    )
    assert time.monotonic() - started < 30


def test_the_bank_policy_adds_requirements_the_caller_cannot_remove(world: dict[str, Any]) -> None:
    answer = chat(world, extra_body={"requirements": []})
    report = answer.model_extra["sitewarden"]["requirements"]
    policy = {r["name"] for r in report["requirements"] if r["source"] == "policy"}
    assert policy == {"no_account_numbers", "no_guarantees"} and report["budget"] == 4


def test_no_candidate_meeting_a_policy_requirement_is_a_422_without_text_and_audited(world: dict[str, Any]) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        chat(world, "strict-app", extra_body={"on_fail": "best", "requirements": []})
    body = caught.value.response.json()
    assert "choices" not in body and "a policy requirement" in body["error"]["message"]
    report = body["sitewarden"]["requirements"]
    assert report["chosen"] is None and report["policy_requirements_met"] is False
    assert all("site_never" in c["failed"] for c in report["candidates"])
    record = entry(world["agent"], body["sitewarden"]["audit_index"])
    assert record["status"] == 422 and record["requirements"]["chosen"] is None and "output_digest" not in record


# --- obligations ------------------------------------------------------------------------------------------


def test_max_output_tokens_caps_generation(world: dict[str, Any]) -> None:
    answer = chat(world, "capped-app", max_tokens=50, temperature=1.0, seed=5)
    assert answer.usage.completion_tokens <= 4
    assert answer.model_extra["sitewarden"]["max_tokens_capped"] == {"asked": 50, "allowed": 4}


def test_redaction_applies_to_generated_text(world: dict[str, Any]) -> None:
    answer = chat(world, "redact-app", max_tokens=8, temperature=1.0, seed=11)
    text = answer.choices[0].message.content
    assert set(text.split()) <= {"[REDACTED]"}
    assert answer.model_extra["sitewarden"].get("redactions", 0) == len(text.split())


def test_rate_limit_answers_429(world: dict[str, Any]) -> None:
    statuses = []
    for _ in range(4):
        try:
            chat(world, "limited-app", max_tokens=1)
            statuses.append(200)
        except openai.RateLimitError as exc:
            statuses.append(429)
            assert exc.response.headers["retry-after"]
    assert statuses[:2] == [200, 200] and 429 in statuses[2:]


def test_n_over_the_bank_limit_is_denied(world: dict[str, Any]) -> None:
    with pytest.raises(openai.PermissionDeniedError) as denied:
        chat(world, n=9)
    assert "the bank allows at most 8" in json.dumps(denied.value.response.json()["sitewarden"]["reasons"])


# --- adapters: refusals and the hot swap -------------------------------------------------------------------


def test_adapters_that_do_not_fit_are_refused_audited_and_serving_goes_on(world: dict[str, Any]) -> None:
    base, agent = world["base"], world["agent"]
    ref = {"name": BASE, "version": "1.0.0", "digest": world["base_digest"]}
    other_base = tiny.build_base(base / "models" / "other", seed=3, layers=1)
    wrong = base / "models" / "wrong-digest"
    tiny.train_adapter(world["base_dir"], wrong, base_ref={**ref, "digest": "0" * 64}, steps=1)
    push(world, wrong, "bad-digest", "1.0.0", adapter_card(wrong), kind="adapter")
    unapproved = base / "models" / "unapproved"
    tiny.train_adapter(world["base_dir"], unapproved, base_ref=ref, steps=1)
    push(world, unapproved, "unapproved", "1.0.0", adapter_card(unapproved), kind="adapter", approve=False)
    foreign = base / "models" / "foreign"
    tiny.train_adapter(other_base, foreign, base_ref={"name": "other", "version": "1.0.0", "digest": "1" * 64}, steps=1)
    push(world, foreign, "other-base", "1.0.0", adapter_card(foreign), kind="adapter")
    liar = base / "models" / "liar"  # another base's weights, its card naming the active base
    tiny.train_adapter(other_base, liar, base_ref=ref, steps=1)
    (liar / "adapter_config.json").write_text(
        json.dumps(
            {**json.loads((liar / "adapter_config.json").read_text()), "target_modules": ["q_proj", "v_proj", "w_gate"]}
        )
    )
    push(world, liar, "liar", "1.0.0", adapter_card(liar), kind="adapter")
    current = f"{ADAPTER}@{'1.0.0' if serving(agent, ADAPTER) == world['v1'] else '1.1.0'}"
    bad = ["bad-digest@1.0.0", "unapproved@1.0.0", "other-base@1.0.0", "liar@1.0.0"]
    rollout(world, f"{BASE}@1.0.0", current, f"{EMBED}@1.0.0", *bad)

    def refused() -> dict[str, str] | None:
        artifacts = agent.status()["artifacts"]
        states = {b: artifacts.get(b, {}) for b in bad}
        return (
            {b: s["reason"] for b, s in states.items()}
            if all(s.get("state") == "refused" for s in states.values())
            else None
        )

    reasons = wait_for(refused, what="the four adapters to be refused")
    assert "not the active base" in reasons["bad-digest@1.0.0"]
    assert "no approval" in reasons["unapproved@1.0.0"]
    assert "not the active base" in reasons["other-base@1.0.0"]
    assert "does not attach" in reasons["liar@1.0.0"] or "match no module" in reasons["liar@1.0.0"]
    with Log.open(agent.data / "audit", readonly=True) as log:
        refusals = [json.loads(e) for e in log.iter_entries() if b'"release.refused"' in e]
    assert {r["release"] for r in refusals} >= set(bad)
    assert chat(world).model_extra["sitewarden"]["adapter"]["name"] == ADAPTER  # serving goes on
    assert set(agent.status()["lm"]["adapters"]) == {ADAPTER}


def test_hot_swap_under_eight_clients_fails_no_request(world: dict[str, Any]) -> None:
    agent = world["agent"]
    v2 = world["base"] / "models" / "router-2"
    ref = {"name": BASE, "version": "1.0.0", "digest": world["base_digest"]}
    tiny.train_adapter(world["base_dir"], v2, base_ref=ref, steps=2, seed=1)
    push(world, v2, ADAPTER, "1.1.0", adapter_card(v2), kind="adapter")
    new = digest(world, ADAPTER, "1.1.0")
    seen: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def client_loop() -> None:
        api = client(world, "swap-app")
        while not stop.is_set():
            try:
                answer = chat_with(api)
                seen.append(answer.model_extra["sitewarden"]["adapter"]["digest"])
            except Exception as exc:
                failures.append(f"{exc.__class__.__name__}: {exc}")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(8):
            pool.submit(client_loop)
        wait_for(lambda: len(seen) >= 16, what="requests to flow")
        rollout(world, f"{BASE}@1.0.0", f"{ADAPTER}@1.1.0", f"{EMBED}@1.0.0")
        wait_for(lambda: serving(agent, ADAPTER) == new, what="the new adapter version to serve")
        mark = len(seen)
        wait_for(lambda: len(seen) >= mark + 16, what="requests on the new version")
        stop.set()
    assert failures == []
    assert set(seen) <= {world["v1"], new} and seen[-1] == new
    assert world["v1"] in seen  # requests flowed on the old version before the swap
    wait_for(
        lambda: (
            f"d{world['v1']}" not in agent.status()["lm"]["attached"]
            and world["v1"] not in agent.status()["lm"]["attached"]
        ),
        what="the old version to be dropped",
    )


def chat_with(api: openai.OpenAI) -> Any:
    return api.chat.completions.create(
        model=ADAPTER, messages=[{"role": "user", "content": "loan"}], max_tokens=4, metadata=META, temperature=0
    )
