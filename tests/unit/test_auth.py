"""Authenticator: Bearer key -> Principal, against real PostgreSQL (keys made by app.admin.keys)."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
import pytest

from app.admin.keys import CreatedKey, create_key
from app.serving.auth import Authenticator, InvalidApiKey, hash_key
from app.serving.postgres import open_pool

PREFIX = "sk_"


def new_key(database_url: str, tier: str = "pro") -> CreatedKey:
    with psycopg.connect(database_url) as conn:
        return create_key(conn, f"a-{uuid.uuid4().hex[:8]}@example.com", tier, None, PREFIX)


def user_id_of(database_url: str, email: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT id FROM users WHERE email = %s", (email,)).fetchone()
        assert row is not None
        return int(row[0])


@asynccontextmanager
async def authenticator(
    database_url: str, *, ttl: float
) -> AsyncIterator[tuple[Authenticator, list[int]]]:
    """An Authenticator and the list its `on_query` appends to (one entry per query)."""
    pool = await open_pool(database_url, max_size=2)
    queries: list[int] = []
    auth = Authenticator(pool, ttl=ttl, on_query=lambda: queries.append(1))
    try:
        yield auth, queries
    finally:
        await auth.stop()
        await pool.close()


def test_a_valid_key_is_its_principal_and_cached(database_url: str) -> None:
    created = new_key(database_url, "pro")

    async def scenario() -> None:
        async with authenticator(database_url, ttl=60) as (auth, queries):
            principal = await auth.authenticate(f"Bearer {created.key}")
            assert principal.user_id == user_id_of(database_url, created.email)
            assert principal.tier == "pro"
            # Any case of the scheme, and surrounding spaces, name the same key; from the cache.
            assert await auth.authenticate(f"bearer  {created.key} ") == principal
            assert len(queries) == 1

    asyncio.run(scenario())


def test_an_unknown_key_is_refused_and_remembered(database_url: str) -> None:
    new_key(database_url)  # the table is not empty

    async def scenario() -> None:
        async with authenticator(database_url, ttl=60) as (auth, queries):
            unknown = f"Bearer {PREFIX}{secrets.token_urlsafe(32)}"
            for _ in range(3):
                with pytest.raises(InvalidApiKey):
                    await auth.authenticate(unknown)
            assert len(queries) == 1

    asyncio.run(scenario())


def test_a_revoked_key_is_refused_once_its_cache_entry_expires(database_url: str) -> None:
    created = new_key(database_url)
    ttl = 1.0  # long enough for the UPDATE below on a loaded machine

    async def scenario() -> None:
        async with authenticator(database_url, ttl=ttl) as (auth, _):
            await auth.authenticate(f"Bearer {created.key}")
            with psycopg.connect(database_url) as conn:
                query = "UPDATE api_keys SET is_active = false WHERE key_hash = %s"
                assert conn.execute(query, (hash_key(created.key),)).rowcount == 1
            await auth.authenticate(f"Bearer {created.key}")  # still cached: within the ttl
            await asyncio.sleep(ttl + 0.05)
            with pytest.raises(InvalidApiKey):
                await auth.authenticate(f"Bearer {created.key}")
        async with authenticator(database_url, ttl=0) as (auth, _):
            with pytest.raises(InvalidApiKey):
                await auth.authenticate(f"Bearer {created.key}")

    asyncio.run(scenario())


def test_a_deactivated_user_is_refused(database_url: str) -> None:
    created = new_key(database_url)
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE users SET is_active = false WHERE email = %s", (created.email,))

    async def scenario() -> None:
        async with authenticator(database_url, ttl=0) as (auth, _):
            with pytest.raises(InvalidApiKey):
                await auth.authenticate(f"Bearer {created.key}")

    asyncio.run(scenario())


def test_concurrent_lookups_of_distinct_keys_share_queries(database_url: str) -> None:
    created = new_key(database_url)
    lookups = 200

    async def scenario() -> None:
        async with authenticator(database_url, ttl=60) as (auth, queries):
            headers = [f"Bearer {PREFIX}{secrets.token_urlsafe(32)}" for _ in range(lookups)]
            headers.append(f"Bearer {created.key}")
            results = await asyncio.gather(
                *(auth.authenticate(h) for h in headers), return_exceptions=True
            )
            refused = [r for r in results[:-1] if isinstance(r, InvalidApiKey)]
            assert len(refused) == lookups
            assert not isinstance(results[-1], BaseException), results[-1]
            print(f"{lookups + 1} concurrent lookups: {len(queries)} queries")
            assert 1 <= len(queries) <= 3

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Bearer    ", "Basic dXNlcjpwYXNz", "Token sk_abc", "sk_abc"],
)
def test_a_malformed_authorization_header_is_refused_without_a_query(
    database_url: str, header: str | None
) -> None:
    async def scenario() -> None:
        async with authenticator(database_url, ttl=60) as (auth, queries):
            with pytest.raises(InvalidApiKey, match="Authorization header"):
                await auth.authenticate(header)
            assert queries == []

    asyncio.run(scenario())
