"""The usage ledger under deleted keys and users, in-process against the real PostgreSQL."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from app.admin.migrations import apply_migrations
from app.serving.postgres import open_pool
from app.serving.usage import UsageRecorder
from tests.helpers import new_user


def test_a_deleted_key_or_user_never_jams_the_ledger(servers) -> None:
    database_url = servers.new_database()
    apply_migrations(database_url)
    a, b, c = (new_user(database_url, f"{name}@example.com") for name in "abc")
    (a_user, a_key), (b_user, b_key) = (a.user_id, a.key_id), (b.user_id, b.key_id)
    c_user, c_key = c.user_id, c.key_id

    dropped: list[int] = []

    async def scenario() -> tuple[bool, bool]:
        pool = await open_pool(database_url, max_size=2)
        usage = UsageRecorder(pool, on_dropped=dropped.append)
        try:
            usage.record(a_user, a_key, 2, 10)
            usage.record(b_user, b_key, 3, 15)
            usage.record(c_user, c_key, 4, 20)
            with psycopg.connect(database_url, autocommit=True) as conn:
                # Served, then the key (and a whole user without history) deleted before the
                # flush: the auth cache serves a deleted key for up to AUTH_CACHE_TTL.
                conn.execute("DELETE FROM api_keys WHERE id = %s", (a_key,))
                conn.execute("DELETE FROM users WHERE id = %s", (c_user,))
            first = await usage.flush()
            usage.record(b_user, b_key, 1, 5)
            second = await usage.flush()
            return first, second
        finally:
            await usage.stop()
            await pool.close()

    first, second = asyncio.run(scenario())
    assert first and second  # old code: every flush failed, B's rows never written
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT user_id, api_key_id, embeddings_count FROM usage ORDER BY id"
        ).fetchall()
        assert rows == [(a_user, None, 2), (b_user, b_key, 3), (b_user, b_key, 1)]
        assert dropped == [1]  # C's record: its user is gone, set aside and counted
        # Billing history outlives its user: deleting one with usage rows is refused.
        with pytest.raises(psycopg.errors.RestrictViolation):
            conn.execute("DELETE FROM users WHERE id = %s", (b_user,))


def test_records_that_cannot_be_written_at_shutdown_are_counted(servers) -> None:
    database_url = servers.new_database()
    apply_migrations(database_url)
    d = new_user(database_url, "d@example.com")
    user, key = d.user_id, d.key_id
    dropped: list[int] = []

    async def scenario() -> None:
        pool = await open_pool(database_url, max_size=2)
        usage = UsageRecorder(pool, on_dropped=dropped.append)
        usage.record(user, key, 5, 25)
        usage.record(user, key, 6, 30)
        await pool.close()  # PostgreSQL out of reach for the whole shutdown
        await usage.stop(timeout=0.5)

    asyncio.run(scenario())
    assert dropped == [2]  # old code: the buffer vanished with nothing counted
