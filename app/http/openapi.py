"""The published API contract: an OpenAPI 3.1 document built from the code's own limits and errors.

Built from the same constants the handlers enforce (input count, token and body limits, the
served model, the error classes), so it cannot say something the code does not do; a test
compares the routes the app serves with the paths declared here, and schemathesis checks the
answers against the schemas.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.config import Settings
from app.http import errors
from app.http.endpoint import endpoint
from app.http.fields import JSON
from app.http.requests import MAX_INPUTS, RequestBodies, Served
from app.http.usage import MONTH
from app.model.engine import COUNT_PIECES_AFTER_CHARS_PER_TOKEN, MAX_CHARS_PER_TOKEN

# Which errors each endpoint can answer with (besides 405 for a wrong method).
_EMBED_ERRORS = (
    errors.InvalidRequest,
    errors.OverTokenLimit,
    errors.Unauthorized,
    errors.RequestTimeout,
    errors.PayloadTooLarge,
    errors.UnsupportedMediaType,
    errors.RateLimitExceeded,
    errors.TooManyRequests,
    errors.ServiceUnavailable,
    errors.Overloaded,
)
_OPENAI_EMBED_ERRORS = (*_EMBED_ERRORS, errors.ModelNotFound)
_MODELS_ERRORS = (errors.Unauthorized, errors.TooManyRequests, errors.ServiceUnavailable)
_USAGE_ERRORS = (
    errors.InvalidRequest,
    errors.Unauthorized,
    errors.TooManyRequests,
    errors.ServiceUnavailable,
    errors.Overloaded,
)

_ERROR_DESCRIPTIONS = {
    400: "Invalid request (`invalid_request`: not JSON, a duplicate key, a wrong type or "
    "value; `text_too_long`)",
    401: "Missing, unknown or revoked API key (`invalid_api_key`)",
    404: "The model is not served here (`model_not_found`)",
    408: "The body did not arrive within READ_TIMEOUT seconds (`request_timeout`); the "
    "connection is closed",
    413: "The body is over the size limit (`payload_too_large`); it is refused unread",
    415: "The body is not JSON (`unsupported_media_type`)",
    429: "The monthly quota is used up (`rate_limit_exceeded`, until the month's end), or a "
    "per-minute limit is reached or too much of the customer's work is queued (`rate_limited`: "
    "`window` says which; retry after `Retry-After` seconds)",
    503: "Starting, stopping, a store is unavailable, or too much work is queued "
    "(`service_unavailable`, `overloaded`); retry after `Retry-After` seconds",
}


def build_openapi(
    settings: Settings, served: Served, bodies: RequestBodies, version: str
) -> dict[str, Any]:
    model = served.model
    dimension = served.dimension
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Smally",
            "version": version,
            "summary": f"Text embeddings ({model}, {dimension} dimensions)",
            "description": (
                "Send text with an API key, get back a sentence embedding. Every embedding served "
                "counts against the key owner's monthly quota. `/v1/embeddings` and `/v1/models` "
                "speak OpenAI's dialect (point an OpenAI client's `base_url` at `/v1`), errors "
                "included. Request bodies are UTF-8 JSON (`Content-Type: application/json`, or "
                f"none) of at most {settings.max_request_bytes} bytes, arriving within "
                f"{settings.read_timeout:g} seconds, with no duplicate keys."
            ),
        },
        "security": [{"bearerAuth": []}],
        "tags": [
            {"name": "embeddings", "description": "The API: needs `Authorization: Bearer <key>`"},
            {"name": "service", "description": "Health, metrics and this contract: no key"},
        ],
        "paths": {
            "/": {"get": _index_operation()},
            "/health": {"get": _health_operation()},
            "/metrics": {"get": _metrics_operation()},
            "/openapi.json": {"get": _openapi_operation()},
            "/docs": {"get": _docs_operation()},
            "/docs/{asset}": {"get": _docs_asset_operation()},
            "/v1/embed": {"post": _embed_operation(bodies)},
            "/v1/embeddings": {"post": _embeddings_operation(bodies)},
            "/v1/models": {"get": _models_operation()},
            "/v1/usage": {"get": _usage_operation()},
        },
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key made by the operator with `create_api_key`.",
                }
            },
            "headers": _headers(),
            "schemas": _schemas(model, dimension),
        },
    }


def _embed_operation(bodies: RequestBodies) -> dict[str, Any]:
    return {
        "operationId": "embed",
        "summary": "Embed one text",
        "tags": ["embeddings"],
        "requestBody": bodies.embed.schema(),
        "responses": {
            "200": _response(
                "The embedding",
                {"$ref": "#/components/schemas/Embedding"},
                headers=_RATE_LIMIT_HEADERS,
            ),
            **_error_responses(_EMBED_ERRORS, "#/components/schemas/Error"),
        },
    }


def _embeddings_operation(bodies: RequestBodies) -> dict[str, Any]:
    return {
        "operationId": "createEmbeddings",
        "summary": f"Embed one text or up to {MAX_INPUTS} (OpenAI-compatible)",
        "tags": ["embeddings"],
        "description": "Each input counts as one embedding against the quota; a batch that would "
        "cross the quota is refused whole and consumes nothing. Errors use OpenAI's envelope, "
        "with `param` naming the offending input (`input[3]`).",
        "requestBody": bodies.embeddings.schema(),
        "responses": {
            "200": _response(
                "The embeddings, in input order",
                {"$ref": "#/components/schemas/EmbeddingList"},
                headers=_RATE_LIMIT_HEADERS,
            ),
            **_error_responses(_OPENAI_EMBED_ERRORS, "#/components/schemas/OpenAIError"),
        },
    }


def _models_operation() -> dict[str, Any]:
    return {
        "operationId": "listModels",
        "summary": "The served model (OpenAI-compatible)",
        "tags": ["embeddings"],
        "responses": {
            "200": _response("The served model", {"$ref": "#/components/schemas/ModelList"}),
            **_error_responses(_MODELS_ERRORS, "#/components/schemas/OpenAIError"),
        },
    }


def _usage_operation() -> dict[str, Any]:
    return {
        "operationId": "usage",
        "summary": "Your own usage of a month, beside your limits",
        "description": "The embeddings and tokens of the key owner's usage ledger in a month "
        "(recorded within about a second of being served), the tier's monthly limit and "
        "per-minute limits (`null`: unlimited), and for the current month what is left and "
        "when it resets. Counts against the per-minute request limit like any request; "
        "answers even when the monthly quota is used up.",
        "tags": ["embeddings"],
        "parameters": [
            {
                "name": "month",
                "in": "query",
                "required": False,
                "description": "The month, UTC (default: the current one)",
                "schema": {"type": "string", "pattern": MONTH.pattern},
            }
        ],
        "responses": {
            "200": _response(
                "The month's usage",
                {"$ref": "#/components/schemas/Usage"},
                headers=_PER_MINUTE_RESPONSE_HEADERS,
            ),
            **_error_responses(_USAGE_ERRORS, "#/components/schemas/Error"),
        },
    }


def _index_operation() -> dict[str, Any]:
    return {
        "operationId": "index",
        "summary": "What this service is and its endpoints",
        "tags": ["service"],
        "security": [],
        "responses": {
            "200": _response(
                "Name, model and endpoints",
                {
                    "type": "object",
                    "required": ["name", "model", "endpoints"],
                    "properties": {
                        "name": {"type": "string"},
                        "description": {"type": "string"},
                        "model": {"type": "string"},
                        "endpoints": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        },
                    },
                },
            )
        },
    }


def _health_operation() -> dict[str, Any]:
    health = {"$ref": "#/components/schemas/Health"}
    return {
        "operationId": "health",
        "summary": "Service health (for load balancers and monitoring)",
        "description": "`status` for everyone. The version, model, each store's check and the "
        "build only for a caller on the service's own machine (a loopback peer, or the address "
        "it was reached on) that sends no X-Real-IP, X-Forwarded-For or Forwarded header: "
        "through nginx, the status alone.",
        "tags": ["service"],
        "security": [],
        "responses": {
            "200": _response("Healthy, or degraded (serving without Redis)", health),
            "503": _response("Unhealthy: the model or the database is not available", health),
        },
    }


def _metrics_operation() -> dict[str, Any]:
    return {
        "operationId": "metrics",
        "summary": "Prometheus metrics",
        "tags": ["service"],
        "security": [],
        "responses": {
            "200": {
                "description": "The Prometheus text exposition format",
                "headers": _REQUEST_ID_HEADER,
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    }


def _openapi_operation() -> dict[str, Any]:
    return {
        "operationId": "openapi",
        "summary": "This document",
        "tags": ["service"],
        "security": [],
        "responses": {"200": _response("OpenAPI 3.1", {"type": "object"})},
    }


def _docs_operation() -> dict[str, Any]:
    return {
        "operationId": "docs",
        "summary": "This document as a web page (served with its assets; no internet needed)",
        "tags": ["service"],
        "security": [],
        "responses": {
            "200": {
                "description": "An HTML page",
                "headers": _REQUEST_ID_HEADER,
                "content": {"text/html": {"schema": {"type": "string"}}},
            },
            "404": _response(
                "The page's assets were not built into this installation (`not_found`)",
                {"$ref": "#/components/schemas/Error"},
            ),
        },
    }


def _docs_asset_operation() -> dict[str, Any]:
    return {
        "operationId": "docsAsset",
        "summary": "A script, stylesheet or icon of the docs page",
        "tags": ["service"],
        "security": [],
        "parameters": [
            {"name": "asset", "in": "path", "required": True, "schema": {"type": "string"}}
        ],
        "responses": {
            "200": {
                "description": "The file",
                "headers": _REQUEST_ID_HEADER,
                "content": {
                    media_type: {"schema": {"type": "string"}}
                    for media_type in ("text/javascript", "text/css", "image/png", "text/plain")
                },
            },
            "404": _response("No such file (`not_found`)", {"$ref": "#/components/schemas/Error"}),
        },
    }


_REQUEST_ID_HEADER = {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}
_PER_MINUTE_HEADERS = tuple(
    f"x-ratelimit-{what}-{window}"
    for window in ("requests", "tokens")
    for what in ("limit", "remaining", "reset")
)
_RATE_LIMIT_HEADERS = {
    name: {"$ref": f"#/components/headers/{name}"}
    for name in (
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
        *_PER_MINUTE_HEADERS,
    )
}


_PER_MINUTE_RESPONSE_HEADERS = {
    name: {"$ref": f"#/components/headers/{name}"} for name in _PER_MINUTE_HEADERS
}


def _response(
    description: str, schema: dict[str, Any], *, headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {**_REQUEST_ID_HEADER, **(headers or {})},
        "content": {JSON: {"schema": schema}},
    }


def _error_responses(
    error_classes: tuple[type[errors.ApiError], ...], schema_ref: str
) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status in sorted({error.status for error in error_classes}):
        codes = sorted({error.code for error in error_classes if error.status == status})
        headers: dict[str, Any] = {}
        if status == 401:
            headers["WWW-Authenticate"] = {"$ref": "#/components/headers/WWW-Authenticate"}
        if status in (429, 503):
            headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
        response = _response(_ERROR_DESCRIPTIONS[status], {"$ref": schema_ref}, headers=headers)
        response["x-error-codes"] = codes
        responses[str(status)] = response
    return responses


def _headers() -> dict[str, Any]:
    def integer(description: str, *, required: bool = True) -> dict[str, Any]:
        return {
            "description": description,
            "required": required,
            "schema": {"type": "string", "pattern": r"^-?[0-9]+$"},
        }

    return {
        "X-Request-Id": {
            "description": "The request's id (the client's own X-Request-Id if it is a safe "
            "token of 1-64 characters), also in the access log.",
            "required": True,
            "schema": {"type": "string", "minLength": 1, "maxLength": 64},
        },
        "X-RateLimit-Limit": integer("Embeddings allowed this month (-1: unlimited)"),
        "X-RateLimit-Remaining": integer("Embeddings left this month", required=False),
        "X-RateLimit-Reset": integer("When the quota resets (Unix seconds, UTC)", required=False),
        **{name: _per_minute_header(name) for name in _PER_MINUTE_HEADERS},
        "Retry-After": integer("Seconds to wait before retrying"),
        "WWW-Authenticate": {
            "description": "The bearer challenge",
            "required": True,
            "schema": {"type": "string"},
        },
    }


def _per_minute_header(name: str) -> dict[str, Any]:
    """x-ratelimit-{limit,remaining,reset}-{requests,tokens}: absent for an unlimited window."""
    _, _, what, window = name.split("-")
    meaning = {
        "limit": (f"{window.capitalize()} allowed per minute", r"^[0-9]+$"),
        "remaining": (f"{window.capitalize()} left of this minute's limit", r"^[0-9]+$"),
        "reset": (f"Until the {window} limit is whole again (1s, 250ms, 6m0s)", r"^[0-9a-z.]+$"),
    }
    description, pattern = meaning[what]
    return {
        "description": description,
        "required": False,
        "schema": {"type": "string", "pattern": pattern},
    }


def _schemas(model: str, dimension: int) -> dict[str, Any]:
    vector = {
        "type": "array",
        "items": {"type": "number"},
        "minItems": 1,
        "maxItems": dimension,
    }
    return {
        "Embedding": {
            "type": "object",
            "required": ["embedding", "model", "tokens", "cached", "latency_ms"],
            "properties": {
                "embedding": {**vector, "minItems": dimension},
                "model": {"type": "string", "const": model},
                "tokens": {"type": "integer", "minimum": 2},
                "cached": {"type": "boolean"},
                "latency_ms": {"type": "number", "minimum": 0},
            },
        },
        "EmbeddingList": {
            "type": "object",
            "required": ["object", "data", "model", "usage"],
            "properties": {
                "object": {"const": "list"},
                "data": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_INPUTS,
                    "items": {
                        "type": "object",
                        "required": ["object", "index", "embedding"],
                        "properties": {
                            "object": {"const": "embedding"},
                            "index": {"type": "integer", "minimum": 0},
                            "embedding": {
                                "oneOf": [
                                    vector,
                                    {"type": "string", "contentEncoding": "base64"},
                                ]
                            },
                        },
                    },
                },
                "model": {"type": "string", "const": model},
                "usage": {
                    "type": "object",
                    "required": ["prompt_tokens", "total_tokens"],
                    "properties": {
                        "prompt_tokens": {"type": "integer", "minimum": 0},
                        "total_tokens": {"type": "integer", "minimum": 0},
                    },
                },
            },
        },
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "data": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["id", "object", "created", "owned_by"],
                        "properties": {
                            "id": {"type": "string"},
                            "object": {"const": "model"},
                            "created": {"type": "integer"},
                            "owned_by": {"type": "string"},
                        },
                    },
                },
            },
        },
        "Usage": {
            "type": "object",
            "required": [
                "object",
                "month",
                "tier",
                "embeddings",
                "tokens",
                "limit",
                "remaining",
                "resets_at",
                "per_minute",
            ],
            "properties": {
                "object": {"const": "usage"},
                "month": {"type": "string", "pattern": MONTH.pattern},
                "tier": {"type": "string"},
                "embeddings": {"type": "integer", "minimum": 0},
                "tokens": {"type": "integer", "minimum": 0},
                "limit": {
                    "type": ["integer", "null"],
                    "minimum": 0,
                    "description": "Embeddings a month; null: unlimited",
                },
                "remaining": {
                    "type": ["integer", "null"],
                    "minimum": 0,
                    "description": "Left this month; null for another month or no limit",
                },
                "resets_at": {
                    "type": ["string", "null"],
                    "format": "date-time",
                    "description": "When the monthly quota resets; null for another month",
                },
                "per_minute": {
                    "type": "object",
                    "required": ["requests", "tokens"],
                    "properties": {
                        "requests": {"type": ["integer", "null"], "minimum": 0},
                        "tokens": {"type": ["integer", "null"], "minimum": 0},
                    },
                },
            },
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "properties": {
                "status": {"enum": ["healthy", "degraded", "unhealthy"]},
                "version": {"type": "string"},
                "model": {"type": "string"},
                "checks": {
                    "type": "object",
                    "required": ["database", "redis", "model"],
                    "properties": {
                        name: {"enum": ["ok", "error"]} for name in ("database", "redis", "model")
                    },
                },
                "build": {"type": "object"},
            },
        },
        "Error": {
            "type": "object",
            "description": "Every error: a stable `error` code and a message for people. Some "
            "carry details (`param`, `max_tokens`, `tokens`, `tokens_at_least`, `chars`, "
            "`index`, `max_bytes`, `limit`, `reset_at`, `window`). `text_too_long` has `tokens` "
            "when the text was tokenized, `tokens_at_least` when counting the pieces of a text "
            f"over {COUNT_PIECES_AFTER_CHARS_PER_TOKEN} characters per token of the limit "
            "already showed it too long, `chars` when the text is over "
            f"{MAX_CHARS_PER_TOKEN} characters per token of the limit (never tokenized).",
            "required": ["error", "message"],
            "properties": {
                "error": {"type": "string", "enum": _all_codes()},
                "message": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "max_tokens": {"type": "integer"},
                "tokens": {"type": "integer"},
                "tokens_at_least": {"type": "integer"},
                "index": {"type": "integer"},
                "max_bytes": {"type": "integer"},
                "limit": {"type": "integer"},
                "reset_at": {"type": "string", "format": "date-time"},
                "chars": {"type": "integer"},
                "window": {"enum": ["requests", "tokens", "queued_tokens"]},
            },
        },
        "OpenAIError": {
            "type": "object",
            "description": "OpenAI's error envelope; `code` is the same stable code as `error` "
            "on the other endpoints.",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": "string", "enum": _all_codes()},
                    },
                }
            },
        },
    }


def _all_codes() -> list[str]:
    """Every stable error code the service can answer with."""
    return sorted({cls.code for cls in _error_classes(errors.ApiError)})


def _error_classes(base: type[errors.ApiError]) -> list[type[errors.ApiError]]:
    found = [base]
    for sub in base.__subclasses__():
        found.extend(_error_classes(sub))
    return found


def document(settings: Settings, served: Served, bodies: RequestBodies, version: str) -> bytes:
    """The document, rendered once per app (the lifespan builds it when the model is known)."""
    return orjson.dumps(build_openapi(settings, served, bodies, version))


@endpoint(errors.Dialect.SMALLY)
async def openapi_json(request: Request) -> Response:
    """GET /openapi.json."""
    return Response(request.app.state.openapi_document, media_type=JSON)


def routes() -> list[Route]:
    return [Route("/openapi.json", openapi_json, methods=["GET"])]
