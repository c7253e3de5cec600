"""The batching queue's fairness across owners, on the real engine: a large job is cut into passes
and other owners' jobs run between them; per-owner bounds; the work of gone callers is dropped."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from app.model.batching import BatchingQueue, OwnerQueueFull
from app.model.engine import Engine
from tests.helpers import MODEL_PATH


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(MODEL_PATH, max_tokens=128)


class Recorder:
    """What the queue ran: rows per pass, in order, and the rows of gone callers it dropped."""

    def __init__(self) -> None:
        self.passes: list[int] = []
        self.abandoned = 0

    def queue(self, engine: Engine, executor: ThreadPoolExecutor, **options) -> BatchingQueue:
        return BatchingQueue(
            lambda rows: engine.infer(rows, normalize=False),
            executor,
            on_run=lambda rows, seconds: self.passes.append(rows),
            on_abandoned=self._abandoned,
            **options,
        )

    def _abandoned(self, rows: int) -> None:
        self.abandoned += rows


def run(engine: Engine, scenario, **options):
    recorder = Recorder()

    async def main():
        with ThreadPoolExecutor(1) as executor:
            queue = recorder.queue(engine, executor, **options)
            queue.start()
            try:
                return await scenario(queue)
            finally:
                await queue.stop()

    return asyncio.run(main()), recorder


def long_rows(engine: Engine, count: int) -> list[list[int]]:
    return engine.tokenize([f"row {i} " + " ".join(["tokenization"] * 40) for i in range(count)])


def test_a_small_job_is_served_between_the_passes_of_a_large_one(engine: Engine) -> None:
    big = long_rows(engine, 600)  # ~50,000 tokens: many passes
    small = engine.tokenize(["the victim's short text"])
    finished: list[str] = []

    async def scenario(queue: BatchingQueue):
        async def submit(name: str, rows, owner: str):
            vectors = await queue.submit(rows, normalize=True, owner=owner)
            finished.append(name)
            return vectors

        large = asyncio.create_task(submit("large", big, "attacker"))
        await asyncio.sleep(0.05)  # the large job is under way
        vector = await submit("small", small, "victim")
        return vector, await large

    (vector, vectors), recorder = run(engine, scenario)
    assert finished == ["small", "large"]
    assert len(recorder.passes) > 10  # the large job ran in many passes, not one
    assert vectors.shape == (600, 384)
    reference = engine.infer(small)
    assert float(vector[0] @ reference[0]) > 0.99999
    alone = engine.infer(big[:1])
    assert float(vectors[0] @ alone[0]) > 0.99999


def test_passes_take_an_equal_share_of_every_waiting_owner(engine: Engine) -> None:
    rows = engine.tokenize([f"text {i}" for i in range(200)])

    async def scenario(queue: BatchingQueue):
        return await asyncio.gather(
            queue.submit(rows, normalize=True, owner="a"),
            queue.submit(rows[:10], normalize=True, owner="b"),
        )

    (a, b), recorder = run(engine, scenario, pass_rows=64)
    # The first pass holds b's ten rows beside a's share, not 64 of a's.
    assert recorder.passes[0] == 64 and sum(recorder.passes) == 210
    assert a.shape == (200, 384) and b.shape == (10, 384)
    assert np.allclose(a[:10], b, atol=1e-5)


def test_a_pass_is_bounded_in_padded_tokens(engine: Engine) -> None:
    rows = long_rows(engine, 64)
    length = max(len(row) for row in rows)

    async def scenario(queue: BatchingQueue):
        return await queue.submit(rows, normalize=True, owner="a")

    _, recorder = run(engine, scenario, max_batch_tokens=length * 10)
    assert max(recorder.passes) == 10 and sum(recorder.passes) == 64


def test_an_owner_with_work_waiting_may_not_queue_more_than_its_bound(engine: Engine) -> None:
    rows = long_rows(engine, 100)
    tokens = sum(len(row) for row in rows)

    async def scenario(queue: BatchingQueue):
        first = asyncio.create_task(queue.submit(rows, normalize=True, owner="a"))
        await asyncio.sleep(0)
        with pytest.raises(OwnerQueueFull):
            await queue.submit(rows, normalize=True, owner="a")
        other = await queue.submit(rows, normalize=True, owner="b")  # another owner is not bound
        return await first, other

    (first, other), _ = run(engine, scenario, max_owner_tokens=tokens + tokens // 2)
    assert first.shape == other.shape == (100, 384)


def test_the_rows_of_a_caller_that_left_are_never_run(engine: Engine) -> None:
    rows = long_rows(engine, 640)

    async def scenario(queue: BatchingQueue):
        job = asyncio.create_task(queue.submit(rows, normalize=True, owner="gone"))
        await asyncio.sleep(0.2)  # a few passes run
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        after = await queue.submit(rows[:1], normalize=True, owner="next")
        return queue.queued_tokens, after

    (queued, _), recorder = run(engine, scenario)
    ran = sum(recorder.passes)
    assert recorder.abandoned > 0 and ran < 640
    assert ran + recorder.abandoned <= 640 + 64 + 1  # at most the pass in flight ran after
    assert queued == 0
