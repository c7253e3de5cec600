"""The service's parts, built at start-up and closed at shutdown; passed to handlers via app.state.

Nothing here is a module-level singleton: every `create_app(settings)` gets its own.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from psycopg_pool import AsyncConnectionPool

from app.buildinfo import build_info
from app.config import Settings
from app.metrics import Metrics
from app.model.engine import Engine
from app.model.runner import EngineRunner
from app.serving.auth import Authenticator
from app.serving.cache import EmbeddingCache
from app.serving.pipeline import EmbeddingPipeline
from app.serving.postgres import open_pool
from app.serving.quota import QuotaService
from app.serving.ratelimit import RateLimiter
from app.serving.redis_link import RedisLink
from app.serving.statement import Statements
from app.serving.usage import UsageRecorder

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 2.0
# /health is unauthenticated: its dependency checks run at most once per this many seconds per
# process, and concurrent callers share the one in flight.
HEALTH_CHECK_TTL = 1.0


@dataclass
class Services:
    settings: Settings
    model: EngineRunner
    pool: AsyncConnectionPool
    redis: RedisLink
    auth: Authenticator
    usage: UsageRecorder
    quota: QuotaService
    limits: RateLimiter
    cache: EmbeddingCache
    metrics: Metrics
    pipeline: EmbeddingPipeline
    statements: Statements
    ready: bool = field(default=False)
    # The cache's own link when CACHE_REDIS_URL names another Redis; it fails independently.
    cache_redis: RedisLink | None = field(default=None)
    database_checks: int = field(default=0, init=False)
    _checks: tuple[float, asyncio.Future[tuple[bool, bool]]] | None = field(
        default=None, init=False, repr=False
    )

    @classmethod
    async def start(cls, settings: Settings, metrics: Metrics) -> Services:
        # Loading the model (~0.5 s) and opening the pool overlap; neither blocks the loop.
        engine_task = asyncio.create_task(
            asyncio.to_thread(
                Engine,
                settings.model_path,
                max_tokens=settings.max_tokens,
                threads=settings.onnx_threads,
            )
        )
        pool = await open_pool(settings.database_url, max_size=settings.db_pool_size)
        try:
            engine = await engine_task
        except BaseException:
            await pool.close()
            raise
        cache_url = settings.cache_redis_url
        own_cache_link = bool(cache_url) and cache_url != settings.redis_url
        # One link serving both roles reports both, so the gauge has the same series either way.
        roles = ("counters",) if own_cache_link else ("counters", "cache")
        redis = RedisLink(
            settings.redis_url,
            key_prefix=settings.redis_key_prefix,
            on_change=metrics.redis_state(*roles),
        )
        usage = UsageRecorder(
            pool,
            max_buffered=settings.usage_buffer_max,
            on_buffer_change=metrics.usage_buffer.set,
            on_dropped=metrics.usage_dropped.inc,
        )
        manifest = engine.manifest
        model = EngineRunner(
            engine,
            window=settings.batch_window_ms / 1000,
            max_batch_tokens=settings.max_batch_tokens,
            max_queue_tokens=settings.max_queue_tokens,
            max_owner_tokens=settings.max_user_queue_tokens,
            max_tokenize_chars=settings.max_tokenize_chars,
            on_run=lambda rows, seconds: metrics.inference_latency.observe(seconds),
            on_abandoned=lambda stage, count: metrics.abandoned.labels(stage).inc(count),
        )
        quota = QuotaService(
            redis,
            pool,
            usage,
            settings.tier_limits,
            on_refused=lambda tier: metrics.rate_limited.labels(tier).inc(),
            on_rebuild=metrics.quota_rebuilds.inc,
        )
        limits = RateLimiter(
            redis,
            settings.tier_rates,
            on_refused=lambda tier, window: metrics.per_minute_refused.labels(tier, window).inc(),
        )
        cache_redis = (
            RedisLink(
                cache_url,
                key_prefix=settings.redis_key_prefix,
                on_change=metrics.redis_state("cache"),
            )
            if own_cache_link
            else None
        )
        cache = EmbeddingCache(
            cache_redis or redis,
            model_sha256=manifest.onnx_sha256,
            dimension=manifest.dimension,
            l1_size=settings.l1_cache_size,
            l2_ttl=settings.l2_cache_ttl,
            per_user=settings.cache_scope == "user",
        )
        services = cls(
            settings=settings,
            model=model,
            pool=pool,
            redis=redis,
            auth=Authenticator(pool, ttl=settings.auth_cache_ttl, on_query=metrics.key_queries.inc),
            usage=usage,
            quota=quota,
            cache=cache,
            metrics=metrics,
            limits=limits,
            pipeline=EmbeddingPipeline(model, cache, quota, limits, metrics),
            statements=Statements(pool, quota, settings.tier_rates),
            cache_redis=cache_redis,
        )
        info = build_info()
        metrics.build_info.labels(
            info["version"], info.get("git_hash") or "unknown", manifest.name, manifest.onnx_sha256
        ).set(1)
        if not await redis.ping():
            redis.failed(ConnectionError("no answer at start-up"))
        redis.start()
        if cache_redis is not None:
            if not await cache_redis.ping():
                cache_redis.failed(ConnectionError("no answer at start-up"))
            cache_redis.start()
        model.start()
        services.auth.start()
        services.usage.start()
        services.ready = True
        log.info(
            "ready",
            extra={"model": manifest.name, "max_tokens": settings.max_tokens},
        )
        return services

    async def stop(self) -> None:
        self.ready = False
        await self.usage.stop()
        await self.auth.stop()
        await self.cache.flush()  # the L2 stores still on their way
        await self.redis.stop()
        if self.cache_redis is not None:
            await self.cache_redis.stop()
        await self.pool.close()
        await self.model.stop()
        log.info("stopped")

    async def health(self) -> tuple[int, dict[str, Any]]:
        database, redis_ok = await self._dependency_checks()
        # Until the probe has switched traffic back to Redis, we are still serving without it.
        redis_ok = redis_ok and self.redis.available
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
            "model": self.model.manifest.name,
            "checks": checks,
            "build": {
                # The release serving: its directory on a server (app/buildinfo.py release_name)
                "release": info["release"],
                "git_hash": info.get("git_hash"),
                "git_dirty": info.get("git_dirty"),
                # sha256 of the uv.lock the build (or the venv) was installed from
                "lock_sha256": info.get("lock_sha256"),
                "build_timestamp": info.get("build_timestamp"),
                # sys.version of the interpreter running (in a binary: the one frozen into it)
                # and the package that shipped it (build/build_binaries.py interpreter)
                "python": info["python"],
                "python_package": info["python_package"],
            },
        }
        return (503 if status == "unhealthy" else 200), body

    async def _dependency_checks(self) -> tuple[bool, bool]:
        now = asyncio.get_running_loop().time()
        if self._checks is None or now - self._checks[0] >= HEALTH_CHECK_TTL:
            self._checks = (now, asyncio.ensure_future(self._run_checks()))
        # Shielded: a caller that goes away must not cancel the check the others wait on.
        return await asyncio.shield(self._checks[1])

    async def _run_checks(self) -> tuple[bool, bool]:
        database, redis_ok = await asyncio.gather(self._check_database(), self.redis.ping())
        return database, redis_ok

    async def _check_database(self) -> bool:
        self.database_checks += 1
        try:
            async with self.pool.connection(timeout=CHECK_TIMEOUT) as conn:
                await asyncio.wait_for(conn.execute("SELECT 1"), CHECK_TIMEOUT)
        except Exception:
            return False
        return True
