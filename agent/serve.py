"""The agent's inference API for local applications: KServe Open Inference Protocol v2 (REST).

Every inference request is authenticated with an app key, states its purpose and data
class (OIP `parameters`, or the headers `X-Sitewarden-Purpose` and
`X-Sitewarden-Data-Class`), is checked against the model's declared inputs, is decided
by the guard, and is recorded in the site's audit log before its response leaves. The
response names the model version and the audit entry's index (`parameters.audit_index`),
so that the caller can cite the record. Refusals (4xx) are audited too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool

from agent import oip
from agent.daemon import Agent
from agent.errors import InferenceError
from agent.sync import ActiveRelease
from sitewarden.telemetry import current_trace_id, setup_tracing

log = logging.getLogger("sitewarden.agent")

PURPOSE_HEADER = "x-sitewarden-purpose"
DATA_CLASS_HEADER = "x-sitewarden-data-class"


class Metrics:
    def __init__(self, agent: Agent) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sitewarden_inference_requests", "Inference requests", ["status"], registry=self.registry
        )
        self.latency = Histogram("sitewarden_inference_seconds", "Inference latency", registry=self.registry)
        lag = Gauge("sitewarden_audit_witness_lag_entries", "Audit entries not yet cosigned", registry=self.registry)
        lag.set_function(lambda: agent.audit.status()["witness_lag_entries"])
        size = Gauge("sitewarden_audit_log_size", "Entries in the site audit log", registry=self.registry)
        size.set_function(lambda: agent.audit.log.size)
        reachable = Gauge(
            "sitewarden_controller_reachable", "1 when the last long poll reached it", registry=self.registry
        )
        reachable.set_function(lambda: 1.0 if agent.controller_reachable else 0.0)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


class InferenceService:
    """The synchronous core of one inference request, run in a worker thread."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def handle(
        self, model_name: str, version: str | None, body: bytes, headers: dict[str, str], caller: str
    ) -> tuple[int, dict[str, Any]]:
        started = time.perf_counter()
        agent = self.agent
        release = agent.active
        event: dict[str, Any] = {
            "type": "inference",
            "caller": caller,
            "model": {"name": model_name, "version": version},
            "input_digest": agent.audit.digest(body),
            "trace_id": current_trace_id(),
        }
        try:
            status, answer = self._serve(
                release, model_name=model_name, version=version, body=body, headers=headers, event=event
            )
        except InferenceError as exc:
            status, answer = exc.status, {"error": str(exc), **({"reasons": exc.reasons} if exc.reasons else {})}
            event["refusal"] = str(exc)
        event["status"] = status
        event["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        if status == 200:
            event["output_digest"] = agent.audit.digest(answer.pop("_output_bytes"))
        index = agent.audit.record(event)
        if status == 200:
            answer["parameters"]["audit_index"] = index
        else:
            answer["audit_index"] = index
        return status, answer

    def _serve(
        self,
        release: ActiveRelease | None,
        *,
        model_name: str,
        version: str | None,
        body: bytes,
        headers: dict[str, str],
        event: dict[str, Any],
    ) -> tuple[int, dict[str, Any]]:
        if release is None or release.name != model_name:
            raise InferenceError(404, f"no model {model_name!r} is active at this site")
        if version is not None and version != release.version:
            raise InferenceError(404, f"model {model_name} is active in version {release.version}, not {version}")
        event["model"] = {"name": release.name, "version": release.version, "digest": release.manifest_sha256}
        request = oip.parse_request(body)
        event["request_id"] = request.id
        params = request.parameters or {}
        purpose = params.get("purpose") or headers.get(PURPOSE_HEADER)
        data_class = params.get("data_class") or headers.get(DATA_CLASS_HEADER)
        event["purpose"], event["data_class"] = purpose, data_class
        if not purpose or not data_class:
            missing = "purpose" if not purpose else "data_class"
            raise InferenceError(
                400, f"every request states its {missing}: OIP parameters or the X-Sitewarden-* headers"
            )
        signature = release.model.signature
        inputs = oip.decode_inputs(request, signature)
        outputs = oip.requested_outputs(request, signature)
        decision = self.agent.guard.inference(
            {
                "caller": event["caller"],
                "purpose": purpose,
                "data_class": data_class,
                "model": {"name": release.name, "version": release.version, "card": release.card},
                "batch": max((a.shape[0] if a.ndim else 1) for a in inputs.values()),
            }
        )
        event["decision"] = decision.to_json()
        event["guard"] = self.agent.guard.name
        if not decision.allow:
            raise InferenceError(403, "denied by policy", list(decision.reasons))
        results = release.model.infer(inputs, outputs)
        tensors = oip.encode_outputs(results, signature, outputs)
        response = oip.InferenceResponse(
            model_name=release.name,
            model_version=release.version,
            id=request.id,
            parameters={"purpose": purpose, "data_class": data_class},
            outputs=tensors,
        ).model_dump(exclude_none=True)
        response["_output_bytes"] = b"".join(t.model_dump_json().encode() for t in tensors)
        return 200, response


def create_app(agent: Agent) -> FastAPI:
    service = InferenceService(agent)
    metrics = Metrics(agent)
    max_body = agent.config.max_body_bytes

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await agent.start()
        try:
            yield
        finally:
            await agent.stop()

    app = FastAPI(
        title="Sitewarden agent",
        description="KServe Open Inference Protocol v2 for local applications, with policy and audit.",
        lifespan=lifespan,
        redoc_url=None,
    )

    def _caller(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        return agent.apps.app_for(key.strip()) if scheme.lower() == "bearer" else None

    @app.get("/v2/health/live", tags=["health"])
    def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["health"])
    def ready() -> Response:
        if agent.active is None:
            return JSONResponse({"ready": False}, status_code=503)
        return JSONResponse({"ready": True})

    @app.get("/v2/models/{name}", tags=["models"])
    def model_metadata(name: str, request: Request) -> Response:
        if _caller(request) is None:
            return _error(401, "an app key is required: Authorization: Bearer <key>")
        release = agent.active
        if release is None or release.name != name:
            return _error(404, f"no model {name!r} is active at this site")
        meta = release.model.signature.metadata(release.name, versions=[release.version])
        return JSONResponse(meta.model_dump(exclude_none=True))

    @app.get("/v2/models/{name}/ready", tags=["models"])
    def model_ready(name: str) -> Response:
        release = agent.active
        ok = release is not None and release.name == name
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 404)

    async def _refuse(status: int, message: str, caller: str | None, name: str, version: str | None) -> dict:
        event = {
            "type": "inference",
            "caller": caller,
            "status": status,
            "refusal": message,
            "model": {"name": name, "version": version},
        }
        return {"error": message, "audit_index": await run_in_threadpool(agent.audit.record, event)}

    async def _body(request: Request) -> bytes | None:
        """The request body, or None when it is over the limit (by header or while reading)."""
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            return None
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                return None
        return bytes(body)

    async def _infer(name: str, version: str | None, request: Request) -> Response:
        started = time.perf_counter()
        caller = _caller(request)
        headers = {
            PURPOSE_HEADER: request.headers.get(PURPOSE_HEADER, ""),
            DATA_CLASS_HEADER: request.headers.get(DATA_CLASS_HEADER, ""),
        }
        if caller is None:
            status = 401
            answer = await _refuse(status, "an app key is required: Authorization: Bearer <key>", None, name, version)
        elif (body := await _body(request)) is None:
            status = 413
            answer = await _refuse(status, f"request body over {max_body} bytes", caller, name, version)
        else:
            status, answer = await run_in_threadpool(service.handle, name, version, body, headers, caller)
        metrics.requests.labels(str(status)).inc()
        metrics.latency.observe(time.perf_counter() - started)
        return JSONResponse(answer, status_code=status)

    @app.post("/v2/models/{name}/infer", tags=["models"])
    async def infer(name: str, request: Request) -> Response:
        return await _infer(name, None, request)

    @app.post("/v2/models/{name}/versions/{version}/infer", tags=["models"])
    async def infer_version(name: str, version: str, request: Request) -> Response:
        return await _infer(name, version, request)

    @app.get("/metrics", tags=["service"])
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    setup_tracing(app, "sitewarden-agent")

    @app.get("/sitewarden/status", tags=["service"])
    def status(request: Request) -> Response:
        if _caller(request) is None:
            return _error(401, "an app key is required: Authorization: Bearer <key>")
        return JSONResponse(agent.status())

    return app
