"""One chat completion or embedding request, from its body to the answer and the audit entry that backs it.

The steps of a chat completion, which the code follows:

1. Parse the body (`wire`); the purpose and data class come from `metadata` or the
   `X-Sitewarden-*` headers, as for OIP.
2. Lease what `model` names: the base, or an adapter with its base (`site.LanguageModels`).
3. Render the conversation with the base's chat template; parse the caller's requirements and
   `response_format` (a JSON or JSON Schema requirement).
4. Ask the policy (`sitewarden/inference`) with the base, the adapter, the requested `n` and
   `max_tokens`; a deny is a 403 with its reasons. Obligations: `rate_limit` (429), then
   `max_output_tokens` caps the tokens, `sampling` adds the policy's named requirements (from the
   bundle's data, `sitewarden.requirements`), strategy and a floor on the candidate budget, which
   the caller cannot remove.
5. Generate: plain requests draw `n` sequences in one batch (seeds `seed`, `seed+1`, ...);
   checked requests draw candidates (`requirements.sample`: a budget of at least `n`, in one batch
   or, for `first`, in rounds; at temperature 0 just `n`, all candidates being the same) and keep
   `n` of them. No candidate passing the policy's
   requirements, or (with `on_fail: error`) fewer than `n` passing the caller's: 422 with the
   report, and no generated text leaves.
6. `redact` patterns apply to the text that leaves; `human_review` and `log_content` as for OIP.
7. Audit, durably, before the answer leaves: base and adapter digests, sampling parameters and
   seeds, HMAC digests of prompt and output, tokens in and out, the requirement report, latency,
   trace id; refusals too. A stream records its decision before its first byte and its outcome
   before `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from agent import obligations, policy_inputs
from agent.apps import OutsideBinding
from agent.callers import DATA_CLASS_HEADER, PURPOSE_HEADER
from agent.errors import InferenceError
from agent.lm import requirements as checks
from agent.lm import wire
from agent.lm.engine import Generated, Sequence
from agent.lm.errors import APIError, LMError
from agent.lm.site import LanguageModels, Lease
from audit.entry import canonical
from sitewarden.telemetry import current_trace_id

DEFAULT_MAX_TOKENS = 256
DEFAULT_CANDIDATES = 4
REQUIREMENTS_KEY = "requirements"  # data.sitewarden.requirements in a policy bundle


@dataclass
class Plan:
    """What a chat request will do, decided before anything is generated."""

    request: wire.ChatRequest
    lease: Lease
    prompt: list[int]
    max_tokens: int
    capped_from: int | None
    checked: bool
    budget: int
    strategy: str
    requirements: list[checks.Requirement]
    duties: Any
    seed: int | None
    event: dict[str, Any] = field(default_factory=dict)


class LMService:
    """The chat and embedding requests of one agent."""

    def __init__(self, agent: Any, models: LanguageModels, limiter: obligations.RateLimiter | None = None) -> None:
        self.agent = agent
        self.models = models
        self.limiter = limiter or obligations.RateLimiter()

    # -- chat completions ---------------------------------------------------------------------------

    async def chat(self, body: bytes, headers: dict[str, str], caller: str) -> tuple[int, Any, dict[str, str]]:
        """Status, answer (a JSON object, or an async iterator of SSE lines for a stream) and headers."""
        started = time.perf_counter()
        event: dict[str, Any] = {
            "type": "inference",
            "api": "openai.chat.completions",
            "caller": caller,
            "trace_id": current_trace_id(),
        }
        plan: Plan | None = None
        try:
            plan = await self._plan(body, headers, caller, event)
            if plan.request.stream and not plan.checked and not plan.duties.patterns:
                return 200, self._stream(plan, started), {}
            status, answer = await self._complete(plan)
        except APIError as exc:
            if plan is not None:
                self.models.release(plan.lease)
            return await self._refusal(exc, event, started)
        except InferenceError as exc:  # obligations (rate limit): the agent's own refusals
            if plan is not None:
                self.models.release(plan.lease)
            error = APIError(exc.status, str(exc), reasons=exc.reasons, headers=exc.headers)
            return await self._refusal(error, event, started)
        self.models.release(plan.lease)
        event["status"] = status
        event["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        index = await self.agent.audit.record_async(event)
        answer["sitewarden"]["audit_index"] = index
        if plan.request.stream:  # checked or redacted text: streamed once it is checked and audited
            return 200, self._replay(answer, plan.request), {}
        return status, answer, {}

    async def _refusal(self, exc: APIError, event: dict[str, Any], started: float) -> tuple[int, Any, dict[str, str]]:
        event["status"] = exc.status
        event["refusal"] = exc.message
        if exc.reasons:
            event["refusal_reasons"] = exc.reasons
        if "requirements" in exc.extra:
            event["requirements"] = exc.extra["requirements"]
        event["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        exc.extra["audit_index"] = await self.agent.audit.record_async(event)
        return exc.status, exc.body(), exc.headers

    async def _plan(self, body: bytes, headers: dict[str, str], caller: str, event: dict[str, Any]) -> Plan:
        event["prompt_digest"] = self.agent.audit.digest(body)  # replaced by the messages' digest once parsed
        try:
            raw = json.loads(body)
        except ValueError as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise APIError(400, "the request body must be a JSON object")
        request: wire.ChatRequest = wire.parse(wire.ChatRequest, raw)
        event["model"] = {"requested": request.model}
        purpose, data_class = _purpose(request.metadata, headers)
        event["purpose"], event["data_class"] = purpose, data_class
        binding = _bound(self.agent, caller, purpose, data_class)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages
        ]
        event["prompt_digest"] = self.agent.audit.digest(canonical(messages))
        own = _caller_requirements(request)
        lease = self.models.acquire(request.model)
        try:
            return await self._decide(request, lease, messages, own, (purpose, data_class, binding), caller, event)
        except BaseException:
            self.models.release(lease)
            raise

    async def _decide(  # noqa: PLR0917 - the parsed parts of one request, passed on once
        self,
        request: wire.ChatRequest,
        lease: Lease,
        messages: list[dict[str, str]],
        own: list[checks.Requirement],
        stated: tuple[str, str, dict[str, list[str]]],
        caller: str,
        event: dict[str, Any],
    ) -> Plan:
        purpose, data_class, binding = stated
        engine = lease.engine
        event["model"] = {"requested": request.model, "base": lease.base.brief()}
        if lease.adapter is not None:
            event["model"]["adapter"] = lease.adapter.brief()
        try:
            prompt = await run_in_threadpool(engine.prompt_ids, messages)
        except Exception as exc:  # the template refuses the conversation (e.g. roles out of order)
            raise APIError(400, f"messages: the model's chat template refuses them: {exc}", param="messages") from None
        room = engine.context - len(prompt)
        if room < 1:
            raise APIError(
                400,
                f"messages: {len(prompt)} tokens leave no room in the model's context of {engine.context}",
                param="messages",
                code="context_length_exceeded",
            )
        asked = request.requested_tokens()
        wanted = asked if asked is not None else min(DEFAULT_MAX_TOKENS, room)
        # The policy sees what the request asks to draw: its n, or its candidate budget when larger.
        drawn = max(request.n, request.candidates or 0)
        guard = self.agent.guard  # read once: one policy version for the whole request
        value = policy_inputs.chat_input(
            self.agent.site,
            app=caller,
            purpose=purpose,
            data_class=data_class,
            model=lease.base.policy_input,
            adapter=lease.adapter.policy_input if lease.adapter else None,
            n=drawn,
            max_tokens=wanted,
            binding=binding,
        )
        decision = await run_in_threadpool(guard.inference, value)
        event["decision"] = decision.to_json()
        event["policy"] = guard.policy
        if not decision.allow:
            raise APIError(403, "denied by policy", reasons=list(decision.reasons), code="denied_by_policy")
        duties = decision.obligations
        obligations.before(duties, app=caller, batch=1, limiter=self.limiter)
        capped_from = None
        limit = min(room, duties.max_output_tokens or room)
        if wanted > limit:
            capped_from, wanted = wanted, limit
        sampling = duties.sampling
        policy_checks: list[checks.Requirement] = []
        if sampling is not None and sampling.requirements:
            try:
                policy_checks = checks.named(sampling.requirements, _definitions(guard))
            except checks.RequirementError as exc:
                raise APIError(500, f"the policy is misconfigured: {exc}", code="policy_misconfigured") from None
        checked = bool(own or policy_checks or (sampling is not None and sampling.n))
        # The candidate budget: the policy's sampling n is a floor the caller may raise (within what the
        # policy allowed it to ask for), never lower; it is at least the n choices asked for.
        floor = sampling.n if sampling is not None and sampling.n else 0
        budget = max(floor, request.candidates or (0 if floor else DEFAULT_CANDIDATES), request.n)
        if request.temperature == 0:  # greedy: every candidate would be the same text, one per choice is enough
            budget = request.n
        if checked and budget > engine.max_batch:
            raise APIError(
                400, f"candidates: at most {engine.max_batch} are drawn at once, not {budget}", param="candidates"
            )
        if not checked and request.n > engine.max_batch:
            raise APIError(400, f"n: at most {engine.max_batch} choices are drawn at once", param="n")
        strategy = (sampling.strategy if sampling and sampling.strategy else None) or request.strategy or "first"
        if strategy not in checks.STRATEGIES:
            raise APIError(500, f"the policy's sampling strategy {strategy!r} is unknown", code="policy_misconfigured")
        return Plan(
            request=request,
            lease=lease,
            prompt=prompt,
            max_tokens=wanted,
            capped_from=capped_from,
            checked=checked,
            budget=budget if checked else request.n,
            strategy=strategy,
            requirements=[*policy_checks, *own],
            duties=duties,
            seed=request.seed,
            event=event,
        )

    def _sequences(self, plan: Plan, count: int, first: int, on_text: Any = None) -> list[Sequence]:
        request = plan.request
        return [
            Sequence(
                prompt_ids=plan.prompt,
                adapter=plan.lease.engine_adapter,
                max_new_tokens=plan.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=None if plan.seed is None else (plan.seed + first + i) % 2**63,
                stop=request.stops(),
                on_text=on_text(first + i) if on_text is not None else None,
            )
            for i in range(count)
        ]

    async def _complete(self, plan: Plan) -> tuple[int, dict[str, Any]]:
        engine = plan.lease.engine
        report = None
        if plan.checked:
            loop = asyncio.get_running_loop()

            def draw(count: int, first: int) -> list[checks.Candidate]:
                results = engine.generate(self._sequences(plan, count, first))
                return [_candidate(first + i, g) for i, g in enumerate(results)]

            outcome = await loop.run_in_executor(
                None,
                lambda: checks.sample(
                    draw,
                    plan.requirements,
                    strategy=plan.strategy,
                    budget=plan.budget,
                    on_fail=plan.request.on_fail,
                    n=plan.request.n,
                ),
            )
            report = outcome.report()
            plan.event["requirements"] = report
            drawn_tokens = sum(c.tokens for c in outcome.candidates)
            plan.event["seeds"] = [json_int(c.seed) for c in outcome.candidates]
            if not outcome.chosen:
                plan.event["tokens"] = {"prompt": len(plan.prompt), "completion": 0, "drawn": drawn_tokens}
                if not outcome.policy_met:
                    message = f"no candidate of {len(outcome.candidates)} met a policy requirement"
                else:
                    passed = sum(all(c.passed.values()) for c in outcome.candidates)
                    message = (
                        f"{passed} of {len(outcome.candidates)} candidates met the request's requirements, "
                        f"{plan.request.n} were asked for"
                    )
                raise APIError(
                    422, f"{message}; no text is returned", code="requirements_not_met", extra={"requirements": report}
                )
            texts = [(c.text, c.finish_reason) for c in outcome.chosen]
            returned_tokens = sum(c.tokens for c in outcome.chosen)
        else:
            results: list[Generated] = await asyncio.wrap_future(engine.submit(self._sequences(plan, plan.budget, 0)))
            texts = [(g.text, g.finish_reason) for g in results]
            drawn_tokens = returned_tokens = sum(g.tokens for g in results)
            plan.event["seeds"] = [json_int(g.seed) for g in results]
        choices, extra = self._finish(plan, texts)
        return 200, self._answer(plan, choices, returned_tokens, report, extra, drawn=drawn_tokens)

    def _finish(self, plan: Plan, texts: list[tuple[str, str]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Redaction, the audit's digests and content; the choices that leave."""
        duties = plan.duties
        redactions = 0
        choices = []
        for index, (generated, finish) in enumerate(texts):
            text = generated
            for pattern in duties.patterns:
                text, count = pattern.subn(obligations.REDACTED, text)
                redactions += count
            choices.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            )
        extra: dict[str, Any] = {}
        if redactions:
            extra["redactions"] = redactions
        if duties.human_review:
            extra["human_review"] = True
        if plan.capped_from is not None:
            extra["max_tokens_capped"] = {"asked": plan.capped_from, "allowed": plan.max_tokens}
        event = plan.event
        event["output_digest"] = self.agent.audit.digest(canonical([c["message"]["content"] for c in choices]))
        event["sampling"] = _sampling(plan)
        event.update(extra)
        if duties.log_content:
            event["content"] = {
                "messages": [m.model_dump(exclude_none=True) for m in plan.request.messages],
                "outputs": [c["message"]["content"] for c in choices],
            }
        return choices, extra

    def _answer(
        self,
        plan: Plan,
        choices: list[dict[str, Any]],
        completion_tokens: int,
        report: dict[str, Any] | None,
        extra: dict[str, Any],
        *,
        drawn: int | None = None,
    ) -> dict[str, Any]:
        """The answer. `usage` counts the tokens of the choices returned, as OpenAI's does; candidates drawn
        and not returned are counted in `sitewarden.tokens_drawn` and the audit entry."""
        usage = {
            "prompt_tokens": len(plan.prompt),
            "completion_tokens": completion_tokens,
            "total_tokens": len(plan.prompt) + completion_tokens,
        }
        drawn = completion_tokens if drawn is None else drawn
        plan.event["tokens"] = {"prompt": usage["prompt_tokens"], "completion": completion_tokens, "drawn": drawn}
        sitewarden: dict[str, Any] = {"base": plan.lease.base.brief(), **extra}
        if drawn != completion_tokens:
            sitewarden["tokens_drawn"] = drawn
        if plan.lease.adapter is not None:
            sitewarden["adapter"] = plan.lease.adapter.brief()
        if report is not None:
            sitewarden["requirements"] = report
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": plan.request.model,
            "system_fingerprint": f"sw-{plan.lease.base.manifest_sha256[:12]}",
            "choices": choices,
            "usage": usage,
            "sitewarden": sitewarden,
        }

    # -- streams -----------------------------------------------------------------------------------

    def _chunk(self, plan_or_answer: dict[str, Any], choices: list[dict[str, Any]], **more: Any) -> str:
        chunk = {
            "id": plan_or_answer["id"],
            "object": "chat.completion.chunk",
            "created": plan_or_answer["created"],
            "model": plan_or_answer["model"],
            "system_fingerprint": plan_or_answer["system_fingerprint"],
            "choices": choices,
            **more,
        }
        return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"

    async def _replay(self, answer: dict[str, Any], request: wire.ChatRequest) -> AsyncIterator[str]:
        """A checked (or redacted) answer as a stream: its text in one chunk per choice, once it is audited."""
        for choice in answer["choices"]:
            delta = {"role": "assistant", "content": choice["message"]["content"]}
            yield self._chunk(answer, [{"index": choice["index"], "delta": delta, "finish_reason": None}])
            yield self._chunk(
                answer, [{"index": choice["index"], "delta": {}, "finish_reason": choice["finish_reason"]}]
            )
        if request.stream_options is not None and request.stream_options.include_usage:
            yield self._chunk(answer, [], usage=answer["usage"], sitewarden=answer["sitewarden"])
        else:
            yield self._chunk(answer, [], sitewarden=answer["sitewarden"])
        yield "data: [DONE]\n\n"

    async def _stream(self, plan: Plan, started: float) -> AsyncIterator[str]:
        """Token by token. The decision is audited before the first byte, the outcome before `[DONE]`."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
        head = self._answer(plan, [], 0, None, {})
        try:
            opening = {**plan.event, "type": "inference.stream", "status": 200}
            await self.agent.audit.record_async(opening)

            def on_text(index: int) -> Any:
                return lambda delta: loop.call_soon_threadsafe(queue.put_nowait, (index, delta))

            future = plan.lease.engine.submit(self._sequences(plan, plan.budget, 0, on_text))
            future.add_done_callback(lambda _f: loop.call_soon_threadsafe(queue.put_nowait, None))
            for index in range(plan.budget):
                delta = {"role": "assistant", "content": ""}
                yield self._chunk(head, [{"index": index, "delta": delta, "finish_reason": None}])
            while (item := await queue.get()) is not None:
                index, text = item
                yield self._chunk(head, [{"index": index, "delta": {"content": text}, "finish_reason": None}])
            try:
                results = future.result()
            except LMError as exc:
                plan.event["status"] = 500
                plan.event["refusal"] = str(exc)
                await self.agent.audit.record_async(plan.event)
                return
            for index, generated in enumerate(results):
                yield self._chunk(head, [{"index": index, "delta": {}, "finish_reason": generated.finish_reason}])
            choices, extra = self._finish(plan, [(g.text, g.finish_reason) for g in results])
            tokens = sum(g.tokens for g in results)
            plan.event["seeds"] = [json_int(g.seed) for g in results]
            answer = self._answer(plan, choices, tokens, None, extra)
            plan.event["status"] = 200
            plan.event["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
            answer["sitewarden"]["audit_index"] = await self.agent.audit.record_async(plan.event)
            options = plan.request.stream_options
            if options is not None and options.include_usage:
                yield self._chunk(head, [], usage=answer["usage"], sitewarden=answer["sitewarden"])
            else:
                yield self._chunk(head, [], sitewarden=answer["sitewarden"])
            yield "data: [DONE]\n\n"
        finally:
            if plan.event.get("status") != 200 or "output_digest" not in plan.event:
                # the client went away mid-stream: what was generated is still on record
                plan.event.setdefault("status", 499)
                plan.event.setdefault("refusal", "the client closed the stream before it ended")
                await self.agent.audit.record_async(plan.event)
            self.models.release(plan.lease)

    # -- embeddings ---------------------------------------------------------------------------------

    async def embeddings(self, body: bytes, headers: dict[str, str], caller: str) -> tuple[int, Any, dict[str, str]]:
        started = time.perf_counter()
        event: dict[str, Any] = {
            "type": "inference",
            "api": "openai.embeddings",
            "caller": caller,
            "trace_id": current_trace_id(),
            "input_digest": self.agent.audit.digest(body),
        }
        try:
            try:
                raw = json.loads(body)
            except ValueError as exc:
                raise APIError(400, f"the request body is not valid JSON: {exc}") from None
            if not isinstance(raw, dict):
                raise APIError(400, "the request body must be a JSON object")
            request: wire.EmbeddingRequest = wire.parse(wire.EmbeddingRequest, raw)
            inputs = [request.input] if isinstance(request.input, str) else request.input
            if not inputs or len(inputs) > 2048 or any(not text for text in inputs):
                raise APIError(400, "input: 1 to 2048 non-empty strings", param="input")
            purpose, data_class = _purpose(request.metadata, headers)
            event["purpose"], event["data_class"] = purpose, data_class
            binding = _bound(self.agent, caller, purpose, data_class)
            release, embedder = self.models.embedding_model(request.model)
            event["model"] = {"requested": request.model, "embedding": release.brief()}
            if request.dimensions is not None and request.dimensions != embedder.dimensions:
                raise APIError(
                    400,
                    f"dimensions: this model has {embedder.dimensions}, not {request.dimensions}",
                    param="dimensions",
                )
            guard = self.agent.guard
            value = policy_inputs.inference_input(
                self.agent.site,
                app=caller,
                purpose=purpose,
                data_class=data_class,
                model=release.policy_input,
                batch=len(inputs),
                inputs=["input"],
                binding=binding,
            )
            decision = await run_in_threadpool(guard.inference, value)
            event["decision"], event["policy"] = decision.to_json(), guard.policy
            if not decision.allow:
                raise APIError(403, "denied by policy", reasons=list(decision.reasons), code="denied_by_policy")
            obligations.before(decision.obligations, app=caller, batch=len(inputs), limiter=self.limiter)
            vectors, tokens = await run_in_threadpool(embedder.embed, inputs)
        except APIError as exc:
            return await self._refusal(exc, event, started)
        except InferenceError as exc:
            return await self._refusal(
                APIError(exc.status, str(exc), reasons=exc.reasons, headers=exc.headers), event, started
            )
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(row.tobytes()).decode()
                if request.encoding_format == "base64"
                else row.tolist(),
            }
            for i, row in enumerate(vectors)
        ]
        event["output_digest"] = self.agent.audit.digest(vectors.tobytes())
        event["tokens"] = {"prompt": tokens}
        event["status"] = 200
        event["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        if decision.obligations.log_content:
            event["content"] = {"input": inputs}
        index = await self.agent.audit.record_async(event)
        answer = {
            "object": "list",
            "data": data,
            "model": request.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "sitewarden": {"audit_index": index, "model": release.brief()},
        }
        return 200, answer, {}

    # -- models ---------------------------------------------------------------------------------------

    def list_models(self) -> dict[str, Any]:
        data = []
        for release, parent in self.models.models():
            entry: dict[str, Any] = {
                "id": release.name,
                "object": "model",
                "created": 0,
                "owned_by": "sitewarden",
                "sitewarden": {**release.brief(), "kind": release.kind, "task": release.task},
            }
            if parent is not None:
                entry["parent"] = parent
            data.append(entry)
        return {"object": "list", "data": data}


def _bound(agent: Any, app: str, purpose: str, data_class: str) -> dict[str, list[str]]:
    """The app's binding (`agent.apps`) when it covers the purpose and data class; a 403 before any policy runs
    otherwise, as on the OIP API."""
    try:
        return agent.apps.check(app, purpose, data_class).to_json()
    except OutsideBinding as exc:
        raise APIError(403, str(exc), code="outside_binding") from None


def _purpose(metadata: dict[str, str] | None, headers: dict[str, str]) -> tuple[str, str]:
    purpose = (metadata or {}).get("purpose") or headers.get(PURPOSE_HEADER)
    data_class = (metadata or {}).get("data_class") or headers.get(DATA_CLASS_HEADER)
    if not purpose or not data_class:
        missing = "purpose" if not purpose else "data_class"
        raise APIError(
            400,
            f"every request states its {missing}: metadata.{missing} or the X-Sitewarden-"
            f"{'Purpose' if missing == 'purpose' else 'Data-Class'} header",
            param=f"metadata.{missing}",
        )
    return purpose, data_class


def _caller_requirements(request: wire.ChatRequest) -> list[checks.Requirement]:
    try:
        own = checks.parse_list(request.requirements, source="request", param="requirements")
    except checks.RequirementError as exc:
        raise APIError(400, str(exc), param="requirements", code="invalid_requirement") from None
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_object":
        own.append(
            checks.parse(
                {"type": "json", "object": True},
                source="response_format",
                where="response_format",
                default_name="response_format",
            )
        )
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format.json_schema.schema is required", param="response_format.json_schema")
        try:
            own.append(
                checks.parse(
                    {"type": "json_schema", "schema": fmt.json_schema.schema_},
                    source="response_format",
                    where="response_format.json_schema",
                    default_name=f"response_format:{fmt.json_schema.name}",
                )
            )
        except checks.RequirementError as exc:
            raise APIError(400, str(exc), param="response_format.json_schema.schema") from None
    return own


def _definitions(guard: Any) -> dict[str, Any]:
    """Named requirements from the active bundles' data (`sitewarden.requirements`), the site's own after."""
    found: dict[str, Any] = {}
    for compiled in (getattr(guard, "local", None), getattr(guard, "central", None)):
        data = getattr(getattr(compiled, "bundle", None), "data", None) or {}
        defined = data.get("sitewarden", {}).get(REQUIREMENTS_KEY, {}) if isinstance(data, dict) else {}
        if isinstance(defined, dict):
            found.update(defined)
    return found


def _candidate(index: int, generated: Generated) -> checks.Candidate:
    return checks.Candidate(
        index=index,
        text=generated.text,
        seed=generated.seed,
        tokens=generated.tokens,
        mean_logprob=generated.mean_logprob,
        finish_reason=generated.finish_reason,
    )


def _sampling(plan: Plan) -> dict[str, Any]:
    request = plan.request
    out: dict[str, Any] = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": plan.max_tokens,
        "seed": json_int(request.seed),
        "n": request.n,
        "stop": list(request.stops()),
    }
    if plan.checked:
        out.update({"checked": True, "strategy": plan.strategy, "budget": plan.budget, "on_fail": request.on_fail})
    return out


def json_int(value: int | None) -> int | str | None:
    """An integer as JSON carries it exactly: beyond 2**53 (RFC 8785's safe integers) as its decimal text."""
    if value is None or abs(value) < 2**53:
        return value
    return str(value)
