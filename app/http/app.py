"""`create_app(settings)`: the ASGI application and its services, built explicitly."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from app.buildinfo import build_info
from app.config import Settings
from app.http import docs, embed, openai, openapi, service, usage
from app.http.errors import (
    ApiError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    dialect_of,
    error_response,
)
from app.http.middleware import CorsMiddleware, RequestContextMiddleware
from app.http.requests import RequestBodies, Served
from app.metrics import Metrics
from app.serving.services import Services


def create_app(settings: Settings) -> Starlette:
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        services = await Services.start(settings, metrics)
        served = Served.of(settings, services.model.manifest)
        bodies = RequestBodies.of(served)
        app.state.services = services
        app.state.served = served
        app.state.bodies = bodies
        app.state.openapi_document = openapi.document(
            settings, served, bodies, build_info()["version"]
        )
        try:
            yield
        finally:
            await services.stop()

    # Each group of endpoints is a module of app/http with a routes() of its own.
    endpoints = [
        *service.routes(),
        *embed.routes(),
        *openai.routes(),
        *usage.routes(),
        *docs.routes(),
        *openapi.routes(),
    ]
    paths = {route.path for route in endpoints}
    middleware = [Middleware(RequestContextMiddleware, metrics=metrics, endpoints=paths)]
    if settings.cors_origins:
        middleware.append(Middleware(CorsMiddleware, origins=settings.cors_origins, paths=paths))
    return Starlette(
        routes=endpoints,
        middleware=middleware,
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan,
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    """The router's own refusals (no such path, a method not served there)."""
    assert isinstance(exc, HTTPException)
    error: ApiError
    if exc.status_code == 404:
        error = NotFound(f"no endpoint at {request.url.path}")
    elif exc.status_code == 405:
        error = MethodNotAllowed(
            f"{request.method} is not allowed on {request.url.path}",
            headers=dict(exc.headers or {}),
        )
    elif exc.status_code < 500:
        error = InvalidRequest(str(exc.detail), status=exc.status_code)
    else:
        error = InternalError("internal error")
    request.state.error = error.code  # counted by the middleware
    return error_response(error, dialect_of(request.scope))


def create_app_from_env() -> Starlette:
    """Entry point for hypercorn's workers (each process builds its own app and services)."""
    return create_app(Settings.from_env())
