"""API errors: each has an HTTP status and a stable `error` code; the body is always JSON."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    status = 500
    code = "internal_error"
    openai_type = "server_error"  # the `type` of OpenAI's error envelope

    def __init__(
        self, message: str, *, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}

    def openai_body(self) -> dict[str, Any]:
        """The same error in OpenAI's envelope, for the OpenAI-compatible endpoints."""
        return {
            "error": {
                "message": self.message,
                "type": self.openai_type,
                "param": self.extra.get("param"),
                "code": self.code,
            }
        }


class InvalidRequest(ApiError):
    openai_type = "invalid_request_error"
    status = 400
    code = "invalid_request"


class TextTooLongError(ApiError):
    openai_type = "invalid_request_error"
    status = 400
    code = "text_too_long"


class Unauthorized(ApiError):
    openai_type = "invalid_request_error"
    status = 401
    code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="smally"'})


class NotFound(ApiError):
    openai_type = "invalid_request_error"
    status = 404
    code = "not_found"


class MethodNotAllowed(ApiError):
    openai_type = "invalid_request_error"
    status = 405
    code = "method_not_allowed"


class PayloadTooLarge(ApiError):
    openai_type = "invalid_request_error"
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ApiError):
    openai_type = "invalid_request_error"
    status = 415
    code = "unsupported_media_type"


class RequestTimeout(ApiError):
    """The request body did not arrive in time (a slow or stalled client)."""

    openai_type = "invalid_request_error"
    status = 408
    code = "request_timeout"


class RateLimitExceeded(ApiError):
    openai_type = "insufficient_quota"
    status = 429
    code = "rate_limit_exceeded"


class ServiceUnavailable(ApiError):
    status = 503
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int = 1, **extra: Any) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)}, **extra)


class Overloaded(ServiceUnavailable):
    code = "overloaded"


class ModelNotFound(ApiError):
    status = 404
    code = "model_not_found"
    openai_type = "invalid_request_error"


class InternalError(ApiError):
    status = 500
    code = "internal_error"
