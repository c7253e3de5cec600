"""What every handler shares: its dialect, the services, the caller, the request's JSON body, and
the one wrapper that turns whatever it raised into an answer (app/http/errors.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from app.http.body import read_json
from app.http.errors import ApiError, Dialect, ServiceUnavailable, error_response, from_domain
from app.serving.auth import Principal
from app.serving.ratelimit import RateState
from app.serving.services import Services

Handler = Callable[[Request], Awaitable[Response]]

# What the access log and metrics say of a request whose client left before its answer (nginx's
# status for the same).
CLIENT_GONE = "client_gone"
CLIENT_GONE_STATUS = 499


def endpoint(dialect: Dialect) -> Callable[[Handler], Handler]:
    """Mark a handler with its dialect and answer its refusals in that dialect's envelope.

    Anything that is not a refusal (a bug) propagates to the middleware: logged, and answered
    with a bare 500 in the same envelope.
    """

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def run(request: Request) -> Response:
            try:
                response = await handler(request)
            except asyncio.CancelledError:
                if not _gone(request):
                    raise
                # The client left: its work was dropped, and nobody reads this answer.
                request.state.error = CLIENT_GONE
                return Response(status_code=CLIENT_GONE_STATUS)
            except Exception as exc:
                error = from_domain(exc, dialect)
                if error is None:
                    raise
                await _add_quota_headers(request, error)
                _add_rate_headers(request, error.headers)
                request.state.error = error.code  # counted by the middleware
                return error_response(error, dialect)
            finally:
                _stop_watching(request)
            _add_rate_headers(request, response.headers)
            return response

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


def _add_rate_headers(request: Request, headers: MutableMapping[str, str]) -> None:
    """Answers after admission carry the caller's x-ratelimit-* headers."""
    rate: RateState | None = getattr(request.state, "rate", None)
    if rate is not None:
        for name, value in rate.headers().items():
            headers.setdefault(name, value)


def ready_services(request: Request) -> Services:
    services: Services = request.app.state.services
    if not services.ready:
        raise ServiceUnavailable("the service is starting or stopping", retry_after=1)
    return services


async def authenticate(services: Services, request: Request) -> Principal:
    """The caller's principal (raises InvalidApiKey), admitted by its per-minute request limit
    before any other work (raises RateLimited); both remembered for the answer's headers."""
    principal = await services.auth.authenticate(request.headers.get("authorization"))
    request.state.principal = principal
    request.state.rate = await services.limits.admit(principal)
    return principal


async def json_body(request: Request, services: Services) -> Any:
    settings = services.settings
    body = await read_json(
        request, max_bytes=settings.max_request_bytes, timeout=settings.read_timeout
    )
    _watch_for_disconnect(request)
    return body


def _watch_for_disconnect(request: Request) -> None:
    """Once the body is read, the next message can only be the client leaving: then the
    handler is cancelled, and the tokenizing and inference it waits for are dropped."""
    handler = asyncio.current_task()
    assert handler is not None

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        request.state.gone = True
        handler.cancel()

    request.state.watcher = asyncio.create_task(watch(), name="disconnect-watch")


def _gone(request: Request) -> bool:
    if not getattr(request.state, "gone", False):
        return False
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return True


def _stop_watching(request: Request) -> None:
    watcher: asyncio.Task[None] | None = getattr(request.state, "watcher", None)
    if watcher is not None:
        watcher.cancel()
