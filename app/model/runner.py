"""The async front of the engine: tokenizing off the event loop, inference through the queue."""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from app.model.batching import BatchingQueue
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
        max_batch_tokens: int = 16_384,
        max_queue_tokens: int = 262_144,
        on_run: Callable[[int, float], None] = lambda rows, seconds: None,
    ) -> None:
        self.engine = engine
        self._inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._heap = HeapTrimmer()
        self._memo: OrderedDict[tuple[str, bool], tuple[int, ...]] = OrderedDict()
        self.queue = BatchingQueue(
            lambda rows: engine.infer(rows, normalize=False),
            self._inference,
            window=window,
            max_batch_tokens=max_batch_tokens,
            max_queue_tokens=max_queue_tokens,
            on_run=on_run,
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
        work = self._tokenize_and_trim if chars > self.TRIM_AFTER_CHARS else self.engine.tokenize
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._tokenizing, functools.partial(work, texts, truncate=truncate)
        )

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

    async def infer(self, token_ids: Sequence[Sequence[int]], *, normalize: bool) -> np.ndarray:
        return await self.queue.submit(token_ids, normalize=normalize)

    async def stop(self) -> None:
        await self.queue.stop()
        self._inference.shutdown(wait=True, cancel_futures=False)
        self._tokenizing.shutdown(wait=True, cancel_futures=False)
