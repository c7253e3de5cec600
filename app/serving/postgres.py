"""The PostgreSQL connection pool the service's stores share (keys, quota fallback, ledger)."""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool


async def open_pool(
    database_url: str,
    *,
    max_size: int,
    statement_timeout_ms: int = 10_000,
    lock_timeout_ms: int = 5_000,
) -> AsyncConnectionPool:
    # Server-side limits, so a slow query or a queue on a lock (the quota fallback's advisory
    # lock) gives its pool connection back instead of holding it indefinitely.
    options = f"-c statement_timeout={statement_timeout_ms} -c lock_timeout={lock_timeout_ms}"
    pool = AsyncConnectionPool(
        database_url,
        min_size=1,
        max_size=max_size,
        timeout=5.0,
        open=False,
        kwargs={"autocommit": True, "options": options},
        name="smally",
    )
    await pool.open(wait=True, timeout=10.0)
    return pool
