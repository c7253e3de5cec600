"""The engine on its own: dynamic padding, no truncation, batches equal singles."""

from __future__ import annotations

import numpy as np
import pytest

from app.engine import Embedder, TextTooLong
from tests.helpers import MODEL_PATH, cosine, load_reference


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(MODEL_PATH, max_tokens=128)


def test_tokenizes_without_padding_or_truncation(embedder: Embedder) -> None:
    assert [len(ids) for ids in embedder.tokenize(["a", "a b c"])] == [3, 5]
    assert embedder.tokenizer.truncation is None and embedder.tokenizer.padding is None


def test_pads_each_batch_to_its_longest_input(embedder: Embedder) -> None:
    shapes: list[tuple[int, ...]] = []
    run = embedder.session.run

    def recording_run(outputs, feeds):  # observe the real session's input, change nothing
        shapes.append(feeds["input_ids"].shape)
        return run(outputs, feeds)

    embedder.session = type("Recorder", (), {"run": staticmethod(recording_run)})()
    try:
        embedder.embed(["a", "a b c"])
    finally:
        embedder.session = run.__self__
    assert shapes == [(2, 5)]


def test_batch_equals_singles(embedder: Embedder) -> None:
    cases = load_reference()["cases"]
    texts = [c["text"] for c in cases]
    batch = embedder.embed(texts)
    assert batch.token_counts == [c["tokens"] for c in cases]
    for i, text in enumerate(texts):
        single = embedder.embed([text])
        np.testing.assert_allclose(batch.vectors[i], single.vectors[0], atol=1e-5)
        assert cosine(batch.vectors[i], cases[i]["embedding"]) >= 0.99999


def test_over_long_input_is_refused_with_its_full_count(embedder: Embedder) -> None:
    with pytest.raises(TextTooLong) as info:
        embedder.embed(["short", " ".join(["word"] * 300)])
    assert (info.value.index, info.value.tokens, info.value.max_tokens) == (1, 302, 128)
