"""API errors: each has an HTTP status and a stable `error` code; the body is always JSON.

The one place where what went wrong becomes an answer: the domain's refusals (a bad key, a used-up
quota, a text over the token limit, a full queue, a store down) are turned into API errors by
`from_domain`, and every error is written in one of the two envelopes by `error_response`: ours
(`{"error": code, "message": ...}`) or, on the OpenAI-compatible endpoints, OpenAI's.
"""

from __future__ import annotations

import math
import time
from enum import Enum
from typing import Any

from starlette.types import Scope

from app.http.responses import JSONResponse
from app.model.batching import OwnerQueueFull, QueueFull
from app.model.engine import MAX_CHARS_PER_TOKEN, TextTooLong
from app.serving.auth import InvalidApiKey
from app.serving.errors import Busy, StoreUnavailable
from app.serving.quota import QuotaExceeded
from app.serving.ratelimit import PERIOD, RateLimited


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


class TooManyRequests(ApiError):
    """Over a per-minute limit (requests or tokens), or too much of the customer's own work is
    waiting for the model: retry after `Retry-After` seconds."""

    openai_type = "requests"
    status = 429
    code = "rate_limited"


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
            # x-should-retry: OpenAI's clients would otherwise retry a refusal that lasts until
            # the month's end.
            headers={
                **state.headers(),
                "Retry-After": str(retry_after),
                "x-should-retry": "false",
            },
            limit=state.limit,
            reset_at=state.reset_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
    if isinstance(exc, RateLimited):
        return _rate_limited(exc)
    if isinstance(exc, OwnerQueueFull):
        return TooManyRequests(
            f"too much of your work is waiting for the model ({exc}); retry shortly",
            headers={"Retry-After": "1"},
            window="queued_tokens",
            limit=exc.limit,
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


def _rate_limited(exc: RateLimited) -> TooManyRequests:
    never = math.isinf(exc.retry_after)
    retry_after = PERIOD if never else max(1, math.ceil(exc.retry_after))
    error = TooManyRequests(
        str(exc) if never else f"{exc}; retry after {retry_after} s",
        headers={**exc.state.headers(), "Retry-After": str(int(retry_after))},
        window=exc.window,
        limit=exc.limit,
    )
    error.openai_type = exc.window  # OpenAI's type names the window: requests or tokens
    return error


def _over_token_limit(exc: TextTooLong, dialect: Dialect) -> OverTokenLimit:
    several = exc.inputs > 1
    where = f"input {exc.index}" if several else "text"
    counted: dict[str, int]
    if exc.chars is not None:  # refused for its characters alone, never tokenized
        what = f"{exc.chars} characters, more than {exc.max_tokens * MAX_CHARS_PER_TOKEN} read"
        counted = {"chars": exc.chars}
    elif exc.exact:
        what = f"{exc.tokens} tokens"
        counted = {"tokens": exc.tokens}
    else:  # refused by counting pieces, never tokenized: only a lower bound
        what = f"more than {exc.max_tokens} tokens"
        counted = {"tokens_at_least": exc.tokens}
    error = OverTokenLimit(
        f"{where} has {what}; the limit is {exc.max_tokens} tokens",
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
