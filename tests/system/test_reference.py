"""Every public reference case, through HTTP: same vector as sentence-transformers, same tokens."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import ApiProcess, cosine, load_reference

CASES = load_reference()["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["text"][:30] for c in CASES])
def test_embed_matches_reference(api: ApiProcess, key: str, case: dict) -> None:
    with api.client(key) as client:
        response = client.post("/v1/embed", json={"text": case["text"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "all-MiniLM-L6-v2"
    assert len(body["embedding"]) == 384
    assert body["tokens"] == case["tokens"]
    assert cosine(body["embedding"], case["embedding"]) >= 0.99999
    assert abs(np.linalg.norm(body["embedding"]) - 1.0) < 1e-5


def test_normalize_false_returns_the_raw_mean_pooled_vector(api: ApiProcess, key: str) -> None:
    case = CASES[2]
    with api.client(key) as client:
        raw = client.post("/v1/embed", json={"text": case["text"], "normalize": False}).json()
        unit = client.post("/v1/embed", json={"text": case["text"], "normalize": True}).json()
    raw_vector = np.asarray(raw["embedding"])
    # Mean-pooled MiniLM vectors are far from unit length; normalising them gives the reference.
    assert not 0.99 < np.linalg.norm(raw_vector) < 1.01
    assert cosine(raw_vector, case["embedding"]) >= 0.99999
    np.testing.assert_allclose(
        raw_vector / np.linalg.norm(raw_vector), unit["embedding"], atol=1e-6
    )
