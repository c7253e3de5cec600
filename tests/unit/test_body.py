"""app.http.body at the function level: media type, size, time and JSON syntax of a request body."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import Message

from app.http.body import check_media_type, parse_json, read_json
from app.http.errors import (
    ApiError,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)


def request(
    chunks: list[bytes], headers: dict[str, str], *, then: str = "end"
) -> tuple[Request, list[int]]:
    """A starlette Request whose body arrives in `chunks`, and the list of receive() calls made
    (one entry per call). After the chunks the client `then`: "end"s the body, "stall"s (sends
    nothing more) or "disconnect"s before the end."""
    calls: list[int] = []
    pending = list(chunks)

    async def receive() -> Message:
        calls.append(1)
        if pending:
            chunk = pending.pop(0)
            more = bool(pending) or then != "end"
            return {"type": "http.request", "body": chunk, "more_body": more}
        if then == "stall":
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/embed",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    return Request(scope, receive), calls


def read(
    chunks: list[bytes],
    headers: dict[str, str] | None = None,
    *,
    max_bytes: int = 1000,
    timeout: float = 5.0,
) -> tuple[Any, list[int]]:
    req, calls = request(chunks, headers or {})
    return asyncio.run(read_json(req, max_bytes=max_bytes, timeout=timeout)), calls


def refused(call: Callable[[], object], kind: type[ApiError]) -> ApiError:
    """The error `call` raises, which must be a `kind`."""
    with pytest.raises(kind) as caught:
        call()
    return caught.value


# --- check_media_type ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Content-Type": "application/json"},
        {"Content-Type": "Application/JSON; charset=UTF-8"},
        {"Content-Type": 'application/json; charset="utf8"'},
        {"Content-Type": "application/json", "Content-Encoding": "identity"},
    ],
)
def test_json_or_no_content_type_is_accepted(headers: dict[str, str]) -> None:
    check_media_type(Headers(headers))


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=latin-1",
        "application/jsonx",
    ],
)
def test_another_media_type_or_charset_is_415(content_type: str) -> None:
    error = refused(
        lambda: check_media_type(Headers({"Content-Type": content_type})), UnsupportedMediaType
    )
    assert (error.status, error.code) == (415, "unsupported_media_type")
    assert error.headers["Accept"] == "application/json"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "GZIP"])
def test_a_compressed_body_is_415(encoding: str) -> None:
    headers = Headers({"Content-Type": "application/json", "Content-Encoding": encoding})
    error = refused(lambda: check_media_type(headers), UnsupportedMediaType)
    assert error.status == 415
    assert error.headers["Accept-Encoding"] == "identity"


# --- parse_json ----------------------------------------------------------------------------


def test_valid_json_is_parsed() -> None:
    assert parse_json('{"text": "héllo", "n": [1, 2.5, null, true]}'.encode()) == {
        "text": "héllo",
        "n": [1, 2.5, None, True],
    }
    assert parse_json(b'["a", "a"]') == ["a", "a"]  # duplicates only matter as object keys


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"{'text': 'x'}",
        b'{"text": NaN}',
        b'{"text": Infinity}',
        b'{"text": -Infinity}',
        b'{"text": "\xff\xfe"}',  # invalid UTF-8
        b'{"text": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8
        b'{"text": "\\ud800"}',  # a lone surrogate escaped
        b"[" * 5000 + b"]" * 5000,
        b'{"a":' * 5000 + b"1" + b"}" * 5000,
        b'{"text": "x"} trailing',
    ],
    ids=lambda body: body[:24].decode("latin-1"),
)
def test_invalid_json_is_400_invalid_request(body: bytes) -> None:
    error = refused(lambda: parse_json(body), InvalidRequest)
    assert (error.status, error.code) == (400, "invalid_request")


@pytest.mark.parametrize(
    "body",
    [
        b'{"text": "a", "text": "b"}',
        b'{"x": {"text": "a", "text": "b"}}',
        b'{"input": [{"text": 1, "other": 2, "text": 3}]}',
    ],
)
def test_duplicate_keys_anywhere_are_400(body: bytes) -> None:
    error = refused(lambda: parse_json(body), InvalidRequest)
    assert error.code == "invalid_request"
    assert "duplicate key 'text'" in error.message
    assert error.extra["param"] == "text"


# --- read_json: a request from a scope and a receive callable -----------------------------


def test_a_body_in_chunks_is_read_whole() -> None:
    payload, calls = read([b'{"text": ', b'"hello"', b"}"], {"Content-Type": "application/json"})
    assert payload == {"text": "hello"}
    assert len(calls) == 3


def test_a_declared_length_over_the_limit_is_413_unread() -> None:
    req, calls = request([b"x" * 2000], {"Content-Length": "2000"})
    error = refused(lambda: asyncio.run(read_json(req, max_bytes=1000, timeout=5)), PayloadTooLarge)
    assert (error.status, error.code) == (413, "payload_too_large")
    assert error.extra["max_bytes"] == 1000
    assert calls == []


def test_a_chunked_body_over_the_limit_is_413_as_soon_as_it_passes() -> None:
    req, calls = request([b"[" + b" " * 99] + [b" " * 100] * 20, {})
    refused(lambda: asyncio.run(read_json(req, max_bytes=250, timeout=5)), PayloadTooLarge)
    assert len(calls) == 3


def test_a_body_of_exactly_the_limit_is_read() -> None:
    body = b'{"text": "' + b"x" * 88 + b'"}'
    assert len(body) == 100
    payload, _ = read([body], {"Content-Length": "100"}, max_bytes=100)
    assert payload == {"text": "x" * 88}


@pytest.mark.parametrize("length", ["abc", "-1", "1e3", " "])
def test_an_invalid_content_length_is_400(length: str) -> None:
    req, _ = request([b"{}"], {"Content-Length": length})
    error = refused(lambda: asyncio.run(read_json(req, max_bytes=1000, timeout=5)), InvalidRequest)
    assert error.code == "invalid_request"


def test_the_media_type_is_checked_before_the_body_is_read() -> None:
    req, calls = request([b"{}"], {"Content-Type": "text/plain"})
    refused(lambda: asyncio.run(read_json(req, max_bytes=1000, timeout=5)), UnsupportedMediaType)
    assert calls == []


def test_a_stalled_body_is_408() -> None:
    req, _ = request([b'{"text": '], {}, then="stall")
    error = refused(
        lambda: asyncio.run(read_json(req, max_bytes=1000, timeout=0.2)), RequestTimeout
    )
    assert (error.status, error.code) == (408, "request_timeout")


@pytest.mark.parametrize("chunks", [[], [b'{"text": '], [b'{"text": "x"}']])
def test_a_client_gone_before_the_whole_body_is_400(chunks: list[bytes]) -> None:
    req, _ = request(chunks, {}, then="disconnect")
    error = refused(lambda: asyncio.run(read_json(req, max_bytes=1000, timeout=5)), InvalidRequest)
    assert (error.status, error.code) == (400, "invalid_request")
    assert "connection ended" in error.message


def test_syntax_errors_come_through_read_json_too() -> None:
    req, _ = request([b'{"text": "a", "text": "b"}'], {"Content-Type": "application/json"})
    error = refused(lambda: asyncio.run(read_json(req, max_bytes=1000, timeout=5)), InvalidRequest)
    assert "duplicate key" in error.message
