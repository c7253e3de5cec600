"""Monthly quotas per user (all of its keys together), checked and consumed in one atomic step.

Normal path: a Lua script in Redis compares and increments the user's counter for the calendar
month (UTC) in one step, so any number of processes sharing Redis never overshoot. A missing
counter (Redis restarted without persistence, evicted, flushed), a negative one or one without
an expiry is rebuilt from the PostgreSQL ledger before the decision; `release()` gives back
only to a counter that exists. Counter keys carry Redis's `run_id`, which the script checks:
after a restart that restored old counters from a snapshot, everyone moves to fresh keys.

When Redis is unreachable (not merely busy: a full connection pool is a 503), decisions fall
back to PostgreSQL: under a per-user advisory lock the month's ledger is summed and the usage
row written in the same transaction, exact across processes. The user is recorded in
`quota_fallback`; every process reads that table at most once a second and decides those
users in PostgreSQL as well (for FALLBACK_HOLD_SECONDS after their last fallback decision),
and the fallback waits once, when the record is new, until all processes have read it and
flushed their ledger buffers. So processes that disagree about Redis never both allow the same
remainder. On recovery the counters of users served meanwhile are dropped and rebuilt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from app.serving.auth import Principal
from app.serving.errors import Busy
from app.serving.redis_link import RedisLink
from app.serving.usage import UsageRecorder

log = logging.getLogger(__name__)

UNLIMITED = -1


def limit_or_none(limit: int) -> int | None:
    """A limit as a JSON answer or a report writes it: None for UNLIMITED."""
    return None if limit == UNLIMITED else limit


# How often each process re-reads `quota_fallback`, and how long after a user's last fallback
# decision every process keeps deciding that user in PostgreSQL.
FALLBACK_POLL_SECONDS = 1.0
FALLBACK_HOLD_SECONDS = 60
# A user seen out of quota is refused for this long without a Redis round trip, and before
# the request body is read or tokenized; keyed on the limit, so a raised tier is never refused.
EXHAUSTED_MEMORY_SECONDS = 5.0
# In-process fallback locks kept (one per user seen in fallback, oldest dropped).
_MAX_USER_LOCKS = 10_000
# Advisory lock keys for the PostgreSQL fallback: one per user, clear of the migration lock.
_LOCK_BASE = 1 << 40

# KEYS[1]: the user's counter for the month in this Redis process. ARGV: count, limit, run_id.
# Returns {-2, run_id} when Redis is not the process the caller named (it restarted: the caller
# moves to that process's counters), {-1, 0} when the counter is missing (rebuild it first),
# {0, used} when over quota, {1, used_after} when consumed. A negative counter or one without
# an expiry was not written by a rebuild (e.g. a DECRBY that recreated a lost key): it is
# deleted and treated as missing.
_CONSUME = """
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
if run_id ~= ARGV[3] then return {-2, run_id} end
local current = redis.call('GET', KEYS[1])
if not current then return {-1, 0} end
current = tonumber(current)
if current == nil or current < 0 or redis.call('TTL', KEYS[1]) < 0 then
  redis.call('DEL', KEYS[1])
  return {-1, 0}
end
local count = tonumber(ARGV[1])
if current + count > tonumber(ARGV[2]) then return {0, current} end
return {1, redis.call('INCRBY', KEYS[1], count)}
"""

# KEYS[1]: the user's counter. ARGV: count. Gives back only to a counter that still exists, so a
# counter lost meanwhile (restart, flush, eviction) is rebuilt from the ledger, not recreated
# at -count without an expiry (which handed the user back their month).
_RELEASE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('DECRBY', KEYS[1], ARGV[1])
"""


def month_bounds(now: datetime) -> tuple[datetime, datetime]:
    start = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


@dataclass(frozen=True, slots=True)
class QuotaState:
    limit: int
    used: int
    reset_at: datetime

    @property
    def remaining(self) -> int:
        return UNLIMITED if self.limit == UNLIMITED else max(self.limit - self.used, 0)

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(int(self.reset_at.timestamp())),
        }


class QuotaExceeded(Exception):
    def __init__(self, state: QuotaState, tier: str) -> None:
        super().__init__(f"monthly quota of {state.limit} embeddings reached")
        self.state = state
        self.tier = tier


@dataclass(slots=True)
class Reservation:
    principal: Principal
    count: int
    tokens: int
    state: QuotaState
    reserved_at: datetime  # the ledger row carries this instant, so the month it was counted in
    counter_key: str | None = None  # consumed from this Redis counter
    ledger_row_id: int | None = None  # or already written to the ledger (fallback)


class QuotaService:
    def __init__(
        self,
        link: RedisLink,
        pool: AsyncConnectionPool,
        usage: UsageRecorder,
        limits: dict[str, int],
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_refused: Callable[[str], None] = lambda tier: None,
        on_rebuild: Callable[[], None] = lambda: None,
    ) -> None:
        self.link = link
        self.on_refused = on_refused  # a request refused for quota, by tier (the metric)
        # A counter rebuilt from the ledger (the metric): once per user and month is normal, a
        # steady stream means counters keep vanishing (eviction, flushes).
        self.on_rebuild = on_rebuild
        self.clock = clock
        self.pool = pool
        self.usage = usage
        self.limits = limits
        self._consume = link.client.register_script(_CONSUME)
        self._release = link.client.register_script(_RELEASE)
        self._served_without_redis: set[int] = set()
        self._run_id = ""  # the Redis process our counters live in (INFO server run_id)
        # Users recently decided in PostgreSQL by any process (table quota_fallback).
        self._pg_users: set[int] = set()
        self._pg_users_read_at = float("-inf")
        self._user_locks: OrderedDict[int, asyncio.Lock] = OrderedDict()
        # user_id -> (limit, monotonic expiry, month end) of the last decision that found the
        # month used up.
        self._exhausted: OrderedDict[int, tuple[int, float, datetime]] = OrderedDict()
        link.on_recovery(self._forget_counters_of_fallback_users)

    def limit_of(self, tier: str) -> int:
        return self.limits.get(tier, 0)

    def refuse_if_known_exhausted(self, principal: Principal) -> None:
        """Raise QuotaExceeded when a decision of the last few seconds found this user's month
        used up at today's limit: the cheap check before any work on the request."""
        known = self._exhausted.get(principal.user_id)
        if known is None:
            return
        limit, expires, end = known
        if limit != self.limit_of(principal.tier) or time.monotonic() >= expires:
            del self._exhausted[principal.user_id]
            return
        if self.clock() >= end:  # a new month began
            del self._exhausted[principal.user_id]
            return
        self.on_refused(principal.tier)
        raise QuotaExceeded(QuotaState(limit, limit, end), principal.tier)

    def _remember(self, principal: Principal, exc: QuotaExceeded) -> None:
        state = exc.state
        if state.used < state.limit:  # only a batch too big for what is left: not exhausted
            return
        expires = time.monotonic() + EXHAUSTED_MEMORY_SECONDS
        self._exhausted.pop(principal.user_id, None)
        self._exhausted[principal.user_id] = (state.limit, expires, state.reset_at)
        while len(self._exhausted) > _MAX_USER_LOCKS:
            self._exhausted.popitem(last=False)

    async def reserve(self, principal: Principal, count: int, tokens: int) -> Reservation:
        """Consume `count` embeddings of the user's month, or raise QuotaExceeded."""
        try:
            return await self._reserve(principal, count, tokens)
        except QuotaExceeded as exc:
            self._remember(principal, exc)
            self.on_refused(principal.tier)
            raise

    async def _reserve(self, principal: Principal, count: int, tokens: int) -> Reservation:
        limit = self.limit_of(principal.tier)
        now = self.clock()
        start, end = month_bounds(now)
        if limit == UNLIMITED:
            return Reservation(principal, count, tokens, QuotaState(limit, 0, end), now)
        if self.link.available:
            try:
                if not await self._decided_in_postgres(principal.user_id, start):
                    used, key = await self._consume_in_redis(principal, count, limit, start, end)
                    state = QuotaState(limit, used, end)
                    return Reservation(principal, count, tokens, state, now, counter_key=key)
            except (aioredis.RedisError, OSError) as exc:
                self._outage_or_busy(exc)
        return await self._reserve_in_postgres(principal, count, tokens, limit, now)

    async def _decided_in_postgres(self, user_id: int, month: datetime) -> bool:
        """Whether another process served this user from PostgreSQL lately: then this one
        decides in PostgreSQL too, so Redis and PostgreSQL never both allow the rest."""
        if time.monotonic() - self._pg_users_read_at >= FALLBACK_POLL_SECONDS:
            # One read at a time; the others use the last answer meanwhile.
            self._pg_users_read_at = time.monotonic()
            try:
                async with self.pool.connection(timeout=FALLBACK_POLL_SECONDS) as conn:
                    cursor = await conn.execute(
                        "SELECT user_id FROM quota_fallback WHERE month = %s"
                        " AND created_at > now() - make_interval(secs => %s)",
                        (month.date(), FALLBACK_HOLD_SECONDS),
                    )
                    users = {row[0] for row in await cursor.fetchall()}
            except (psycopg.Error, PoolTimeout):
                # PostgreSQL down: nobody can decide there either, so the last answer holds.
                return user_id in self._pg_users
            changed = users ^ self._pg_users
            if changed:
                # Their counters miss the rows written in PostgreSQL: rebuilt when next used.
                # Until that delete succeeds the last answer stands and the next call reads
                # again; the caller takes the error for an outage.
                try:
                    await self.link.client.delete(*(self._counter_key(u, month) for u in changed))
                except BaseException:
                    self._pg_users_read_at = float("-inf")
                    raise
            self._pg_users = users
        return user_id in self._pg_users

    def _user_lock(self, user_id: int) -> asyncio.Lock:
        lock = self._user_locks.pop(user_id, None) or asyncio.Lock()
        self._user_locks[user_id] = lock
        while len(self._user_locks) > _MAX_USER_LOCKS:
            oldest, old_lock = next(iter(self._user_locks.items()))
            if old_lock.locked():
                break
            del self._user_locks[oldest]
        return lock

    def _outage_or_busy(self, exc: BaseException) -> None:
        """A busy connection pool is not an outage: answer 503 rather than fall back, since a
        fallback while other requests still consume in Redis would mix the two stores."""
        if isinstance(exc, aioredis.ConnectionError) and "No connection available" in str(exc):
            raise Busy("all Redis connections are busy; retry shortly") from None
        self.link.failed(exc)

    def _counter_key(self, user_id: int, month: datetime) -> str:
        # The Redis process's run_id is part of the key: counters restored from a snapshot
        # after a restart belong to the old run and are never read again (they expire).
        return self.link.key("quota", user_id, month.strftime("%Y-%m"), self._run_id)

    async def _consume_in_redis(
        self,
        principal: Principal,
        count: int,
        limit: int,
        start: datetime,
        end: datetime,
    ) -> tuple[int, str]:
        for _ in range(4):
            key = self._counter_key(principal.user_id, start)
            allowed, used = await self._consume(keys=[key], args=[count, limit, self._run_id])
            if allowed == 1:
                return int(used), key
            if allowed == 0:
                raise QuotaExceeded(QuotaState(limit, int(used), end), principal.tier)
            if allowed == -2:
                self._new_redis_run(used.decode() if isinstance(used, bytes) else str(used))
                continue
            await self._rebuild(key, principal.user_id, start, end)
        raise aioredis.RedisError("quota counter vanished while rebuilding it")

    def _new_redis_run(self, run_id: str) -> None:
        if self._run_id:
            log.warning("redis restarted: quota counters are rebuilt from the ledger")
        self._run_id = run_id

    async def _rebuild(self, key: str, user_id: int, start: datetime, end: datetime) -> None:
        # Our own buffered records go in first, so the ledger holds all that this process served.
        await self.usage.flush()
        used = await self._ledger_sum(user_id, start, end)
        # NX: when several processes rebuild at once, the first one's value stands.
        # Kept a week past the month's end so late requests of the month still find it.
        expire_at = int(end.timestamp()) + 7 * 86400
        await self.link.client.set(key, used, nx=True, exat=expire_at)
        log.info("quota counter rebuilt from the ledger", extra={"user_id": user_id})
        self.on_rebuild()

    async def _ledger_sum(self, user_id: int, start: datetime, end: datetime, conn=None) -> int:
        query = (
            "SELECT coalesce(sum(embeddings_count), 0) FROM usage"
            " WHERE user_id = %s AND created_at >= %s AND created_at < %s"
        )
        if conn is not None:
            cursor = await conn.execute(query, (user_id, start, end))
            return int((await cursor.fetchone())[0])
        async with self.pool.connection() as own:
            cursor = await own.execute(query, (user_id, start, end))
            return int((await cursor.fetchone())[0])

    async def _reserve_in_postgres(
        self,
        principal: Principal,
        count: int,
        tokens: int,
        limit: int,
        now: datetime,
    ) -> Reservation:
        self._served_without_redis.add(principal.user_id)
        if self.usage.buffered:
            await self.usage.flush()
        # One request per user at a time takes a connection: the others wait here, not
        # holding pool connections while blocked on the advisory lock.
        async with self._user_lock(principal.user_id):
            await self._mark_decided_in_postgres(principal.user_id, now)
            return await self._decide_in_postgres(principal, count, tokens, limit, now)

    async def _mark_decided_in_postgres(self, user_id: int, now: datetime) -> None:
        """Record the user in `quota_fallback`; when that is news, wait until every process
        has read it (poll interval) and flushed what it served from Redis (flush interval)."""
        month = month_bounds(now)[0].date()
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "INSERT INTO quota_fallback AS f (user_id, month) VALUES (%s, %s)"
                " ON CONFLICT (month, user_id) DO UPDATE SET"
                " since = CASE WHEN f.created_at < now() - make_interval(secs => %s)"
                " THEN now() ELSE f.since END, created_at = now()"
                " RETURNING extract(epoch FROM now() - since)::float8",
                (user_id, month, FALLBACK_HOLD_SECONDS),
            )
            (age,) = await cursor.fetchone()
        settle = FALLBACK_POLL_SECONDS + self.usage.flush_interval + 0.5
        if age < settle:
            await asyncio.sleep(settle - age)

    async def _decide_in_postgres(
        self, principal: Principal, count: int, tokens: int, limit: int, now: datetime
    ) -> Reservation:
        start, end = month_bounds(now)
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(%s)", (_LOCK_BASE + principal.user_id,)
            )
            used = await self._ledger_sum(principal.user_id, start, end, conn)
            if used + count > limit:
                raise QuotaExceeded(QuotaState(limit, used, end), principal.tier)
            cursor = await conn.execute(
                "INSERT INTO usage (user_id, api_key_id, embeddings_count, tokens, created_at)"
                # A key deleted meanwhile is still billed to its user (api_key_id NULL).
                " VALUES (%s, (SELECT id FROM api_keys WHERE id = %s), %s, %s, %s) RETURNING id",
                (principal.user_id, principal.key_id, count, tokens, now),
            )
            (row_id,) = await cursor.fetchone()
        state = QuotaState(limit, used + count, end)
        return Reservation(principal, count, tokens, state, now, ledger_row_id=row_id)

    async def status(self, principal: Principal) -> QuotaState:
        """The user's quota state, consuming nothing (for headers on error responses)."""
        limit = self.limit_of(principal.tier)
        start, end = month_bounds(self.clock())
        if limit == UNLIMITED:
            return QuotaState(limit, 0, end)
        if self.link.available:
            try:
                used, _ = await self._consume_in_redis(principal, 0, limit, start, end)
                return QuotaState(limit, used, end)
            except QuotaExceeded as exc:
                return exc.state
            except (aioredis.RedisError, OSError) as exc:
                self._outage_or_busy(exc)
        return QuotaState(limit, await self._ledger_sum(principal.user_id, start, end), end)

    async def set_tokens(self, reservation: Reservation, tokens: int) -> None:
        """The reserved request's tokens, once tokenized (the reservation came first, on the
        input count alone)."""
        reservation.tokens = tokens
        if reservation.ledger_row_id is not None and tokens:
            # The fallback wrote its ledger row when it decided; the embeddings are billed
            # whatever happens here, the tokens are a statistic.
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(
                        "UPDATE usage SET tokens = %s WHERE id = %s",
                        (tokens, reservation.ledger_row_id),
                    )
            except (psycopg.Error, PoolTimeout):
                log.warning("could not record a request's tokens in the ledger", exc_info=True)

    def commit(self, reservation: Reservation) -> None:
        """The embeddings were served: meter them (unless the fallback already did)."""
        if reservation.ledger_row_id is None:
            p = reservation.principal
            self.usage.record(
                p.user_id, p.key_id, reservation.count, reservation.tokens, reservation.reserved_at
            )

    async def release(self, reservation: Reservation) -> None:
        """Serving failed after the reservation: give the embeddings back."""
        try:
            if reservation.counter_key is not None:
                await self._release(keys=[reservation.counter_key], args=[reservation.count])
            elif reservation.ledger_row_id is not None:
                async with self.pool.connection() as conn:
                    await conn.execute(
                        "DELETE FROM usage WHERE id = %s", (reservation.ledger_row_id,)
                    )
        except Exception:
            log.warning("could not give back a failed request's quota", exc_info=True)

    async def _forget_counters_of_fallback_users(self) -> None:
        users = set(self._served_without_redis)
        if users:
            month = self.clock()
            await self.link.client.delete(*(self._counter_key(u, month) for u in users))
        self._served_without_redis -= users
