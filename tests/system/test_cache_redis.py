"""CACHE_REDIS_URL: the L2 cache in its own Redis, the quota counters in REDIS_URL's."""

from pathlib import Path

import redis

from dev.servers import LocalRedis
from tests.helpers import ApiProcess, base_env, create_key


def test_cache_and_counters_live_in_separate_redis(servers, tmp_path: Path) -> None:
    cache_server = LocalRedis(tmp_path / "cache-redis", persist=False)
    cache_url = cache_server.start()
    try:
        env = base_env(
            DATABASE_URL=servers.new_database(),
            REDIS_URL=servers.redis_url,
            CACHE_REDIS_URL=cache_url,
            REDIS_KEY_PREFIX="cache-split:",
        )
        key = create_key(env, tmp_path, "split@example.com", "free")
        (tmp_path / "api").mkdir()
        api = ApiProcess(env, tmp_path / "api").start()
        try:
            api.wait_healthy()
            with api.client() as client:
                answer = client.post(
                    "/v1/embed",
                    json={"text": "a text for the cache"},
                    headers={"Authorization": f"Bearer {key}"},
                )
                assert answer.status_code == 200, answer.text
        finally:
            api.stop()
        quota_keys = redis.Redis.from_url(servers.redis_url).keys("cache-split:*")
        cache_keys = redis.Redis.from_url(cache_url).keys("cache-split:*")
        print(f"quota Redis: {quota_keys}; cache Redis: {cache_keys}")
        assert any(b"emb:" in k for k in cache_keys)
        assert not any(b"emb:" in k for k in quota_keys)
        assert quota_keys and not any(k in cache_keys for k in quota_keys)
    finally:
        cache_server.stop()
