"""Dynamic batching: requests that arrive together are embedded together.

A queue in front of the engine. When the engine is idle, a lone request runs at once. While it
is busy, requests wait in the queue; the next run takes all of them (up to a token budget),
giving late-comers at most `window` seconds to join when others are already waiting. Rows are
sorted by length and cut into forward passes of `pass_rows`, so short texts are not padded to
the longest of a mixed batch. One executor call per run keeps the
event loop out of model work. The queue is bounded in tokens: past `max_queue_tokens` new work
is refused (`QueueFull`) instead of building a backlog nobody will wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from app.model.engine import l2_normalize

RunRows = Callable[[Sequence[Sequence[int]]], np.ndarray]


class QueueFull(Exception):
    """The queue holds more work than the engine can catch up with soon; retry shortly."""


@dataclass(slots=True)
class _Job:
    rows: Sequence[Sequence[int]]
    normalize: bool
    tokens: int
    future: asyncio.Future[np.ndarray] = field(repr=False)


class BatchingQueue:
    def __init__(
        self,
        run_rows: RunRows,
        executor: Executor,
        *,
        window: float = 0.001,
        max_batch_tokens: int = 16_384,
        max_queue_tokens: int = 262_144,
        pass_rows: int = 64,
        on_run: Callable[[int, float], None] = lambda rows, seconds: None,
    ) -> None:
        self.run_rows = run_rows  # blocking: raw (unnormalised) vectors of padded rows
        self.executor = executor
        self.window = window
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_tokens = max_queue_tokens
        # Rows per forward pass: raw ORT on 2 cores peaks at batches of 32-64 (1340/s at 32,
        # 1266 at 64, 1255 at 128 in `make bench`) and slows past that.
        self.pass_rows = pass_rows
        self.on_run = on_run
        self.queued_tokens = 0
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._worker = asyncio.create_task(self._work(), name="batching-queue")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(QueueFull("the service is stopping"))

    async def submit(self, rows: Sequence[Sequence[int]], *, normalize: bool) -> np.ndarray:
        tokens = sum(len(row) for row in rows)
        # An empty queue takes any job, however large; otherwise the bound holds.
        if self.queued_tokens and self.queued_tokens + tokens > self.max_queue_tokens:
            raise QueueFull(f"{self.queued_tokens} tokens are already waiting")
        job = _Job(rows, normalize, tokens, asyncio.get_running_loop().create_future())
        self.queued_tokens += tokens
        self._queue.put_nowait(job)
        return await job.future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            tokens = jobs[0].tokens
            while not self._queue.empty() and tokens < self.max_batch_tokens:
                jobs.append(self._queue.get_nowait())
                tokens += jobs[-1].tokens
            if len(jobs) > 1 and self.window > 0:
                # Under load: others are arriving, let the next few join this run.
                deadline = loop.time() + self.window
                while tokens < self.max_batch_tokens and (remaining := deadline - loop.time()) > 0:
                    try:
                        jobs.append(await asyncio.wait_for(self._queue.get(), remaining))
                    except TimeoutError:
                        break
                    tokens += jobs[-1].tokens
            self.queued_tokens -= tokens
            live = [job for job in jobs if not job.future.done()]  # callers may have gone
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self._run, live)
            except Exception as exc:
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, vectors in zip(live, results, strict=True):
                if not job.future.done():
                    job.future.set_result(vectors)

    def _run(self, jobs: list[_Job]) -> list[np.ndarray]:
        """On the executor thread: one pass over every row of every job, in length order."""
        started = time.perf_counter()
        rows = [row for job in jobs for row in job.rows]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        pooled = np.empty((len(rows), 0), dtype=np.float32)
        # Neighbours in length order share a pass: little padding, and passes of a size
        # ONNX Runtime runs fastest.
        for start in range(0, len(order), self.pass_rows):
            chunk = order[start : start + self.pass_rows]
            vectors = self.run_rows([rows[i] for i in chunk])
            if pooled.shape[1] == 0:
                pooled = np.empty((len(rows), vectors.shape[1]), dtype=np.float32)
            pooled[chunk] = vectors
        self.on_run(len(rows), time.perf_counter() - started)
        results = []
        offset = 0
        for job in jobs:
            vectors = pooled[offset : offset + len(job.rows)]
            offset += len(job.rows)
            if job.normalize:
                vectors = l2_normalize(vectors)
            results.append(vectors)
        return results
