"""A request's JSON body: media type, size, time and syntax are checked before a handler sees it.

- `Content-Type` must be `application/json` (any case, `charset` utf-8 if given) or absent: a body
  without one is read as JSON all the same, so `requests.post(data=...)` and bare HTTP clients
  work; any other type (`text/plain`, forms, multipart) is 415. A `Content-Encoding` other than
  `identity` is 415 too: nothing here inflates a compressed body (no zip bombs).
- A body over `max_bytes` is 413: refused from `Content-Length` unread, or as soon as a chunked
  one passes the limit. The whole body must arrive within `timeout` seconds, else 408: a client
  sending a byte a second cannot hold a request open for days.
- Invalid UTF-8, lone surrogates (`"\\ud800"`), NaN, nesting deeper than about 1,000 levels and
  duplicate keys in an object are 400 `invalid_request`: JSON that parsers read differently is
  refused rather than guessed at.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request

from app.http.errors import InvalidRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType

MEDIA_TYPE = "application/json"


async def read_json(request: Request, *, max_bytes: int, timeout: float) -> Any:
    check_media_type(request.headers)
    return parse_json(await read_body(request, max_bytes=max_bytes, timeout=timeout))


def check_media_type(headers: Headers) -> None:
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            "Content-Encoding is not supported: send the body uncompressed",
            headers={"Accept-Encoding": "identity"},
        )
    content_type = headers.get("content-type", "").strip()
    if not content_type:
        return
    media_type, *params = (part.strip() for part in content_type.split(";"))
    if media_type.lower() != MEDIA_TYPE:
        raise UnsupportedMediaType(
            f"Content-Type must be {MEDIA_TYPE}", headers={"Accept": MEDIA_TYPE}
        )
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            raise UnsupportedMediaType(
                "JSON bodies are UTF-8: charset must be utf-8 if given",
                headers={"Accept": MEDIA_TYPE},
            )


async def read_body(request: Request, *, max_bytes: int, timeout: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("invalid Content-Length header")
        if int(declared) > max_bytes:
            raise PayloadTooLarge(f"request body is over {max_bytes} bytes", max_bytes=max_bytes)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(
                        f"request body is over {max_bytes} bytes", max_bytes=max_bytes
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout:g} seconds"
        ) from None
    except ClientDisconnect:
        # Nobody may be left to read this; it keeps a half-closed client's answer and the log
        # honest (a 400 of the client's making, not a 500 of ours).
        raise InvalidRequest("the connection ended before the whole request body arrived") from None
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc.msg}") from None
    if isinstance(payload, dict):
        _refuse_duplicate_keys(body)
    return payload


class _DuplicateKey(Exception):
    def __init__(self, name: str) -> None:
        self.name = name


def _check_pairs(pairs: list[tuple[str, Any]]) -> None:
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise _DuplicateKey(name)
        seen.add(name)


def _refuse_duplicate_keys(body: bytes) -> None:
    """orjson keeps the last of duplicate keys, other parsers the first: a proxy or a log reader
    could see another request than the one served. The body is valid JSON already (orjson said
    so); the standard parser walks it once more, only to look at each object's keys (~1 ms/MB)."""
    try:
        json.loads(body, object_pairs_hook=_check_pairs)
    except _DuplicateKey as exc:
        name = exc.name if len(exc.name) <= 64 else exc.name[:64] + "..."
        raise InvalidRequest(
            f"duplicate key {name!r} in the request body", param=exc.name[:64]
        ) from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    except ValueError:  # e.g. an integer of over 4,300 digits
        raise InvalidRequest("request body is not valid JSON") from None
