"""The controller's errors, one hierarchy; `controller.api.problems` maps them to HTTP.

Each class carries the HTTP status and an RFC 9457 problem type slug, so that service
functions raise domain errors and the HTTP layer translates them in one place.
"""

from __future__ import annotations

from typing import Any


class ControllerError(Exception):
    """Base class of errors the controller reports to clients."""

    status = 500
    slug = "internal-error"
    title = "Internal error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class BadRequest(ControllerError):
    status, slug, title = 400, "bad-request", "Bad request"


class Unauthenticated(ControllerError):
    status, slug, title = 401, "unauthenticated", "Authentication required"


class Forbidden(ControllerError):
    status, slug, title = 403, "forbidden", "Forbidden"


class NotFound(ControllerError):
    status, slug, title = 404, "not-found", "Not found"


class Conflict(ControllerError):
    status, slug, title = 409, "conflict", "Conflict"


class Gone(ControllerError):
    status, slug, title = 410, "gone", "Gone"


class PayloadTooLarge(ControllerError):
    status, slug, title = 413, "payload-too-large", "Payload too large"


class Unprocessable(ControllerError):
    status, slug, title = 422, "unprocessable", "Unprocessable content"


class Unavailable(ControllerError):
    status, slug, title = 503, "unavailable", "Service unavailable"
