"""The async front of the engine: tokenizing off the event loop, inference through the queue."""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from app.model.batching import BatchingQueue, QueueFull
from app.model.engine import Engine, ModelManifest
from app.model.memory import HeapTrimmer


class EngineRunner:
    """The async front of the engine: tokenizing, and inference through the batching queue.

    Model work runs on one dedicated thread (ONNX Runtime already spreads a pass over the
    cores). Tokenizing a short input takes microseconds, less than a thread hop, so it runs
    inline; long ones go to a thread of their own, never queueing behind inference.
    """

    INLINE_TOKENIZE_CHARS = 2048
    # Token ids of the latest single short texts: a text sent again (what the cache serves) is
    # not tokenized again. Tokenizing one costs 60-70 us in the serving process, a third of a
    # cached request's event-loop time (`make bench`: cached /v1/embed +15 % requests/s, p50
    # 0.50 -> 0.41 ms). Bounded: 4,096 texts of at most 512 characters, ~3 MB.
    MEMO_TEXTS = 4096
    MEMO_MAX_CHARS = 512
    # Past this many characters, the tokenizer's buffers are worth handing back to the OS.
    TRIM_AFTER_CHARS = 64 * 1024

    def __init__(
        self,
        engine: Engine,
        *,
        window: float = 0.001,
        max_batch_tokens: int = 1_024,
        max_queue_tokens: int = 1_048_576,
        max_owner_tokens: int = 262_144,
        max_tokenize_chars: int = 2_000_000,
        on_run: Callable[[int, float], None] = lambda rows, seconds: None,
        on_abandoned: Callable[[str, int], None] = lambda stage, count: None,
    ) -> None:
        self.engine = engine
        self._inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._heap = HeapTrimmer()
        self._memo: OrderedDict[tuple[str, bool], tuple[int, ...]] = OrderedDict()
        # Characters handed to the tokenizer thread and not yet tokenized: past the bound new
        # work is refused at once (QueueFull) rather than queued for seconds.
        self.max_tokenize_chars = max_tokenize_chars
        self.tokenize_queued_chars = 0
        self.on_abandoned = on_abandoned  # ("tokenize" texts | "inference" rows) of gone callers
        self.queue = BatchingQueue(
            lambda rows: engine.infer(rows, normalize=False),
            self._inference,
            window=window,
            max_batch_tokens=max_batch_tokens,
            max_queue_tokens=max_queue_tokens,
            max_owner_tokens=max_owner_tokens,
            on_run=on_run,
            on_abandoned=lambda rows: on_abandoned("inference", rows),
        )

    @property
    def manifest(self) -> ModelManifest:
        return self.engine.manifest

    def start(self) -> None:
        self.queue.start()

    async def tokenize(self, texts: Sequence[str], *, truncate: bool = False) -> list[list[int]]:
        if len(texts) == 1 and len(texts[0]) <= self.MEMO_MAX_CHARS:
            return [list(self._tokenize_one(texts[0], truncate))]
        chars = sum(len(t) for t in texts)
        if chars <= self.INLINE_TOKENIZE_CHARS:
            return self.engine.tokenize(texts, truncate=truncate)
        queued = self.tokenize_queued_chars
        if queued and queued + chars > self.max_tokenize_chars:
            raise QueueFull(f"{queued} characters are already waiting for the tokenizer")
        work = self._tokenize_and_trim if chars > self.TRIM_AFTER_CHARS else self.engine.tokenize
        loop = asyncio.get_running_loop()
        # Whoever takes it first: the tokenizer thread starting the work, or a caller that left
        # before its turn (the work is then never done).
        claim = threading.Lock()

        def tokenize() -> list[list[int]]:
            if not claim.acquire(blocking=False):
                return []
            try:
                return work(texts, truncate=truncate)
            finally:
                loop.call_soon_threadsafe(self._tokenized, chars)

        self.tokenize_queued_chars += chars
        try:
            return await loop.run_in_executor(self._tokenizing, tokenize)
        except asyncio.CancelledError:
            if claim.acquire(blocking=False):
                self._tokenized(chars)
                self.on_abandoned("tokenize", len(texts))
            raise

    def _tokenized(self, chars: int) -> None:
        self.tokenize_queued_chars -= chars

    def _tokenize_one(self, text: str, truncate: bool) -> tuple[int, ...]:
        key = (text, truncate)
        ids = self._memo.get(key)
        if ids is None:
            (row,) = self.engine.tokenize([text], truncate=truncate)  # TextTooLong: not kept
            ids = self._memo[key] = tuple(row)
            if len(self._memo) > self.MEMO_TEXTS:
                self._memo.popitem(last=False)
        else:
            self._memo.move_to_end(key)
        return ids

    def _tokenize_and_trim(self, texts: Sequence[str], *, truncate: bool) -> list[list[int]]:
        # A megabyte of text (a hostile one refused as too long, or 2,048 legitimate inputs)
        # costs ~100 MB of tokenizer buffers; without this the process keeps them for good.
        try:
            return self.engine.tokenize(texts, truncate=truncate)
        finally:
            self._heap.release()

    async def infer(
        self, token_ids: Sequence[Sequence[int]], *, normalize: bool, owner: Hashable = None
    ) -> np.ndarray:
        """Vectors of the rows, through the fair queue (`owner`: whose work it is)."""
        return await self.queue.submit(token_ids, normalize=normalize, owner=owner)

    async def stop(self) -> None:
        await self.queue.stop()
        self._inference.shutdown(wait=True, cancel_futures=False)
        self._tokenizing.shutdown(wait=True, cancel_futures=False)
