"""HTTP handlers: parse the request, call the domain, shape the response. Nothing more."""

from __future__ import annotations

import time
from typing import Any

import orjson
import psycopg
from psycopg_pool import PoolTimeout
from starlette.requests import Request
from starlette.responses import Response

from app.auth import InvalidApiKey, Principal
from app.engine import TextTooLong
from app.errors import (
    InvalidRequest,
    PayloadTooLarge,
    ServiceUnavailable,
    TextTooLongError,
    Unauthorized,
)
from app.responses import JSONResponse
from app.services import Services

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
            },
        }
    )


async def health(request: Request) -> Response:
    services: Services = request.app.state.services
    status, body = await services.health()
    return JSONResponse(body, status_code=status)


async def embed(request: Request) -> Response:
    started = time.perf_counter()
    services = services_of(request)
    principal = await authenticate(services, request)
    payload = await read_json(request, services.settings.max_request_bytes)
    text, normalize = parse_embed_request(payload)

    try:
        batch = await services.embeddings.embed([text], normalize=normalize)
    except TextTooLong as exc:
        raise TextTooLongError(
            f"text has {exc.tokens} tokens; the limit is {exc.max_tokens}",
            max_tokens=exc.max_tokens,
            tokens=exc.tokens,
        ) from None
    tokens = batch.token_counts[0]
    services.usage.record(principal.user_id, principal.key_id, 1, tokens)
    return JSONResponse(
        {
            "embedding": batch.vectors[0],
            "model": services.embeddings.manifest.name,
            "tokens": tokens,
            "cached": False,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
    )


async def authenticate(services: Services, request: Request) -> Principal:
    try:
        return await services.auth.authenticate(request.headers.get("authorization"))
    except InvalidApiKey as exc:
        raise Unauthorized(str(exc)) from None
    except _UNAVAILABLE:
        raise ServiceUnavailable("the key store is unavailable; retry shortly") from None


async def read_json(request: Request, limit: int) -> Any:
    """Read at most `limit` bytes of body and parse it; a larger body is refused unread."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("invalid Content-Length header")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body is over {limit} bytes", max_bytes=limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over {limit} bytes", max_bytes=limit)
        chunks.append(chunk)
    try:
        return orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc.msg}") from None


def parse_embed_request(payload: Any) -> tuple[str, bool]:
    if not isinstance(payload, dict):
        raise InvalidRequest('request body must be a JSON object like {"text": "..."}')
    text = payload.get("text")
    if text is None:
        raise InvalidRequest("'text' is required", param="text")
    if not isinstance(text, str):
        raise InvalidRequest("'text' must be a string", param="text")
    if not text.strip():
        raise InvalidRequest("'text' must not be empty or only whitespace", param="text")
    normalize = payload.get("normalize", True)
    if not isinstance(normalize, bool):
        raise InvalidRequest("'normalize' must be true or false", param="normalize")
    return text, normalize
