"""/health's dependency checks: once a second per process, shared, a failure still seen soon."""

import asyncio
import time
from types import SimpleNamespace

import psycopg

from app.serving.postgres import open_pool
from app.serving.redis_link import RedisLink
from app.serving.services import Services


async def _scenario(servers) -> None:
    url = servers.new_database()
    pool = await open_pool(url, max_size=4)
    redis = RedisLink(servers.redis_url, key_prefix="health-test:")
    # Only what health() reads: the dependency checks run against the real servers.
    services = Services(
        settings=None,
        model=SimpleNamespace(manifest=SimpleNamespace(name="m")),
        pool=pool,
        redis=redis,
        auth=None,
        usage=None,
        quota=None,
        limits=None,
        cache=None,
        metrics=None,
        pipeline=None,
        statements=None,
        ready=True,
    )
    try:
        answers = await asyncio.gather(*(services.health() for _ in range(100)))
        print(f"100 concurrent /health -> {services.database_checks} database checks")
        assert all(body["checks"]["database"] == "ok" for _, body in answers)
        assert services.database_checks <= 2
        # A real fault: the database goes away; /health must say so within ~1-2 s.
        async with pool.connection() as conn:
            name = (await (await conn.execute("SELECT current_database()")).fetchone())[0]
        with psycopg.connect(servers.postgres_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        started = time.monotonic()
        while (await services.health())[1]["checks"]["database"] == "ok":
            assert time.monotonic() - started < 5
            await asyncio.sleep(0.1)
        print(f"database loss seen after {time.monotonic() - started:.2f} s")
    finally:
        await redis.stop()
        await pool.close()


def test_health_checks_are_shared_and_still_see_a_fault(servers) -> None:
    asyncio.run(_scenario(servers))
