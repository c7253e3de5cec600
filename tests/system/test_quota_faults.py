"""QuotaService against real PostgreSQL and a Redis of its own that the tests restart, with the
faults of issue #16 made real."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
import redis
import redis.asyncio as aioredis

from app.admin.migrations import apply_migrations
from app.serving.auth import Principal
from app.serving.errors import Busy
from app.serving.postgres import open_pool
from app.serving.quota import FALLBACK_POLL_SECONDS, QuotaExceeded, QuotaService
from app.serving.redis_link import RedisLink
from app.serving.usage import UsageRecorder
from dev.servers import LocalRedis
from tests.conftest import Servers
from tests.helpers import ApiProcess, base_env, create_key, new_user


@dataclass
class Stack:
    quota: QuotaService
    usage: UsageRecorder
    link: RedisLink
    principal: Principal
    database_url: str


def ledger(database_url: str, user_id: int) -> int:
    with psycopg.connect(database_url) as conn:
        query = "SELECT coalesce(sum(embeddings_count), 0) FROM usage WHERE user_id = %s"
        return int(conn.execute(query, (user_id,)).fetchone()[0])


@asynccontextmanager
async def stack(database_url: str, redis_url: str, limit: int) -> AsyncIterator[Stack]:
    pool = await open_pool(database_url, max_size=4)
    link = RedisLink(redis_url, key_prefix="faults:", timeout=1.0)
    usage = UsageRecorder(pool)
    quota = QuotaService(link, pool, usage, {"free": limit})
    try:
        email = f"u-{uuid.uuid4().hex[:8]}@example.com"
        yield Stack(quota, usage, link, new_user(database_url, email), database_url)
    finally:
        await usage.flush()
        await link.stop()
        await pool.close()


async def reconnect(link: RedisLink) -> None:
    """Let the client drop its connections to the old Redis process."""
    for _ in range(20):
        try:
            await link.client.ping()
            return
        except (aioredis.RedisError, OSError):
            await asyncio.sleep(0.1)


async def serve_until_refused(s: Stack, at_most: int = 50) -> int:
    served = 0
    for _ in range(at_most):
        try:
            reservation = await s.quota.reserve(s.principal, 1, 3)
        except QuotaExceeded:
            return served
        s.quota.commit(reservation)
        served += 1
    return served


def test_release_after_a_redis_restart_gives_back_nothing(servers: Servers, tmp_path: Path) -> None:
    """Issue #16.1: limit 10, 9 used, one request in flight, Redis restarted, the request fails."""
    redis_server = LocalRedis(tmp_path / "redis", persist=False)
    database_url = servers.new_database()
    apply_migrations(database_url)

    async def scenario() -> tuple[int, int, int]:
        async with stack(database_url, redis_server.start(), limit=10) as s:
            for _ in range(9):
                s.quota.commit(await s.quota.reserve(s.principal, 1, 3))
            await s.usage.flush()
            in_flight = await s.quota.reserve(s.principal, 1, 3)
            redis_server.stop()
            redis_server.start()
            await reconnect(s.link)
            await s.quota.release(in_flight)  # e.g. Overloaded after the reservation
            raw = redis.Redis.from_url(redis_server.url)
            key = in_flight.counter_key
            assert key is not None
            counter, ttl = raw.get(key), raw.ttl(key)
            print(f"after release: counter={counter!r} ttl={ttl}")
            assert counter is None or (int(counter) >= 0 and ttl > 0)
            served = await serve_until_refused(s)
            await s.usage.flush()
            now_key = s.quota._counter_key(s.principal.user_id, datetime.now(UTC))
            return served, ledger(database_url, s.principal.user_id), int(raw.get(now_key) or 0)

    try:
        served, total, counter = asyncio.run(scenario())
    finally:
        redis_server.stop()
    print(f"served after the restart: {served}, ledger {total}, counter {counter}")
    assert served == 1
    assert total == 10 and counter == 10


def test_redis_lost_as_another_process_falls_back_sends_this_one_to_postgres_too(
    servers: Servers, tmp_path: Path
) -> None:
    """Issue #23.7: another process starts deciding a user in PostgreSQL (its row in
    quota_fallback) just as Redis goes away; this process's next request for the user must be
    decided in PostgreSQL as well, not fail with the counters' delete."""
    redis_server = LocalRedis(tmp_path / "redis", persist=False)
    database_url = servers.new_database()
    apply_migrations(database_url)

    async def scenario() -> tuple[int | None, int]:
        async with stack(database_url, redis_server.start(), limit=10) as s:
            s.quota.commit(await s.quota.reserve(s.principal, 1, 3))
            await s.usage.flush()
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO quota_fallback (user_id, month) VALUES (%s, %s)",
                    (s.principal.user_id, datetime.now(UTC).date().replace(day=1)),
                )
            redis_server.stop()
            await asyncio.sleep(FALLBACK_POLL_SECONDS + 0.1)  # the next request reads the table
            reservation = await s.quota.reserve(s.principal, 1, 3)
            s.quota.commit(reservation)
            await s.usage.flush()
            return reservation.ledger_row_id, ledger(database_url, s.principal.user_id)

    try:
        row_id, total = asyncio.run(scenario())
    finally:
        redis_server.stop()
    print(f"decided in PostgreSQL as ledger row {row_id}; ledger {total}")
    assert row_id is not None and total == 2


def test_a_busy_redis_pool_is_a_503_not_an_outage(servers: Servers) -> None:
    """Issue #16.4: a pool timing out ("No connection available") must not switch to PostgreSQL."""
    database_url = servers.new_database()
    apply_migrations(database_url)

    async def scenario() -> None:
        pool = await open_pool(database_url, max_size=2)
        link = RedisLink(servers.redis_url, key_prefix="busy:", pool_timeout=0.3, max_connections=1)
        quota = QuotaService(link, pool, UsageRecorder(pool), {"free": 10})
        principal = new_user(database_url, "busy@example.com")
        try:
            # The pool's one connection is taken, as by a burst of other requests.
            held = await link.client.connection_pool.get_connection("PING")
            try:
                await quota.reserve(principal, 1, 3)
            except Busy as exc:
                print(f"refused: {type(exc).__name__}: {exc}")
            else:
                raise AssertionError("a busy pool was taken as an outage and served")
            assert link.available, "a busy pool marked Redis down"
            await link.client.connection_pool.release(held)
            assert (await quota.reserve(principal, 1, 3)).counter_key is not None
            assert ledger(database_url, principal.user_id) == 0
        finally:
            await link.stop()
            await pool.close()

    asyncio.run(scenario())


def test_the_ledger_row_carries_the_reservations_month(servers: Servers) -> None:
    """Issue #16.9: reserved at 23:59:59.9 on the month's last day, committed after midnight."""
    database_url = servers.new_database()
    apply_migrations(database_url)
    reserved = datetime(2026, 1, 31, 23, 59, 59, 900_000, tzinfo=UTC)

    async def scenario() -> list[datetime]:
        pool = await open_pool(database_url, max_size=2)
        link = RedisLink(servers.redis_url, key_prefix=f"month-{uuid.uuid4().hex[:6]}:")
        usage = UsageRecorder(pool)
        principal = new_user(database_url, "midnight@example.com")
        now = [reserved]
        quota = QuotaService(link, pool, usage, {"free": 10}, clock=lambda: now[0])
        try:
            reservation = await quota.reserve(principal, 1, 3)
            now[0] = datetime(2026, 2, 1, 0, 0, 0, 200_000, tzinfo=UTC)
            quota.commit(reservation)
            await usage.flush()
            # The fallback path writes its row at reservation time too.
            link.failed(RuntimeError("forced fallback"))
            now[0] = reserved
            await quota.reserve(principal, 1, 3)
        finally:
            await link.stop()
            await pool.close()
        with psycopg.connect(database_url) as conn:
            rows = conn.execute("SELECT created_at FROM usage ORDER BY id").fetchall()
        return [r[0] for r in rows]

    stamps = asyncio.run(scenario())
    print(f"ledger stamps: {stamps}")
    assert [(s.astimezone(UTC).year, s.astimezone(UTC).month) for s in stamps] == [(2026, 1)] * 2


def test_a_negative_or_unexpiring_counter_is_rebuilt(servers: Servers) -> None:
    """What the old release() left behind (-1, no TTL) is rebuilt from the ledger, not trusted."""
    database_url = servers.new_database()
    apply_migrations(database_url)

    async def scenario() -> list[int]:
        async with stack(database_url, servers.redis_url, limit=10) as s:
            s.link.key_prefix = f"neg-{uuid.uuid4().hex[:6]}:"
            for _ in range(9):
                s.quota.commit(await s.quota.reserve(s.principal, 1, 3))
            await s.usage.flush()
            raw = redis.Redis.from_url(servers.redis_url)
            await s.quota.status(s.principal)  # learns the Redis run
            key = s.quota._counter_key(s.principal.user_id, datetime.now(UTC))
            seen = []
            for value in (-1, 2):
                raw.set(key, value)  # no expiry
                seen.append((await s.quota.status(s.principal)).used)
                assert raw.ttl(key) > 0
            return seen

    assert asyncio.run(scenario()) == [9, 9]


def test_counters_restored_from_a_snapshot_are_not_trusted(
    servers: Servers, tmp_path: Path
) -> None:
    """Issue #16.3: snapshot at 5, usage 10, Redis killed (SIGKILL) and restarted from the RDB."""
    redis_server = LocalRedis(tmp_path / "redis", persist=True)
    database_url = servers.new_database()
    apply_migrations(database_url)

    async def scenario() -> tuple[int, int]:
        async with stack(database_url, redis_server.start(), limit=10) as s:
            raw = redis.Redis.from_url(redis_server.url)
            for i in range(10):
                s.quota.commit(await s.quota.reserve(s.principal, 1, 3))
                if i == 4:
                    raw.save()  # the snapshot holds the counter at 5
            await s.usage.flush()
            assert redis_server.process is not None
            redis_server.process.kill()
            redis_server.process.wait()
            redis_server.start()
            await reconnect(s.link)
            served = await serve_until_refused(s)
            await s.usage.flush()
            return served, ledger(database_url, s.principal.user_id)

    try:
        served, total = asyncio.run(scenario())
    finally:
        redis_server.stop()
    print(f"served after the restart from the snapshot: {served}, ledger {total}")
    assert served == 0 and total == 10


def test_processes_split_between_redis_and_postgres_stay_within_the_limit(
    servers: Servers, tmp_path: Path
) -> None:
    """Issue #16.4: one process decided Redis is down (its Redis address is dead), the other
    serves from Redis; both serve the same user at once."""
    database_url = servers.new_database()
    apply_migrations(database_url)
    dead_redis = f"unix://{tmp_path / 'no-redis.sock'}"

    async def scenario() -> tuple[int, int, int]:
        prefix = f"split-{uuid.uuid4().hex[:6]}:"
        async with (
            stack(database_url, servers.redis_url, limit=10) as on_redis,
            stack(database_url, dead_redis, limit=10) as on_postgres,
        ):
            on_redis.link.key_prefix = on_postgres.link.key_prefix = prefix
            on_postgres.principal = on_redis.principal = new_user(database_url, "split@x.org")
            for s in (on_redis, on_postgres):
                s.usage.start()

            async def serve(s: Stack) -> int:
                served = 0
                for _ in range(30):
                    try:
                        s.quota.commit(await s.quota.reserve(s.principal, 1, 3))
                        served += 1
                    except QuotaExceeded:
                        pass
                    await asyncio.sleep(0.1)
                return served

            a, b = await asyncio.gather(serve(on_redis), serve(on_postgres))
            for s in (on_redis, on_postgres):
                await s.usage.stop()
            assert not on_postgres.link.available and on_redis.link.available
            return a, b, ledger(database_url, on_redis.principal.user_id)

    served_redis, served_postgres, total = asyncio.run(scenario())
    print(f"served: {served_redis} via Redis + {served_postgres} via PostgreSQL, ledger {total}")
    assert served_redis + served_postgres == total <= 10


def test_pool_connections_carry_statement_and_lock_timeouts(servers: Servers) -> None:
    """Issue #16.7: no query or lock wait holds a pool connection indefinitely."""

    async def scenario() -> tuple[str, str]:
        pool = await open_pool(servers.new_database(), max_size=1)
        try:
            async with pool.connection() as conn:
                statement = await (await conn.execute("SHOW statement_timeout")).fetchone()
                lock = await (await conn.execute("SHOW lock_timeout")).fetchone()
                return statement[0], lock[0]
        finally:
            await pool.close()

    assert asyncio.run(scenario()) == ("10s", "5s")


def test_a_user_out_of_quota_is_refused_before_the_body_is_read(
    servers: Servers, tmp_path: Path
) -> None:
    """Issue #16.10: once the month is used up, the next request is refused before its body
    is parsed or tokenized: a malformed body gets the 429, not a 400 from the parser."""
    env = base_env(
        DATABASE_URL=servers.new_database(), REDIS_URL=servers.redis_url, FREE_TIER_LIMIT="2"
    )
    api = ApiProcess(env, tmp_path).start()
    try:
        api.wait_healthy()
        key = create_key(env, tmp_path, "spent@example.com", "free")
        with api.client(key) as client:
            codes = [
                client.post("/v1/embed", json={"text": f"t {i}"}).status_code for i in range(3)
            ]
            assert codes == [200, 200, 429]
            for path in ("/v1/embed", "/v1/embeddings"):
                bad = client.post(
                    path, content=b"{not json", headers={"content-type": "application/json"}
                )
                print(path, bad.status_code, bad.text[:120])
                assert bad.status_code == 429 and bad.headers["x-ratelimit-remaining"] == "0"
    finally:
        api.stop()


def test_the_exhaustion_memory_never_refuses_a_raised_limit(servers: Servers) -> None:
    database_url = servers.new_database()
    apply_migrations(database_url)

    async def scenario() -> None:
        async with stack(database_url, servers.redis_url, limit=1) as s:
            s.link.key_prefix = f"raise-{uuid.uuid4().hex[:6]}:"
            s.quota.commit(await s.quota.reserve(s.principal, 1, 3))
            with pytest.raises(QuotaExceeded):
                await s.quota.reserve(s.principal, 1, 3)
            with pytest.raises(QuotaExceeded):  # remembered
                s.quota.refuse_if_known_exhausted(s.principal)
            s.quota.limits["free"] = 5  # the tier's limit was raised
            s.quota.refuse_if_known_exhausted(s.principal)
            await s.quota.reserve(s.principal, 1, 3)

    asyncio.run(scenario())
