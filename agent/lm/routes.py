"""The OpenAI-compatible routes on the agent's server, next to OIP v2: thin, over `service.LMService`.

| route | what |
|---|---|
| `GET /v1/models`, `GET /v1/models/{model}` | the active base, its adapters (`parent`: the base), the embedding model |
| `POST /v1/chat/completions` | chat completions, streamed as server-sent events with `stream: true` |
| `POST /v1/embeddings` | embeddings, `encoding_format` `float` or `base64` |

Callers authenticate with the site's app keys (`Authorization: Bearer <app key>`, which is how the
openai client sends its `api_key`). Errors are OpenAI's error object with the right status; a
refusal is audited like an answer, and its `sitewarden.audit_index` names the entry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from agent import obligations
from agent.callers import DATA_CLASS_HEADER, PURPOSE_HEADER
from agent.lm.errors import APIError

if TYPE_CHECKING:  # the service needs the lm extra (re2, jsonschema): imported only when it runs
    from agent.lm.service import LMService


NO_KEY = "an app key is required: Authorization: Bearer <key>"


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def mount(
    app: FastAPI,
    agent: Any,
    *,
    caller: Callable[[Request], str | None],
    body: Callable[[Request], Awaitable[bytes | None]],
    record: Callable[[dict[str, Any]], Awaitable[int | None]],
    limiter: obligations.RateLimiter | None = None,
) -> LMService | None:
    """Add the /v1 routes to the agent's app; the service, or None when the lm extra is missing.
    `limiter` is OIP's, so that an app's rate limit counts its requests on both APIs."""
    models = getattr(agent, "lm", None)
    service = None
    if models is not None:  # the lm extra is installed (agent.lm.site.create)
        from agent.lm.service import LMService  # noqa: PLC0415

        service = LMService(agent, models, limiter)
    max_body = agent.config.max_body_bytes

    async def refuse(status: int, message: str, who: str | None, api: str) -> JSONResponse:
        index = await record({"type": "inference", "api": api, "caller": who, "status": status, "refusal": message})
        return _error(APIError(status, message, extra={"audit_index": index}))

    def unavailable() -> JSONResponse:
        return _error(APIError(503, "this agent has no language-model runtime: the lm extra is not installed"))

    async def list_models(request: Request) -> Response:
        if caller(request) is None:
            return _error(APIError(401, NO_KEY))
        if service is None:
            return unavailable()
        return JSONResponse(service.list_models())

    async def get_model(request: Request) -> Response:
        if caller(request) is None:
            return _error(APIError(401, NO_KEY))
        if service is None:
            return unavailable()
        wanted = request.path_params["model"]
        for entry in service.list_models()["data"]:
            if entry["id"] == wanted:
                return JSONResponse(entry)
        return _error(
            APIError(404, f"the model {wanted!r} does not exist at this site", param="model", code="model_not_found")
        )

    def endpoint(api: str, handle: Callable[..., Awaitable[tuple[int, Any, dict[str, str]]]]) -> Callable[..., Any]:
        async def route(request: Request) -> Response:
            who = caller(request)
            if who is None:
                return await refuse(401, NO_KEY, None, api)
            if service is None:
                return unavailable()
            raw = await body(request)
            if raw is None:
                return await refuse(413, f"request body over {max_body} bytes", who, api)
            headers = {h: request.headers.get(h, "") for h in (PURPOSE_HEADER, DATA_CLASS_HEADER)}
            status, answer, extra = await handle(raw, headers, who)
            if isinstance(answer, dict):
                return JSONResponse(answer, status_code=status, headers=extra)
            return StreamingResponse(
                answer, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **extra}
            )

        return route

    app.add_api_route("/v1/models", list_models, methods=["GET"], tags=["openai"], summary="Models")
    app.add_api_route("/v1/models/{model}", get_model, methods=["GET"], tags=["openai"], summary="A model")
    if service is not None:
        chat, embeddings = service.chat, service.embeddings
    else:

        async def chat(*_args: Any) -> tuple[int, Any, dict[str, str]]:
            raise AssertionError("unreachable without a service")

        embeddings = chat
    app.add_api_route(
        "/v1/chat/completions",
        endpoint("openai.chat.completions", chat),
        methods=["POST"],
        tags=["openai"],
        summary="Chat completions (OpenAI-compatible), with requirement-checked sampling",
    )
    app.add_api_route(
        "/v1/embeddings",
        endpoint("openai.embeddings", embeddings),
        methods=["POST"],
        tags=["openai"],
        summary="Embeddings (OpenAI-compatible)",
    )
    return service
