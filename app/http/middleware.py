"""Per-request context: request id, access log line, and a JSON 500 for anything unexpected;
and CORS for browser clients (CORS_ORIGINS)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.http.errors import InternalError, dialect_of, error_response
from app.logs import request_id_var
from app.metrics import Metrics

access_log = logging.getLogger("smally.access")
log = logging.getLogger(__name__)

# Answers are per caller and per moment: never cached by proxies, never sniffed as HTML.
_SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"))
_DISCARD_IDLE = 1.0
_DISCARD_LIMIT = 30.0
# Answers that end the connection whatever is left of the body: too big, or too slow.
_CLOSING_STATUSES = (408, 413)
# At most this much already-received body is dropped to keep a connection open after an early
# answer; past it the connection is closed instead.
_TAKE_QUEUED_BYTES = 1024 * 1024
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, endpoints: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        # Handlers leave `cached` and `error` here (it is what request.state writes to).
        state = scope.setdefault("state", {})
        request_id = _request_id(scope)
        token = request_id_var.set(request_id)
        status = 500
        response_started = False
        body_complete = not _has_body(scope)
        discarding: asyncio.Task[None] | None = None

        async def receive_tracking_body() -> Message:
            nonlocal body_complete
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_complete = True
            return message

        async def send_with_context(message: Message) -> None:
            nonlocal status, response_started, discarding
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                    *_SECURITY_HEADERS,
                ]
                if not body_complete and status not in _CLOSING_STATUSES:
                    await _take_queued_body(receive_tracking_body, lambda: body_complete)
                if not body_complete:
                    # Answered before the body was read (413, 401, ...): this connection
                    # cannot carry another request, so say so.
                    headers.append((b"connection", b"close"))
                message["headers"] = headers
            elif not message.get("more_body", False) and not body_complete:
                # Take the rest of the unread body off hypercorn's hands meanwhile, or the
                # final send never returns.
                discarding = asyncio.create_task(
                    _discard_unread_body(receive_tracking_body, lambda: body_complete)
                )
            await send(message)

        try:
            await self.app(scope, receive_tracking_body, send_with_context)
        except Exception:
            # Internals go to the log (with the request id to find them), never to the client.
            log.exception("unhandled error")
            state["error"] = InternalError.code
            if not response_started:
                response = error_response(InternalError("internal server error"), dialect_of(scope))
                await response(scope, receive, send_with_context)
        finally:
            duration = time.perf_counter() - started
            if discarding is not None:
                await discarding
            endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
            cached = "true" if state.get("cached") else "false"
            self.metrics.requests.labels(endpoint, str(status), cached).inc()
            self.metrics.request_latency.labels(endpoint).observe(duration)
            if "error" in state:
                self.metrics.errors.labels(state["error"]).inc()
            access_log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],  # never the query string: it may carry secrets
                    "status": status,
                    "duration_ms": round(duration * 1000, 3),
                },
            )
            request_id_var.reset(token)


async def _take_queued_body(receive: Receive, complete: Callable[[], bool]) -> None:
    """Drop the body chunks hypercorn has already received, without waiting for more.

    A small body usually arrived with its headers: when the app answers without reading it
    (401, a refused media type), dropping it keeps the connection open for the next request,
    which matters most to a client that pipelined several on one connection (closing would
    lose every answer after this one). A body still on its way is left alone: the connection
    is closed instead.
    """
    taken = 0
    while not complete() and taken <= _TAKE_QUEUED_BYTES:
        pending = asyncio.ensure_future(receive())
        # One turn of the loop: a chunk already queued is taken in it, one on the wire is not.
        await asyncio.sleep(0)
        if not pending.done():
            pending.cancel()  # the queue keeps its chunk; nothing is lost
            with contextlib.suppress(asyncio.CancelledError):
                await pending
            return
        taken += len(pending.result().get("body", b""))


async def _discard_unread_body(receive: Receive, complete: Callable[[], bool]) -> None:
    """Read and drop what is left of a request body.

    Hypercorn hands body chunks to the app through a queue of ten; when the app answers
    without reading them, the end of the response waits for room in that queue (for the
    disconnect event) forever, and so does graceful shutdown. Chunks are dropped as they arrive
    until the body ends, the client goes, or a second passes without anything.
    """
    deadline = asyncio.get_running_loop().time() + _DISCARD_LIMIT
    while not complete() and asyncio.get_running_loop().time() < deadline:
        try:
            await asyncio.wait_for(receive(), _DISCARD_IDLE)
        except TimeoutError:
            return


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() != b"0"
        if name == b"transfer-encoding":
            return True
    return False


def _request_id(scope: Scope) -> str:
    value = _header(scope, b"x-request-id")
    candidate = value.decode("latin-1") if value is not None else ""
    return candidate if _CLIENT_REQUEST_ID.match(candidate) else uuid.uuid4().hex


class CorsMiddleware:
    """CORS for the origins in CORS_ORIGINS (installed only when it is set).

    An allowed origin's preflight (OPTIONS with Access-Control-Request-Method) on a served path
    is answered here, 204; its other requests get Access-Control-Allow-Origin on every answer,
    errors included (a browser hides the body of an answer without it, so a 401 or 429 would
    reach the page as a bare network error). Any other origin gets no CORS header at all and
    exactly the answers it got without CORS (its preflight is 405): the browser then refuses.
    Starlette's CORSMiddleware is not used because it sends some CORS headers to every origin
    and refuses a preflight with a plain-text 400, where every error here is JSON.
    Sits inside RequestContextMiddleware, so a preflight is logged, counted and carries the
    request id and security headers like any answer.
    """

    ALLOW_METHODS = b"GET, POST"
    # What a browser client sends beyond the safelisted headers (and a request id to trace).
    ALLOW_HEADERS = b"Authorization, Content-Type, X-Request-Id"
    # What a page may read of an answer beyond the safelisted headers.
    EXPOSE_HEADERS = (
        b"X-Request-Id, X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, Retry-After"
    )
    MAX_AGE = b"600"  # seconds a browser may reuse a preflight's answer

    def __init__(self, app: ASGIApp, *, origins: tuple[str, ...], paths: set[str]) -> None:
        self.app = app
        self.any_origin = "*" in origins
        self.origins = frozenset(origin.encode("latin-1") for origin in origins)
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = _header(scope, b"origin") if scope["type"] == "http" else None
        if origin is None or not (self.any_origin or origin in self.origins):
            await self.app(scope, receive, send)
            return
        allow = (
            [(b"access-control-allow-origin", b"*")]
            if self.any_origin
            else [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]
        )
        if (
            scope["method"] == "OPTIONS"
            and _header(scope, b"access-control-request-method") is not None
            and scope["path"] in self.paths
        ):
            preflight = Response(status_code=204)
            preflight.raw_headers.extend(
                [
                    *allow,
                    (b"access-control-allow-methods", self.ALLOW_METHODS),
                    (b"access-control-allow-headers", self.ALLOW_HEADERS),
                    (b"access-control-max-age", self.MAX_AGE),
                ]
            )
            await preflight(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    *allow,
                    (b"access-control-expose-headers", self.EXPOSE_HEADERS),
                ]
            await send(message)

        await self.app(scope, receive, send_with_cors)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None
