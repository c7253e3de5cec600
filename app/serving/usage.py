"""The usage ledger: every embedding served becomes a row in `usage`, written in batches.

Requests only append to an in-memory buffer; a background task copies the buffer into PostgreSQL
at least every `flush_interval` seconds, or sooner once `flush_records` are waiting. When
PostgreSQL is down the records stay buffered and the flush is retried; only past
`max_buffered` records are the oldest dropped, and counted. Shutdown flushes what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

# Records go through a staging table, so one record that cannot join (its key or user deleted
# since it was served) never fails the COPY of everyone else's: a deleted key's usage is still
# billed to its user (api_key_id NULL, as ON DELETE SET NULL does for older rows), and only a
# record whose user no longer exists is set aside, counted and logged.
_STAGE = (
    "CREATE TEMP TABLE usage_incoming (user_id BIGINT, api_key_id BIGINT,"
    " embeddings_count INTEGER, tokens INTEGER, created_at TIMESTAMPTZ) ON COMMIT DROP"
)
_COPY_STAGE = (
    "COPY usage_incoming (user_id, api_key_id, embeddings_count, tokens, created_at) FROM STDIN"
)
_INSERT_STAGED = """
INSERT INTO usage (user_id, api_key_id, embeddings_count, tokens, created_at)
SELECT i.user_id, k.id, i.embeddings_count, i.tokens, i.created_at
FROM usage_incoming i
JOIN users u ON u.id = i.user_id
LEFT JOIN api_keys k ON k.id = i.api_key_id AND k.user_id = i.user_id
"""
_USERS_GONE = (
    "SELECT DISTINCT i.user_id FROM usage_incoming i"
    " WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.id = i.user_id) ORDER BY 1"
)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    user_id: int
    api_key_id: int
    embeddings_count: int
    tokens: int
    created_at: datetime


class UsageRecorder:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        flush_interval: float = 1.0,
        flush_records: int = 500,
        max_buffered: int = 1_000_000,
        on_buffer_change: Callable[[int], None] = lambda buffered: None,
        on_dropped: Callable[[int], None] = lambda dropped: None,
    ) -> None:
        self.pool = pool
        self.flush_interval = flush_interval
        self.flush_records = flush_records
        self.max_buffered = max_buffered
        self._on_buffer_change = on_buffer_change
        self._on_dropped = on_dropped
        self._buffer: deque[UsageRecord] = deque()
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def record(
        self,
        user_id: int,
        api_key_id: int,
        embeddings_count: int,
        tokens: int,
        created_at: datetime | None = None,
    ) -> None:
        """`created_at`: when the quota was reserved, so a request straddling a month's end is
        billed in the month it was counted against (default: now)."""
        stamp = created_at if created_at is not None else datetime.now(UTC)
        self._buffer.append(UsageRecord(user_id, api_key_id, embeddings_count, tokens, stamp))
        self._enforce_bound()
        self._on_buffer_change(len(self._buffer))
        if len(self._buffer) >= self.flush_records:
            self._wake.set()

    def _enforce_bound(self) -> None:
        overflow = len(self._buffer) - self.max_buffered
        if overflow > 0:
            for _ in range(overflow):
                self._buffer.popleft()
            self._on_dropped(overflow)
            log.error("usage buffer full: dropped the oldest records", extra={"dropped": overflow})

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-flusher")

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop the background task and write everything still buffered (retrying until timeout)."""
        # Never cancel the flusher mid-flush (a batch taken out of the buffer and not yet
        # written would be lost): ask it to finish its turn and stop.
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        deadline = asyncio.get_running_loop().time() + timeout
        while self._buffer:
            if await self.flush():
                continue
            if asyncio.get_running_loop().time() > deadline:
                lost = len(self._buffer)
                self._buffer.clear()
                self._on_dropped(lost)
                self._on_buffer_change(0)
                log.error("usage records not written at shutdown", extra={"records": lost})
                return
            await asyncio.sleep(0.2)

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.flush_interval)
            self._wake.clear()
            if self._stopping:
                return
            if self._buffer and not await self.flush():
                await asyncio.sleep(self.flush_interval)  # PostgreSQL is down: back off

    async def flush(self) -> bool:
        """Write the buffered records; on failure they go back into the buffer. Returns success."""
        async with self._flush_lock:
            if not self._buffer:
                return True
            batch, self._buffer = self._buffer, deque()
            try:
                async with self.pool.connection() as conn, conn.transaction():
                    await conn.execute(_STAGE)
                    async with conn.cursor().copy(_COPY_STAGE) as copy:
                        for r in batch:
                            await copy.write_row(
                                (
                                    r.user_id,
                                    r.api_key_id,
                                    r.embeddings_count,
                                    r.tokens,
                                    r.created_at,
                                )
                            )
                    written = (await conn.execute(_INSERT_STAGED)).rowcount
                    gone: list[int] = []
                    if written < len(batch):
                        cursor = await conn.execute(_USERS_GONE)
                        gone = [user_id for (user_id,) in await cursor.fetchall()]
            except BaseException as exc:
                # Not written (the transaction rolled back): back into the buffer, older
                # records first, then what arrived meanwhile. Even on cancellation.
                batch.extend(self._buffer)
                self._buffer = batch
                self._enforce_bound()
                if not isinstance(exc, Exception):
                    raise
                log.warning(
                    "usage flush failed; records kept for retry",
                    extra={"records": len(batch)},
                    exc_info=True,
                )
                return False
            finally:
                self._on_buffer_change(len(self._buffer))
            if written < len(batch):
                self._set_aside(len(batch) - written, gone)
            return True

    def _set_aside(self, count: int, user_ids: list[int]) -> None:
        self._on_dropped(count)
        log.error(
            "usage records of deleted users set aside",
            extra={"records": count, "user_ids": user_ids[:20]},
        )
