"""What every handler shares: its dialect, the services, the caller, the request's JSON body, and
the one wrapper that turns whatever it raised into an answer (app/http/errors.py)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from app.http.body import read_json
from app.http.errors import ApiError, Dialect, ServiceUnavailable, error_response, from_domain
from app.serving.auth import Principal
from app.serving.services import Services

Handler = Callable[[Request], Awaitable[Response]]


def endpoint(dialect: Dialect) -> Callable[[Handler], Handler]:
    """Mark a handler with its dialect and answer its refusals in that dialect's envelope.

    Anything that is not a refusal (a bug) propagates to the middleware: logged, and answered
    with a bare 500 in the same envelope.
    """

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                error = from_domain(exc, dialect)
                if error is None:
                    raise
                await _add_quota_headers(request, error)
                request.state.error = error.code  # counted by the middleware
                return error_response(error, dialect)

        run.dialect = dialect  # type: ignore[attr-defined]  # read by errors.dialect_of
        return run

    return wrap


async def _add_quota_headers(request: Request, error: ApiError) -> None:
    """Errors after authentication still carry the caller's X-RateLimit-* headers."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None or "X-RateLimit-Limit" in error.headers:
        return
    # The headers are a courtesy; the error itself must go out whatever happens here.
    with contextlib.suppress(Exception):
        services: Services = request.app.state.services
        error.headers.update((await services.quota.status(principal)).headers())


def ready_services(request: Request) -> Services:
    services: Services = request.app.state.services
    if not services.ready:
        raise ServiceUnavailable("the service is starting or stopping", retry_after=1)
    return services


async def authenticate(services: Services, request: Request) -> Principal:
    """The caller's principal (raises InvalidApiKey); remembered for the quota headers."""
    principal = await services.auth.authenticate(request.headers.get("authorization"))
    request.state.principal = principal
    return principal


async def json_body(request: Request, services: Services) -> Any:
    settings = services.settings
    return await read_json(
        request, max_bytes=settings.max_request_bytes, timeout=settings.read_timeout
    )
