"""CORS_ORIGINS, in-process against the real PostgreSQL, Redis and model: preflights, allowed and
refused origins, errors included, and off by default. (tests/system/test_docs_page.py sends a real
cross-origin request from Chromium.)"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from app.config import ConfigError, Settings
from app.http.app import create_app
from tests.helpers import create_key

PAGE = "https://app.example.com"
OTHER = "https://evil.example.com"
API_ROUTES = [
    ("POST", "/v1/embed"),
    ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"),
    ("GET", "/health"),
    ("GET", "/openapi.json"),
    ("GET", "/"),
]


@pytest.fixture(scope="module")
def keys(module_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cwd = tmp_path_factory.mktemp("cors")
    return {
        "scale": create_key(module_env, cwd, "cors@example.com", "scale"),
        "free": create_key(module_env, cwd, "cors-free@example.com", "free"),
    }


@contextmanager
def service(module_env: dict[str, str], **overrides: str) -> Iterator[TestClient]:
    settings = Settings.from_env({**module_env, **overrides}, dotenv=None)
    with TestClient(create_app(settings), base_url="http://api.example.com") as client:
        yield client


def preflight(client: TestClient, path: str, method: str, origin: str) -> httpx.Response:
    return client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


def test_preflight_for_an_allowed_origin(module_env: dict[str, str]) -> None:
    with service(module_env, CORS_ORIGINS=f"http://localhost:3000, {PAGE}/") as client:
        for method, path in API_ROUTES:
            response = preflight(client, path, method, PAGE)
            assert response.status_code == 204, (path, response.text)
            headers = response.headers
            assert headers["access-control-allow-origin"] == PAGE, path
            assert method in headers["access-control-allow-methods"], path
            allowed = {
                h.strip().lower() for h in headers["access-control-allow-headers"].split(",")
            }
            assert {"authorization", "content-type"} <= allowed, path
            assert int(headers["access-control-max-age"]) > 0
            assert "Origin" in headers["vary"]
            # An answer like any other: traced and with the security headers.
            assert headers["x-request-id"] and headers["x-content-type-options"] == "nosniff"


def test_allowed_origin_on_answers_and_errors(
    module_env: dict[str, str], keys: dict[str, str]
) -> None:
    with service(module_env, CORS_ORIGINS=PAGE, FREE_TIER_LIMIT="1") as client:
        origin = {"Origin": PAGE}
        scale = {**origin, "Authorization": f"Bearer {keys['scale']}"}
        free = {**origin, "Authorization": f"Bearer {keys['free']}"}
        answers = {
            (200, "embed"): client.post(
                "/v1/embed", json={"text": "from a browser"}, headers=scale
            ),
            (401, "no key"): client.post("/v1/embed", json={"text": "no key"}, headers=origin),
            (400, "bad text"): client.post("/v1/embed", json={"text": 7}, headers=scale),
            (400, "openai"): client.post("/v1/embeddings", json={"input": "x"}, headers=scale),
            (200, "free"): client.post("/v1/embed", json={"text": "one"}, headers=free),
            (429, "quota"): client.post("/v1/embed", json={"text": "two"}, headers=free),
            (404, "path"): client.get("/nowhere", headers=origin),
        }
    for what, response in answers.items():
        assert response.status_code == what[0], (what, response.text)
        assert response.headers["access-control-allow-origin"] == PAGE, what
        exposed = response.headers["access-control-expose-headers"]
        assert "X-RateLimit-Remaining" in exposed and "X-Request-Id" in exposed, what
    assert answers[429, "quota"].json()["error"] == "rate_limit_exceeded"


def test_a_refused_origin_gets_no_cors_headers(
    module_env: dict[str, str], keys: dict[str, str]
) -> None:
    with service(module_env, CORS_ORIGINS=PAGE) as client:
        refused = preflight(client, "/v1/embed", "POST", OTHER)
        answer = client.post(
            "/v1/embed",
            json={"text": "x"},
            headers={"Origin": OTHER, "Authorization": f"Bearer {keys['scale']}"},
        )
        no_origin = client.post(
            "/v1/embed", json={"text": "x"}, headers={"Authorization": f"Bearer {keys['scale']}"}
        )
    # Exactly what it would get without CORS: OPTIONS is not a method of the route.
    assert refused.status_code == 405 and refused.json()["error"] == "method_not_allowed"
    assert answer.status_code == 200 and no_origin.status_code == 200
    for response in (refused, answer, no_origin):
        assert cors_headers(response) == {}, response.request


def test_any_origin(module_env: dict[str, str], keys: dict[str, str]) -> None:
    with service(module_env, CORS_ORIGINS="*") as client:
        response = preflight(client, "/v1/embeddings", "POST", OTHER)
        answer = client.post("/v1/embed", json={"text": "x"}, headers={"Origin": OTHER})
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "*"
    assert answer.status_code == 401 and answer.headers["access-control-allow-origin"] == "*"


def test_off_by_default(module_env: dict[str, str], keys: dict[str, str]) -> None:
    assert Settings.from_env(module_env, dotenv=None).cors_origins == ()
    with service(module_env) as client:
        refused = preflight(client, "/v1/embed", "POST", PAGE)
        answer = client.post(
            "/v1/embed",
            json={"text": "x"},
            headers={"Origin": PAGE, "Authorization": f"Bearer {keys['scale']}"},
        )
    assert refused.status_code == 405 and cors_headers(refused) == {}
    assert answer.status_code == 200 and cors_headers(answer) == {}


@pytest.mark.parametrize(
    ("value", "origins"),
    [
        ("", ()),
        ("*", ("*",)),
        (" https://App.Example.com/ ,http://localhost:3000", (PAGE, "http://localhost:3000")),
    ],
)
def test_cors_origins_setting(value: str, origins: tuple[str, ...], tmp_path: Path) -> None:
    env = {"DATABASE_URL": "postgresql:///x", "REDIS_URL": "redis://r", "CORS_ORIGINS": value}
    assert Settings.from_env(env, dotenv=None).cors_origins == origins


@pytest.mark.parametrize(
    "value",
    ["*, https://a.example", "app.example.com", "https://a.example/path", "ftp://a.example",
     "https://a.example:99999", "https://user@a.example"],
)  # fmt: skip
def test_invalid_cors_origins_name_the_variable(value: str) -> None:
    env = {"DATABASE_URL": "postgresql:///x", "REDIS_URL": "redis://r", "CORS_ORIGINS": value}
    with pytest.raises(ConfigError, match="CORS_ORIGINS"):
        Settings.from_env(env, dotenv=None)
