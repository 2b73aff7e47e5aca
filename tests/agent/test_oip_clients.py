"""The clients people already use, against a live agent: Triton's `tritonclient.http` and KServe's
`InferenceRESTClient`, unmodified, with JSON and binary tensor data both ways, compressed bodies, and the errors
parsed by the clients themselves. Then the attacker's side of the same surface: a compressed body that inflates
past the limit, corrupt or unsupported encodings, binary data that does not add up, a purpose stated twice, keys
missing, unknown and revoked; each refused with the OIP error object, audited, and serving goes on.

One world for the module (a controller over TLS, the bank policy pack and a small fraud scorer pushed, approved
and rolled out, one agent on loopback), its tests in order on one worker.
"""

from __future__ import annotations

import asyncio
import gzip
import hmac
import json
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from tritonclient.utils import InferenceServerException

from agent.identity import DataDir
from agent.onnx_model import OnnxModel
from audit import Log
from audit.entry import canonical
from sitewarden import __version__, approval
from sitewarden.fraud_model import build_release, sample_features
from tests.agent_harness import BANK_PACK, POLICY, AgentProcess, app_bindings, enroll_agent, push_policy, wait_for
from tests.controller_server import sitewarden, start_controller
from tests.tls import TestPKI

MODEL = "fraud-scorer"
VERSION = "1.0.0"
LABELS = {"region": "eu-west"}
MAX_BODY = 256 << 10  # the site's body limit in this world: small, so that a zip bomb is cheap to build
ROWS = sample_features(3, seed=5)
TERMS = {"purpose": "fraud", "data_class": "confidential"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("oip-clients")
    controller = start_controller(base, pki)
    agent: AgentProcess | None = None
    try:
        keys = base / "approvers"
        approval.generate_approver_key(keys / "alice.pem", keys / "alice.pub.pem")
        added = sitewarden(
            "approver", "add", "alice", "--public-key", str(keys / "alice.pub.pem"), env=controller.cli_env()
        )
        assert added.returncode == 0, added.stderr
        operator, approver = controller.token("operator", "bob"), controller.token("approver", "alice")
        release = base / "release"
        card = build_release(release, seed=7, n_samples=2_000)
        push = ["release", "push", str(release), "--name", MODEL, "--version", VERSION, "--metadata", str(card)]
        assert sitewarden(*push, env=controller.cli_env(operator)).returncode == 0
        approve = ["release", "approve", MODEL, VERSION, "--key", str(keys / "alice.pem")]
        assert sitewarden(*approve, env=controller.cli_env(approver)).returncode == 0
        push_policy(
            controller, BANK_PACK, "1.0.0", operator=operator, approver=approver, approver_key=keys / "alice.pem"
        )
        agent = enroll_agent(controller, base, "branch-c", LABELS, {"alice": keys / "alice.pub.pem"})
        agent.config.write_text(
            f'[server]\nlisten = "127.0.0.1:{agent.port}"\nmax_body_bytes = {MAX_BODY}\n\n'
            f'[controller]\nca_cert = "{pki.ca_cert}"\n\n[approvers]\nalice = "{keys / "alice.pub.pem"}"\n\n'
            + app_bindings(("fraud-app", "old-app"))
        )
        agent.start()
        rollout = {
            "name": "clients",
            "releases": [{"name": MODEL, "version": VERSION}],
            "policy": {"name": POLICY, "version": "1.0.0"},
            "selector": LABELS,
        }
        with controller.client(operator) as client:
            client.post("/api/v1/rollouts", rollout)
        serving = agent
        wait_for(lambda: serving.active() == (MODEL, VERSION), what=f"the agent to serve {MODEL} {VERSION}")
        yield {"agent": agent, "controller": controller, "model": OnnxModel(release / "model.onnx"), "base": base}
    finally:
        if agent is not None:
            agent.stop()
            assert "Traceback" not in agent.log(), agent.log()[-3000:]
        controller.stop()


# -- helpers ---------------------------------------------------------------------------------------------------


def auth(agent: AgentProcess, key: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key or agent.app_key}"}


def triton_client(agent: AgentProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(agent.url.removeprefix("http://"))


def entries(agent: AgentProcess) -> list[dict[str, Any]]:
    with Log.open(agent.data / "audit", readonly=True) as log:
        return [json.loads(e) for e in log.iter_entries()]


def entry(agent: AgentProcess, index: int) -> dict[str, Any]:
    return entries(agent)[index]


def digest(agent: AgentProcess, data: bytes) -> str:
    return hmac.digest(DataDir(agent.data).hmac_secret(), data, "sha256").hex()


def expected(world: dict[str, Any], rows: np.ndarray) -> dict[str, np.ndarray]:
    return world["model"].infer({"features": rows.astype(np.float32)})


def triton_inputs(rows: np.ndarray, *, binary: bool) -> list[triton.InferInput]:
    tensor = triton.InferInput("features", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows.astype(np.float32), binary_data=binary)
    return [tensor]


def raw_infer(agent: AgentProcess, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        f"{agent.url}/v2/models/{MODEL}/infer", content=body, headers={**auth(agent), **(headers or {})}, timeout=30
    )


def json_body(rows: np.ndarray = ROWS, **extra: Any) -> bytes:
    request = {
        "inputs": [{"name": "features", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}],
        "parameters": dict(TERMS),
        **extra,
    }
    return json.dumps(request).encode()


def refused(response: httpx.Response, status: int, needle: str, agent: AgentProcess) -> dict[str, Any]:
    """The response is the OIP error object with `needle` in it, and its refusal is audited."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert needle in body["error"], body
    recorded = entry(agent, body["audit_index"])
    assert recorded["status"] == status and needle in recorded["refusal"], recorded
    return recorded


def still_serving(agent: AgentProcess) -> None:
    response = raw_infer(agent, json_body())
    assert response.status_code == 200, response.text


# -- Triton's client ---------------------------------------------------------------------------------------------


def test_tritonclient_sees_a_live_ready_server_and_its_model_metadata(world: dict[str, Any]) -> None:
    agent = world["agent"]
    with triton_client(agent) as client:
        assert client.is_server_live() and client.is_server_ready()
        server = client.get_server_metadata()
        assert server["name"] == "sitewarden-agent" and server["version"] == __version__
        assert "binary_tensor_data" in server["extensions"]
        # Which models a site runs is for its apps to know: model readiness needs an app key.
        assert not client.is_model_ready(MODEL)
        assert client.is_model_ready(MODEL, headers=auth(agent))
        assert client.is_model_ready(MODEL, VERSION, headers=auth(agent))
        assert not client.is_model_ready(MODEL, "9.9.9", headers=auth(agent))
        assert not client.is_model_ready("no-such-model", headers=auth(agent))
        for version in ("", VERSION):
            meta = client.get_model_metadata(MODEL, version, headers=auth(agent))
            assert meta["name"] == MODEL and meta["versions"] == [VERSION]
            assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 8]}]
            assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]


def test_tritonclient_infers_with_binary_data_both_ways_and_the_digest_covers_the_bytes_sent(
    world: dict[str, Any],
) -> None:
    agent = world["agent"]
    want = expected(world, ROWS)
    inputs = triton_inputs(ROWS, binary=True)
    outputs = [triton.InferRequestedOutput("label"), triton.InferRequestedOutput("probabilities")]  # binary
    with triton_client(agent) as client:
        result = client.infer(MODEL, inputs, outputs=outputs, parameters=TERMS, headers=auth(agent))
        body, json_size = client.generate_request_body(inputs, outputs=outputs, parameters=TERMS)
    answer = result.get_response()
    assert all(o["parameters"]["binary_data_size"] > 0 and "data" not in o for o in answer["outputs"])
    np.testing.assert_array_equal(result.as_numpy("label"), want["label"])
    np.testing.assert_array_equal(result.as_numpy("probabilities"), want["probabilities"])
    recorded = entry(agent, answer["parameters"]["audit_index"])
    assert recorded["wire"] == {"inference_header_length": json_size}
    assert recorded["input_digest"] == digest(agent, body)
    # The output digest covers the outputs as they would be in JSON, whatever encoding the caller asked for.
    as_json = [
        {"name": "label", "datatype": "INT64", "shape": [3], "data": want["label"].tolist()},
        {"name": "probabilities", "datatype": "FP32", "shape": [3, 2], "data": want["probabilities"].ravel().tolist()},
    ]
    assert recorded["output_digest"] == digest(agent, canonical(as_json))


def test_tritonclient_infers_with_json_both_ways_and_with_every_output_binary_by_default(world: dict[str, Any]) -> None:
    agent = world["agent"]
    want = expected(world, ROWS)
    with triton_client(agent) as client:
        plain = client.infer(
            MODEL,
            triton_inputs(ROWS, binary=False),
            outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)],
            parameters=TERMS,
            headers=auth(agent),
        )
        # No outputs named: the client asks for all of them in binary (binary_data_output).
        default = client.infer(MODEL, triton_inputs(ROWS, binary=True), parameters=TERMS, headers=auth(agent))
    assert [o["name"] for o in plain.get_response()["outputs"]] == ["probabilities"]
    assert "data" in plain.get_response()["outputs"][0]
    np.testing.assert_allclose(plain.as_numpy("probabilities"), want["probabilities"], rtol=1e-6)
    assert all("binary_data_size" in o["parameters"] for o in default.get_response()["outputs"])
    np.testing.assert_array_equal(default.as_numpy("label"), want["label"])


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compressed_requests_are_served_and_audited_over_the_decompressed_bytes(
    world: dict[str, Any], algorithm: str
) -> None:
    agent = world["agent"]
    inputs = triton_inputs(ROWS, binary=True)
    with triton_client(agent) as client:
        result = client.infer(
            MODEL, inputs, parameters=TERMS, headers=auth(agent), request_compression_algorithm=algorithm
        )
        body, _ = client.generate_request_body(inputs, parameters=TERMS)
    np.testing.assert_array_equal(result.as_numpy("label"), expected(world, ROWS)["label"])
    recorded = entry(agent, result.get_response()["parameters"]["audit_index"])
    assert recorded["wire"]["content_encoding"] == algorithm
    assert recorded["input_digest"] == digest(agent, body)


def test_tritonclient_raises_the_servers_own_messages(world: dict[str, Any]) -> None:
    agent = world["agent"]
    with triton_client(agent) as client:
        cases = {
            "unknown model": (
                lambda: client.infer(
                    "no-such-model", triton_inputs(ROWS, binary=True), parameters=TERMS, headers=auth(agent)
                ),
                "404",
                "no model 'no-such-model' is active at this site",
            ),
            "wrong version": (
                lambda: client.infer(
                    MODEL, triton_inputs(ROWS, binary=True), "2.0.0", parameters=TERMS, headers=auth(agent)
                ),
                "404",
                "active in version 1.0.0, not 2.0.0",
            ),
            "wrong shape": (
                lambda: client.infer(
                    MODEL, triton_inputs(ROWS[:, :7], binary=True), parameters=TERMS, headers=auth(agent)
                ),
                "400",
                "input 'features': shape [3, 7] does not match the model's [-1, 8]",
            ),
            "no key": (
                lambda: client.infer(MODEL, triton_inputs(ROWS, binary=True), parameters=TERMS),
                "401",
                "an app key is required",
            ),
            "metadata without a key": (lambda: client.get_model_metadata(MODEL), "401", "an app key is required"),
            "unknown route": (lambda: client.get_model_repository_index(), "404", "no such route"),
            "statistics": (lambda: client.get_inference_statistics(MODEL), "404", "no such route"),
            "shared memory": (
                lambda: client.infer(
                    MODEL,
                    triton_inputs(ROWS, binary=True),
                    outputs=[triton.InferRequestedOutput("label", class_count=1)],
                    parameters=TERMS,
                    headers=auth(agent),
                ),
                "400",
                "the classification extension is not supported",
            ),
        }
        for why, (call, status, message) in cases.items():
            with pytest.raises(InferenceServerException) as caught:
                call()
            assert caught.value.status() == status, (why, caught.value)
            assert message in caught.value.message(), (why, caught.value.message())


def test_a_policy_denial_shows_its_reasons_through_both_clients(world: dict[str, Any]) -> None:
    agent = world["agent"]
    marketing = {"purpose": "marketing", "data_class": "confidential"}
    with triton_client(agent) as client, pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, triton_inputs(ROWS, binary=True), parameters=marketing, headers=auth(agent))
    assert caught.value.status() == "403"
    assert caught.value.message().startswith("denied by policy: ")
    assert "marketing" in caught.value.message() and "confidential" in caught.value.message()

    async def kserve_denied() -> str:
        request = kserve_request(ROWS, parameters=marketing)
        async with InferenceRESTClient(RESTConfig(protocol="v2")) as client:
            with pytest.raises(httpx.HTTPStatusError) as denied:
                await client.infer(agent.url, request, model_name=MODEL, headers=auth(agent))
        return str(denied.value)

    message = asyncio.run(kserve_denied())
    assert "denied by policy: " in message and "marketing" in message and "403" in message


# -- KServe's client ---------------------------------------------------------------------------------------------


def kserve_request(
    rows: np.ndarray, *, binary: bool = False, parameters: dict[str, Any] | None = None, **kw: Any
) -> InferRequest:
    tensor = InferInput("features", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows.astype(np.float32), binary_data=binary)
    return InferRequest(
        model_name=kw.pop("model_name", MODEL), infer_inputs=[tensor], parameters=parameters or dict(TERMS), **kw
    )


def test_kserve_client_checks_health_and_infers_with_json_and_binary_data(world: dict[str, Any]) -> None:
    agent = world["agent"]
    want = expected(world, ROWS)

    async def session() -> dict[str, Any]:
        async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=30)) as client:
            found = {
                "live": await client.is_server_live(agent.url),
                "ready": await client.is_server_ready(agent.url),
                "model ready": await client.is_model_ready(agent.url, MODEL, headers=auth(agent)),
                "other ready": await client.is_model_ready(agent.url, "no-such-model", headers=auth(agent)),
                "without a key": await client.is_model_ready(agent.url, MODEL),
            }
            # KServe's client puts model_name (and an id) in every body.
            found["json"] = await client.infer(agent.url, kserve_request(ROWS), model_name=MODEL, headers=auth(agent))
            found["binary"] = await client.infer(
                agent.url,
                kserve_request(ROWS, binary=True, parameters={**TERMS, "binary_data_output": True}),
                model_name=MODEL,
                headers=auth(agent),
            )
            with pytest.raises(httpx.HTTPStatusError) as mismatch:
                await client.infer(
                    agent.url, kserve_request(ROWS, model_name="other"), model_name=MODEL, headers=auth(agent)
                )
            found["mismatch"] = str(mismatch.value)
            return found

    found = asyncio.run(session())
    assert found["live"] and found["ready"] and found["model ready"] and not found["other ready"]
    assert not found["without a key"]
    for how in ("json", "binary"):
        result = found[how]
        assert result.model_name == MODEL  # KServe's InferResponse.from_bytes does not read model_version
        outputs = {o.name: o.as_numpy() for o in result.outputs}
        np.testing.assert_array_equal(outputs["label"], want["label"])
        np.testing.assert_allclose(outputs["probabilities"], want["probabilities"], rtol=1e-6)
    assert "400" in found["mismatch"]
    assert "model_name 'other' in the body is not the model of the path, 'fraud-scorer'" in found["mismatch"]


# -- the OIP surface, as an attacker or a careless client finds it -------------------------------------------------


def test_every_error_under_v2_is_the_oip_error_object(world: dict[str, Any]) -> None:
    agent = world["agent"]
    not_found = httpx.get(f"{agent.url}/v2/repository/index", timeout=10)
    assert not_found.status_code == 404 and set(not_found.json()) == {"error"}
    wrong_method = httpx.get(f"{agent.url}/v2/models/{MODEL}/infer", timeout=10)
    assert wrong_method.status_code == 405 and "POST" in wrong_method.json()["error"]
    assert wrong_method.headers["allow"] == "POST"
    posted = httpx.post(f"{agent.url}/v2", timeout=10)
    assert posted.status_code == 405 and "error" in posted.json()
    form = raw_infer(agent, b"purpose=fraud", {"Content-Type": "application/x-www-form-urlencoded"})
    refused(form, 415, "Content-Type 'application/x-www-form-urlencoded' is not supported", agent)
    unauthenticated = httpx.get(f"{agent.url}/sitewarden/status", timeout=10)
    assert unauthenticated.status_code == 401 and "app key" in unauthenticated.json()["error"]
    assert unauthenticated.headers["www-authenticate"] == 'Bearer realm="sitewarden-agent"'
    # Outside /v2 FastAPI's own shape stays.
    assert "detail" in httpx.get(f"{agent.url}/no-such-page", timeout=10).json()


def test_a_compressed_body_that_inflates_past_the_limit_is_refused_without_inflating_it(world: dict[str, Any]) -> None:
    agent = world["agent"]
    # 64 MiB of zeros compress to about 64 KiB: under the limit on the wire, 256 times over it inflated.
    squeezer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    bomb = b"".join(squeezer.compress(zeros) for _ in range(64)) + squeezer.flush()
    assert len(bomb) < MAX_BODY
    recorded = refused(
        raw_infer(agent, bomb, {"Content-Encoding": "gzip"}),
        413,
        f"request body over {MAX_BODY} bytes once decompressed",
        agent,
    )
    assert recorded["caller"] == "fraud-app"
    # Within the limit, compressed either way, it is served.
    for encoding, data in (("gzip", gzip.compress(json_body())), ("deflate", zlib.compress(json_body()))):
        response = raw_infer(agent, data, {"Content-Encoding": encoding, "Content-Type": "application/json"})
        assert response.status_code == 200, (encoding, response.text)
        assert entry(agent, response.json()["parameters"]["audit_index"])["input_digest"] == digest(agent, json_body())
    refused(
        raw_infer(agent, b"\x1f\x8b not gzip at all", {"Content-Encoding": "gzip"}),
        400,
        "gzip request body is corrupt",
        agent,
    )
    truncated = gzip.compress(json_body())[:-12]
    refused(raw_infer(agent, truncated, {"Content-Encoding": "gzip"}), 400, "ends before its compressed stream", agent)
    trailing = gzip.compress(json_body()) + b"junk"
    refused(raw_infer(agent, trailing, {"Content-Encoding": "gzip"}), 400, "bytes after its compressed stream", agent)
    refused(
        raw_infer(agent, json_body(), {"Content-Encoding": "br"}), 415, "Content-Encoding 'br' is not supported", agent
    )
    refused(raw_infer(agent, bytes(MAX_BODY + 1)), 413, f"request body over {MAX_BODY} bytes", agent)
    still_serving(agent)


def binary_request(
    rows: np.ndarray, *, size: int | None = None, extra: bytes = b"", header: int | None = None
) -> tuple[bytes, dict[str, str]]:
    data = rows.astype("<f4").tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "shape": list(rows.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(data) if size is None else size},
                }
            ],
            "parameters": TERMS,
        }
    ).encode()
    length = len(head) if header is None else header
    if size is not None and size < len(data):
        data = data[:size]  # the data as long as it says, but not as long as the shape needs
    return head + data + extra, {
        "Inference-Header-Content-Length": str(length),
        "Content-Type": "application/octet-stream",
    }


def test_binary_tensor_data_that_does_not_add_up_is_refused_naming_the_input(world: dict[str, Any]) -> None:
    agent = world["agent"]
    body, headers = binary_request(ROWS)
    assert raw_infer(agent, body, headers).status_code == 200
    body, headers = binary_request(ROWS, size=4 * 8 * 3 + 4)
    refused(raw_infer(agent, body, headers), 400, "binary_data_size is 100, but only 96 bytes", agent)
    body, headers = binary_request(ROWS, extra=b"\x00" * 4)
    refused(raw_infer(agent, body, headers), 400, "4 bytes of binary tensor data follow", agent)
    body, headers = binary_request(ROWS, size=4 * 8 * 3 - 4, extra=b"")
    refused(raw_infer(agent, body, headers), 400, "takes 96 bytes of binary data, but binary_data_size is 92", agent)
    body, headers = binary_request(ROWS, header=10**6)
    refused(raw_infer(agent, body, headers), 400, "Inference-Header-Content-Length 1000000 does not fit", agent)
    nan = ROWS.astype(np.float32).copy()
    nan[1, 2] = np.nan
    body, headers = binary_request(nan)
    refused(raw_infer(agent, body, headers), 400, "input 'features': data holds NaN", agent)
    body, _ = binary_request(ROWS)
    refused(
        raw_infer(agent, body),
        400,
        "binary tensor data after the JSON needs the Inference-Header-Content-Length",
        agent,
    )
    still_serving(agent)


def test_a_purpose_or_data_class_stated_twice_with_different_values_is_refused(world: dict[str, Any]) -> None:
    agent = world["agent"]
    recorded = refused(
        raw_infer(agent, json_body(), {"X-Sitewarden-Purpose": "marketing"}),
        400,
        "purpose is stated twice with different values: 'fraud' in the parameters, 'marketing' in the "
        "X-Sitewarden-Purpose header",
        agent,
    )
    assert "decision" not in recorded  # refused before the policy was asked
    refused(
        raw_infer(agent, json_body(), {"X-Sitewarden-Data-Class": "public"}),
        400,
        "data_class is stated twice with different values",
        agent,
    )
    same = raw_infer(agent, json_body(), {"X-Sitewarden-Purpose": "fraud", "X-Sitewarden-Data-Class": "confidential"})
    assert same.status_code == 200, same.text


def test_a_missing_an_unknown_and_a_revoked_key_are_told_apart_and_the_revoked_app_is_audited(
    world: dict[str, Any],
) -> None:
    agent = world["agent"]
    old = sitewarden("agent", "app-key", "create", "old-app", "--data", str(agent.data)).stdout.strip()
    assert raw_infer(agent, json_body(), auth(agent, old)).status_code == 200
    assert sitewarden("agent", "app-key", "revoke", "old-app", "--data", str(agent.data)).returncode == 0
    response = raw_infer(agent, json_body(), auth(agent, old))
    recorded = refused(response, 401, "of app 'old-app' was revoked at", agent)
    assert response.headers["www-authenticate"] == 'Bearer realm="sitewarden-agent", error="invalid_token"'
    assert recorded["caller"] == "old-app" and recorded["credential"] == "revoked"
    assert recorded["key_id"] == old.split("_", 2)[1]
    # The key's id with a wrong secret is unknown, not revoked: only the holder of the secret learns more.
    forged = f"swa_{old.split('_', 2)[1]}_not-the-secret"
    recorded = refused(
        raw_infer(agent, json_body(), auth(agent, forged)), 401, "the app key is not known at this site", agent
    )
    assert recorded["caller"] is None and recorded["credential"] == "unknown"
    missing = httpx.post(f"{agent.url}/v2/models/{MODEL}/infer", content=json_body(), timeout=10)
    recorded = refused(missing, 401, "an app key is required", agent)
    assert missing.headers["www-authenticate"] == 'Bearer realm="sitewarden-agent"'
    assert recorded["credential"] == "missing or malformed"
    still_serving(agent)
