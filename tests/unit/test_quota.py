"""QuotaService decisions in this process, on real Redis (counters) and PostgreSQL (ledger)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import psycopg
import pytest

from app.metrics import Metrics
from app.serving.auth import Principal
from app.serving.postgres import open_pool
from app.serving.quota import UNLIMITED, QuotaExceeded, QuotaService
from app.serving.redis_link import RedisLink
from app.serving.usage import UsageRecorder
from tests.conftest import Servers
from tests.helpers import new_user

LIMIT = 5


@dataclass
class Stack:
    quota: QuotaService
    usage: UsageRecorder
    link: RedisLink
    principal: Principal  # a free-tier user of its own, LIMIT embeddings a month
    metrics: Metrics  # the service's metrics, fed by the quota's callbacks as services.py does


@asynccontextmanager
async def stack(database_url: str, redis_url: str, key_prefix: str) -> AsyncIterator[Stack]:
    pool = await open_pool(database_url, max_size=2)
    link = RedisLink(redis_url, key_prefix=key_prefix)
    usage = UsageRecorder(pool)
    metrics = Metrics()
    quota = QuotaService(
        link,
        pool,
        usage,
        {"free": LIMIT, "scale": UNLIMITED},
        on_rebuild=metrics.quota_rebuilds.inc,
    )
    principal = new_user(database_url, f"q-{uuid.uuid4().hex[:8]}@example.com")
    try:
        yield Stack(quota, usage, link, principal, metrics)
    finally:
        await usage.flush()
        await link.stop()
        await pool.close()


@pytest.fixture
def run(
    servers: Servers, database_url: str, key_prefix: str
) -> Callable[[Callable[[Stack], Awaitable[object]]], object]:
    """run(scenario): the async scenario on a fresh stack and user, to completion."""

    def runner(scenario: Callable[[Stack], Awaitable[object]]) -> object:
        async def main() -> object:
            async with stack(database_url, servers.redis_url, key_prefix) as s:
                return await scenario(s)

        return asyncio.run(main())

    return runner


def ledger(database_url: str, user_id: int) -> int:
    with psycopg.connect(database_url) as conn:
        query = "SELECT coalesce(sum(embeddings_count), 0) FROM usage WHERE user_id = %s"
        row = conn.execute(query, (user_id,)).fetchone()
        assert row is not None
        return int(row[0])


def test_consumes_up_to_the_limit_then_refuses(run) -> None:
    async def scenario(s: Stack) -> None:
        for used in range(1, LIMIT + 1):
            reservation = await s.quota.reserve(s.principal, 1, 3)
            assert (reservation.state.used, reservation.state.remaining) == (used, LIMIT - used)
            s.quota.commit(reservation)
        with pytest.raises(QuotaExceeded) as refused:
            await s.quota.reserve(s.principal, 1, 3)
        assert (refused.value.state.limit, refused.value.state.used) == (LIMIT, LIMIT)
        assert refused.value.tier == "free"
        headers = refused.value.state.headers()
        assert headers["X-RateLimit-Limit"] == str(LIMIT)
        assert headers["X-RateLimit-Remaining"] == "0"

    run(scenario)


def test_a_batch_crossing_the_limit_consumes_nothing(run) -> None:
    async def scenario(s: Stack) -> None:
        s.quota.commit(await s.quota.reserve(s.principal, 3, 9))
        with pytest.raises(QuotaExceeded) as refused:
            await s.quota.reserve(s.principal, 3, 9)
        assert refused.value.state.used == 3
        assert (await s.quota.status(s.principal)).used == 3
        # What is left is still there, to the last one.
        assert (await s.quota.reserve(s.principal, LIMIT - 3, 6)).state.used == LIMIT

    run(scenario)


def test_release_gives_the_embeddings_back(run) -> None:
    async def scenario(s: Stack) -> None:
        failed = await s.quota.reserve(s.principal, LIMIT, 10)
        with pytest.raises(QuotaExceeded):
            await s.quota.reserve(s.principal, 1, 1)
        await s.quota.release(failed)
        assert (await s.quota.status(s.principal)).used == 0
        assert (await s.quota.reserve(s.principal, LIMIT, 10)).state.used == LIMIT

    run(scenario)


def test_an_unlimited_tier_is_never_refused_nor_counted(run) -> None:
    async def scenario(s: Stack) -> None:
        scale = replace(s.principal, tier="scale")
        for _ in range(3):
            reservation = await s.quota.reserve(scale, 10**9, 1)
            assert reservation.counter_key is None and reservation.ledger_row_id is None
            assert reservation.state.remaining == UNLIMITED
            assert reservation.state.headers()["X-RateLimit-Limit"] == "-1"
        state = await s.quota.status(scale)
        assert (state.limit, state.used) == (UNLIMITED, 0)
        s.quota.refuse_if_known_exhausted(scale)

    run(scenario)


def test_status_consumes_nothing(run) -> None:
    async def scenario(s: Stack) -> None:
        assert (await s.quota.status(s.principal)).used == 0
        s.quota.commit(await s.quota.reserve(s.principal, 2, 2))
        for _ in range(LIMIT + 1):
            state = await s.quota.status(s.principal)
            assert (state.used, state.remaining) == (2, LIMIT - 2)
        assert (await s.quota.reserve(s.principal, LIMIT - 2, 2)).state.used == LIMIT

    run(scenario)


def test_refuse_if_known_exhausted_remembers_only_a_used_up_month(run) -> None:
    async def scenario(s: Stack) -> None:
        s.quota.refuse_if_known_exhausted(s.principal)  # nothing known: no refusal
        s.quota.commit(await s.quota.reserve(s.principal, LIMIT - 1, 5))
        with pytest.raises(QuotaExceeded):
            await s.quota.reserve(s.principal, 2, 2)  # too big a batch: the month is not used up
        s.quota.refuse_if_known_exhausted(s.principal)
        s.quota.commit(await s.quota.reserve(s.principal, 1, 1))
        with pytest.raises(QuotaExceeded):
            await s.quota.reserve(s.principal, 1, 1)  # now it is
        with pytest.raises(QuotaExceeded) as known:
            s.quota.refuse_if_known_exhausted(s.principal)
        assert known.value.state.remaining == 0
        # Another user is not refused for it, nor this one once its tier's limit is raised.
        s.quota.refuse_if_known_exhausted(replace(s.principal, user_id=s.principal.user_id + 1))
        s.quota.limits["free"] = LIMIT + 10
        s.quota.refuse_if_known_exhausted(s.principal)

    run(scenario)


def rebuilds(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("smally_quota_counter_rebuilds_total")


def test_every_counter_rebuild_is_counted(run) -> None:
    async def scenario(s: Stack) -> None:
        assert rebuilds(s.metrics) == 0  # the series exists before the first rebuild
        # A user's first request of the month finds no counter: one rebuild, then none.
        reservation = await s.quota.reserve(s.principal, 1, 1)
        assert rebuilds(s.metrics) == 1
        await s.quota.reserve(s.principal, 1, 1)
        assert rebuilds(s.metrics) == 1
        # The key vanishes (eviction, FLUSHALL): the next decision rebuilds it, and counts it.
        assert reservation.counter_key is not None
        assert await s.link.client.delete(reservation.counter_key) == 1
        await s.quota.reserve(s.principal, 1, 1)
        assert rebuilds(s.metrics) == 2
        # A counter that is not a rebuild's (no expiry) is dropped and rebuilt: counted too.
        await s.link.client.persist(reservation.counter_key)
        await s.quota.status(s.principal)
        assert rebuilds(s.metrics) == 3

    run(scenario)


def test_a_lost_counter_is_rebuilt_from_the_ledger(run, database_url: str) -> None:
    async def scenario(s: Stack) -> None:
        reservation = await s.quota.reserve(s.principal, 2, 2)
        s.quota.commit(reservation)
        await s.usage.flush()
        # Another process served 1 more and wrote it to the ledger; this Redis then loses the key.
        with psycopg.connect(database_url) as conn:
            conn.execute(
                "INSERT INTO usage (user_id, api_key_id, embeddings_count, tokens)"
                " VALUES (%s, %s, 1, 1)",
                (s.principal.user_id, s.principal.key_id),
            )
        assert reservation.counter_key is not None
        assert await s.link.client.delete(reservation.counter_key) == 1
        assert ledger(database_url, s.principal.user_id) == 3
        assert (await s.quota.reserve(s.principal, 1, 1)).state.used == 4
        assert await s.link.client.ttl(reservation.counter_key) > 0  # rebuilt with an expiry
        # status() rebuilds a lost counter too, rather than reading it as 0.
        assert await s.link.client.delete(reservation.counter_key) == 1
        assert (await s.quota.status(s.principal)).used == 3  # the 4th is not committed
        assert (await s.quota.reserve(s.principal, 2, 2)).state.used == LIMIT
        with pytest.raises(QuotaExceeded):
            await s.quota.reserve(s.principal, 1, 1)

    run(scenario)
