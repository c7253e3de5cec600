"""Who is calling: Bearer key -> principal, with a short in-process cache.

The lookup is by SHA-256 of the presented key (an indexed equality on the hash), never a
comparison on the plain key, so response time says nothing about how close a guess was.
Valid and unknown keys are both cached for `ttl` seconds, which keeps PostgreSQL off the hot path;
lookups are coalesced into one query at a time, at most one per `min_query_interval`, which makes
floods of random keys cheap however they are paced; a revoked key is refused within `ttl`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from app.serving.errors import StoreUnavailable

log = logging.getLogger(__name__)


class InvalidApiKey(Exception):
    """No key, a malformed header, or a key that is unknown or revoked."""


def hash_key(key: str) -> str:
    """What is stored of a key, and looked up: its SHA-256 (`create_api_key` stores the same)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: int
    user_id: int
    tier: str


class Authenticator:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        ttl: float,
        max_entries: int = 100_000,
        last_used_interval: float = 5.0,
        min_query_interval: float = 0.02,
        on_query: Callable[[], None] = lambda: None,
    ) -> None:
        self.pool = pool
        self.ttl = ttl
        self.max_entries = max_entries
        self.last_used_interval = last_used_interval
        self._cache: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()
        self._used_keys: set[int] = set()
        self._flusher: asyncio.Task[None] | None = None
        self.max_lookup_batch = 1000
        self.min_query_interval = min_query_interval
        self._last_query = float("-inf")  # loop time of the last query's start
        self.on_query = on_query
        self._waiting: dict[str, asyncio.Future[Principal | None]] = {}
        self._lookups: asyncio.Task[None] | None = None

    async def authenticate(self, authorization: str | None) -> Principal:
        key = _bearer_token(authorization)
        digest = hash_key(key)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            principal = cached[1]
        else:
            try:
                principal = await self._lookup(digest)
            except (psycopg.OperationalError, PoolTimeout):
                raise StoreUnavailable("the key store is unavailable; retry shortly") from None
            self._remember(digest, principal, now)
        if principal is None:
            raise InvalidApiKey("invalid or revoked API key")
        self._used_keys.add(principal.key_id)
        return principal

    async def _lookup(self, digest: str) -> Principal | None:
        """Look `digest` up together with every other lookup waiting meanwhile.

        Lookups are coalesced: one query at a time, for all the hashes that arrived while the
        previous one ran, and one future per hash however many requests carry it. Queries also
        start at most once per `min_query_interval`: without that, keys arriving a little apart
        (a client slower than PostgreSQL, a few connections) got a query each. A flood of random
        keys therefore costs PostgreSQL at most 1/min_query_interval queries a second, however
        it is paced; a lookup on an otherwise quiet service still starts at once.
        """
        future = self._waiting.get(digest)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._waiting[digest] = future
            if self._lookups is None or self._lookups.done():
                self._lookups = asyncio.create_task(self._run_lookups(), name="key-lookups")
        return await asyncio.shield(future)

    async def _run_lookups(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            # Wait out the interval since the last query (on a quiet service: nothing, but this
            # turn of the loop still adds its lookups); whatever arrives meanwhile joins in.
            await asyncio.sleep(max(0.0, self._last_query + self.min_query_interval - loop.time()))
            self._last_query = loop.time()
            batch = dict(list(self._waiting.items())[: self.max_lookup_batch])
            for digest in batch:
                del self._waiting[digest]
            try:
                found = await self._query(list(batch))
            except Exception as exc:
                for future in batch.values():
                    if not future.done():
                        future.set_exception(exc)
                continue
            for digest, future in batch.items():
                if not future.done():
                    future.set_result(found.get(digest))

    async def _query(self, digests: list[str]) -> dict[str, Principal]:
        self.on_query()
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                """
                SELECT k.key_hash, k.id, k.user_id, u.tier
                  FROM api_keys k JOIN users u ON u.id = k.user_id
                 WHERE k.key_hash = ANY(%s) AND k.is_active AND u.is_active
                """,
                (digests,),
            )
            rows = await cursor.fetchall()
        return {row[0]: Principal(key_id=row[1], user_id=row[2], tier=row[3]) for row in rows}

    def _remember(self, digest: str, principal: Principal | None, now: float) -> None:
        if self.ttl <= 0:
            return
        self._cache[digest] = (now + self.ttl, principal)
        self._cache.move_to_end(digest)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    # `last_used_at` is written in the background, a batch every few seconds, so a request
    # never waits for it.
    def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_loop(), name="last-used-flusher")

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush_last_used()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.last_used_interval)
            await self.flush_last_used()

    async def flush_last_used(self) -> None:
        if not self._used_keys:
            return
        key_ids, self._used_keys = sorted(self._used_keys), set()
        try:
            async with self.pool.connection() as conn:
                await conn.execute(
                    "UPDATE api_keys SET last_used_at = now() WHERE id = ANY(%s)", (key_ids,)
                )
        except Exception:  # a lost last_used_at is cosmetic; never fail serving for it
            log.warning("could not update last_used_at", exc_info=True)


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise InvalidApiKey("missing Authorization header (expected 'Bearer <key>')")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise InvalidApiKey("Authorization header must be 'Bearer <key>'")
    return token
