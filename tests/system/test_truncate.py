"""`"truncate": true` on /v1/embed and /v1/embeddings: a text over MAX_TOKENS is embedded from its
first MAX_TOKENS tokens (sentence-transformers' max_seq_length) instead of refused.

The expectation is computed apart from the service: the `tokenizers` library's own truncation
(what sentence-transformers asks of the tokenizer) and a plain ONNX Runtime session."""

from __future__ import annotations

import time

import httpx
import numpy as np
import onnxruntime as ort
import psycopg
import pytest
from tokenizers import Tokenizer

from app.model.engine import Engine
from tests.helpers import MODEL_PATH, ApiProcess, cosine, create_key

MAX_TOKENS = 128  # the service's default MAX_TOKENS
# Several word pieces per word for some of them, so the cut falls inside words too.
LONG_TEXT = " ".join(
    f"paragraph {i} discusses tokenization, embeddings and unbelievably long sentences"
    for i in range(40)
)


def reference_ids(text: str, max_tokens: int = MAX_TOKENS) -> list[int]:
    tokenizer = Tokenizer.from_file(str(MODEL_PATH / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_tokens)
    return tokenizer.encode(text).ids


def reference_vector(ids: list[int]) -> np.ndarray:
    session = ort.InferenceSession(
        str(MODEL_PATH / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds = {"input_ids": np.array([ids], dtype=np.int64)}
    feeds["attention_mask"] = np.ones_like(feeds["input_ids"])
    (pooled,) = session.run(["sentence_embedding"], feeds)
    return pooled[0] / np.linalg.norm(pooled[0])


@pytest.fixture(scope="module")
def scale_key(api: ApiProcess) -> str:
    return create_key(api.env, api.workdir, "truncate@example.com", "scale")


def test_the_tokenizer_cuts_like_sentence_transformers() -> None:
    engine = Engine(MODEL_PATH, max_tokens=16)
    full = engine.tokenizer.encode(LONG_TEXT).ids
    (cut,) = engine.tokenize([LONG_TEXT], truncate=True)
    assert cut == reference_ids(LONG_TEXT, 16) == full[:15] + full[-1:]
    assert engine.tokenize(["short text"], truncate=True) == engine.tokenize(["short text"])


def test_embed_truncates_on_request(api: ApiProcess, scale_key: str) -> None:
    ids = reference_ids(LONG_TEXT)
    assert len(ids) == MAX_TOKENS
    expected = reference_vector(ids)
    with api.client(scale_key) as client:
        refused = client.post("/v1/embed", json={"text": LONG_TEXT})
        cut = client.post("/v1/embed", json={"text": LONG_TEXT, "truncate": True})
        again = client.post("/v1/embed", json={"text": LONG_TEXT, "truncate": True})
        # The truncated entry now in the cache must not answer the untruncated request.
        still_refused = client.post("/v1/embed", json={"text": LONG_TEXT, "truncate": False})
    assert refused.status_code == 400 and refused.json()["error"] == "text_too_long"
    # 3,400 characters: over 8 per token of the limit, so refused by counting its pieces.
    assert refused.json()["tokens_at_least"] == MAX_TOKENS + 1
    full_count = len(Tokenizer.from_file(str(MODEL_PATH / "tokenizer.json")).encode(LONG_TEXT))
    assert cut.status_code == 200, cut.text
    body = cut.json()
    assert body["tokens"] == MAX_TOKENS and body["cached"] is False
    similarity = cosine(body["embedding"], expected)
    print(f"\ntruncated {full_count} -> {MAX_TOKENS} tokens; cosine to reference {similarity:.7f}")
    assert similarity > 0.9999
    assert again.json()["cached"] is True and again.json()["embedding"] == body["embedding"]
    assert still_refused.status_code == 400 and still_refused.json()["error"] == "text_too_long"


def test_embeddings_truncates_on_request(api: ApiProcess, scale_key: str) -> None:
    short = "a short text"
    with api.client(scale_key) as client:
        refused = client.post(
            "/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": [short, LONG_TEXT]}
        )
        cut = client.post(
            "/v1/embeddings",
            json={"model": "all-MiniLM-L6-v2", "input": [short, LONG_TEXT], "truncate": True},
        )
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "text_too_long"
    assert refused.json()["error"]["param"] == "input[1]"
    assert cut.status_code == 200, cut.text
    body = cut.json()
    short_ids = reference_ids(short)
    assert body["usage"]["prompt_tokens"] == len(short_ids) + MAX_TOKENS
    vectors = [row["embedding"] for row in body["data"]]
    assert cosine(vectors[0], reference_vector(short_ids)) > 0.9999
    assert cosine(vectors[1], reference_vector(reference_ids(LONG_TEXT))) > 0.9999


def test_quota_and_ledger_count_what_was_embedded(api: ApiProcess) -> None:
    key = create_key(api.env, api.workdir, "truncate-ledger@example.com", "pro")
    with api.client(key) as client:
        response = client.post("/v1/embed", json={"text": LONG_TEXT + " ledger", "truncate": True})
    assert response.status_code == 200
    limit = int(response.headers["x-ratelimit-limit"])
    assert int(response.headers["x-ratelimit-remaining"]) == limit - 1
    deadline = time.monotonic() + 15
    with psycopg.connect(api.env["DATABASE_URL"]) as conn:
        while True:
            row = conn.execute(
                """
                SELECT sum(u.embeddings_count), sum(u.tokens) FROM usage u
                  JOIN users s ON s.id = u.user_id WHERE s.email = 'truncate-ledger@example.com'
                """
            ).fetchone()
            if row[0] is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert row == (1, MAX_TOKENS)


@pytest.mark.parametrize("value", ["yes", 1, 0, None, [], {}])
def test_truncate_must_be_a_boolean(api: ApiProcess, scale_key: str, value: object) -> None:
    with api.client(scale_key) as client:
        embed = client.post("/v1/embed", json={"text": "hi", "truncate": value})
        openai = client.post(
            "/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "hi", "truncate": value}
        )
    assert embed.status_code == 400
    assert embed.json()["error"] == "invalid_request" and embed.json()["param"] == "truncate"
    assert "true or false" in embed.json()["message"]
    assert openai.status_code == 400
    assert openai.json()["error"]["code"] == "invalid_request"
    assert openai.json()["error"]["param"] == "truncate"


def test_truncate_is_in_the_contract(api: ApiProcess) -> None:
    document = httpx.get(f"{api.base_url}/openapi.json").json()
    for path in ("/v1/embed", "/v1/embeddings"):
        schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        truncate = schema["schema"]["properties"]["truncate"]
        assert truncate["type"] == "boolean" and truncate["default"] is False, path
        assert f"{MAX_TOKENS}" in truncate["description"], path
