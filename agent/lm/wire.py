"""The OpenAI-compatible wire format: chat completion and embedding requests, as this agent reads them.

Requests are parsed leniently where OpenAI's API is: fields this module does not know are
ignored (clients send new ones all the time). Fields it knows but cannot honour are refused
with a 400 naming them (`UNSUPPORTED`: tools, logit bias, log-probabilities, audio, ...), so
that no caller believes it got what it asked for. Sitewarden's extensions travel in the same
body (the openai client's `extra_body`): `requirements`, `strategy`, `candidates`, `on_fail`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

from agent.lm.errors import APIError

# Known OpenAI fields the agent cannot honour; present with a value other than their neutral one: 400.
UNSUPPORTED: dict[str, Any] = {
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "parallel_tool_calls": None,
    "logit_bias": None,
    "logprobs": False,
    "top_logprobs": None,
    "audio": None,
    "prediction": None,
    "web_search_options": None,
    "reasoning_effort": None,
    "store": False,
    "presence_penalty": 0,
    "frequency_penalty": 0,
}
MAX_MESSAGES = 256


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: str = Field(min_length=1, max_length=200)
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: StrictInt | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    n: StrictInt = Field(default=1, ge=1, le=128)
    response_format: ResponseFormat | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    # Sitewarden's extensions: requirement-checked sampling.
    requirements: list[Any] | None = None
    strategy: Literal["first", "best", "majority"] | None = None
    candidates: StrictInt | None = Field(default=None, ge=1, le=128)
    on_fail: Literal["error", "best"] = "error"

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and (len(value) > 4 or not all(value)):
            raise ValueError("stop holds at most 4 non-empty strings")
        return value

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=200)
    input: str | list[str] = Field()
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "list[TextPart]", "function-after[_stops(), union[str,list[str]]]"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    """A request object, or APIError 400 naming the parameter; unsupported known fields are refused."""
    refused = [
        name
        for name, neutral in UNSUPPORTED.items()
        if name in body and body[name] is not None and body[name] != neutral
    ]
    if refused:
        raise APIError(
            400,
            f"{', '.join(refused)} {'is' if len(refused) == 1 else 'are'} not supported by this server",
            param=refused[0],
            code="unsupported_parameter",
        )
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        param = _param(tuple(error["loc"]))
        raise APIError(400, f"{param or 'body'}: {error['msg']}", param=param or None, code="invalid_value") from None
