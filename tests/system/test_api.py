"""The HTTP contract of /v1/embed, /health and /: every status code, always a JSON envelope."""

from __future__ import annotations

import time

import psycopg
import pytest

from tests.helpers import ApiProcess, create_key


def error_of(response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert isinstance(body["message"], str) and body["message"]
    assert "Traceback" not in response.text
    return body["error"]


def test_embed_response_shape(api: ApiProcess, key: str) -> None:
    with api.client(key) as client:
        response = client.post("/v1/embed", json={"text": "hello world"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"embedding", "model", "tokens", "cached", "latency_ms"}
    assert len(body["embedding"]) == 384 and all(isinstance(x, float) for x in body["embedding"])
    assert body["tokens"] == 4
    assert body["cached"] is False
    assert body["latency_ms"] > 0
    assert response.headers["x-request-id"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    assert "server" not in response.headers  # no version banner


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer " + "x" * 10240},
        {"Authorization": "Bearer sk_" + "0" * 64},
        {"Authorization": "sk_" + "0" * 64},
    ],
    ids=["missing", "empty", "basic", "bearer-alone", "bearer-10kb-junk", "unknown", "no-scheme"],
)
def test_invalid_api_key(api: ApiProcess, headers: dict[str, str]) -> None:
    with api.client() as client:
        response = client.post("/v1/embed", json={"text": "hello"}, headers=headers)
    assert response.status_code == 401
    assert error_of(response) == "invalid_api_key"
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b"[]",
        b'"just a string"',
        b"{}",
        b'{"text": null}',
        b'{"text": 42}',
        b'{"text": ["a", "b"]}',
        b'{"text": ""}',
        b'{"text": "   \\n\\t  "}',
        b'{"text": "ok", "normalize": "yes"}',
        b'{"text": "ok", "normalize": 1}',
        b'{"text": "\\ud800"}',
        b'{"text": "\xff\xfe"}',
    ],
    ids=[
        "malformed",
        "empty-body",
        "array",
        "string",
        "missing-text",
        "null-text",
        "number-text",
        "list-text",
        "empty-text",
        "whitespace-text",
        "normalize-string",
        "normalize-number",
        "lone-surrogate",
        "invalid-utf8",
    ],
)
def test_invalid_request(api: ApiProcess, key: str, body: bytes) -> None:
    with api.client(key) as client:
        response = client.post(
            "/v1/embed", content=body, headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 400, response.text
    assert error_of(response) == "invalid_request"


def test_text_too_long_is_refused_not_truncated(api: ApiProcess, key: str) -> None:
    # 126 words + [CLS]/[SEP] = 128 tokens is the largest accepted input.
    with api.client(key) as client:
        fits = client.post("/v1/embed", json={"text": " ".join(["word"] * 126)})
        over = client.post("/v1/embed", json={"text": " ".join(["word"] * 127)})
        far_over = client.post("/v1/embed", json={"text": " ".join(["word"] * 5000)})
    assert fits.status_code == 200 and fits.json()["tokens"] == 128
    assert over.status_code == 400
    assert error_of(over) == "text_too_long"
    assert over.json()["max_tokens"] == 128 and over.json()["tokens"] == 129
    # Over 10,000 characters: refused by counting words (5,000 > 126), never tokenized.
    assert error_of(far_over) == "text_too_long" and "tokens" not in far_over.json()
    assert far_over.json()["tokens_at_least"] == 129


def test_payload_too_large(api: ApiProcess, key: str) -> None:
    big = b'{"text": "' + b"a" * (1024 * 1024) + b'"}'
    with api.client(key) as client:
        response = client.post("/v1/embed", content=big)
    assert response.status_code == 413
    assert error_of(response) == "payload_too_large"
    assert response.json()["max_bytes"] == 1024 * 1024


def test_unknown_path_and_method(api: ApiProcess, key: str) -> None:
    with api.client(key) as client:
        missing = client.get("/v1/nothing")
        wrong_method = client.get("/v1/embed")
    assert missing.status_code == 404 and error_of(missing) == "not_found"
    assert wrong_method.status_code == 405 and error_of(wrong_method) == "method_not_allowed"


def test_health_and_index(api: ApiProcess) -> None:
    with api.client() as client:
        health = client.get("/health")
        index = client.get("/")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "healthy"
    assert body["checks"] == {"database": "ok", "redis": "ok", "model": "ok"}
    assert body["model"] == "all-MiniLM-L6-v2"
    assert body["version"]
    assert {"git_hash", "lock_sha256", "build_timestamp", "python"} <= set(body["build"])
    assert "POST /v1/embed" in index.json()["endpoints"]


def test_usage_and_last_used_are_recorded(api: ApiProcess) -> None:
    key = create_key(api.env, api.workdir, "metered@example.com", "pro")
    with api.client(key) as client:
        for text in ("one", "two words", "three words here"):
            assert client.post("/v1/embed", json={"text": text}).status_code == 200
    deadline = time.monotonic() + 15
    with psycopg.connect(api.env["DATABASE_URL"]) as conn:
        while True:
            row = conn.execute(
                """
                SELECT count(*), sum(u.embeddings_count), sum(u.tokens), max(k.last_used_at)
                  FROM usage u JOIN api_keys k ON k.id = u.api_key_id
                  JOIN users s ON s.id = u.user_id WHERE s.email = 'metered@example.com'
                """
            ).fetchone()
            if (row[0] == 3 and row[3] is not None) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert row[:3] == (3, 3, 3 + 4 + 5)
    assert row[3] is not None


def test_logs_are_json_without_keys_or_texts(api: ApiProcess, key: str) -> None:
    secret_text = "my very private sentence 8472"
    with api.client(key) as client:
        client.post("/v1/embed", json={"text": secret_text})
        client.post("/v1/embed", json={"text": secret_text, "normalize": "bad"})
        client.post("/v1/embed", json={"text": secret_text}, headers={"Authorization": "Bearer x"})
    time.sleep(0.2)
    records = api.log_records()
    access = [r for r in records if r.get("logger") == "smally.access"]
    assert {"timestamp", "level", "message", "request_id", "status", "duration_ms"} <= set(
        access[-1]
    )
    logs = api.logs()
    assert key not in logs and key[3:] not in logs
    assert secret_text not in logs
