"""EmbeddingCache: the in-process L1 in front of a real Redis L2."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import numpy as np
import pytest

from app.serving.cache import EmbeddingCache
from app.serving.redis_link import RedisLink
from tests.conftest import Servers

DIM = 8
MODEL_A = "aa" * 32
MODEL_B = "bb" * 32
TOKENS = [101, 7592, 2088, 102]


def vector(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


@asynccontextmanager
async def redis_link(url: str, key_prefix: str) -> AsyncIterator[RedisLink]:
    link = RedisLink(url, key_prefix=key_prefix)
    try:
        yield link
    finally:
        await link.stop()


def new_cache(link: RedisLink, **overrides: object) -> EmbeddingCache:
    options: dict = {"model_sha256": MODEL_A, "dimension": DIM, "l1_size": 4, "l2_ttl": 60}
    options.update(overrides)
    return EmbeddingCache(link, **options)


@pytest.fixture
def run(servers: Servers, key_prefix: str) -> Callable[..., object]:
    """run(scenario): scenario(link) on a RedisLink to the session's Redis, in a key space of the
    test's own."""

    def runner(scenario: Callable[[RedisLink], Awaitable[object]]) -> object:
        async def main() -> object:
            async with redis_link(servers.redis_url, key_prefix) as link:
                return await scenario(link)

        return asyncio.run(main())

    return runner


def test_a_put_is_an_l1_hit(run) -> None:
    async def scenario(link: RedisLink) -> None:
        cache = new_cache(link)
        key = cache.key(TOKENS, True, 1)
        assert await cache.get(key) is None
        await cache.put(key, vector(1))
        hit = await cache.get(key)
        assert hit is not None and hit.level == "l1"
        np.testing.assert_array_equal(hit.vector, vector(1))

    run(scenario)


def test_an_entry_evicted_from_l1_comes_from_l2_and_back_into_l1(run) -> None:
    async def scenario(link: RedisLink) -> None:
        cache = new_cache(link, l1_size=1)
        first, second = cache.key(TOKENS, True, 1), cache.key(TOKENS[:-1], True, 1)
        await cache.put(first, vector(1))
        await cache.put(second, vector(2))  # L1 holds one entry: `first` is gone from it
        hit = await cache.get(first)
        assert hit is not None and hit.level == "l2"
        np.testing.assert_array_equal(hit.vector, vector(1))
        hit = await cache.get(first)
        assert hit is not None and hit.level == "l1"

    run(scenario)


def test_another_cache_on_the_same_redis_hits_l2(run) -> None:
    async def scenario(link: RedisLink) -> None:
        writer, reader = new_cache(link), new_cache(link)
        key = writer.key(TOKENS, False, 1)
        await writer.put(key, vector(3))
        hit = await reader.get(key)
        assert hit is not None and hit.level == "l2"
        np.testing.assert_array_equal(hit.vector, vector(3))

    run(scenario)


def test_per_user_scope_separates_users_and_shared_scope_does_not(run) -> None:
    async def scenario(link: RedisLink) -> None:
        cache = new_cache(link)
        await cache.put(cache.key(TOKENS, True, 1), vector(4))
        assert cache.key(TOKENS, True, 1) != cache.key(TOKENS, True, 2)
        assert await cache.get(cache.key(TOKENS, True, 2)) is None
        assert await new_cache(link).get(cache.key(TOKENS, True, 2)) is None

        shared = new_cache(link, per_user=False)
        assert shared.key(TOKENS, True, 1) == shared.key(TOKENS, True, 2)
        await shared.put(shared.key(TOKENS, True, 1), vector(5))
        hit = await new_cache(link, per_user=False).get(shared.key(TOKENS, True, 2))
        assert hit is not None
        np.testing.assert_array_equal(hit.vector, vector(5))

    run(scenario)


def test_a_users_key_never_equals_a_shared_key_of_other_tokens(run) -> None:
    """User 101's id, as the key hashes it, reads as the token ids [101, 0]: without the scope
    in the key, user 101's entry for TOKENS was the shared entry for [101, 0, *TOKENS]."""

    async def scenario(link: RedisLink) -> None:
        per_user, shared = new_cache(link), new_cache(link, per_user=False)
        await shared.put(shared.key([101, 0, *TOKENS], True, 7), vector(7))
        assert per_user.key(TOKENS, True, 101) != shared.key([101, 0, *TOKENS], True, 7)
        assert await per_user.get(per_user.key(TOKENS, True, 101)) is None

    run(scenario)


def test_the_model_and_the_normalize_flag_are_part_of_the_key(run) -> None:
    async def scenario(link: RedisLink) -> None:
        old, new = new_cache(link, model_sha256=MODEL_A), new_cache(link, model_sha256=MODEL_B)
        await old.put(old.key(TOKENS, True, 1), vector(6))
        assert old.key(TOKENS, True, 1) != new.key(TOKENS, True, 1)
        assert await new.get(new.key(TOKENS, True, 1)) is None
        assert old.key(TOKENS, True, 1) != old.key(TOKENS, False, 1)
        assert await old.get(old.key(TOKENS, False, 1)) is None

    run(scenario)


def test_l2_entries_expire_and_ttl_0_keeps_redis_out(run, key_prefix: str) -> None:
    async def scenario(link: RedisLink) -> None:
        cache = new_cache(link, l2_ttl=60)
        await cache.put(cache.key(TOKENS, True, 1), vector(7))
        (stored,) = await link.client.keys(key_prefix + "*")
        assert 0 < await link.client.ttl(stored) <= 60
        await link.client.delete(stored)

        off = new_cache(link, l2_ttl=0)
        key = off.key(TOKENS, True, 2)
        await off.put(key, vector(8))
        assert await link.client.keys(key_prefix + "*") == []
        hit = await off.get(key)
        assert hit is not None and hit.level == "l1"  # L1 still works
        assert await new_cache(link, l2_ttl=0).get(key) is None

    run(scenario)


def test_an_l2_value_of_the_wrong_size_is_a_miss(run, key_prefix: str) -> None:
    async def scenario(link: RedisLink) -> None:
        cache = new_cache(link)
        key = cache.key(TOKENS, True, 1)
        await cache.put(key, vector(9))
        (stored,) = await link.client.keys(key_prefix + "*")
        await link.client.set(stored, b"\x00" * (4 * DIM - 1))
        assert await new_cache(link).get(key) is None

    run(scenario)


def test_put_keeps_a_copy_not_a_view_of_the_batch(run) -> None:
    async def scenario(link: RedisLink) -> None:
        cache = new_cache(link)
        batch = np.stack([vector(10), vector(11), vector(12)])
        key = cache.key(TOKENS, True, 1)
        await cache.put(key, batch[1])
        batch[1] = 0.0
        hit = await cache.get(key)
        assert hit is not None
        np.testing.assert_array_equal(hit.vector, vector(11))
        assert not np.shares_memory(hit.vector, batch)
        assert not hit.vector.flags.writeable

    run(scenario)


async def command_calls(link: RedisLink) -> dict[str, int]:
    """Calls per Redis command so far (INFO commandstats), e.g. {"mget": 3, "set": 40}."""
    stats = await link.client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def test_a_batch_costs_one_l2_read_and_keeps_the_order_and_levels(run) -> None:
    async def scenario(link: RedisLink) -> None:
        writer = new_cache(link, l1_size=1000)
        keys = [writer.key([101, i, 102], True, 1) for i in range(300)]
        await writer.put_many([(key, vector(i)) for i, key in enumerate(keys[:200])])
        reader = new_cache(link, l1_size=1000)
        await reader.put(keys[0], vector(0))  # one in the reader's L1 too
        before = await command_calls(link)
        hits = await reader.get_many(keys)
        after = await command_calls(link)
        assert after.get("mget", 0) - before.get("mget", 0) == 1
        assert after.get("get", 0) == before.get("get", 0)  # no read per key
        assert hits[0] is not None and hits[0].level == "l1"
        assert all(h is not None and h.level == "l2" for h in hits[1:200])
        assert all(h is None for h in hits[200:])
        for i in (1, 57, 199):
            assert np.array_equal(hits[i].vector, vector(i))  # each answer at its own place
        again = await reader.get_many(keys[1:200])
        assert all(h is not None and h.level == "l1" for h in again)  # L2 hits filled L1

    run(scenario)


def test_put_many_stores_every_entry_with_its_expiry(run, key_prefix: str) -> None:
    async def scenario(link: RedisLink) -> None:
        cache = new_cache(link, l1_size=0)
        keys = [cache.key([101, i, 102], True, 1) for i in range(50)]
        await cache.put_many([(key, vector(i)) for i, key in enumerate(keys)])
        stored = [k async for k in link.client.scan_iter(match=f"{key_prefix}emb:*")]
        assert len(stored) == 50
        ttls = [await link.client.ttl(k) for k in stored[:5]]
        assert all(0 < ttl <= 60 for ttl in ttls), ttls

    run(scenario)


def test_concurrent_lookups_share_their_l2_reads(run) -> None:
    async def scenario(link: RedisLink) -> None:
        writer = new_cache(link, l1_size=0)
        keys = [writer.key([101, i, 102], True, 1) for i in range(64)]
        await writer.put_many([(key, vector(i)) for i, key in enumerate(keys[:32])])
        reader = new_cache(link, l1_size=0)
        before = await command_calls(link)
        # 64 requests at once, one key each: all of them ask before the reader's first turn,
        # so one MGET answers them all.
        hits = await asyncio.gather(*(reader.get_many([key]) for key in keys))
        after = await command_calls(link)
        assert after.get("mget", 0) - before.get("mget", 0) == 1
        # One request whose MGET Redis holds for a moment (CLIENT PAUSE), 63 arriving meanwhile:
        # they wait for it and go together, in one more.
        await link.client.execute_command("CLIENT", "PAUSE", "300", "ALL")
        first = asyncio.create_task(reader.get_many([keys[0]]))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(reader.get_many([k])) for k in keys[1:]]
        await asyncio.sleep(0.05)
        assert not first.done()  # still held by Redis, with the 63 waiting behind it
        again = [await first, *await asyncio.gather(*rest)]
        calls = await command_calls(link)
        assert calls.get("mget", 0) - after.get("mget", 0) == 2
        assert [hit for (hit,) in again][32:] == [None] * 32
        assert all(hit is not None for (hit,) in again[:32])
        for i, (hit,) in enumerate(hits):  # each request gets its own answer
            if i < 32:
                assert hit is not None and hit.level == "l2"
                np.testing.assert_array_equal(hit.vector, vector(i))
            else:
                assert hit is None

    run(scenario)


def test_store_answers_at_once_and_writes_l2_in_the_background(run, key_prefix: str) -> None:
    async def scenario(link: RedisLink) -> None:
        cache = new_cache(link, l1_size=100)
        keys = [cache.key([101, i, 102], True, 1) for i in range(40)]
        before = await command_calls(link)
        for i, key in enumerate(keys):  # 40 requests' stores: a call, not a round trip each
            cache.store([(key, vector(i))])
        hit = await cache.get(keys[0])  # in L1 at once
        assert hit is not None and hit.level == "l1"
        await cache.flush()
        after = await command_calls(link)
        assert after.get("set", 0) - before.get("set", 0) == 40
        stored = [k async for k in link.client.scan_iter(match=f"{key_prefix}emb:*")]
        assert len(stored) == 40
        hit = await new_cache(link).get(keys[39])
        assert hit is not None and hit.level == "l2"
        np.testing.assert_array_equal(hit.vector, vector(39))

    run(scenario)


def test_an_l2_outage_mid_lookup_is_a_miss_for_every_request_waiting(
    servers: Servers, key_prefix: str
) -> None:
    async def main() -> None:
        # A port nobody listens on: the shared MGET fails, and every lookup that waited on it
        # gets misses (the model answers), not an error.
        async with redis_link("redis://127.0.0.1:9/0", key_prefix) as link:
            cache = new_cache(link)
            keys = [cache.key([101, i, 102], True, 1) for i in range(10)]
            hits = await asyncio.gather(*(cache.get_many([key]) for key in keys))
            assert hits == [[None]] * 10
            assert not link.available

    asyncio.run(main())
