"""RedisLink's reported state (smally_redis_up) through real outages: a Redis of the test's own
that is stopped and started again, and a port where nothing listens."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from app.metrics import Metrics
from app.serving.redis_link import RedisLink
from dev.servers import LocalRedis


def redis_up(metrics: Metrics, role: str) -> float | None:
    return metrics.registry.get_sample_value("smally_redis_up", {"role": role})


def closed_port() -> int:
    """A local port nothing listens on (bound once by us, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_the_gauge_follows_redis_going_down_and_coming_back(tmp_path: Path) -> None:
    server = LocalRedis(tmp_path / "redis", persist=False)
    url = server.start()
    metrics = Metrics()

    async def scenario() -> None:
        link = RedisLink(
            url,
            key_prefix="link-test:",
            timeout=1.0,
            probe_interval=0.05,
            on_change=metrics.redis_state("counters", "cache"),
        )
        link.start()
        try:
            # Reported from the start, before any outage.
            assert redis_up(metrics, "counters") == redis_up(metrics, "cache") == 1
            assert await link.client.set(link.key("k"), 1)

            server.stop()
            with pytest.raises((aioredis.RedisError, OSError)) as failure:
                await link.client.get(link.key("k"))
            link.failed(failure.value)
            assert not link.available
            assert redis_up(metrics, "counters") == redis_up(metrics, "cache") == 0
            # The probe finds nobody: the link stays down, and says so.
            await asyncio.sleep(0.5)
            assert redis_up(metrics, "counters") == 0 and not link.available

            server.start()
            await until(lambda: link.available)
            assert redis_up(metrics, "counters") == redis_up(metrics, "cache") == 1
        finally:
            await link.stop()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_a_cache_redis_that_nobody_answers_is_reported_alone(servers) -> None:
    """Two links as services.py builds them with CACHE_REDIS_URL: quota counters on the session's
    Redis, the cache on a port where nothing listens."""
    metrics = Metrics()

    async def scenario() -> None:
        counters = RedisLink(
            servers.redis_url, key_prefix="link-test:", on_change=metrics.redis_state("counters")
        )
        cache = RedisLink(
            f"redis://127.0.0.1:{closed_port()}/0",
            key_prefix="link-test:",
            timeout=1.0,
            on_change=metrics.redis_state("cache"),
        )
        try:
            # services.py's start-up check.
            for link in (counters, cache):
                if not await link.ping():
                    link.failed(ConnectionError("no answer at start-up"))
            assert counters.available and not cache.available
            assert redis_up(metrics, "counters") == 1
            assert redis_up(metrics, "cache") == 0
        finally:
            await counters.stop()
            await cache.stop()

    asyncio.run(scenario())
