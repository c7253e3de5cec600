"""A process killed mid-migration leaves yoyo's lock row behind; later starts must not jam."""

from __future__ import annotations

from pathlib import Path

import psycopg

from tests.helpers import ApiProcess, base_env, create_key, run_cli


def test_a_stale_migration_lock_left_by_a_killed_process_is_cleared(servers, tmp_path: Path):
    env = base_env(DATABASE_URL=servers.new_database(), REDIS_URL=servers.redis_url)
    assert run_cli("api", "migrate", env=env, cwd=tmp_path).returncode == 0
    leave_stale_lock(env["DATABASE_URL"])
    key = create_key(env, tmp_path, "after-kill@example.com", "free")  # was: 10 s, LockTimeout
    assert key
    leave_stale_lock(env["DATABASE_URL"])
    api = ApiProcess(env, tmp_path).start()
    try:
        api.wait_healthy()
    finally:
        api.stop()
    assert any(r.get("message") == "cleared a stale migration lock" for r in api.log_records())
    with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM yoyo_lock").fetchone() == (0,)


def leave_stale_lock(database_url: str) -> None:
    """What `api migrate` leaves when SIGKILLed between taking yoyo's lock and releasing it."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO yoyo_lock (locked, ctime, pid) VALUES (1, now(), 999999)")
