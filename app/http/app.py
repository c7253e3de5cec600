"""`create_app(settings)`: the ASGI application and its services, built explicitly."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.config import Settings
from app.http import docs, embed, openai, openapi
from app.http.errors import ApiError, InternalError, MethodNotAllowed, NotFound
from app.http.middleware import CorsMiddleware, RequestContextMiddleware
from app.http.responses import error_response
from app.metrics import Metrics
from app.serving.services import Services


def create_app(settings: Settings) -> Starlette:
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        services = await Services.start(settings, metrics)
        app.state.services = services
        try:
            yield
        finally:
            await services.stop()

    endpoints = [
        Route("/", embed.index, methods=["GET"]),
        Route("/health", embed.health, methods=["GET"]),
        Route("/metrics", embed.metrics, methods=["GET"]),
        Route("/v1/embed", embed.embed, methods=["POST"]),
        Route("/v1/embeddings", openai.embeddings, methods=["POST"]),
        Route("/v1/models", openai.models, methods=["GET"]),
        *docs.routes(),
        Route("/openapi.json", openapi.openapi_json, methods=["GET"]),
    ]
    paths = {route.path for route in endpoints}
    middleware = [Middleware(RequestContextMiddleware, metrics=metrics, endpoints=paths)]
    if settings.cors_origins:
        middleware.append(Middleware(CorsMiddleware, origins=settings.cors_origins, paths=paths))
    return Starlette(
        routes=endpoints,
        middleware=middleware,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error},
        lifespan=lifespan,
    )


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _respond(request, exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return _respond(request, NotFound(f"no endpoint at {request.url.path}"))
    if exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
        error.headers.update(exc.headers or {})
        return _respond(request, error)
    error = ApiError(str(exc.detail)) if exc.status_code < 500 else InternalError("internal error")
    if exc.status_code < 500:
        error.status, error.code = exc.status_code, "invalid_request"
    return _respond(request, error)


def _respond(request: Request, error: ApiError) -> Response:
    request.state.error = error.code  # counted by the middleware
    return error_response(error, request.scope["path"])


def create_app_from_env() -> Starlette:
    """Entry point for hypercorn's workers (each process builds its own app and services)."""
    return create_app(Settings.from_env())
