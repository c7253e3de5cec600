"""The engine on its own: dynamic padding, no truncation, batches equal singles."""

from __future__ import annotations

import random

import numpy as np
import pytest

from app.model.engine import Engine, TextTooLong, end_of_pieces
from tests.embedding import embed
from tests.helpers import MODEL_PATH, cosine, load_reference


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(MODEL_PATH, max_tokens=128)


def test_tokenizes_without_padding_or_truncation(engine: Engine) -> None:
    assert [len(ids) for ids in engine.tokenize(["a", "a b c"])] == [3, 5]
    assert engine.tokenizer.truncation is None and engine.tokenizer.padding is None


def test_pads_each_batch_to_its_longest_input(engine: Engine) -> None:
    shapes: list[tuple[int, ...]] = []
    run = engine.session.run

    def recording_run(outputs, feeds):  # observe the real session's input, change nothing
        shapes.append(feeds["input_ids"].shape)
        return run(outputs, feeds)

    engine.session = type("Recorder", (), {"run": staticmethod(recording_run)})()
    try:
        embed(engine, ["a", "a b c"])
    finally:
        engine.session = run.__self__
    assert shapes == [(2, 5)]


def test_batch_equals_singles(engine: Engine) -> None:
    cases = load_reference()["cases"]
    texts = [c["text"] for c in cases]
    batch = embed(engine, texts)
    assert batch.token_counts == [c["tokens"] for c in cases]
    for i, text in enumerate(texts):
        single = embed(engine, [text])
        np.testing.assert_allclose(batch.vectors[i], single.vectors[0], atol=1e-5)
        assert cosine(batch.vectors[i], cases[i]["embedding"]) >= 0.99999


def test_over_long_input_is_refused_with_its_full_count(engine: Engine) -> None:
    # 64 words of 3 pieces each: too few words for the word count to tell, so it is tokenized.
    with pytest.raises(TextTooLong) as info:
        embed(engine, ["short", " ".join(["a.b"] * 64)])
    assert (info.value.index, info.value.tokens, info.value.max_tokens) == (1, 194, 128)
    assert info.value.exact


def test_many_words_are_refused_before_tokenizing(engine: Engine) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 25_000  # 1.1 MB
    with pytest.raises(TextTooLong) as info:
        engine.tokenize(["short", text])
    assert (info.value.index, info.value.tokens, info.value.exact) == (1, 129, False)
    # 10 sure pieces a sentence (9 words and its full stop): the 127th ends its 7th word.
    sentence = "The quick brown fox jumps over the lazy dog. "
    assert end_of_pieces(text, 127) == len(sentence * 12 + "The quick brown fox jumps over the")


# Characters on which the word count and BERT's normaliser could disagree: whitespace of every
# kind, controls it deletes, marks it strips, zero-width and CJK characters, punctuation.
_NASTY = list(
    "abc XY 12 .,;!?-_'\"\t\n\r\x0b\x0c"
    "\u00a0\u3000\u2003\u1680\u0301\u0308\u200b\u200d\ufeff\u2028\u2029\x1c\x1f\x85"
    "\x00\ufffdéßÅ東京²٣\u0627\u05d0\u0e01ǅⅫ\U0001f600"
)


def test_the_word_count_never_exceeds_the_word_pieces(engine: Engine) -> None:
    """Sound on 5,000 random texts of the characters most likely to break it."""
    rng = random.Random(16)
    for _ in range(5_000):
        text = "".join(rng.choice(_NASTY) for _ in range(rng.randint(1, 60)))
        pieces = len(engine.tokenizer.encode(text).ids) - 2
        assert end_of_pieces(text, pieces + 1) is None, (text, pieces)  # no more words than that


def test_truncating_after_the_word_count_keeps_the_same_pieces() -> None:
    """A long text cut at a word end (truncate=true) gives the pieces of cutting the whole."""
    # 10 pieces: many random texts go over; words counted in every text, however short.
    small = Engine(MODEL_PATH, max_tokens=12, count_pieces_after=0)
    rng = random.Random(11)
    cut = 0
    for _ in range(2_000):
        text = "".join(rng.choice(_NASTY) for _ in range(rng.randint(20, 200)))
        whole = small.tokenizer.encode(text).ids
        expected = whole if len(whole) <= 12 else [*whole[:11], whole[-1]]
        cut += end_of_pieces(text, 11) is not None
        assert small.tokenize([text], truncate=True) == [expected], text
    assert cut > 500  # the word count did the cutting often enough to mean something
