"""EmbeddingCache in-process, against the real throwaway Redis."""

from __future__ import annotations

import asyncio
import gc

import numpy as np

from app.serving.cache import EmbeddingCache
from app.serving.redis_link import RedisLink
from tests.helpers import ApiProcess, create_key

DIMENSION = 384


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_l1_memory_is_bounded_by_its_entries_not_their_batches(servers) -> None:
    """100 entries, each one row of its own 2,048-row batch: the batches must not stay alive
    (a view would keep 100 x 3 MB = 300 MB; the entries themselves are 100 x 1.5 KB)."""

    async def fill() -> tuple[float, list[np.ndarray]]:
        link = RedisLink(servers.redis_url, key_prefix="test-l1-bound:")
        cache = EmbeddingCache(
            link, model_sha256="00" * 32, dimension=DIMENSION, l1_size=1000, l2_ttl=0
        )
        gc.collect()
        before = _rss_mib()
        for i in range(100):
            batch = np.random.default_rng(i).random((2048, DIMENSION), dtype=np.float32)
            await cache.put(cache.key([101, i, 102], True, 1), batch[i % 2048])
            del batch
        gc.collect()
        grown = _rss_mib() - before
        entries = list(cache._l1.values())
        await link.stop()
        return grown, entries

    grown, entries = asyncio.run(fill())
    print(f"RSS growth after 100 entries from 100 batches of 2048 x 384: {grown:.1f} MiB")
    assert len(entries) == 100
    assert all(entry.base is None and entry.nbytes == 4 * DIMENSION for entry in entries)
    assert grown < 64, f"L1 kept {grown:.0f} MiB for 150 KB of vectors"


def test_one_customer_cannot_see_what_another_embedded(servers) -> None:
    """CACHE_SCOPE=user (default): B's request for A's text is computed, never a hit."""

    async def lookups(per_user: bool) -> tuple[bool, bool]:
        link = RedisLink(servers.redis_url, key_prefix=f"test-scope-{per_user}:")
        cache = EmbeddingCache(
            link,
            model_sha256="11" * 32,
            dimension=DIMENSION,
            l1_size=10,
            l2_ttl=60,
            per_user=per_user,
        )
        tokens = [101, 7592, 102]
        await cache.put(cache.key(tokens, True, 1), np.ones(DIMENSION, dtype=np.float32))
        own = await cache.get(cache.key(tokens, True, 1)) is not None
        other = await cache.get(cache.key(tokens, True, 2)) is not None
        await link.stop()
        return own, other

    assert asyncio.run(lookups(per_user=True)) == (True, False)
    assert asyncio.run(lookups(per_user=False)) == (True, True)  # CACHE_SCOPE=shared


def test_cached_flag_never_reports_another_customers_request(api: ApiProcess) -> None:
    alice = create_key(api.env, api.workdir, "alice-scope@example.com", "pro")
    bob = create_key(api.env, api.workdir, "bob-scope@example.com", "pro")
    text = {"text": "a confidential sentence only alice has sent"}
    with api.client(alice) as client:
        assert client.post("/v1/embed", json=text).json()["cached"] is False
        assert client.post("/v1/embed", json=text).json()["cached"] is True
    with api.client(bob) as client:
        first = client.post("/v1/embed", json=text).json()
        assert first["cached"] is False  # shared cache: True, telling bob what alice sent
        assert client.post("/v1/embed", json=text).json()["cached"] is True
