"""Per-minute limits (RateLimiter) in this process, on the session's real Redis, and in memory
while Redis is unreachable."""

from __future__ import annotations

import asyncio
import math

import pytest

from app.serving.auth import Principal
from app.serving.ratelimit import RateLimited, RateLimiter, RateState, Window, duration
from app.serving.redis_link import RedisLink
from tests.conftest import Servers
from tests.helpers import free_port

USER = Principal(key_id=1, user_id=7, tier="free")


def limiter(url: str, key_prefix: str, requests: int, tokens: int) -> RateLimiter:
    return RateLimiter(RedisLink(url, key_prefix=key_prefix), {"free": (requests, tokens)})


async def admitted(limiters: list[RateLimiter], attempts: int) -> list[str]:
    """Each attempt on the next limiter in turn: 'ok' or the refused window."""
    outcomes = []
    for i in range(attempts):
        try:
            await limiters[i % len(limiters)].admit(USER)
            outcomes.append("ok")
        except RateLimited as exc:
            outcomes.append(exc.window)
    return outcomes


def test_two_processes_sharing_redis_allow_the_limit_exactly(
    servers: Servers, key_prefix: str
) -> None:
    async def scenario():
        pair = [limiter(servers.redis_url, key_prefix, 5, -1) for _ in range(2)]
        try:
            outcomes = await admitted(pair, 12)
            with pytest.raises(RateLimited) as refused:
                await pair[0].admit(USER)
            return outcomes, refused.value
        finally:
            for one in pair:
                await one.link.stop()

    outcomes, refused = asyncio.run(scenario())
    assert outcomes == ["ok"] * 5 + ["requests"] * 7
    assert refused.window == "requests" and refused.limit == 5
    assert 11 < refused.retry_after <= 12  # one request every 60 / 5 s
    assert refused.state.requests is not None and refused.state.requests.remaining == 0


def test_tokens_are_charged_once_known_and_a_refusal_costs_nothing(
    servers: Servers, key_prefix: str
) -> None:
    async def scenario():
        one = limiter(servers.redis_url, key_prefix, -1, 100)
        try:
            first = await one.charge_tokens(USER, 60)
            with pytest.raises(RateLimited) as over:
                await one.charge_tokens(USER, 60)
            with pytest.raises(RateLimited) as never:
                await one.charge_tokens(USER, 101)
            rest = await one.charge_tokens(USER, 40)
            with pytest.raises(RateLimited) as empty:
                await one.admit(USER)  # no room for a single token
            return first, over.value, never.value, rest, empty.value
        finally:
            await one.link.stop()

    first, over, never, rest, empty = asyncio.run(scenario())
    assert first.tokens is not None and first.tokens.remaining == 40
    assert first.requests is None  # unlimited: no window, no headers
    assert over.window == "tokens" and 11 < over.retry_after <= 12
    assert math.isinf(never.retry_after) and "more than" in str(never)
    assert rest.tokens is not None and rest.tokens.remaining == 0
    assert empty.window == "tokens"


def test_headers_are_openais(servers: Servers, key_prefix: str) -> None:
    async def scenario():
        one = limiter(servers.redis_url, key_prefix, 60, 1000)
        try:
            await one.admit(USER)
            return await one.charge_tokens(USER, 10)
        finally:
            await one.link.stop()

    headers = asyncio.run(scenario()).headers()
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert headers["x-ratelimit-remaining-requests"] == "59"
    assert headers["x-ratelimit-reset-requests"] in ("1s", "999ms")
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert headers["x-ratelimit-remaining-tokens"] == "990"
    assert headers["x-ratelimit-reset-tokens"] in ("600ms", "599ms")


def test_without_redis_each_process_limits_in_memory(key_prefix: str) -> None:
    async def scenario():
        one = limiter(f"redis://127.0.0.1:{free_port()}/0", key_prefix, 3, -1)
        one.link.failed(ConnectionError("down"))
        try:
            return await admitted([one], 5)
        finally:
            await one.link.stop()

    assert asyncio.run(scenario()) == ["ok"] * 3 + ["requests"] * 2


def test_an_unreachable_redis_is_found_out_and_limits_go_on_in_memory(key_prefix: str) -> None:
    async def scenario():
        one = limiter(f"redis://127.0.0.1:{free_port()}/0", key_prefix, 2, -1)
        try:
            outcomes = await admitted([one], 3)
            return outcomes, one.link.available
        finally:
            await one.link.stop()

    outcomes, available = asyncio.run(scenario())
    assert outcomes == ["ok", "ok", "requests"] and available is False


def test_unlimited_tiers_never_reach_redis(key_prefix: str) -> None:
    async def scenario():
        one = limiter(f"redis://127.0.0.1:{free_port()}/0", key_prefix, -1, -1)
        try:
            return await one.admit(USER), one.link.available
        finally:
            await one.link.stop()

    state, available = asyncio.run(scenario())
    assert state == RateState(None, None) and state.headers() == {} and available


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.0004, "1ms"), (0.25, "250ms"), (1.5, "1.5s"), (59.9, "59.9s"), (360, "6m0s")],
)
def test_durations_are_written_as_openai_does(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_a_window_tells_when_a_request_fits() -> None:
    window = Window(limit=60, ahead=60.0)  # the whole minute is used
    assert window.remaining == 0
    assert window.wait_for(1) == pytest.approx(1.0)
    assert window.wait_for(61) == math.inf
