"""HTTP handlers: parse the request, call the domain, shape the response. Nothing more."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout
from starlette.requests import Request
from starlette.responses import Response

from app.http.body import read_json
from app.http.errors import (
    ApiError,
    InvalidRequest,
    RateLimitExceeded,
    ServiceUnavailable,
    TextTooLongError,
    Unauthorized,
)
from app.http.errors import (
    Overloaded as OverloadedError,
)
from app.http.responses import JSONResponse
from app.model.batching import QueueFull
from app.model.engine import TextTooLong
from app.serving.auth import InvalidApiKey, Principal
from app.serving.errors import Busy
from app.serving.pipeline import Served
from app.serving.quota import QuotaExceeded
from app.serving.services import Services

_UNAVAILABLE = (psycopg.OperationalError, PoolTimeout)


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    if not services.ready:
        raise ServiceUnavailable("the service is starting or stopping", retry_after=1)
    return services


async def index(request: Request) -> Response:
    services: Services = request.app.state.services
    return JSONResponse(
        {
            "name": "smally",
            "description": "Text embeddings API",
            "model": services.embeddings.manifest.name,
            "endpoints": {
                "POST /v1/embed": "embed one text (Authorization: Bearer <key>)",
                "GET /health": "service health",
                "POST /v1/embeddings": "OpenAI-compatible embeddings (one text or up to 2048)",
                "GET /v1/models": "the served model (OpenAI-compatible)",
                "GET /metrics": "Prometheus metrics",
            },
        }
    )


async def health(request: Request) -> Response:
    services: Services = request.app.state.services
    status, body = await services.health()
    return JSONResponse(body, status_code=status)


async def metrics(request: Request) -> Response:
    services: Services = request.app.state.services
    return Response(services.metrics.render(), media_type=services.metrics.content_type)


async def embed(request: Request) -> Response:
    started = time.perf_counter()
    services = services_of(request)
    principal = await authenticate(services, request)
    refuse_known_over_quota(services, principal)
    async with quota_headers_on_error(services, principal):
        payload = await json_body(request, services)
        text, normalize, truncate = parse_embed_request(payload)
        (token_ids,) = await tokenize(services, [text], truncate=truncate)
        served = await serve(services, principal, [token_ids], normalize)
    request.state.cached = served.cached[0]
    return JSONResponse(
        {
            "embedding": served.vectors[0],
            "model": services.embeddings.manifest.name,
            "tokens": len(token_ids),  # what was embedded: after truncation, if any
            "cached": served.cached[0],
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        },
        headers=served.quota.headers(),
    )


async def authenticate(services: Services, request: Request) -> Principal:
    try:
        return await services.auth.authenticate(request.headers.get("authorization"))
    except InvalidApiKey as exc:
        raise Unauthorized(str(exc)) from None
    except _UNAVAILABLE:
        raise ServiceUnavailable("the key store is unavailable; retry shortly") from None


@contextlib.asynccontextmanager
async def quota_headers_on_error(services: Services, principal: Principal) -> AsyncIterator[None]:
    """Errors after authentication still carry the caller's X-RateLimit-* headers."""
    try:
        yield
    except ApiError as exc:
        if "X-RateLimit-Limit" not in exc.headers:
            # The headers are a courtesy; the error itself must go out whatever happens here.
            with contextlib.suppress(Exception):
                exc.headers.update((await services.quota.status(principal)).headers())
        raise


async def json_body(request: Request, services: Services) -> Any:
    settings = services.settings
    return await read_json(
        request, max_bytes=settings.max_request_bytes, timeout=settings.read_timeout
    )


async def tokenize(
    services: Services, texts: list[str], *, truncate: bool = False
) -> list[list[int]]:
    try:
        return await services.embeddings.tokenize(texts, truncate=truncate)
    except TextTooLong as exc:
        where = f"input {exc.index}" if len(texts) > 1 else "text"
        count = f"{exc.tokens}" if exc.exact else f"more than {exc.max_tokens}"
        # An exact count, or (refused by counting words, never tokenized) only a lower bound.
        counted = {"tokens": exc.tokens} if exc.exact else {"tokens_at_least": exc.tokens}
        raise TextTooLongError(
            f"{where} has {count} tokens; the limit is {exc.max_tokens}",
            max_tokens=exc.max_tokens,
            index=exc.index,
            **counted,
        ) from None


def rate_limited(services: Services, exc: QuotaExceeded) -> RateLimitExceeded:
    services.metrics.rate_limited.labels(exc.tier).inc()
    state = exc.state
    retry_after = max(1, int(state.reset_at.timestamp() - time.time()))
    return RateLimitExceeded(
        f"monthly quota of {state.limit} embeddings reached for the {exc.tier} tier",
        headers={**state.headers(), "Retry-After": str(retry_after)},
        limit=state.limit,
        reset_at=state.reset_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def refuse_known_over_quota(services: Services, principal: Principal) -> None:
    """Before reading the body: a user just seen out of quota costs no parsing or tokenizing."""
    try:
        services.quota.refuse_if_known_exhausted(principal)
    except QuotaExceeded as exc:
        raise rate_limited(services, exc) from None


async def serve(
    services: Services, principal: Principal, token_ids: Sequence[Sequence[int]], normalize: bool
) -> Served:
    try:
        return await services.pipeline.serve(principal, token_ids, normalize=normalize)
    except QuotaExceeded as exc:
        raise rate_limited(services, exc) from None
    except QueueFull as exc:
        raise OverloadedError(f"too much work is queued ({exc}); retry shortly") from None
    except Busy as exc:
        raise OverloadedError(str(exc)) from None
    except _UNAVAILABLE:
        raise ServiceUnavailable("the database is unavailable; retry shortly") from None


def parse_embed_request(payload: Any) -> tuple[str, bool, bool]:
    if not isinstance(payload, dict):
        raise InvalidRequest('request body must be a JSON object like {"text": "..."}')
    text = payload.get("text")
    if text is None:
        raise InvalidRequest("'text' is required", param="text")
    if not isinstance(text, str):
        raise InvalidRequest("'text' must be a string", param="text")
    if not text.strip():
        raise InvalidRequest("'text' must not be empty or only whitespace", param="text")
    return text, flag(payload, "normalize", default=True), parse_truncate(payload)


def parse_truncate(payload: dict[str, Any]) -> bool:
    """`truncate` (both embedding endpoints): embed the first MAX_TOKENS tokens of a longer
    text instead of refusing it (`text_too_long`, the default)."""
    return flag(payload, "truncate", default=False)


def flag(payload: dict[str, Any], name: str, *, default: bool) -> bool:
    value = payload.get(name, default)
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be true or false", param=name)
    return value
