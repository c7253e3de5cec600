"""The billing path against real PostgreSQL and Redis: exact quotas across processes, a ledger
that loses nothing, the two-level cache, and what operators see."""

from __future__ import annotations

import asyncio
import calendar
import csv
import io
import json
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from app.config import Settings
from dev.servers import LocalPostgres, LocalRedis
from tests.conftest import Servers
from tests.helpers import (
    BIN,
    ApiProcess,
    base_env,
    build_tiny_model,
    create_key,
    new_database,
    run_cli,
)


def next_month_start() -> datetime:
    now = datetime.now(UTC)
    return datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)


async def _embed_all(
    targets: list[tuple[ApiProcess, str]], texts: list[str], answered: list[int] | None = None
) -> list[httpx.Response | Exception]:
    """Send every text at once, request i to targets[i % len(targets)]; each answered
    request's index is appended to `answered` as it comes back."""
    limits = httpx.Limits(max_connections=len(texts))
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def one(i: int, text: str) -> httpx.Response:
            api, key = targets[i % len(targets)]
            response = await client.post(
                f"{api.base_url}/v1/embed",
                json={"text": text},
                headers={"Authorization": f"Bearer {key}"},
            )
            if answered is not None:
                answered.append(i)
            return response

        return await asyncio.gather(
            *(one(i, t) for i, t in enumerate(texts)), return_exceptions=True
        )


def embed_all(targets: list[tuple[ApiProcess, str]], texts: list[str]):
    return asyncio.run(_embed_all(targets, texts))


def ledger_total(database_url: str, email: str | None = None) -> int:
    query = "SELECT coalesce(sum(embeddings_count), 0) FROM usage"
    params: tuple = ()
    if email:
        query += " WHERE user_id = (SELECT id FROM users WHERE email = %s)"
        params = (email,)
    with psycopg.connect(database_url) as conn:
        return int(conn.execute(query, params).fetchone()[0])


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@pytest.fixture
def env(servers: Servers) -> dict[str, str]:
    return base_env(DATABASE_URL=servers.new_database(), REDIS_URL=servers.redis_url)


@pytest.fixture
def two_apis(env: dict[str, str], tmp_path: Path):
    env["FREE_TIER_LIMIT"] = "50"
    apis = [ApiProcess(env, tmp_path).start(), ApiProcess(env, tmp_path).start()]
    try:
        for api in apis:
            api.wait_healthy()
        yield apis
    finally:
        for api in apis:
            api.stop()


def test_quota_is_exact_under_concurrency_across_two_processes(two_apis, tmp_path: Path) -> None:
    env = two_apis[0].env
    key = create_key(env, tmp_path, "busy@example.com", "free")
    sent = time.time()  # Retry-After is counted from when the server answered, after this
    responses = embed_all(
        [(two_apis[0], key), (two_apis[1], key)], [f"request number {i}" for i in range(200)]
    )
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 50 and statuses.count(429) == 150
    # Both processes took part in deciding.
    assert {r.url.port for r in responses} == {a.port for a in two_apis}
    refused = next(r for r in responses if r.status_code == 429)
    reset = next_month_start()
    assert refused.json() == {
        "error": "rate_limit_exceeded",
        "message": refused.json()["message"],
        "limit": 50,
        "reset_at": reset.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    assert 0 < int(refused.headers["retry-after"]) <= reset.timestamp() - sent + 1
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert wait_for(lambda: ledger_total(env["DATABASE_URL"]) == 50)


def test_rate_limit_headers_and_quota_per_user_not_per_key(two_apis, tmp_path: Path) -> None:
    api, env = two_apis[0], two_apis[0].env
    first = create_key(env, tmp_path, "keys@example.com", "free")
    second = create_key(env, tmp_path, "keys@example.com")
    remaining = []
    with api.client() as client:
        for i in range(60):
            key = first if i % 2 else second
            response = client.post(
                "/v1/embed",
                json={"text": "the same text, cached after the first time"},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert response.headers["x-ratelimit-limit"] == "50"
            assert response.headers["x-ratelimit-reset"] == str(
                calendar.timegm(next_month_start().timetuple())
            )
            remaining.append((response.status_code, int(response.headers["x-ratelimit-remaining"])))
        bad = client.post(
            "/v1/embed", json={"text": ""}, headers={"Authorization": f"Bearer {first}"}
        )
    # Cached answers count too, and the two keys share the user's 50.
    assert remaining[:50] == [(200, 49 - i) for i in range(50)]
    assert remaining[50:] == [(429, 0)] * 10
    # A user just seen out of quota is refused before the body is read (issue #16.10).
    assert bad.status_code == 429 and bad.headers["x-ratelimit-remaining"] == "0"


def test_sigterm_under_load_loses_no_usage(env: dict[str, str], tmp_path: Path) -> None:
    apis = [ApiProcess(env, tmp_path).start(), ApiProcess(env, tmp_path).start()]
    for api in apis:
        api.wait_healthy()
    key = create_key(env, tmp_path, "load@example.com", "scale")

    async def load_then_terminate() -> list:
        answered: list[int] = []
        task = asyncio.create_task(
            _embed_all(
                [(apis[0], key), (apis[1], key)], [f"load text {i}" for i in range(400)], answered
            )
        )
        # Mid-load by progress, not by the clock (a loaded machine answered none in 1 s).
        deadline = time.monotonic() + 60
        while len(answered) < 20 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(answered) < 400, "the load was over before the signal"
        for api in apis:
            api.send_signal(signal.SIGTERM)
        return await task

    responses = asyncio.run(load_then_terminate())
    served = sum(1 for r in responses if isinstance(r, httpx.Response) and r.status_code == 200)
    assert [api.stop() for api in apis] == [0, 0]
    assert served > 0
    assert ledger_total(env["DATABASE_URL"]) == served


def test_usage_survives_a_postgres_outage(tmp_path: Path) -> None:
    postgres = LocalPostgres(tmp_path / "pg")
    redis_server = LocalRedis(tmp_path / "redis", persist=False)
    env = base_env(
        DATABASE_URL=new_database(postgres.start()),
        REDIS_URL=redis_server.start(),
        AUTH_CACHE_TTL="600",  # keys stay known while the database is away
    )
    api = ApiProcess(env, tmp_path).start()
    try:
        api.wait_healthy()
        key = create_key(env, tmp_path, "outage@example.com", "pro")
        with api.client(key) as client:
            assert client.post("/v1/embed", json={"text": "before"}).status_code == 200
            postgres.stop()
            during = [client.post("/v1/embed", json={"text": f"during {i}"}) for i in range(20)]
            assert [r.status_code for r in during] == [200] * 20
            buffered = _metric(client.get("/metrics").text, "smally_usage_buffer_records")
            assert buffered >= 20
        postgres.start()
        assert wait_for(lambda: _safe_total(env["DATABASE_URL"]) == 21, timeout=30)
        with api.client() as client:
            assert _metric(client.get("/metrics").text, "smally_usage_dropped_total") == 0
        assert api.stop() == 0
    finally:
        api.stop()
        redis_server.stop()
        postgres.stop()


def _safe_total(url: str) -> int:
    try:
        return ledger_total(url)
    except psycopg.OperationalError:
        return -1


def _metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_redis_outage_keeps_serving_with_exact_quotas(tmp_path: Path, servers: Servers) -> None:
    redis_server = LocalRedis(tmp_path / "redis", persist=False)
    env = base_env(
        DATABASE_URL=servers.new_database(), REDIS_URL=redis_server.start(), FREE_TIER_LIMIT="30"
    )
    api = ApiProcess(env, tmp_path).start()
    try:
        api.wait_healthy()
        key = create_key(env, tmp_path, "redisless@example.com", "free")
        with api.client(key) as client:
            for i in range(10):
                assert client.post("/v1/embed", json={"text": f"up {i}"}).status_code == 200
            redis_server.stop()
            # /health checks its dependencies at most once a second: the outage shows within it.
            health = wait_for(
                lambda: (h := client.get("/health")).json()["status"] == "degraded" and h, 3.0
            )
            assert health and health.status_code == 200
            assert health.json()["checks"]["redis"] == "error"
            during = [client.post("/v1/embed", json={"text": f"down {i}"}) for i in range(25)]
            assert [r.status_code for r in during] == [200] * 20 + [429] * 5
            assert during[19].headers["x-ratelimit-remaining"] == "0"
            redis_server.start()  # comes back empty: counters are rebuilt from the ledger
            assert wait_for(lambda: client.get("/health").json()["status"] == "healthy")
            after = client.post("/v1/embed", json={"text": "up again"})
            assert after.status_code == 429 and after.json()["limit"] == 30
        logs = api.logs()
        assert logs.count("redis unreachable") == 1
        assert logs.count("redis reachable again") == 1
    finally:
        api.stop()
        redis_server.stop()


def test_redis_flush_mid_month_rebuilds_the_quota(tmp_path: Path, servers: Servers) -> None:
    redis_server = LocalRedis(tmp_path / "redis", persist=False)
    env = base_env(
        DATABASE_URL=servers.new_database(), REDIS_URL=redis_server.start(), FREE_TIER_LIMIT="20"
    )
    api = ApiProcess(env, tmp_path).start()
    try:
        api.wait_healthy()
        key = create_key(env, tmp_path, "flushed@example.com", "free")
        with api.client(key) as client:
            for i in range(15):
                assert client.post("/v1/embed", json={"text": f"first {i}"}).status_code == 200
            redis.Redis.from_url(redis_server.url).flushall()
            after = [client.post("/v1/embed", json={"text": f"second {i}"}) for i in range(8)]
        assert [r.status_code for r in after] == [200] * 5 + [429] * 3
        assert wait_for(lambda: ledger_total(env["DATABASE_URL"]) == 20)
    finally:
        api.stop()
        redis_server.stop()


def test_cache_levels_and_keys(env: dict[str, str], tmp_path: Path) -> None:
    api = ApiProcess(env, tmp_path).start()
    try:
        api.wait_healthy()
        key = create_key(env, tmp_path, "cache@example.com", "pro")
        with api.client(key) as client:
            first = client.post("/v1/embed", json={"text": "Cache Me If You Can"}).json()
            again = client.post("/v1/embed", json={"text": "Cache Me If You Can"}).json()
            # Same token ids for this uncased model: the same entry.
            lower = client.post("/v1/embed", json={"text": "cache me if you can"}).json()
            raw = client.post(
                "/v1/embed", json={"text": "cache me if you can", "normalize": False}
            ).json()
        assert (first["cached"], again["cached"], lower["cached"], raw["cached"]) == (
            False,
            True,
            True,
            False,
        )
        assert again["embedding"] == first["embedding"] == lower["embedding"]
        stored = redis.Redis.from_url(env["REDIS_URL"]).keys(env["REDIS_KEY_PREFIX"] + "emb:*")
        assert len(stored) == 2
        assert len(redis.Redis.from_url(env["REDIS_URL"]).get(stored[0])) == 384 * 4
    finally:
        assert api.stop() == 0
    # A new process has an empty L1: the answer comes from Redis (L2), then from L1.
    api = ApiProcess(env, tmp_path).start()
    try:
        api.wait_healthy()
        with api.client(key) as client:
            from_l2 = client.post("/v1/embed", json={"text": "CACHE ME IF YOU CAN"}).json()
            from_l1 = client.post("/v1/embed", json={"text": "cache me if you can"}).json()
            metrics = client.get("/metrics").text
        assert from_l2["cached"] and from_l2["embedding"] == first["embedding"]
        assert from_l1["cached"]
        assert _metric(metrics, "smally_cache_hits_total", level="l2") == 1
        assert _metric(metrics, "smally_cache_hits_total", level="l1") == 1
    finally:
        api.stop()


def test_swapped_model_never_gets_the_old_models_vectors(
    env: dict[str, str], tmp_path: Path
) -> None:
    tiny = build_tiny_model(tmp_path / "tiny-model")
    real = ApiProcess(env, tmp_path).start()
    try:
        real.wait_healthy()
        key = create_key(env, tmp_path, "swap@example.com", "pro")
        with real.client(key) as client:
            assert client.post("/v1/embed", json={"text": "swap test"}).json()["cached"] is False
    finally:
        real.stop()
    swapped = ApiProcess({**env, "MODEL_PATH": str(tiny)}, tmp_path).start()
    try:
        swapped.wait_healthy()
        with swapped.client(key) as client:
            body = client.post("/v1/embed", json={"text": "swap test"}).json()
        assert body["cached"] is False and len(body["embedding"]) != 384
    finally:
        swapped.stop()


def test_revoke_list_and_usage_commands(env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "AUTH_CACHE_TTL": "0.5"}
    api = ApiProcess(env, tmp_path).start()
    try:
        api.wait_healthy()
        kept = create_key(env, tmp_path, "ops@example.com", "pro")
        revoked = create_key(env, tmp_path, "ops@example.com")
        with api.client() as client:
            for key, text in ((kept, "one"), (kept, "two words"), (revoked, "three")):
                response = client.post(
                    "/v1/embed", json={"text": text}, headers={"Authorization": f"Bearer {key}"}
                )
                assert response.status_code == 200
        result = run_cli("api", "keys", "revoke", revoked[:11], env=env, cwd=tmp_path)
        assert result.returncode == 0 and revoked[:11] in result.stdout
        time.sleep(0.7)
        with api.client(revoked) as client:
            assert client.post("/v1/embed", json={"text": "x"}).status_code == 401
        listing = run_cli("api", "keys", "list", "ops@example.com", env=env, cwd=tmp_path).stdout
        assert f"{kept[:11]}\tactive" in listing and f"{revoked[:11]}\trevoked" in listing
        assert wait_for(lambda: ledger_total(env["DATABASE_URL"]) == 3)
        report = run_cli("api", "usage", "ops@example.com", env=env, cwd=tmp_path)
        assert report.returncode == 0, report.stderr
        lines = report.stdout.splitlines()
        assert lines[0] == f"ops@example.com  {datetime.now(UTC):%Y-%m}"
        rows = {line.split()[0]: line.split()[-2:] for line in lines[2:]}
        assert rows[kept[:11]] == ["2", "7"] and rows[revoked[:11]] == ["1", "3"]
        assert rows["total"] == ["3", "10"]
        last_month = run_cli(
            "api", "usage", "ops@example.com", "--month", "2020-01", env=env, cwd=tmp_path
        )
        assert last_month.stdout.splitlines()[-1].split()[-2:] == ["0", "0"]
        ambiguous = run_cli("api", "keys", "revoke", "sk_", env=env, cwd=tmp_path)
        assert ambiguous.returncode != 0 and "give more" in ambiguous.stderr
    finally:
        api.stop()


def test_metrics_with_two_workers_and_the_dashboard(env: dict[str, str], tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from tests.helpers import REPO

    api = ApiProcess({**env, "WORKERS": "2"}, tmp_path).start()
    try:
        api.wait_healthy()
        key = create_key(env, tmp_path, "metrics@example.com", "pro")
        with httpx.Client(base_url=api.base_url, timeout=30) as fresh:
            # A new connection each time, so the requests spread over both workers.
            for i in range(20):
                fresh.post(
                    "/v1/embed",
                    json={"text": f"m {i % 10}"},
                    headers={"Authorization": f"Bearer {key}", "Connection": "close"},
                )
            fresh.post("/v1/embed", json={"text": "x"}, headers={"Authorization": "Bearer nope"})
            fresh.post("/v1/embed", json={"text": ""}, headers={"Authorization": f"Bearer {key}"})
            response = fresh.get("/metrics")
    finally:
        assert api.stop() == 0
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # Whichever worker answered /metrics, it counts the requests of both.
    assert _metric(text, "smally_requests_total", endpoint="/v1/embed", status="200") == 20
    assert _metric(text, "smally_requests_total", endpoint="/v1/embed", cached="true") >= 1
    assert _metric(text, "smally_cache_misses_total") >= 10
    assert _metric(text, "smally_errors_total", error="invalid_api_key") == 1
    assert _metric(text, "smally_errors_total", error="invalid_request") == 1
    assert _metric(text, "smally_token_count_count") == 20
    assert _metric(text, "smally_inference_latency_seconds_count") >= 10
    assert _metric(text, "smally_build_info", model="all-MiniLM-L6-v2") == 1
    # Gauges of both workers, aggregated: the Redis they share is up for each role.
    assert _metric(text, "smally_redis_up", role="counters") == 1
    assert _metric(text, "smally_redis_up", role="cache") == 1
    exported = set(families)
    for name in (
        "smally_requests",
        "smally_request_latency_seconds",
        "smally_inference_latency_seconds",
        "smally_cache_hits",
        "smally_cache_misses",
        "smally_token_count",
        "smally_errors",
        "smally_rate_limit_exceeded",
        "smally_usage_buffer_records",
        "smally_usage_dropped",
        "smally_build_info",
        "smally_redis_up",
        "smally_quota_counter_rebuilds",
    ):
        assert name in exported, name

    # Every query of the Grafana dashboard names metrics the service exports.
    import json
    import re

    dashboard = json.loads((REPO / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs
    samples = {s.name for f in families.values() for s in f.samples} | exported
    for expr in exprs:
        for name in re.findall(r"\bsmally_[a-z0-9_]+", expr):
            assert name in samples or name.removesuffix("_bucket") in exported, (name, expr)


def migrated(env: dict[str, str], tmp_path: Path) -> str:
    result = run_cli("api", "migrate", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return env["DATABASE_URL"]


def test_usage_all_is_one_row_per_user_whose_totals_are_the_ledgers(
    env: dict[str, str], tmp_path: Path
) -> None:
    url = migrated(env, tmp_path)
    now = datetime.now(UTC)
    month = f"{now:%Y-%m}"
    last_month = now.replace(day=1) - timedelta(days=1)
    users = {"a@example.com": "free", "b@example.com": "pro", "c@example.com": "scale"}
    users["d@example.com"] = "free"  # no usage this month: a row of zeros
    rows = [("a", 2, 5, now), ("a", 1, 3, now), ("a", 4, 9, now), ("b", 10, 100, now)]
    rows += [("b", 7, 70, last_month), ("c", 1, 1, now)]
    with psycopg.connect(url) as conn:
        for email, tier in users.items():
            conn.execute("INSERT INTO users (email, tier) VALUES (%s, %s)", (email, tier))
        for user, embeddings, tokens, at in rows:
            conn.execute(
                "INSERT INTO usage (user_id, embeddings_count, tokens, created_at)"
                " SELECT id, %s, %s, %s FROM users WHERE email = %s",
                (embeddings, tokens, at, f"{user}@example.com"),
            )
        (ledger,) = conn.execute(
            "SELECT sum(embeddings_count) FROM usage WHERE created_at >= %s",
            (now.replace(day=1, hour=0, minute=0, second=0, microsecond=0),),
        ).fetchone()
    limits = Settings.from_env(env, dotenv=None).tier_limits

    exported = run_cli(
        "api", "usage", "--all", "--month", month, "--format", "csv", env=env, cwd=tmp_path
    )
    assert exported.returncode == 0, exported.stderr
    table = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert [row["email"] for row in table] == sorted(users)
    assert {row["email"]: (row["embeddings"], row["tokens"]) for row in table} == {
        "a@example.com": ("7", "17"),
        "b@example.com": ("10", "100"),
        "c@example.com": ("1", "1"),
        "d@example.com": ("0", "0"),
    }
    assert sum(int(row["embeddings"]) for row in table) == ledger == 18
    for row in table:
        limit = limits[row["tier"]]
        assert row["month"] == month and row["tier"] == users[row["email"]]
        assert row["limit"] == ("" if limit == -1 else str(limit))

    as_json = run_cli(
        "api", "usage", "--all", "--month", month, "--format", "json", env=env, cwd=tmp_path
    )
    assert as_json.returncode == 0, as_json.stderr
    records = json.loads(as_json.stdout)
    assert [(r["email"], r["embeddings"], r["tokens"]) for r in records] == [
        (row["email"], int(row["embeddings"]), int(row["tokens"])) for row in table
    ]
    assert all(
        r["limit"] == (None if limits[r["tier"]] == -1 else limits[r["tier"]]) for r in records
    )

    then = run_cli(
        "api",
        "usage",
        "--all",
        "--month",
        f"{last_month:%Y-%m}",
        "--format",
        "json",
        env=env,
        cwd=tmp_path,
    )
    assert {r["email"]: r["embeddings"] for r in json.loads(then.stdout)}["b@example.com"] == 7

    for wrong in (
        ["usage"],
        ["usage", "a@example.com", "--all"],
        ["usage", "--all", "--format", "xml"],
    ):
        refused = run_cli("api", *wrong, env=env, cwd=tmp_path)
        assert refused.returncode == 2, (wrong, refused.stdout, refused.stderr)
    bad_month = run_cli("api", "usage", "--all", "--month", "2026-13", env=env, cwd=tmp_path)
    assert bad_month.returncode == 1 and bad_month.stderr.startswith("error: month must look like")


def peak_rss_kib(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run `api ARGS` under GNU time: its peak resident set (KiB) and its stdout."""
    result = subprocess.run(
        ["/usr/bin/time", "-f", "%M", str(BIN / "api"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stderr.strip().splitlines()[-1]), result.stdout


def test_usage_all_streams_a_million_ledger_rows_in_bounded_memory(
    env: dict[str, str], tmp_path: Path
) -> None:
    url = migrated(env, tmp_path)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO users (email) SELECT 'user' || i || '@example.com'"
            " FROM generate_series(1, 100000) i"
        )
        conn.execute(
            "INSERT INTO usage (user_id, embeddings_count, tokens)"
            " SELECT id, 1, 3 FROM users, generate_series(1, 10)"
        )
        (ledger,) = conn.execute("SELECT sum(embeddings_count) FROM usage").fetchone()
    month = f"{datetime.now(UTC):%Y-%m}"
    empty, _ = peak_rss_kib(
        "usage", "--all", "--month", "2000-01", "--format", "csv", env=env, cwd=tmp_path
    )
    full, out = peak_rss_kib(
        "usage", "--all", "--month", month, "--format", "csv", env=env, cwd=tmp_path
    )
    rows = list(csv.DictReader(io.StringIO(out)))
    print(f"api usage --all: {len(rows)} users, peak RSS {full} KiB (no rows: {empty} KiB)")
    assert ledger == 1_000_000 and len(rows) == 100_000
    assert sum(int(row["embeddings"]) for row in rows) == ledger
    assert full - empty < 16 * 1024  # 100,000 users held at once would take ~40 MiB more
