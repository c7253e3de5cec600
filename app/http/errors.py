"""API errors: each has an HTTP status and a stable `error` code; the body is always JSON.

The one place where what went wrong becomes an answer: the domain's refusals (a bad key, a used-up
quota, a text over the token limit, a full queue, a store down) are turned into API errors by
`from_domain`, and every error is written in one of the two envelopes by `error_response`: ours
(`{"error": code, "message": ...}`) or, on the OpenAI-compatible endpoints, OpenAI's.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Any

from starlette.types import Scope

from app.http.responses import JSONResponse
from app.model.batching import QueueFull
from app.model.engine import TextTooLong
from app.serving.auth import InvalidApiKey
from app.serving.errors import Busy, StoreUnavailable
from app.serving.quota import QuotaExceeded


class ApiError(Exception):
    status = 500
    code = "internal_error"
    openai_type = "server_error"  # the `type` of OpenAI's error envelope

    def __init__(
        self,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        status: int | None = None,  # another status than the class's (the router's refusals)
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        if status is not None:
            self.status = status
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


class OverTokenLimit(ApiError):
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


class Dialect(Enum):
    """Which envelope an endpoint's errors are written in."""

    SMALLY = "smally"
    OPENAI = "openai"


def from_domain(exc: Exception, dialect: Dialect) -> ApiError | None:
    """The API error for a refusal of the domain; None for anything else (a bug: a 500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidApiKey):
        return Unauthorized(str(exc))
    if isinstance(exc, QuotaExceeded):
        state = exc.state
        retry_after = max(1, int(state.reset_at.timestamp() - time.time()))
        return RateLimitExceeded(
            f"monthly quota of {state.limit} embeddings reached for the {exc.tier} tier",
            headers={**state.headers(), "Retry-After": str(retry_after)},
            limit=state.limit,
            reset_at=state.reset_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
    if isinstance(exc, TextTooLong):
        return _over_token_limit(exc, dialect)
    if isinstance(exc, QueueFull):
        return Overloaded(f"too much work is queued ({exc}); retry shortly")
    if isinstance(exc, Busy):
        return Overloaded(str(exc))
    if isinstance(exc, StoreUnavailable):
        return ServiceUnavailable(str(exc))
    return None


def _over_token_limit(exc: TextTooLong, dialect: Dialect) -> OverTokenLimit:
    several = exc.inputs > 1
    where = f"input {exc.index}" if several else "text"
    count = f"{exc.tokens}" if exc.exact else f"more than {exc.max_tokens}"
    # An exact count, or (refused by counting words, never tokenized) only a lower bound.
    counted = {"tokens": exc.tokens} if exc.exact else {"tokens_at_least": exc.tokens}
    error = OverTokenLimit(
        f"{where} has {count} tokens; the limit is {exc.max_tokens}",
        max_tokens=exc.max_tokens,
        index=exc.index,
        **counted,
    )
    if dialect is Dialect.OPENAI:  # OpenAI's envelope names the offending input
        error.extra["param"] = f"input[{exc.index}]" if several else "input"
    return error


def error_response(error: ApiError, dialect: Dialect) -> JSONResponse:
    body = error.openai_body() if dialect is Dialect.OPENAI else error.body()
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def dialect_of(scope: Scope) -> Dialect:
    """The dialect of the endpoint the router matched (see `app.http.endpoint`); ours when none
    matched."""
    return getattr(scope.get("endpoint"), "dialect", Dialect.SMALLY)
