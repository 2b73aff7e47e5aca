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
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

from agent import obligations, oip, policy_inputs
from agent.daemon import Agent
from agent.errors import InferenceError
from agent.lm import routes as lm_routes
from agent.sync import ActiveRelease
from audit.entry import canonical
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
        # What the chart's PrometheusRule alerts on: a site that stopped reporting, artifacts the
        # site refused, and audit entries that could not be written.
        reported = Gauge(
            "sitewarden_last_status_report_timestamp_seconds",
            "When the controller last took this site's status report (heartbeat), Unix time; 0 before the first",
            registry=self.registry,
        )
        reported.set_function(lambda: agent.last_report_at)
        refused = Gauge(
            "sitewarden_sync_refused_artifacts",
            "Artifacts of the desired state the site refused",
            registry=self.registry,
        )
        refused.set_function(
            lambda: sum(1 for a in agent.syncer.state.artifacts.values() if a.get("state") == "refused")
        )
        failures = Gauge(
            "sitewarden_audit_write_failures",
            "Audit entries that could not be written since start",
            registry=self.registry,
        )
        failures.set_function(lambda: agent.audit.write_failures)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


# Models whose recent calls took less than this run on the event loop: a hop to a worker thread
# would cost more than the call. Slower ones run in the thread pool, so the loop keeps serving.
INLINE_INFER_S = 0.001


class InferenceService:
    """One inference request, from its body to the answer and the audit entry that backs it."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.limiter = obligations.RateLimiter()

    async def handle(
        self, model_name: str, version: str | None, body: bytes, headers: dict[str, str], caller: str
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Serve one request: status, body and extra response headers. Its audit entry is durable
        (in the default mode) when this returns.

        The entry's `output_digest` is the HMAC-SHA256 (site secret) of the RFC 8785 form of the
        response's `outputs` array, so that whoever holds a response can tie it to its entry.
        """
        started = time.perf_counter()
        agent = self.agent
        event: dict[str, Any] = {
            "type": "inference",
            "caller": caller,
            "model": {"name": model_name, "version": version},
            "input_digest": agent.audit.digest(body),
            "trace_id": current_trace_id(),
        }
        response_headers: dict[str, str] = {}
        try:
            status, answer = await self._serve(
                agent.active, model_name=model_name, version=version, body=body, headers=headers, event=event
            )
        except InferenceError as exc:
            status, answer = exc.status, {"error": str(exc), **({"reasons": exc.reasons} if exc.reasons else {})}
            event["refusal"] = str(exc)
            if exc.reasons:
                event["refusal_reasons"] = exc.reasons
            response_headers = exc.headers
        event["status"] = status
        event["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        if status == 200:
            event["output_digest"] = agent.audit.digest(canonical(answer["outputs"]))
        index = await agent.audit.record_async(event)
        if status == 200:
            answer["parameters"]["audit_index"] = index
        else:
            answer["audit_index"] = index
        return status, answer, response_headers

    async def _serve(
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
        if not isinstance(purpose, str) or not isinstance(data_class, str):
            raise InferenceError(400, "purpose and data_class must be strings")
        model = release.model
        inputs = oip.decode_inputs(request, model.signature)
        outputs = oip.requested_outputs(request, model.signature)
        caller = event["caller"]
        batch = max((a.shape[0] if a.ndim else 1) for a in inputs.values())
        guard = self.agent.guard  # read once: this request sees one policy version throughout
        names = tuple(inputs)
        key = (caller, purpose, data_class, release.manifest_sha256, batch, names)
        decision = guard.remembered(key)
        if decision is None:  # evaluating takes milliseconds: off the event loop (regopy releases the GIL)
            value = policy_inputs.inference_input(
                self.agent.site,
                app=caller,
                purpose=purpose,
                data_class=data_class,
                model=release.policy_input,
                batch=batch,
                inputs=list(names),
            )
            decision = await run_in_threadpool(guard.inference, value, key)
        event["decision"] = decision.to_json()
        event["policy"] = guard.policy
        if not decision.allow:
            raise InferenceError(403, "denied by policy", list(decision.reasons))
        duties = decision.obligations
        obligations.before(duties, app=caller, batch=batch, limiter=self.limiter)
        if model.recent_seconds < INLINE_INFER_S:
            results = model.infer(inputs, outputs)
        else:
            results = await run_in_threadpool(model.infer, inputs, outputs)
        tensors = oip.encode_outputs(results, model.signature, outputs)
        answer: dict[str, Any] = {"model_name": release.name, "model_version": release.version}
        if request.id is not None:
            answer["id"] = request.id
        parameters: dict[str, Any] = {"purpose": purpose, "data_class": data_class}
        if duties.human_review:
            parameters["human_review"] = True
        answer["parameters"] = parameters
        answer["outputs"] = obligations.after(duties, [t.model_dump(exclude_none=True) for t in tensors], parameters)
        if duties.log_content:
            event["content"] = {"request": json.loads(body), "outputs": answer["outputs"]}
        return 200, answer


INFER_PATHS = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")
INFER_DESCRIPTION = (
    "Run the active model (OIP v2 `$inference_request`). Callers: local apps, with `Authorization: Bearer "
    "<app key>`. Each request states `purpose` and `data_class` in its parameters (or the X-Sitewarden-Purpose "
    "and X-Sitewarden-Data-Class headers); inputs are checked against the model's declared inputs. Every request, "
    "answered or refused, is recorded in the site's audit log before the response leaves; the response's "
    "`parameters.audit_index` (or `audit_index` in an error) is the entry's index. 400: bad input, named; "
    "401: no valid app key; 403: denied by policy, with reasons; 404: no such model or version; 413: body over "
    "the limit."
)


def _document_infer(app: FastAPI) -> None:
    """Put the infer routes, served by plain Starlette routes, into the app's OpenAPI document."""
    docs = APIRouter(tags=["models"])
    for path in INFER_PATHS:
        versioned = "{version}" in path
        docs.add_api_route(
            path,
            _infer_versioned_signature if versioned else _infer_signature,
            methods=["POST"],
            response_model=oip.InferenceResponse,
            description=INFER_DESCRIPTION,
            name="infer_versioned" if versioned else "infer",
            responses={status: {"description": text} for status, text in INFER_ERRORS.items()},
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=[*app.routes, *docs.routes],
            )
            for path in INFER_PATHS:  # bad input is a 400 naming it, not FastAPI's 422
                app.openapi_schema["paths"][path]["post"]["responses"].pop("422", None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


INFER_ERRORS = {
    400: "Bad input, named",
    401: "No valid app key",
    403: "Denied by policy",
    404: "No such model or version",
    413: "Body over the limit",
}


async def _infer_signature(body: oip.InferenceRequest, name: str) -> None:
    """The infer route's signature, for the OpenAPI document only (never routed)."""
    raise NotImplementedError


async def _infer_versioned_signature(body: oip.InferenceRequest, name: str, version: str) -> None:
    """The versioned infer route's signature, for the OpenAPI document only (never routed)."""
    raise NotImplementedError


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

    # Kubernetes probes. Liveness: the process answers (a restart would not help otherwise).
    # Readiness: the agent has started (data dir, audit log and policy loaded) and is not shutting
    # down; it does not depend on the controller, since a site keeps serving while it is away,
    # nor on an active model (`/v2/health/ready` says that, as the Open Inference Protocol asks).
    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> Response:
        if not agent.serving:
            return JSONResponse({"status": "not ready", "reason": "starting or shutting down"}, status_code=503)
        return JSONResponse({"status": "ready"})

    # The latest signed checkpoint and the key that signs it: public by design (the controller
    # witnesses the same note), so that `helm test` and monitoring can check that the log is
    # signed with the site's key without an app key or the data volume.
    @app.get("/sitewarden/checkpoint", tags=["service"])
    def checkpoint() -> Response:
        signed = agent.audit.log.signed_checkpoint
        if signed is None:
            return _error(404, "the site's audit log has no signed checkpoint yet")
        return JSONResponse({"checkpoint": signed, "vkey": agent.audit.vkey, "origin": agent.identity.origin})

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
        return {"error": message, "audit_index": await agent.audit.record_async(event)}

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
        extra: dict[str, str] = {}
        if caller is None:
            status = 401
            answer = await _refuse(status, "an app key is required: Authorization: Bearer <key>", None, name, version)
        elif (body := await _body(request)) is None:
            status = 413
            answer = await _refuse(status, f"request body over {max_body} bytes", caller, name, version)
        else:
            status, answer, extra = await service.handle(name, version, body, headers, caller)
        metrics.requests.labels(str(status)).inc()
        metrics.latency.observe(time.perf_counter() - started)
        return JSONResponse(answer, status_code=status, headers=extra)

    async def infer(request: Request) -> Response:
        return await _infer(request.path_params["name"], request.path_params.get("version"), request)

    # Plain Starlette routes: FastAPI's per-request machinery (dependency solving, exit stacks) would
    # cost about 0.1 ms, a sixth of a one-row request (bench/inference_bench.py). `_document_infer`
    # describes them in the OpenAPI document.
    for path in INFER_PATHS:
        app.router.routes.append(Route(path, infer, methods=["POST"]))
    _document_infer(app)

    # The OpenAI-compatible API of the language-model runtime (agent/lm/routes.py), on the same keys and
    # the same rate limits (an app's requests per minute count across OIP and /v1).
    lm_routes.mount(app, agent, caller=_caller, body=_body, record=agent.audit.record_async, limiter=service.limiter)

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
