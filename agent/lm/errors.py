"""The language-model runtime's errors, rooted at `LMError` (an `AgentError`).

`APIError` carries what the OpenAI-compatible API answers: an HTTP status and OpenAI's error
object (`{"error": {"message", "type", "param", "code"}}`); the routes map it in one place.
"""

from __future__ import annotations

from typing import Any

from agent.errors import AgentError, RefusedError


class LMError(AgentError):
    """Base class of the language-model runtime's errors."""


class ArtifactError(LMError, RefusedError):
    """A base model, adapter or embedding model directory cannot be used; the message says why."""


class NotInstalled(LMError):
    """The `lm` extra (torch, transformers, peft, ...) is not installed in this environment."""


# OpenAI's error `type` for each status it uses.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "requirements_not_met",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(LMError):
    """A request the API answers with an error: status, message, and the parameter it concerns."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        reasons: list[str] | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.reasons = reasons or []
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        """OpenAI's error object; Sitewarden's additions (reasons, report, audit index) beside it."""
        error: dict[str, Any] = {
            "message": self.message,
            "type": _TYPES.get(self.status, "invalid_request_error"),
            "param": self.param,
            "code": self.code,
        }
        body: dict[str, Any] = {"error": error}
        sitewarden: dict[str, Any] = dict(self.extra)
        if self.reasons:
            sitewarden["reasons"] = self.reasons
        if sitewarden:
            body["sitewarden"] = sitewarden
        return body
