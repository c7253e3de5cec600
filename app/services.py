"""The service's parts, built at start-up and closed at shutdown; passed to handlers via app.state.

Nothing here is a module-level singleton: every `create_app(settings)` gets its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool

from app.auth import Authenticator
from app.buildinfo import build_info
from app.config import Settings
from app.engine import Embedder, EmbeddingService
from app.storage import open_pool
from app.usage import UsageRecorder

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 2.0


@dataclass
class Services:
    settings: Settings
    embeddings: EmbeddingService
    pool: AsyncConnectionPool
    redis: aioredis.Redis
    auth: Authenticator
    usage: UsageRecorder
    ready: bool = field(default=False)

    @classmethod
    async def start(cls, settings: Settings) -> Services:
        # Loading the model (~0.5 s) and opening the pool overlap; neither blocks the loop.
        embedder_task = asyncio.create_task(
            asyncio.to_thread(Embedder, settings.model_path, max_tokens=settings.max_tokens)
        )
        pool = await open_pool(settings.database_url, max_size=settings.db_pool_size)
        try:
            embedder = await embedder_task
        except BaseException:
            await pool.close()
            raise
        redis_client = aioredis.from_url(
            settings.redis_url, socket_timeout=CHECK_TIMEOUT, socket_connect_timeout=CHECK_TIMEOUT
        )
        services = cls(
            settings=settings,
            embeddings=EmbeddingService(embedder),
            pool=pool,
            redis=redis_client,
            auth=Authenticator(pool, ttl=settings.auth_cache_ttl),
            usage=UsageRecorder(pool),
        )
        services.auth.start()
        services.usage.start()
        services.ready = True
        log.info(
            "ready",
            extra={"model": embedder.manifest.name, "max_tokens": settings.max_tokens},
        )
        return services

    async def stop(self) -> None:
        self.ready = False
        await self.usage.stop()
        await self.auth.stop()
        await self.redis.aclose()
        await self.pool.close()
        self.embeddings.close()
        log.info("stopped")

    async def health(self) -> tuple[int, dict[str, Any]]:
        database, redis_ok = await asyncio.gather(self._check_database(), self._check_redis())
        checks = {
            "database": "ok" if database else "error",
            "redis": "ok" if redis_ok else "error",
            "model": "ok" if self.ready else "error",
        }
        if not (self.ready and database):
            status = "unhealthy"
        elif not redis_ok:
            status = "degraded"  # Redis only speeds things up; we can still serve without it
        else:
            status = "healthy"
        info = build_info()
        body = {
            "status": status,
            "version": info["version"],
            "model": self.embeddings.manifest.name,
            "checks": checks,
            "build": {
                "git_hash": info.get("git_hash"),
                "git_dirty": info.get("git_dirty"),
                "build_timestamp": info.get("build_timestamp"),
                "python": info["python"],
            },
        }
        return (503 if status == "unhealthy" else 200), body

    async def _check_database(self) -> bool:
        try:
            async with self.pool.connection(timeout=CHECK_TIMEOUT) as conn:
                await asyncio.wait_for(conn.execute("SELECT 1"), CHECK_TIMEOUT)
        except Exception:
            return False
        return True

    async def _check_redis(self) -> bool:
        with contextlib.suppress(Exception):
            return bool(await asyncio.wait_for(self.redis.ping(), CHECK_TIMEOUT))
        return False
