"""The service's life: migrations on start (also two at once), keys coming and going, outages,
draining on SIGTERM."""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import orjson
import psycopg

from dev.servers import LocalPostgres, LocalRedis
from tests.conftest import Servers
from tests.helpers import ApiProcess, base_env, create_key, new_database


def test_two_processes_starting_at_once_on_an_empty_database_share_one_schema(
    servers: Servers, tmp_path: Path
) -> None:
    env = base_env(DATABASE_URL=servers.new_database(), REDIS_URL=servers.redis_url)
    first, second = ApiProcess(env, tmp_path), ApiProcess(env, tmp_path)
    try:
        first.start()
        second.start()
        first.wait_healthy()
        second.wait_healthy()
        with psycopg.connect(env["DATABASE_URL"]) as conn:
            applied = conn.execute("SELECT migration_id FROM _yoyo_migration").fetchall()
            tables = {
                row[0]
                for row in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                )
            }
        assert sorted(applied)[0] == ("0001_initial",) and len(applied) == len(set(applied))
        assert {"users", "api_keys", "usage"} <= tables
        key = create_key(env, tmp_path, "both@example.com")
        for process in (first, second):
            with process.client(key) as client:
                assert client.post("/v1/embed", json={"text": "hi"}).status_code == 200
    finally:
        assert first.stop() == 0
        assert second.stop() == 0


def test_revoked_key_and_inactive_user_are_refused(servers: Servers, tmp_path: Path) -> None:
    env = base_env(
        DATABASE_URL=servers.new_database(), REDIS_URL=servers.redis_url, AUTH_CACHE_TTL="0.2"
    )
    api = ApiProcess(env, tmp_path).start()
    try:
        api.wait_healthy()
        revoked = create_key(env, tmp_path, "revoked@example.com")
        inactive = create_key(env, tmp_path, "inactive@example.com")
        with api.client() as client:
            for key in (revoked, inactive):
                response = client.post(
                    "/v1/embed", json={"text": "hi"}, headers={"Authorization": f"Bearer {key}"}
                )
                assert response.status_code == 200
        with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
            conn.execute(
                "UPDATE api_keys SET is_active = FALSE WHERE key_prefix = %s", (revoked[:11],)
            )
            conn.execute("UPDATE users SET is_active = FALSE WHERE email = 'inactive@example.com'")
        time.sleep(0.5)  # past the auth cache TTL
        with api.client() as client:
            for key in (revoked, inactive):
                response = client.post(
                    "/v1/embed", json={"text": "hi"}, headers={"Authorization": f"Bearer {key}"}
                )
                assert response.status_code == 401
                assert response.json()["error"] == "invalid_api_key"
    finally:
        api.stop()


def test_database_outage_gives_503_and_unhealthy_then_recovers(tmp_path: Path) -> None:
    postgres = LocalPostgres(tmp_path / "own-postgres")
    redis = LocalRedis(tmp_path / "own-redis", persist=False)
    env = base_env(
        DATABASE_URL=new_database(postgres.start()), REDIS_URL=redis.start(), AUTH_CACHE_TTL="0"
    )
    try:
        api = ApiProcess(env, tmp_path).start()
        api.wait_healthy()
        key = create_key(env, tmp_path, "outage@example.com")
        postgres.stop()
        with api.client(key) as client:
            time.sleep(1.1)  # /health's checks are cached for 1 s (Services.HEALTH_CHECK_TTL)
            health = client.get("/health")
            embed = client.post("/v1/embed", json={"text": "hi"})
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        assert health.json()["checks"]["database"] == "error"
        assert embed.status_code == 503
        assert embed.json()["error"] == "service_unavailable"
        assert "retry-after" in embed.headers
        postgres.start()
        api.wait_healthy(timeout=30)
        with api.client(key) as client:
            assert client.post("/v1/embed", json={"text": "hi"}).status_code == 200
        assert api.stop() == 0
    finally:
        redis.stop()
        postgres.stop()


def test_unexpected_failure_is_a_bare_500(servers: Servers, tmp_path: Path) -> None:
    env = base_env(
        DATABASE_URL=servers.new_database(), REDIS_URL=servers.redis_url, AUTH_CACHE_TTL="0"
    )
    api = ApiProcess(env, tmp_path).start()
    try:
        api.wait_healthy()
        key = create_key(env, tmp_path, "broken@example.com")
        # Someone breaks the schema under the running service.
        with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
            conn.execute("ALTER TABLE api_keys RENAME COLUMN key_hash TO gone")
        with api.client(key) as client:
            response = client.post("/v1/embed", json={"text": "hi"})
        assert response.status_code == 500
        assert response.json() == {"error": "internal_error", "message": "internal server error"}
        assert "key_hash" not in response.text
        assert "UndefinedColumn" in api.logs()  # the details go to the log instead
    finally:
        api.stop()


LONG_TEXT = " ".join(["word"] * 120)  # 122 tokens, near the limit


def _embed_many(api: ApiProcess, key: str, count: int, on_first=None) -> list[tuple[int, float]]:
    """Send `count` embed requests whole, on their own connections, before any answer; returns
    (status, finish time) each. Calls on_first() once the first answer is back, while the others
    are still in flight."""
    connections = [
        socket.create_connection(("127.0.0.1", api.port), timeout=60) for _ in range(count)
    ]
    for i, connection in enumerate(connections):
        body = orjson.dumps({"text": f"{LONG_TEXT} {i}"})  # all different: no cache hits
        request = (
            f"POST /v1/embed HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode() + body
        connection.sendall(request)
    first_done = threading.Event()

    def read(connection: socket.socket) -> tuple[int, float]:
        with connection:
            data = b""
            while chunk := connection.recv(65536):
                data += chunk
        first_done.set()
        status = int(data.split(b" ", 2)[1])
        if status != 200:  # what it was, for the failure report
            print(status, data.rpartition(b"\r\n\r\n")[2][:300])
        return status, time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(read, c) for c in connections]
        assert first_done.wait(timeout=60)
        if on_first is not None:
            on_first()
        return [f.result(timeout=120) for f in futures]


def test_health_answers_while_the_model_is_busy(api: ApiProcess, key: str) -> None:
    health_times: list[float] = []

    def check_health() -> None:
        response = httpx.get(f"{api.base_url}/health", timeout=30)
        assert response.status_code == 200
        health_times.append(time.monotonic())

    # Enough work that the model is still busy well after the first answer, however the queue
    # groups it (48 could all come back from one run, before /health was even asked).
    results = _embed_many(api, key, 192, on_first=check_health)
    assert [status for status, _ in results] == [200] * 192
    # /health came back while embeddings were still being computed.
    assert health_times[0] < max(finished for _, finished in results)


def test_sigterm_drains_in_flight_requests_and_flushes_usage(
    servers: Servers, tmp_path: Path
) -> None:
    env = base_env(DATABASE_URL=servers.new_database(), REDIS_URL=servers.redis_url)
    api = ApiProcess(env, tmp_path).start()
    api.wait_healthy()
    key = create_key(env, tmp_path, "drain@example.com")
    signalled: list[float] = []

    def terminate() -> None:
        api.send_signal(signal.SIGTERM)
        signalled.append(time.monotonic())

    results = _embed_many(api, key, 48, on_first=terminate)
    assert api.stop() == 0
    assert [status for status, _ in results] == [200] * 48
    assert any(finished > signalled[0] for _, finished in results)  # some were drained
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        (served,) = conn.execute("SELECT sum(embeddings_count) FROM usage").fetchone()
    assert served == 48
