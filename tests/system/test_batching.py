"""The batching queue in front of the real engine: batches, routing, backpressure."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from app.model.batching import BatchingQueue, QueueFull
from app.model.engine import Engine
from tests.helpers import MODEL_PATH, ApiProcess, cosine, create_key, load_reference

CASES = load_reference()["cases"]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(MODEL_PATH, max_tokens=128)


def run(engine: Engine, coro_factory, **queue_options):
    runs: list[int] = []

    async def main():
        with ThreadPoolExecutor(1) as executor:
            queue = BatchingQueue(
                lambda rows: engine.infer(rows, normalize=False),
                executor,
                on_run=lambda rows, seconds: runs.append(rows),
                **queue_options,
            )
            queue.start()
            try:
                return await coro_factory(queue)
            finally:
                await queue.stop()

    return asyncio.run(main()), runs


def test_requests_arriving_together_share_a_run_and_get_their_own_rows(engine) -> None:
    token_ids = engine.tokenize([c["text"] for c in CASES])

    async def submit_all(queue):
        return await asyncio.gather(*(queue.submit([ids], normalize=True) for ids in token_ids))

    results, runs = run(engine, submit_all, window=0.002)
    assert sum(runs) == len(CASES) and len(runs) < len(CASES)  # batched
    for case, vectors in zip(CASES, results, strict=True):
        assert cosine(vectors[0], case["embedding"]) >= 0.99999


def test_a_lone_request_does_not_wait_for_the_window(engine) -> None:
    async def one(queue):
        # A window of a minute: had the lone request waited for it, this would time out.
        return await asyncio.wait_for(
            queue.submit(engine.tokenize(["alone"]), normalize=True), timeout=20
        )

    vectors, runs = run(engine, one, window=60.0)
    assert runs == [1] and vectors.shape == (1, 384)


def test_passes_in_length_order_give_each_row_its_own_vector(engine) -> None:
    rows = engine.tokenize(["a", "a b", " ".join(["word"] * 100), "c d e", "f g h i j k"])

    async def submit(queue):
        return await queue.submit(rows, normalize=False)

    vectors, _ = run(engine, submit, pass_rows=2)
    expected = engine.infer(rows, normalize=False)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_a_full_queue_refuses_instead_of_queueing(engine) -> None:
    rows = engine.tokenize([" ".join(["word"] * 100)] * 4)

    async def flood(queue):
        return await asyncio.gather(
            *(queue.submit(rows, normalize=True) for _ in range(20)), return_exceptions=True
        )

    results, _ = run(engine, flood, max_queue_tokens=1000)
    refused = [r for r in results if isinstance(r, QueueFull)]
    served = [r for r in results if isinstance(r, np.ndarray)]
    assert refused and served and len(refused) + len(served) == 20


def test_overload_is_a_503_with_retry_after(module_env: dict, api: ApiProcess) -> None:
    env = {**module_env, "MAX_QUEUE_TOKENS": "256", "SCALE_TIER_LIMIT": "-1"}
    small = ApiProcess(env, api.workdir).start()
    try:
        small.wait_healthy()
        key = create_key(env, api.workdir, "flood@example.com", "scale")

        async def flood():
            async with httpx.AsyncClient(base_url=small.base_url, timeout=60) as http:
                return await asyncio.gather(
                    *(
                        http.post(
                            "/v1/embed",
                            headers={"Authorization": f"Bearer {key}"},
                            json={"text": " ".join(["word"] * 120) + f" {i}"},
                        )
                        for i in range(40)
                    )
                )

        responses = asyncio.run(flood())
        statuses = [r.status_code for r in responses]
        assert set(statuses) == {200, 503}, statuses
        overloaded = next(r for r in responses if r.status_code == 503)
        assert overloaded.json()["error"] == "overloaded"
        assert overloaded.headers["retry-after"] == "1"
    finally:
        small.stop()
