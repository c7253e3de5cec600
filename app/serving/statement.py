"""A customer's own usage of a month (GET /v1/usage): the ledger's totals beside the limits that
applied, and for the current month what is left of it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from app.serving.auth import Principal
from app.serving.errors import StoreUnavailable
from app.serving.quota import UNLIMITED, QuotaService, month_bounds

_TOTALS = (
    "SELECT coalesce(sum(embeddings_count), 0), coalesce(sum(tokens), 0) FROM usage"
    " WHERE user_id = %s AND created_at >= %s AND created_at < %s"
)


@dataclass(frozen=True, slots=True)
class Statement:
    month: datetime  # its first instant, UTC
    tier: str
    embeddings: int  # served and recorded in the ledger
    tokens: int
    limit: int  # embeddings a month, UNLIMITED (-1) for none
    remaining: int | None  # the current month only: what the quota still allows
    resets_at: datetime | None  # the current month only (a month to come has neither)
    per_minute: tuple[int, int]  # (requests, tokens); UNLIMITED for none


class Statements:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        quota: QuotaService,
        rates: dict[str, tuple[int, int]],
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.pool = pool
        self.quota = quota
        self.rates = rates
        self.clock = clock

    async def of(self, principal: Principal, month: datetime | None = None) -> Statement:
        """The principal's user's statement of `month` (its first instant; default: now)."""
        now = self.clock()
        limit = self.quota.limit_of(principal.tier)
        per_minute = self.rates.get(principal.tier, (UNLIMITED, UNLIMITED))
        if month is not None and month > now:  # nothing served yet (nor a December 9999's end)
            return Statement(month, principal.tier, 0, 0, limit, None, None, per_minute)
        current, _ = month_bounds(now)
        start, end = month_bounds(month or now)
        try:
            async with self.pool.connection() as conn:
                cursor = await conn.execute(_TOTALS, (principal.user_id, start, end))
                row = await cursor.fetchone()
        except (psycopg.OperationalError, PoolTimeout):
            raise StoreUnavailable("the usage ledger is unavailable; retry shortly") from None
        assert row is not None
        remaining: int | None = None
        resets_at: datetime | None = None
        if start == current:
            state = await self.quota.status(principal)
            remaining, resets_at = state.remaining, state.reset_at
        return Statement(
            month=start,
            tier=principal.tier,
            embeddings=int(row[0]),
            tokens=int(row[1]),
            limit=limit,
            remaining=remaining,
            resets_at=resets_at,
            per_minute=per_minute,
        )
