"""The agent's errors, rooted at one base class."""

from __future__ import annotations


class AgentError(Exception):
    """Base class of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """The site configuration or the data dir cannot be used; the message says why."""


class EnrollmentError(AgentError):
    """Enrollment failed: bad token, controller refused, or the root does not match the token."""


class RefusedError(AgentError):
    """An artifact was refused (TUF, approval, acceptance decision, load check); carries the reason."""


class InferenceError(AgentError):
    """A request cannot be served; `status` is the HTTP status to answer with."""

    def __init__(
        self, status: int, message: str, reasons: list[str] | None = None, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reasons = reasons or []
        self.headers = headers or {}


class RetryableError(AgentError):
    """A failure expected to pass (the network, the controller, the disk, a key file being replaced):
    the desired-state version is not used up but retried with backoff."""


class AuditUnavailable(AgentError):
    """The site's audit log cannot store entries now (a full disk, a failed write, a full queue):
    requests are refused with 503 until it can again; `retry_after_s` says when to try again."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
