"""The agent's inference API for local applications: KServe Open Inference Protocol v2 (REST).

Spoken as Triton's and KServe's own clients speak it: server metadata (`GET /v2`), liveness and
readiness, model metadata and readiness with or without a version, inference with JSON or with the
binary tensor data extension in both directions, bodies compressed with gzip or deflate, and every
error under `/v2` as the OIP error object `{"error": "..."}` (404 and 405 included), so that the
clients show the server's message.

Every inference request is authenticated with an app key, states its purpose and data
class (OIP `parameters`, or the headers `X-Sitewarden-Purpose` and
`X-Sitewarden-Data-Class`) within what the site binds the app to (`agent.apps`), is checked
against the model's declared inputs, is decided
by the guard, and is recorded in the site's audit log before its response leaves. The
response names the model version and the audit entry's index (`parameters.audit_index`),
so that the caller can cite the record. Refusals (4xx) are audited too, a revoked key's
app by name.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from agent import callers, obligations, oip, policy_inputs
from agent.callers import DATA_CLASS_HEADER, PURPOSE_HEADER
from agent.daemon import Agent
from agent.errors import AuditUnavailable, InferenceError
from agent.lm import routes as lm_routes
from agent.sync import ActiveRelease
from audit.entry import canonical
from sitewarden import __version__
from sitewarden.telemetry import current_trace_id, serve_metrics, setup_tracing

log = logging.getLogger("sitewarden.agent")

__all__ = ["DATA_CLASS_HEADER", "PURPOSE_HEADER", "Call", "InferenceService", "Reply", "create_app"]


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
        self.registry.register(agent.collector())  # sync, readiness and the audit log's health
        cosigned = Gauge(
            "sitewarden_controller_log_cosigned_size",
            "Size of the controller's audit checkpoint this site cosigned last",
            registry=self.registry,
        )
        cosigned.set_function(lambda: agent.controller_witness.size)
        forked = Gauge(
            "sitewarden_controller_log_refused",
            "1 once this site refused a checkpoint of the controller's log that contradicts what it cosigned",
            registry=self.registry,
        )
        forked.set_function(lambda: 1.0 if agent.controller_witness.state.refused else 0.0)


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """The OIP error object, `{"error": "..."}` (plus `extra` fields), which Triton's and KServe's clients read."""
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


# Models whose recent calls took less than this run on the event loop: a hop to a worker thread
# would cost more than the call. Slower ones run in the thread pool, so the loop keeps serving.
INLINE_INFER_S = 0.001
HEADER_LENGTH = "inference-header-content-length"


@dataclass(frozen=True)
class Call:
    """One inference request as HTTP delivered it: the path's model and version, the body once any
    Content-Encoding is undone, the authenticated app, the purpose and data class headers, and the
    length of the JSON header when binary tensor data follows it."""

    model: str
    version: str | None
    body: bytes
    caller: str
    headers: Mapping[str, str] = field(default_factory=dict)
    header_length: int | None = None
    content_encoding: str | None = None


@dataclass
class Reply:
    """What to answer: status, the JSON object, extra headers, and binary tensor data to follow the JSON."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    binary: bytes = b""


class InferenceService:
    """One inference request, from its body to the answer and the audit entry that backs it."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.limiter = obligations.RateLimiter()

    async def handle(self, call: Call) -> Reply:
        """Serve one request. Its audit entry is durable (in the default mode) when this returns.

        The entry's `input_digest` is the HMAC-SHA256 (site secret) of the body as the caller encoded it
        before any Content-Encoding: the JSON header and the binary tensor data, byte for byte. Its
        `output_digest` is the HMAC-SHA256 of the RFC 8785 form of the response's `outputs` array with every
        tensor's data as JSON (binary outputs as they would have been sent in JSON), so that whoever holds a
        response can tie it to its entry.
        """
        started = time.perf_counter()
        agent = self.agent
        event: dict[str, Any] = {
            "type": "inference",
            "caller": call.caller,
            "model": {"name": call.model, "version": call.version},
            "input_digest": agent.audit.digest(call.body),
            "trace_id": current_trace_id(),
        }
        if call.header_length is not None or call.content_encoding:
            wire = (("inference_header_length", call.header_length), ("content_encoding", call.content_encoding))
            event["wire"] = {k: v for k, v in wire if v is not None}
        reply: Reply
        try:
            reply = await self._serve(agent.active, call, event)
        except InferenceError as exc:
            reply = Reply(exc.status, error_body(exc), exc.headers)
            event["refusal"] = str(exc)
            if exc.reasons:
                event["refusal_reasons"] = exc.reasons
        event["status"] = reply.status
        event["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        index = await agent.audit.record_async(event)
        if reply.status == 200:
            reply.body["parameters"]["audit_index"] = index
        else:
            reply.body["audit_index"] = index
        return reply

    async def _serve(self, release: ActiveRelease | None, call: Call, event: dict[str, Any]) -> Reply:
        model_name, version = call.model, call.version
        if release is None or release.name != model_name:
            raise InferenceError(404, f"no model {model_name!r} is active at this site")
        if version is not None and version != release.version:
            raise InferenceError(404, f"model {model_name} is active in version {release.version}, not {version}")
        event["model"] = {"name": release.name, "version": release.version, "digest": release.manifest_sha256}
        request = oip.parse_request(call.body, call.header_length)
        event["request_id"] = request.id
        if request.model_name is not None and request.model_name != model_name:
            raise InferenceError(
                400, f"model_name {request.model_name!r} in the body is not the model of the path, {model_name!r}"
            )
        if request.model_version is not None and request.model_version != (version or release.version):
            raise InferenceError(
                400 if version is not None else 404,
                f"model_version {request.model_version!r} in the body: model {model_name} is active in version "
                f"{release.version}" + (f" and the path names {version}" if version is not None else ""),
            )
        params = request.parameters or {}
        try:
            terms = callers.stated_terms(params, call.headers)
        except InferenceError:
            event["purpose"], event["data_class"] = params.get("purpose"), params.get("data_class")
            raise
        purpose, data_class = terms.purpose, terms.data_class
        event["purpose"], event["data_class"] = purpose, data_class
        # The app's key may state only what the site bound it to: refused (403) before any policy runs.
        binding = self.agent.apps.check(call.caller, purpose, data_class)
        model = release.model
        binary_in = (
            oip.binary_inputs(request, call.body, call.header_length) if call.header_length is not None else None
        )
        inputs = oip.decode_inputs(request, model.signature, binary=binary_in)
        outputs = oip.requested_outputs(request, model.signature)
        caller = call.caller
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
                binding=binding.to_json(),
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
        event["output_digest"] = self.agent.audit.digest(canonical(answer["outputs"]))
        if duties.log_content:
            event["content"] = _content(call, answer["outputs"])
        binary = b""
        if request.outputs or params.get("binary_data_output"):  # the plain JSON request skips this
            binary = oip.binary_outputs(request, answer["outputs"])
        return Reply(200, answer, binary=binary)


def error_body(exc: InferenceError) -> dict[str, Any]:
    """The OIP error object of a refusal; a policy's reasons are in `error` too, since clients show only it."""
    message = str(exc)
    if exc.reasons:
        message += ": " + "; ".join(exc.reasons)
        return {"error": message, "reasons": exc.reasons}
    return {"error": message}


def _content(call: Call, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """The raw request and outputs, for the `log_content` obligation: the JSON header as JSON, and any binary
    tensor data after it in base64."""
    if call.header_length is None:
        return {"request": json.loads(call.body), "outputs": [dict(o) for o in outputs]}
    header, binary = call.body[: call.header_length], call.body[call.header_length :]
    return {
        "request": json.loads(header),
        "binary_data_base64": base64.b64encode(binary).decode(),
        "outputs": [dict(o) for o in outputs],
    }


INFER_PATHS = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")
INFER_DESCRIPTION = (
    "Run the active model (OIP v2 `$inference_request`). Callers: local apps, with `Authorization: Bearer "
    "<app key>`. Each request states `purpose` and `data_class` in its parameters (or the X-Sitewarden-Purpose "
    "and X-Sitewarden-Data-Class headers, not both with different values); inputs are checked against the model's "
    "declared inputs. The binary tensor data extension is served: a JSON header of `Inference-Header-Content-Length` "
    "bytes, then the inputs that carry `binary_data_size`; outputs asked with `binary_data` (or the request's "
    "`binary_data_output`) come back the same way. The body may be compressed (`Content-Encoding: gzip` or "
    "`deflate`); the size limit applies to it decompressed. Every request, answered or refused, is recorded in the "
    "site's audit log before the response leaves; the response's `parameters.audit_index` (or `audit_index` in an "
    'error) is the entry\'s index. Errors are `{"error": "..."}`. 400: bad input, named; 401: no valid app key '
    "(missing, unknown or revoked; `WWW-Authenticate: Bearer`); 403: a purpose or data class outside the app's "
    "binding (refused before the policy), or denied by policy, the reasons in `error` and `reasons`; 404: no such "
    "model or version; 413: body over the limit; 415: a Content-Type or Content-Encoding not served; 429: rate "
    "limit; 503: the site's audit log cannot write (`Retry-After`), so nothing is answered."
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
    403: "Outside the app's binding, or denied by policy",
    404: "No such model or version",
    413: "Body over the limit",
    415: "Content-Type or Content-Encoding not served",
    429: "Rate limit",
}


async def _infer_signature(body: oip.InferenceRequest, name: str) -> None:
    """The infer route's signature, for the OpenAPI document only (never routed)."""
    raise NotImplementedError


async def _infer_versioned_signature(body: oip.InferenceRequest, name: str, version: str) -> None:
    """The versioned infer route's signature, for the OpenAPI document only (never routed)."""
    raise NotImplementedError


def respond(reply: Reply) -> Response:
    """The HTTP response of a reply: JSON, or the JSON header then binary tensor data, its length in
    `Inference-Header-Content-Length`."""
    if not reply.binary:
        return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)
    header = JSONResponse(reply.body).body
    return Response(
        header + reply.binary,
        status_code=reply.status,
        headers={**reply.headers, "Inference-Header-Content-Length": str(len(header))},
        media_type="application/octet-stream",
    )


def header_length(headers: Mapping[str, str]) -> int | None:
    """`Inference-Header-Content-Length`, when binary tensor data follows the JSON header; 400 if malformed."""
    value = headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not value.isdigit() or len(value) > 18:
        raise InferenceError(400, f"Inference-Header-Content-Length {value[:40]!r} is not a number of bytes")
    return int(value)


# Media types an inference body may declare: JSON, or binary tensor data after a JSON header. No
# Content-Type at all is taken as JSON, as Triton does (its Python client sends none).
_BODY_TYPES = ("application/json", "application/octet-stream")


def check_content_type(headers: Mapping[str, str]) -> None:
    """415 for a body that declares a media type other than JSON or octet-stream (a form, say)."""
    value = headers.get("content-type")
    if not value:
        return
    media = value.split(";", 1)[0].strip().lower()
    if media not in _BODY_TYPES and not media.endswith("+json"):
        raise InferenceError(
            415,
            f"Content-Type {media!r} is not supported: send application/json, or application/octet-stream with "
            "binary tensor data after a JSON header of Inference-Header-Content-Length bytes",
        )


def _oip_path(path: str) -> bool:
    return path == "/v2" or path.startswith(("/v2/", "/sitewarden/"))


def _install_error_handlers(app: FastAPI) -> None:
    """Every error under /v2 (and /sitewarden) is the OIP error object; elsewhere FastAPI's own shape."""

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if not _oip_path(request.url.path):
            return await http_exception_handler(request, exc)
        path = request.url.path[:200]
        if exc.status_code == 404:
            message = f"{request.method} {path}: no such route on this agent (see /docs)"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow") or ""
            message = f"{request.method} is not allowed on {path}" + (f"; use {allowed}" if allowed else "")
        else:
            message = str(exc.detail)
        return _error(exc.status_code, message, dict(exc.headers or {}))

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        if not _oip_path(request.url.path):
            return await request_validation_exception_handler(request, exc)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return _error(400, f"{where}: {first.get('msg')}" if where else str(first.get("msg")))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed: %s: %s", request.method, request.url.path, exc.__class__.__name__, exc)
        return _error(500, "internal error of the agent; its log says more")

    async def audit_unavailable(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AuditUnavailable)
        return _error(503, str(exc), {"Retry-After": str(exc.retry_after_s)})

    async def refused(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, InferenceError)
        return _error(exc.status, str(exc), dict(exc.headers or {}))

    app.add_exception_handler(AuditUnavailable, audit_unavailable)
    app.add_exception_handler(InferenceError, refused)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)


def create_app(agent: Agent) -> FastAPI:
    service = InferenceService(agent)
    metrics = Metrics(agent)
    max_body = agent.config.max_body_bytes

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Metrics on a listener of their own where the site configuration says ([metrics] listen).
        listener = (
            serve_metrics(agent.config.metrics_host, agent.config.metrics_port, metrics.registry)
            if agent.config.metrics_host is not None
            else None
        )
        await agent.start()
        try:
            yield
        finally:
            await agent.stop()
            if listener is not None:
                listener.close()

    app = FastAPI(
        title="Sitewarden agent",
        description="KServe Open Inference Protocol v2 for local applications, with policy and audit.",
        lifespan=lifespan,
        redoc_url=None,
    )
    _install_error_handlers(app)

    def unauthenticated(request: Request) -> Response | None:
        """None when the request carries a valid app key, else the 401 to answer."""
        try:
            callers.authenticate(agent.apps, request.headers.get("authorization"))
        except callers.Unauthenticated as exc:
            return _error(401, str(exc), exc.headers)
        return None

    @app.get("/v2", tags=["health"], response_model=oip.ServerMetadata)
    def server_metadata() -> Response:
        """Server metadata (OIP `$metadata_server_response`): name, version, the protocol extensions served."""
        meta = oip.ServerMetadata(name="sitewarden-agent", version=__version__, extensions=oip.EXTENSIONS)
        return JSONResponse(meta.model_dump())

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
        if not agent.audit.writable:  # it would refuse every request (503) until the log writes again
            reason = f"the audit log cannot write: {agent.audit.failure}"
            return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
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
        if reasons := agent.not_ready():
            return JSONResponse({"ready": False, "error": "; ".join(reasons)}, status_code=503)
        return JSONResponse({"ready": True})

    def metadata(name: str, version: str | None, request: Request) -> Response:
        if (refusal := unauthenticated(request)) is not None:
            return refusal
        release = agent.active
        if release is None or release.name != name:
            return _error(404, f"no model {name!r} is active at this site")
        if version is not None and version != release.version:
            return _error(404, f"model {name} is active in version {release.version}, not {version}")
        meta = release.model.signature.metadata(release.name, versions=[release.version])
        return JSONResponse(meta.model_dump(exclude_none=True))

    @app.get("/v2/models/{name}", tags=["models"], response_model=oip.ModelMetadata)
    def model_metadata(name: str, request: Request) -> Response:
        """The active model's metadata: its inputs and outputs, and its version. Needs an app key."""
        return metadata(name, None, request)

    @app.get("/v2/models/{name}/versions/{version}", tags=["models"], response_model=oip.ModelMetadata)
    def model_version_metadata(name: str, version: str, request: Request) -> Response:
        """The model's metadata if this version is the active one (else 404). Needs an app key."""
        return metadata(name, version, request)

    def readiness(name: str, version: str | None) -> Response:
        release = agent.active
        if release is None or release.name != name:
            return _error(404, f"no model {name!r} is active at this site", name=name, ready=False)
        if version is not None and version != release.version:
            message = f"model {name} is active in version {release.version}, not {version}"
            return _error(404, message, name=name, version=version, ready=False)
        body: dict[str, Any] = {"name": name, "ready": True}
        if version is not None:
            body["version"] = version
        return JSONResponse(body)

    @app.get("/v2/models/{name}/ready", tags=["models"])
    def model_ready(name: str, request: Request) -> Response:
        """200 when the model is active here, 404 otherwise. Needs an app key: which models a site runs is
        for its apps to know, not for whoever reaches the port."""
        if (refusal := unauthenticated(request)) is not None:
            return refusal
        return readiness(name, None)

    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["models"])
    def model_version_ready(name: str, version: str, request: Request) -> Response:
        """200 when this version of the model is the active one, 404 otherwise. Needs an app key."""
        if (refusal := unauthenticated(request)) is not None:
            return refusal
        return readiness(name, version)

    async def refuse(exc: InferenceError, caller: str | None, name: str, version: str | None) -> Reply:
        """A request refused before it was read (no key, body too large or undecodable): audited."""
        event: dict[str, Any] = {
            "type": "inference",
            "caller": caller,
            "status": exc.status,
            "refusal": str(exc),
            "model": {"name": name, "version": version},
        }
        if isinstance(exc, callers.Unauthenticated):
            event["caller"] = exc.app
            event["credential"] = "revoked" if exc.app else ("unknown" if exc.key_id else "missing or malformed")
            if exc.key_id:
                event["key_id"] = exc.key_id
        reply = Reply(exc.status, error_body(exc), exc.headers)
        reply.body["audit_index"] = await agent.audit.record_async(event)
        return reply

    async def read_body(request: Request, encoding: str | None) -> bytes:
        """The request body, decompressed, within the limit (413 past it, whether compressed or not)."""
        length = request.headers.get("content-length")
        return await callers.read_body(request.stream(), max_body, length=length, encoding=encoding)

    async def answer(request: Request) -> Reply:
        name, version = request.path_params["name"], request.path_params.get("version")
        headers = request.headers
        caller = None
        try:
            caller = callers.authenticate(agent.apps, headers.get("authorization"))
            check_content_type(headers)
            encoding = callers.content_encoding(headers)
            length = header_length(headers)
            body = await read_body(request, encoding)
        except InferenceError as exc:
            return await refuse(exc, caller, name, version)
        stated = {k: headers.get(k, "") for k in (PURPOSE_HEADER, DATA_CLASS_HEADER)}
        return await service.handle(Call(name, version, body, caller, stated, length, encoding))

    async def infer(request: Request) -> Response:
        started = time.perf_counter()
        try:
            agent.audit.check_writable()  # no answer without its audit entry: refused before anything runs
            reply = await answer(request)
        except AuditUnavailable as exc:  # also when the log fails while this request is served
            reply = Reply(503, {"error": str(exc)}, {"Retry-After": str(exc.retry_after_s)})
        metrics.requests.labels(str(reply.status)).inc()
        metrics.latency.observe(time.perf_counter() - started)
        return respond(reply)

    # Plain Starlette routes: FastAPI's per-request machinery (dependency solving, exit stacks) would
    # cost about 0.1 ms, a sixth of a one-row request (bench/inference_bench.py). `_document_infer`
    # describes them in the OpenAPI document.
    for path in INFER_PATHS:
        app.router.routes.append(Route(path, infer, methods=["POST"]))
    _document_infer(app)

    # The OpenAI-compatible API of the language-model runtime (agent/lm/routes.py), on the same keys and
    # the same rate limits (an app's requests per minute count across OIP and /v1).
    def app_of(request: Request) -> str | None:
        try:
            return callers.authenticate(agent.apps, request.headers.get("authorization"))
        except callers.Unauthenticated:
            return None

    async def lm_body(request: Request) -> bytes | None:
        """The body of a /v1 request, decompressed; None when it is over the limit. A site whose audit log
        cannot write answers nothing (503, see `_install_error_handlers`)."""
        agent.audit.check_writable()
        try:
            return await read_body(request, callers.content_encoding(request.headers))
        except InferenceError as exc:
            if exc.status == 413:
                return None
            raise

    lm_routes.mount(app, agent, caller=app_of, body=lm_body, record=agent.audit.record_async, limiter=service.limiter)

    @app.get("/metrics", tags=["service"])
    def prometheus(request: Request) -> Response:
        # On the API listener only for a caller with an app key; `[metrics] listen` serves them apart.
        if (refusal := unauthenticated(request)) is not None:
            return refusal
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    setup_tracing(app, "sitewarden-agent")

    @app.get("/sitewarden/status", tags=["service"])
    def status(request: Request) -> Response:
        """What the agent runs and why: active release and policy, refusals with reasons, witness lag,
        controller reachability (the same document `sitewarden agent status` prints). Needs an app key."""
        if (refusal := unauthenticated(request)) is not None:
            return refusal
        return JSONResponse(agent.status())

    return app
