"""Redis as an optional accelerator: when it is unreachable the service keeps serving without it.

Callers check `available` before a call and report failures with `failed()`; while Redis is down
they skip it instead of each waiting for a timeout. A background probe notices the recovery,
and the transition (either way) is logged once, not per request, and reported to `on_change`
(the smally_redis_up gauge).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

log = logging.getLogger(__name__)

RecoveryHook = Callable[[], Awaitable[None]]
StateHook = Callable[[bool], None]


class RedisLink:
    def __init__(
        self,
        url: str,
        *,
        key_prefix: str,
        timeout: float = 2.0,  # a hung Redis costs a request this much before the fallback
        probe_interval: float = 1.0,
        max_connections: int = 64,
        pool_timeout: float = 10.0,
        on_change: StateHook = lambda up: None,
    ) -> None:
        # A burst waits (up to `pool_timeout`) for one of `max_connections` instead of failing:
        # a busy pool is not Redis being down, and the quota must not fall back to PostgreSQL
        # for it (that would mix the two stores). The wait is longer than a command's timeout:
        # 192 requests at once on a loaded 2-core machine waited more than 2 s (503s in a test
        # run), while a hung Redis frees its connections after `timeout` and is then skipped.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=pool_timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self.client = aioredis.Redis.from_pool(pool)
        self.key_prefix = key_prefix
        self.probe_interval = probe_interval
        self.available = True
        self.on_change = on_change
        on_change(True)  # the reported state follows `available` from the start
        self._recovery_hooks: list[RecoveryHook] = []
        self._probe: asyncio.Task[None] | None = None

    def key(self, *parts: object) -> str:
        return self.key_prefix + ":".join(str(p) for p in parts)

    def on_recovery(self, hook: RecoveryHook) -> None:
        self._recovery_hooks.append(hook)

    def failed(self, exc: BaseException) -> None:
        if self.available:
            self.available = False
            log.warning(
                "redis unreachable: serving without it (quotas from PostgreSQL, no L2 cache)",
                extra={"error": type(exc).__name__},
            )
            self.on_change(False)

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (aioredis.RedisError, OSError):
            return False

    def start(self) -> None:
        self._probe = asyncio.create_task(self._probe_loop(), name="redis-probe")

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.client.aclose()

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            if self.available:
                continue
            if await self.ping():
                # Hooks run before traffic returns to Redis, so nothing reads stale state.
                for hook in self._recovery_hooks:
                    try:
                        await hook()
                    except Exception:
                        log.exception("redis recovery hook failed")
                        break
                else:
                    self.available = True
                    log.warning("redis reachable again: back to normal")
                    self.on_change(True)
