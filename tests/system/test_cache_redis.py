"""CACHE_REDIS_URL: the L2 cache in its own Redis, the quota counters in REDIS_URL's."""

import time
from pathlib import Path

import redis
from prometheus_client.parser import text_string_to_metric_families

from dev.servers import LocalRedis
from tests.helpers import ApiProcess, base_env, create_key


def redis_up(client) -> dict[str, float]:
    """smally_redis_up by role, from the service's /metrics."""
    text = client.get("/metrics").text
    return {
        s.labels["role"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "smally_redis_up"
    }


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
                assert redis_up(client) == {"counters": 1, "cache": 1}
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


def test_each_redis_link_reports_its_own_outage(servers, tmp_path: Path) -> None:
    """smally_redis_up{role}: the cache's Redis goes away and comes back; the counters' stays."""
    cache_server = LocalRedis(tmp_path / "cache-redis", persist=False)
    env = base_env(
        DATABASE_URL=servers.new_database(),
        REDIS_URL=servers.redis_url,
        CACHE_REDIS_URL=cache_server.start(),
        REDIS_KEY_PREFIX="cache-outage:",
    )
    key = create_key(env, tmp_path, "outage@example.com", "free")
    (tmp_path / "api").mkdir()
    api = ApiProcess(env, tmp_path / "api").start()
    try:
        api.wait_healthy()
        auth = {"Authorization": f"Bearer {key}"}
        with api.client() as client:
            assert redis_up(client) == {"counters": 1, "cache": 1}
            cache_server.stop()
            # An uncached text: its L2 lookup meets the dead cache Redis, and is still served.
            answer = client.post("/v1/embed", json={"text": "after the outage"}, headers=auth)
            assert answer.status_code == 200, answer.text
            assert redis_up(client) == {"counters": 1, "cache": 0}
            cache_server.start()
            deadline = time.monotonic() + 15
            while redis_up(client)["cache"] != 1:  # the probe (every 1 s) notices the recovery
                assert time.monotonic() < deadline, "the cache Redis was not seen coming back"
                time.sleep(0.2)
            assert redis_up(client) == {"counters": 1, "cache": 1}
    finally:
        api.stop()
        cache_server.stop()
