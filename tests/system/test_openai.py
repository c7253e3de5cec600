"""/v1/embeddings and /v1/models through the real clients, unmodified: the official `openai`
package and langchain-openai's OpenAIEmbeddings."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
from langchain_openai import OpenAIEmbeddings

from tests.helpers import ApiProcess, cosine, create_key, load_reference

CASES = load_reference()["cases"]
MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def client(api: ApiProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.base_url}/v1", api_key=key, max_retries=0)


def embed_v1(api: ApiProcess, key: str, text: str) -> list[float]:
    with api.client(key) as http:
        return http.post("/v1/embed", json={"text": text}).json()["embedding"]


def same_float32(a, b) -> bool:
    """Equal as the float32 vectors both endpoints compute (JSON and base64 print them apart)."""
    return np.array_equal(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32))


def test_a_string(client: openai.OpenAI, api: ApiProcess, key: str) -> None:
    case = CASES[0]
    result = client.embeddings.create(model=MODEL, input=case["text"])
    assert result.model == MODEL and result.object == "list"
    assert [d.index for d in result.data] == [0]
    assert result.usage.prompt_tokens == result.usage.total_tokens == case["tokens"]
    assert cosine(result.data[0].embedding, case["embedding"]) >= 0.99999
    assert same_float32(result.data[0].embedding, embed_v1(api, key, case["text"]))


def test_a_list_in_order(client: openai.OpenAI, api: ApiProcess, key: str) -> None:
    cases = CASES[:12]
    result = client.embeddings.create(model=MODEL, input=[c["text"] for c in cases])
    assert [d.index for d in result.data] == list(range(12))
    assert result.usage.prompt_tokens == sum(c["tokens"] for c in cases)
    for case, item in zip(cases, result.data, strict=True):
        assert cosine(item.embedding, case["embedding"]) >= 0.99999
    assert same_float32(result.data[5].embedding, embed_v1(api, key, cases[5]["text"]))


def test_base64_and_dimensions(client: openai.OpenAI, api: ApiProcess, key: str) -> None:
    text = CASES[3]["text"]
    floats = client.embeddings.create(model=MODEL, input=text).data[0].embedding
    # Asked for explicitly, base64 comes back as the string: little-endian float32 bytes.
    encoded = client.embeddings.create(model=MODEL, input=text, encoding_format="base64")
    raw = encoded.data[0].embedding
    assert isinstance(raw, str)
    assert np.frombuffer(base64.b64decode(raw), dtype="<f4").tolist() == floats
    with api.client(key) as http:
        plain = http.post(
            "/v1/embeddings", json={"model": MODEL, "input": text, "encoding_format": "float"}
        ).json()["data"][0]["embedding"]
    assert same_float32(plain, floats)
    short = client.embeddings.create(model=MODEL, input=text, dimensions=64).data[0].embedding
    assert len(short) == 64
    expected = np.asarray(floats[:64]) / np.linalg.norm(floats[:64])
    assert np.allclose(short, expected, atol=1e-6)


def test_langchain(api: ApiProcess, key: str) -> None:
    # check_embedding_ctx_length=False: otherwise LangChain tokenizes with tiktoken (OpenAI's
    # tokenizer, fetched from the internet) and sends token ids that mean nothing to MiniLM.
    embeddings = OpenAIEmbeddings(
        model=MODEL,
        base_url=f"{api.base_url}/v1",
        api_key=key,
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    documents = embeddings.embed_documents([c["text"] for c in CASES[:5]])
    query = embeddings.embed_query(CASES[6]["text"])
    for case, vector in zip(CASES[:5], documents, strict=True):
        assert cosine(vector, case["embedding"]) >= 0.99999
    assert cosine(query, CASES[6]["embedding"]) >= 0.99999
    assert same_float32(query, embed_v1(api, key, CASES[6]["text"]))


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_errors_in_openai_envelope(client: openai.OpenAI, api: ApiProcess) -> None:
    bad_key = openai.OpenAI(base_url=f"{api.base_url}/v1", api_key="sk_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as unauthorized:
        bad_key.embeddings.create(model=MODEL, input="hi")
    assert unauthorized.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.embeddings.create(model=MODEL, input=["fine", "also fine", "word " * 200])
    assert too_long.value.body["param"] == "input[2]"
    assert too_long.value.body["code"] == "text_too_long"
    with pytest.raises(openai.BadRequestError) as empty:
        client.embeddings.create(model=MODEL, input=["ok", " "])
    assert empty.value.body["param"] == "input[1]"
    with pytest.raises(openai.BadRequestError) as tokens:
        client.embeddings.create(model=MODEL, input=[[101, 102]])
    assert tokens.value.body["param"] == "input[0]"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.embeddings.create(model=MODEL, input=["x"] * 2049)
    assert too_many.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError) as dims:
        client.embeddings.create(model=MODEL, input="x", dimensions=385)
    assert dims.value.body["param"] == "dimensions"
    with pytest.raises(openai.NotFoundError) as model:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert model.value.body["code"] == "model_not_found"
    with pytest.raises(openai.APIStatusError) as big:
        client.embeddings.create(model=MODEL, input=["a" * 1000] * 1100)
    assert big.value.status_code == 413
    assert big.value.body["code"] == "payload_too_large"


def test_a_batch_over_the_quota_is_refused_whole(module_env: dict, api: ApiProcess) -> None:
    env = {**module_env, "FREE_TIER_LIMIT": "10"}
    limited = ApiProcess(env, api.workdir).start()
    try:
        limited.wait_healthy()
        key = create_key(env, api.workdir, "batch@example.com", "free")
        client = openai.OpenAI(base_url=f"{limited.base_url}/v1", api_key=key, max_retries=0)
        client.embeddings.create(model=MODEL, input=[f"t{i}" for i in range(8)])
        with pytest.raises(openai.RateLimitError) as refused:
            client.embeddings.create(model=MODEL, input=[f"u{i}" for i in range(3)])
        assert refused.value.body["code"] == "rate_limit_exceeded"
        assert refused.value.response.headers["x-ratelimit-remaining"] == "2"
        ok = client.embeddings.with_raw_response.create(model=MODEL, input=["v0", "v1"])
        assert ok.headers["x-ratelimit-remaining"] == "0"
    finally:
        limited.stop()


def test_aliases_only_when_configured(module_env: dict, api: ApiProcess) -> None:
    env = {**module_env, "MODEL_ALIASES": "text-embedding-3-small"}
    aliased = ApiProcess(env, api.workdir).start()
    try:
        aliased.wait_healthy()
        key = create_key(env, api.workdir, "alias@example.com", "pro")
        client = openai.OpenAI(base_url=f"{aliased.base_url}/v1", api_key=key, max_retries=0)
        result = client.embeddings.create(model="text-embedding-3-small", input="alias")
        assert result.model == MODEL
        assert [m.id for m in client.models.list()] == [MODEL, "text-embedding-3-small"]
    finally:
        aliased.stop()


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(
    api: ApiProcess, key: str
) -> None:
    import asyncio

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
            return await asyncio.gather(
                *(
                    http.post(
                        "/v1/embeddings",
                        headers={"Authorization": f"Bearer {key}"},
                        json={"model": MODEL, "input": [c["text"] for c in CASES[i : i + 3]]},
                    )
                    for i in range(0, 36, 3)
                )
            )

    for i, response in zip(range(0, 36, 3), asyncio.run(run()), strict=True):
        for case, item in zip(CASES[i : i + 3], response.json()["data"], strict=True):
            assert cosine(item["embedding"], case["embedding"]) >= 0.99999
