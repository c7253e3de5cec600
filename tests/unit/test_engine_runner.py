"""EngineRunner.tokenize: the real tokenizer, and its memo of single short texts."""

from __future__ import annotations

import asyncio

import pytest

from app.model.batching import QueueFull
from app.model.engine import Engine, TextTooLong
from app.model.runner import EngineRunner
from tests.helpers import MODEL_PATH


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(MODEL_PATH, max_tokens=16, threads=1)


def test_a_text_sent_again_gets_the_same_ids_from_the_memo(engine: Engine) -> None:
    runner = EngineRunner(engine)

    async def main() -> None:
        text = "the quick brown fox"
        (first,) = await runner.tokenize([text])
        assert first == engine.tokenize([text])[0]
        first.append(0)  # a caller's list is its own: the memo is not changed through it
        (again,) = await runner.tokenize([text])
        assert again == engine.tokenize([text])[0] and again is not first
        # truncate is part of the key: a long text is cut with it, refused without it.
        long = " ".join(["word"] * 40)
        (cut,) = await runner.tokenize([long], truncate=True)
        assert len(cut) == 16
        for _ in range(2):  # a refusal is not remembered as ids
            with pytest.raises(TextTooLong):
                await runner.tokenize([long])
        # Two texts go through the tokenizer together, as before.
        assert await runner.tokenize([text, long], truncate=True) == [again, cut]

    asyncio.run(main())
    asyncio.run(runner.stop())


def test_the_memo_keeps_the_latest_texts_only(engine: Engine) -> None:
    runner = EngineRunner(engine)
    runner.MEMO_TEXTS = 3

    async def main() -> None:
        for i in range(10):
            await runner.tokenize([f"text number {i}"])
        await runner.tokenize(["text number 7"])  # used again: the newest
        await runner.tokenize(["text number 10"])
        assert [text for text, _ in runner._memo] == [
            "text number 9",
            "text number 7",
            "text number 10",
        ]

    asyncio.run(main())
    asyncio.run(runner.stop())


def many_texts(count: int, seed: int) -> list[str]:
    return [f"text {seed} {i} " + " ".join(["word"] * 8) for i in range(count)]


def test_the_tokenizer_queue_is_bounded_and_refuses_at_once(engine: Engine) -> None:
    chars = len("".join(many_texts(2_000, 1)))  # ~100,000: one batch for the tokenizer thread
    runner = EngineRunner(engine, max_tokenize_chars=chars * 5 // 2)  # room for two such

    async def main() -> list[object]:
        return await asyncio.gather(
            *(runner.tokenize(many_texts(2_000, seed)) for seed in range(4)),
            return_exceptions=True,
        )

    results = asyncio.run(main())
    asyncio.run(runner.stop())
    refused = [r for r in results if isinstance(r, QueueFull)]
    assert len(refused) == 2 and all(isinstance(r, list) for r in results[:2])
    assert runner.tokenize_queued_chars == 0


def test_texts_of_a_caller_that_left_before_its_turn_are_never_tokenized(engine: Engine) -> None:
    tokenized: list[int] = []
    abandoned: list[tuple[str, int]] = []

    class Counting(Engine):
        def tokenize(self, texts, *, truncate=False):
            tokenized.append(len(texts))
            return super().tokenize(texts, truncate=truncate)

    counting = Counting(MODEL_PATH, max_tokens=16, threads=1)
    runner = EngineRunner(counting, on_abandoned=lambda stage, n: abandoned.append((stage, n)))

    async def main() -> None:
        first = asyncio.create_task(runner.tokenize(many_texts(3_000, 1)))
        second = asyncio.create_task(runner.tokenize(many_texts(500, 2)))
        await asyncio.sleep(0)  # both handed to the tokenizer thread; the first is running
        second.cancel()
        await first
        with pytest.raises(asyncio.CancelledError):
            await second

    asyncio.run(main())
    asyncio.run(runner.stop())
    assert tokenized == [3_000]
    assert abandoned == [("tokenize", 500)]
    assert runner.tokenize_queued_chars == 0
