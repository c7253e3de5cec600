"""Per-minute limits per customer (all of its keys together): requests and tokens, per tier.

Each limit is a GCRA ("generic cell rate algorithm") in Redis: the user's key holds the instant
its allowance is next fully used up (the theoretical arrival time, TAT); a request of cost c
moves it c x (60 s / limit) later and is allowed while it stays within 60 s of now. A quiet
customer may spend a whole minute's limit at once, then one unit per 60 s / limit. One script
decides both windows atomically on Redis's own clock, so every process and API host sharing the
counters' Redis sees one count: exact, like the monthly quota.

Every authenticated request takes one from the requests window before any other work, refused
ones included (a 400 costs the server work too); tokens are charged once the texts are
tokenized. A refusal consumes nothing.

While Redis is unreachable each process decides in memory with the same algorithm: a customer
then gets at most its limit from each process (limit x processes in all).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from app.serving.auth import Principal
from app.serving.errors import Busy
from app.serving.redis_link import RedisLink

UNLIMITED = -1
PERIOD = 60.0  # seconds: the limits are per minute
WINDOWS = ("requests", "tokens")
# Users whose in-memory allowance is kept while Redis is down (the least recently seen dropped).
_MAX_LOCAL_USERS = 100_000

# KEYS: the user's requests and tokens TAT keys. ARGV: for each window limit, need, cost (limit
# < 0: unlimited, skipped). Allowed when every window has room for its `need`; then each is
# charged its `cost`. Returns {refused window (0: none, 1, 2), µs ahead of now per window}.
_DECIDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local period = tonumber(ARGV[7])
local ahead = {0, 0}
local refused = 0
for i = 1, 2 do
  local limit = tonumber(ARGV[i * 3 - 2])
  if limit > 0 then
    local tat = tonumber(redis.call('GET', KEYS[i]) or 0)
    if tat < now then tat = now end
    ahead[i] = tat - now
    if refused == 0 and ahead[i] + tonumber(ARGV[i * 3 - 1]) * period / limit > period then
      refused = i
    end
  end
end
if refused == 0 then
  for i = 1, 2 do
    local limit = tonumber(ARGV[i * 3 - 2])
    local cost = tonumber(ARGV[i * 3])
    if limit > 0 and cost > 0 then
      ahead[i] = ahead[i] + cost * period / limit
      redis.call('SET', KEYS[i], string.format('%.0f', now + ahead[i]),
                 'PX', math.floor(ahead[i] / 1000) + 1000)
    end
  end
end
return {refused, math.floor(ahead[1]), math.floor(ahead[2])}
"""


@dataclass(frozen=True, slots=True)
class Window:
    """One limit after a decision."""

    limit: int  # per minute
    ahead: float  # seconds the allowance is used ahead of now (0: all of it is free)

    @property
    def remaining(self) -> int:
        return max(0, math.floor((PERIOD - self.ahead) * self.limit / PERIOD + 1e-9))

    def wait_for(self, need: int) -> float:
        """Seconds until `need` fits (math.inf when it never can)."""
        if need > self.limit:
            return math.inf
        return max(0.0, self.ahead + need * PERIOD / self.limit - PERIOD)


@dataclass(frozen=True, slots=True)
class RateState:
    requests: Window | None  # None: unlimited
    tokens: Window | None

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers, for each limited window."""
        headers = {}
        for name in WINDOWS:
            window: Window | None = getattr(self, name)
            if window is not None:
                headers[f"x-ratelimit-limit-{name}"] = str(window.limit)
                headers[f"x-ratelimit-remaining-{name}"] = str(window.remaining)
                headers[f"x-ratelimit-reset-{name}"] = duration(window.ahead)
        return headers


UNLIMITED_STATE = RateState(None, None)


def duration(seconds: float) -> str:
    """A duration as OpenAI writes it in x-ratelimit-reset-*: 0s, 250ms, 1.5s, 6m0s."""
    ms = math.ceil(seconds * 1000)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    text = f"{rest / 1000:g}s"
    return f"{minutes}m{text}" if minutes else text


class RateLimited(Exception):
    """Over a per-minute limit: `window` names which, `retry_after` when the request would fit
    (math.inf: a request larger than the whole limit never does)."""

    def __init__(self, window: str, need: int, state: RateState, tier: str) -> None:
        limit: Window = getattr(state, window)
        self.window = window
        self.limit = limit.limit
        self.retry_after = limit.wait_for(need)
        self.state = state
        self.tier = tier
        if math.isinf(self.retry_after):
            message = (
                f"a request of {need} {window} is more than the {tier} tier's limit of "
                f"{limit.limit} {window} per minute"
            )
        else:
            message = f"the {tier} tier's limit of {limit.limit} {window} per minute is reached"
        super().__init__(message)


class RateLimiter:
    def __init__(
        self,
        link: RedisLink,
        rates: dict[str, tuple[int, int]],
        *,
        on_refused: Callable[[str, str], None] = lambda tier, window: None,
    ) -> None:
        self.link = link
        self.rates = rates  # tier -> (requests, tokens) per minute
        self.on_refused = on_refused
        self._decide = link.client.register_script(_DECIDE)
        # (user, window) -> monotonic TAT, for decisions while Redis is down.
        self._local: OrderedDict[tuple[int, int], float] = OrderedDict()

    async def admit(self, principal: Principal) -> RateState:
        """Take one request, and require room for at least one token: before any other work."""
        return await self._take(principal, ((1, 1), (1, 0)))

    async def charge_tokens(self, principal: Principal, tokens: int) -> RateState:
        """Charge a request's tokens, once known (raises RateLimited when they do not fit)."""
        return await self._take(principal, ((0, 0), (tokens, tokens)))

    async def _take(
        self, principal: Principal, needs: tuple[tuple[int, int], tuple[int, int]]
    ) -> RateState:
        limits = self.rates.get(principal.tier, (UNLIMITED, UNLIMITED))
        if all(limit == UNLIMITED for limit in limits):
            return UNLIMITED_STATE
        refused, ahead = None, (0.0, 0.0)
        if self.link.available:
            try:
                refused, ahead = await self._in_redis(principal.user_id, limits, needs)
            except (aioredis.RedisError, OSError) as exc:
                if isinstance(exc, aioredis.ConnectionError) and "No connection available" in str(
                    exc
                ):
                    raise Busy("all Redis connections are busy; retry shortly") from None
                self.link.failed(exc)
        if not self.link.available:
            refused, ahead = self._in_memory(principal.user_id, limits, needs)
        state = RateState(
            *(
                Window(limit, seconds) if limit != UNLIMITED else None
                for limit, seconds in zip(limits, ahead, strict=True)
            )
        )
        if refused is not None:
            window = WINDOWS[refused]
            self.on_refused(principal.tier, window)
            raise RateLimited(window, needs[refused][0], state, principal.tier)
        return state

    async def _in_redis(
        self,
        user_id: int,
        limits: tuple[int, int],
        needs: tuple[tuple[int, int], tuple[int, int]],
    ) -> tuple[int | None, tuple[float, float]]:
        keys = [self.link.key("rate", user_id, name) for name in WINDOWS]
        args: list[int | float] = []
        for limit, (need, cost) in zip(limits, needs, strict=True):
            args += [limit, need, cost]
        args.append(int(PERIOD * 1_000_000))
        refused, *ahead = await self._decide(keys=keys, args=args)
        seconds = (int(ahead[0]) / 1e6, int(ahead[1]) / 1e6)
        return (int(refused) - 1 if int(refused) else None), seconds

    def _in_memory(
        self,
        user_id: int,
        limits: tuple[int, int],
        needs: tuple[tuple[int, int], tuple[int, int]],
    ) -> tuple[int | None, tuple[float, float]]:
        """The script's decision, in this process only (Redis is down)."""
        now = time.monotonic()
        ahead = [0.0, 0.0]
        for i, limit in enumerate(limits):
            if limit != UNLIMITED:
                ahead[i] = max(self._local.get((user_id, i), now), now) - now
        for i, (limit, (need, _)) in enumerate(zip(limits, needs, strict=True)):
            if limit != UNLIMITED and ahead[i] + need * PERIOD / limit > PERIOD:
                return i, (ahead[0], ahead[1])
        for i, (limit, (_, cost)) in enumerate(zip(limits, needs, strict=True)):
            if limit != UNLIMITED and cost:
                ahead[i] += cost * PERIOD / limit
                self._local[(user_id, i)] = now + ahead[i]
                self._local.move_to_end((user_id, i))
        while len(self._local) > _MAX_LOCAL_USERS:
            self._local.popitem(last=False)
        return None, (ahead[0], ahead[1])
