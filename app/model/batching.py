"""Dynamic, fair batching: requests that arrive together are embedded together, and no customer's
request waits for another customer's large one.

A queue in front of the engine, with a line of jobs per owner (the customer). Each forward pass
is filled round-robin across the owners with work waiting, every owner taking an equal share of
its rows (a job's rows in length order, so they pad little), up to `pass_rows` rows and
`max_batch_tokens` padded tokens, rows of much different lengths in passes of their own. A large
job is thus cut into passes, and every other owner's rows run between them: a request waits for
at most the two passes handed to the engine (the one running and the next, formed meanwhile so
that the engine never waits for the event loop) and its share of the next, never for the rest
of a large job.

When the engine is idle a lone request runs at once; when several wait, late-comers get at most
`window` seconds to join the pass. The queue is bounded in tokens, in all (`max_queue_tokens`:
QueueFull) and per owner (`max_owner_tokens`: OwnerQueueFull), so a backlog nobody will wait
for is refused at once instead of built; an owner with nothing queued may always submit one job.
A job whose caller has gone (its future cancelled) is dropped, its remaining rows never run.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from app.model.engine import l2_normalize

RunRows = Callable[[Sequence[Sequence[int]]], np.ndarray]

# An owner's rows in a pass come from its first this many jobs, shortest first; a job passed
# over in this many of its owner's passes in a row goes first.
_MERGE_JOBS = 16
_MAX_SKIPS = 4
# Passes handed to the engine's thread at once: the one running and the next, formed meanwhile.
_PASSES_AHEAD = 2
# A row more than twice as long as a pass's longest (and this many tokens) starts the next pass:
# short requests are not padded to a long one's length, nor wait for its pass.
_PAD_SLACK = 16


class QueueFull(Exception):
    """The queue holds more work than the engine can catch up with soon; retry shortly."""


class OwnerQueueFull(Exception):
    """This owner already has as much work waiting as one owner may; retry once it has run."""

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(f"{queued} tokens of yours are already waiting (at most {limit})")
        self.queued = queued
        self.limit = limit


@dataclass(slots=True, eq=False)
class _Job:
    owner: Hashable
    rows: Sequence[Sequence[int]]
    normalize: bool
    future: asyncio.Future[np.ndarray] = field(repr=False)
    order: list[int] = field(default_factory=list)  # row indices, shortest first
    taken: int = 0  # rows handed to passes so far
    skipped: int = 0  # passes in a row of its owner that took none of its rows
    done: int = 0  # rows whose vectors are back
    vectors: np.ndarray | None = field(default=None, repr=False)

    def tokens_left(self) -> int:
        return sum(len(self.rows[i]) for i in self.order[self.taken :])


@dataclass(slots=True)
class _Pass:
    rows: list[Sequence[int]] = field(default_factory=list)
    normalize: list[bool] = field(default_factory=list)
    slots: list[tuple[_Job, int]] = field(default_factory=list)  # (job, row index) per row
    longest: int = 0


class BatchingQueue:
    def __init__(
        self,
        run_rows: RunRows,
        executor: Executor,
        *,
        window: float = 0.001,
        max_batch_tokens: int = 1_024,
        max_queue_tokens: int = 1_048_576,
        max_owner_tokens: int = 262_144,
        pass_rows: int = 64,
        on_run: Callable[[int, float], None] = lambda rows, seconds: None,
        on_abandoned: Callable[[int], None] = lambda rows: None,
    ) -> None:
        self.run_rows = run_rows  # blocking: raw (unnormalised) vectors of padded rows
        self.executor = executor
        self.window = window
        # Padded tokens (rows x the longest) per pass: raw ORT on 2 cores is fastest at
        # 512-2,048 of them, and a pass of 1,024 takes ~65 ms: the most another owner's request
        # waits for the pass in flight.
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_tokens = max_queue_tokens
        self.max_owner_tokens = max_owner_tokens
        self.pass_rows = pass_rows
        self.on_run = on_run
        self.on_abandoned = on_abandoned  # rows of gone callers, dropped unrun
        self.queued_tokens = 0
        self._owner_tokens: dict[Hashable, int] = {}
        # Owners with work waiting, in round-robin order; each with its jobs, oldest first.
        self._lines: OrderedDict[Hashable, deque[_Job]] = OrderedDict()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._worker = asyncio.create_task(self._work(), name="batching-queue")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for line in self._lines.values():
            for job in line:
                if not job.future.done():
                    job.future.set_exception(QueueFull("the service is stopping"))
        self._lines.clear()

    async def submit(
        self, rows: Sequence[Sequence[int]], *, normalize: bool, owner: Hashable = None
    ) -> np.ndarray:
        tokens = sum(len(row) for row in rows)
        # An empty queue takes any job, however large; otherwise the bounds hold.
        if self.queued_tokens and self.queued_tokens + tokens > self.max_queue_tokens:
            raise QueueFull(f"{self.queued_tokens} tokens are already waiting")
        owned = self._owner_tokens.get(owner, 0)
        if owned and owned + tokens > self.max_owner_tokens:
            raise OwnerQueueFull(owned, self.max_owner_tokens)
        future = asyncio.get_running_loop().create_future()
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        job = _Job(owner, rows, normalize, future, order)
        self._add_tokens(owner, tokens)
        self._lines.setdefault(owner, deque()).append(job)
        self._arrived.set()
        try:
            return await future
        finally:
            if not future.done() or future.cancelled():
                self._abandon(job)

    def _add_tokens(self, owner: Hashable, tokens: int) -> None:
        self.queued_tokens += tokens
        left = self._owner_tokens.get(owner, 0) + tokens
        if left > 0:
            self._owner_tokens[owner] = left
        else:
            self._owner_tokens.pop(owner, None)

    def _abandon(self, job: _Job) -> None:
        """The caller is gone: its rows not yet taken never run."""
        if not job.future.done():
            job.future.cancel()
        line = self._lines.get(job.owner)
        if line is not None and job in line:
            line.remove(job)
            if not line:
                del self._lines[job.owner]
            self._add_tokens(job.owner, -job.tokens_left())
            self.on_abandoned(len(job.order) - job.taken)
            job.taken = len(job.order)

    def waiting(self) -> int:
        """Jobs waiting for a pass."""
        return sum(len(line) for line in self._lines.values())

    async def _work(self) -> None:
        """Keeps the engine's thread fed: the next pass is handed to it while one runs, so it
        goes from pass to pass without waiting for the event loop in between."""
        loop = asyncio.get_running_loop()
        running: deque[tuple[_Pass, asyncio.Future[np.ndarray]]] = deque()
        while True:
            if len(running) < _PASSES_AHEAD and self._lines:
                if not running and self.window > 0 and self.waiting() > 1:
                    # Under load: others are arriving, let the next few join this pass.
                    await asyncio.sleep(self.window)
                batch = self._next_pass()
                if batch.rows:
                    running.append((batch, loop.run_in_executor(self.executor, self._run, batch)))
                continue
            self._arrived.clear()
            if not running:
                await self._arrived.wait()
                continue
            batch, done = running[0]
            if len(running) < _PASSES_AHEAD:
                # The pass's end, or new work to form the next pass from, whichever comes first.
                arrival = asyncio.ensure_future(self._arrived.wait())
                await asyncio.wait({done, arrival}, return_when=asyncio.FIRST_COMPLETED)
                arrival.cancel()
            else:
                await asyncio.wait({done})
            if done.done():
                running.popleft()
                self._deliver(batch, done)

    def _deliver(self, batch: _Pass, done: asyncio.Future[np.ndarray]) -> None:
        """A pass's vectors to their jobs; a job is answered once all its rows are back."""
        try:
            vectors = done.result()
        except Exception as exc:
            for job, _ in batch.slots:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        for (job, index), vector in zip(batch.slots, vectors, strict=True):
            if job.future.done():
                continue
            if job.vectors is None:
                job.vectors = np.empty((len(job.rows), vector.shape[0]), dtype=np.float32)
            job.vectors[index] = vector
            job.done += 1
            if job.done == len(job.rows):
                job.future.set_result(job.vectors)

    def _next_pass(self) -> _Pass:
        """Rows for one pass, round-robin across owners, each taking an equal share."""
        batch = _Pass()
        while self._lines and len(batch.rows) < self.pass_rows:
            owners = list(self._lines)
            share = max(1, (self.pass_rows - len(batch.rows)) // len(owners))
            for owner in owners:
                if not self._take(owner, share, batch):
                    return batch  # the pass is full
        return batch

    def _take(self, owner: Hashable, share: int, batch: _Pass) -> bool:
        """Up to `share` of the owner's rows into the pass; False once the pass is full. The
        owner goes to the back of the round-robin order.

        The shortest rows of the owner's first few jobs, so that a pass pads little even when
        each job is small (a job's rows are taken in length order, always); a job passed over
        in a few passes in a row has its next row taken first, so none waits for long."""
        line = self._lines.pop(owner)
        window = [job for _, job in zip(range(_MERGE_JOBS), line, strict=False)]
        # Passed over too often: first, whatever its length (the smaller key).
        shortest = [
            (0 if job.skipped >= _MAX_SKIPS else 1, len(job.rows[job.order[job.taken]]), n, job)
            for n, job in enumerate(window)
        ]
        heapq.heapify(shortest)
        served: set[int] = set()
        full = False
        taken = 0
        while shortest and taken < share:
            _, length, n, job = heapq.heappop(shortest)
            longest = max(batch.longest, length)
            if batch.rows and (
                len(batch.rows) >= self.pass_rows
                or longest * (len(batch.rows) + 1) > self.max_batch_tokens
                or length > 2 * batch.longest + _PAD_SLACK
            ):
                full = True
                break
            index = job.order[job.taken]
            batch.rows.append(job.rows[index])
            batch.normalize.append(job.normalize)
            batch.slots.append((job, index))
            batch.longest = longest
            job.taken += 1
            taken += 1
            served.add(n)
            self._add_tokens(owner, -length)
            if job.taken < len(job.order):
                heapq.heappush(shortest, (1, len(job.rows[job.order[job.taken]]), n, job))
            else:
                line.remove(job)
        for n, job in enumerate(window):
            job.skipped = 0 if n in served else job.skipped + 1
        if line:
            self._lines[owner] = line
        return not full

    def _run(self, batch: _Pass) -> np.ndarray:
        """On the executor thread: one forward pass; rows normalised where their job asks."""
        started = time.perf_counter()
        vectors = self.run_rows(batch.rows)
        self.on_run(len(batch.rows), time.perf_counter() - started)
        if any(batch.normalize):
            wanted = np.asarray(batch.normalize)
            vectors[wanted] = l2_normalize(vectors[wanted])
        return vectors
