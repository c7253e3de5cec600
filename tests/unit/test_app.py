"""The HTTP app in this process: `create_app(settings)` with its lifespan, driven through httpx's
ASGI transport, on real PostgreSQL, Redis and the real model (no `api` process, no socket)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from starlette.applications import Starlette

from app.admin.keys import create_key
from app.config import Settings
from app.http.app import create_app
from tests.conftest import Servers
from tests.helpers import MODEL_PATH, cosine, load_reference

FREE_LIMIT = 1000


@dataclass
class InProcess:
    """The app, its lifespan entered on `runner`'s loop, and an API key for it. Every call runs on
    that one loop, so the services started by the lifespan serve all of the module's tests."""

    runner: asyncio.Runner
    app: Starlette
    client: httpx.AsyncClient
    key: str

    def request(
        self, method: str, path: str, *, key: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return self.runner.run(self.client.request(method, path, headers=headers, **kwargs))


@pytest.fixture(scope="module")
def service(servers: Servers, database_url: str) -> Iterator[InProcess]:
    settings = Settings(
        database_url=database_url,
        redis_url=servers.redis_url,
        model_path=MODEL_PATH,
        redis_key_prefix=f"unit-app-{uuid.uuid4().hex[:8]}:",
        free_tier_limit=FREE_LIMIT,
        ort_threads=1,
    )
    with psycopg.connect(database_url) as conn:
        key = create_key(conn, "app@example.com", "free", None, settings.api_key_prefix).key
    app = create_app(settings)
    lifespan = app.router.lifespan_context(app)
    transport = httpx.ASGITransport(app=app)
    client = httpx.AsyncClient(transport=transport, base_url="http://smally.test")
    with asyncio.Runner() as runner:
        runner.run(lifespan.__aenter__())
        try:
            yield InProcess(runner, app, client, key)
        finally:
            runner.run(client.aclose())
            runner.run(lifespan.__aexit__(None, None, None))


def assert_request_id(response: httpx.Response) -> None:
    assert len(response.headers.get("x-request-id", "")) >= 8, response.headers


def test_health_is_200_healthy(service: InProcess) -> None:
    response = service.request("GET", "/health")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "healthy"
    assert body["checks"] == {"database": "ok", "redis": "ok", "model": "ok"}
    assert_request_id(response)


def test_health_names_the_build_and_stores_to_local_callers_only(service: InProcess) -> None:
    local = service.request("GET", "/health")  # the transport's peer is 127.0.0.1
    assert set(local.json()) >= {"status", "version", "model", "checks", "build"}, local.text
    forwarded = service.request("GET", "/health", headers={"X-Forwarded-For": "203.0.113.7"})
    remote = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=service.app, client=("203.0.113.7", 40000)),
        base_url="http://smally.test",
    )
    try:
        elsewhere = service.runner.run(remote.get("/health"))
    finally:
        service.runner.run(remote.aclose())
    for anonymous in (forwarded, elsewhere):
        assert anonymous.status_code == local.status_code == 200
        assert anonymous.json() == {"status": "healthy"}, anonymous.text


def test_embed_answers_the_reference_vector_with_quota_headers(service: InProcess) -> None:
    case = load_reference()["cases"][0]
    response = service.request("POST", "/v1/embed", key=service.key, json={"text": case["text"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["embedding"]) == 384
    assert all(isinstance(x, float) for x in body["embedding"])
    assert cosine(body["embedding"], case["embedding"]) >= 0.99999
    assert body["tokens"] == case["tokens"]
    assert response.headers["x-ratelimit-limit"] == str(FREE_LIMIT)
    remaining = int(response.headers["x-ratelimit-remaining"])
    assert 0 <= remaining < FREE_LIMIT
    assert int(response.headers["x-ratelimit-reset"]) > 0
    assert_request_id(response)


def test_openai_embeddings_answers_in_its_envelope(service: InProcess) -> None:
    response = service.request(
        "POST",
        "/v1/embeddings",
        key=service.key,
        json={"model": "all-MiniLM-L6-v2", "input": ["one", "two"]},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert all(len(item["embedding"]) == 384 for item in body["data"])
    assert "x-ratelimit-remaining" in response.headers


@pytest.mark.parametrize("path", ["/v1/embed", "/v1/embeddings"])
@pytest.mark.parametrize("key", [None, "sk_not-a-key-of-ours"])
def test_no_valid_key_is_401_json(service: InProcess, path: str, key: str | None) -> None:
    response = service.request("POST", path, key=key, json={"text": "x"})
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["www-authenticate"].startswith("Bearer")
    error = response.json()["error"]
    code = error["code"] if path == "/v1/embeddings" else error
    assert code == "invalid_api_key"
    assert_request_id(response)


BAD_EMBED_BODIES = [b"not json", b"[]", b"{}", b'{"text": 1}', b'{"text": "  "}', b'{"text": NaN}']
BAD_OPENAI_BODIES = [
    b"not json",
    b"[]",
    b'{"model": "all-MiniLM-L6-v2"}',
    b'{"model": "all-MiniLM-L6-v2", "input": [1, 2]}',
    b'{"model": "all-MiniLM-L6-v2", "input": "x", "input": "y"}',
]


@pytest.mark.parametrize("body", BAD_EMBED_BODIES)
def test_a_bad_embed_body_is_400_in_smallys_envelope(service: InProcess, body: bytes) -> None:
    response = service.request(
        "POST",
        "/v1/embed",
        key=service.key,
        content=body,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    payload = response.json()
    assert payload["error"] == "invalid_request"
    assert isinstance(payload["message"], str) and payload["message"]
    # Errors after authentication carry the caller's quota too.
    assert response.headers["x-ratelimit-limit"] == str(FREE_LIMIT)
    assert_request_id(response)


@pytest.mark.parametrize("body", BAD_OPENAI_BODIES)
def test_a_bad_openai_body_is_400_in_openais_envelope(service: InProcess, body: bytes) -> None:
    response = service.request(
        "POST",
        "/v1/embeddings",
        key=service.key,
        content=body,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_request"
    assert error["type"] == "invalid_request_error"
    assert_request_id(response)


def test_an_unknown_path_is_404_json(service: InProcess) -> None:
    response = service.request("GET", "/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    assert_request_id(response)


def test_a_wrong_method_is_405_json_with_allow(service: InProcess) -> None:
    response = service.request("GET", "/v1/embed")
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"
    assert "POST" in response.headers["allow"]
    assert_request_id(response)


def test_openapi_json_describes_the_endpoints(service: InProcess) -> None:
    response = service.request("GET", "/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    assert {"/v1/embed", "/v1/embeddings", "/health"} <= set(document["paths"])
    assert_request_id(response)


def test_a_clients_request_id_is_kept_and_a_bad_one_replaced(service: InProcess) -> None:
    kept = service.request("GET", "/health", headers={"X-Request-Id": "client-id.42"})
    assert kept.headers["x-request-id"] == "client-id.42"
    replaced = service.request("GET", "/health", headers={"X-Request-Id": "no spaces <here>"})
    assert replaced.headers["x-request-id"] not in ("", "no spaces <here>")


def usage_until(service: InProcess, key: str, embeddings: int, **params: str) -> dict:
    """GET /v1/usage until the ledger shows `embeddings` (it is written within about a second)."""
    for _ in range(40):
        response = service.request("GET", "/v1/usage", key=key, params=params)
        assert response.status_code == 200, response.text
        if response.json()["embeddings"] >= embeddings:
            return response.json()
        service.runner.run(asyncio.sleep(0.1))
    raise AssertionError(f"the ledger never showed {embeddings}: {response.text}")


def test_usage_shows_the_callers_own_month_and_limits_and_never_anothers(
    service: InProcess, database_url: str
) -> None:
    with psycopg.connect(database_url) as conn:
        mine = create_key(conn, f"me-{uuid.uuid4().hex[:6]}@example.com", "free", None, "sk_")
        theirs = create_key(conn, f"they-{uuid.uuid4().hex[:6]}@example.com", "pro", None, "sk_")
    now = datetime.now(UTC)
    last_month = (now.replace(day=1) - timedelta(days=1)).replace(day=15)
    with psycopg.connect(database_url) as conn:  # their usage last month, as the ledger has it
        conn.execute(
            "INSERT INTO usage (user_id, api_key_id, embeddings_count, tokens, created_at)"
            " SELECT user_id, id, 7, 70, %s FROM api_keys WHERE key_prefix = %s",
            (last_month, theirs.key_prefix),
        )
    texts = {"model": "all-MiniLM-L6-v2", "input": ["one", "two three"]}
    assert service.request("POST", "/v1/embeddings", key=mine.key, json=texts).status_code == 200
    assert (
        service.request("POST", "/v1/embed", key=theirs.key, json={"text": "x"}).status_code == 200
    )

    body = usage_until(service, mine.key, 2)
    next_month = (now.replace(day=1) + timedelta(days=32)).replace(day=1)
    assert body == {
        "object": "usage",
        "month": f"{now:%Y-%m}",
        "tier": "free",
        "embeddings": 2,
        "tokens": body["tokens"],
        "limit": FREE_LIMIT,
        "remaining": FREE_LIMIT - 2,
        "resets_at": f"{next_month:%Y-%m}-01T00:00:00Z",
        "per_minute": {"requests": 60, "tokens": 20_000},
    }
    assert body["tokens"] == 3 + 4  # [CLS] one [SEP], [CLS] two three [SEP]
    assert usage_until(service, theirs.key, 1)["embeddings"] == 1

    month = f"{last_month:%Y-%m}"
    past = usage_until(service, theirs.key, 7, month=month)
    assert (past["month"], past["embeddings"], past["tokens"]) == (month, 7, 70)
    assert past["remaining"] is None and past["resets_at"] is None
    assert past["tier"] == "pro" and past["per_minute"] == {"requests": 600, "tokens": 200_000}
    mine_then = service.request("GET", "/v1/usage", key=mine.key, params={"month": month})
    assert mine_then.json()["embeddings"] == 0, mine_then.text
    to_come = service.request("GET", "/v1/usage", key=mine.key, params={"month": "9999-12"})
    assert to_come.status_code == 200, to_come.text
    assert to_come.json()["embeddings"] == 0 and to_come.json()["resets_at"] is None


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("month=2026-13", "month"),
        ("month=26-11", "month"),
        ("month=0999-01", "month"),
        ("month=2026-11&month=2026-10", "month"),
        ("user=someone@example.com", "user"),
    ],
)
def test_usage_refuses_a_bad_query_with_400(service: InProcess, query: str, param: str) -> None:
    response = service.request("GET", f"/v1/usage?{query}", key=service.key)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_request"
    assert response.json()["param"] == param


def test_usage_without_a_valid_key_is_401(service: InProcess) -> None:
    response = service.request("GET", "/v1/usage", key="sk_not-a-key-of-ours")
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "invalid_api_key"
