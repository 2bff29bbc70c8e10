"""Every error the API answers with: typed, raised by handlers, rendered in one place.

Handlers raise an :class:`ApiError` (``QueueFull(retry_after)``,
``ValidationFailed(details)``, …) and read as the happy path; the app's one
error handler (:func:`render`) turns it, or any other Sanic exception, into a
JSON body. Parsing client input happens inside :func:`client_input`, which
turns *any* failure to parse into a 400, so no odd input reaches a 500.
"""

from __future__ import annotations

import logging
from typing import Any

from sanic import HTTPResponse, Request
from sanic.exceptions import SanicException

from service.responses import json_response

log = logging.getLogger(__name__)

SANIC_NAMES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "body_too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
}


class ApiError(SanicException):
    """An answer other than success, with its JSON ``error`` name."""

    status_code = 400
    error = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message, status_code=self.status_code, headers=headers)
        self.message = message
        self.fields = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "message": self.message, **self.fields}


class BadRequest(ApiError):
    pass


class InvalidJSON(ApiError):
    error = "invalid_json"


class ValidationFailed(ApiError):
    error = "validation_failed"

    def __init__(self, details: list[Any]) -> None:
        super().__init__("the batch was refused; nothing from it was stored", details=details)


class Unauthorized(ApiError):
    status_code = 401
    error = "unauthorized"

    def __init__(
        self, message: str = "send a valid API key in X-API-Key or Authorization: Bearer"
    ) -> None:
        super().__init__(message)


class Forbidden(ApiError):
    status_code = 403
    error = "forbidden"


class NotFound(ApiError):
    status_code = 404
    error = "not_found"


class QuotaExceeded(ApiError):
    """A limit that a retry soon will not lift (distinct types per day)."""

    status_code = 403
    error = "quota_exceeded"


class BodyTooLarge(ApiError):
    status_code = 413
    error = "body_too_large"


class UnsupportedMediaType(ApiError):
    status_code = 415
    error = "unsupported_media_type"


class _RetryLater(ApiError):
    def __init__(self, message: str, retry_after: int, **extra: Any) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)}, **extra)


class RateLimited(_RetryLater):
    status_code = 429
    error = "rate_limited"


class QueueFull(_RetryLater):
    status_code = 503
    error = "overloaded"


class Unavailable(_RetryLater):
    status_code = 503
    error = "unavailable"


class client_input:
    """Parse client input: any failure (bad bytes, odd digits, …) is the client's, a 400.

    A class, not ``@contextmanager``: it runs on every ingest request, and a
    generator-based context manager costs several times as much.
    """

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 _tb: object) -> None:  # fmt: skip
        if exc is None or isinstance(exc, ApiError) or not isinstance(exc, Exception):
            return  # nothing, or already an answer: let it through
        raise BadRequest(f"{self.what} could not be parsed: {type(exc).__name__}") from exc


def render(request: Request, exc: Exception) -> HTTPResponse:
    """The app's one error handler."""
    if isinstance(exc, ApiError):
        return json_response(exc.body(), exc.status_code, exc.headers or None)
    if isinstance(exc, SanicException):
        status = exc.status_code
        name = SANIC_NAMES.get(status, "error" if status < 500 else "internal_error")
        message = str(exc) or name.replace("_", " ")
        return json_response({"error": name, "message": message}, status,
                             dict(exc.headers) if exc.headers else None)  # fmt: skip
    log.exception("unhandled error on %s %s", request.method, request.path)
    return json_response({"error": "internal_error", "message": "an unexpected error occurred"},
                         500)  # fmt: skip
