"""The operator's commands: create_api_key, api migrate, api --version, and config errors."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest

from tests.conftest import Servers
from tests.helpers import REPO, ApiProcess, base_env, run_cli


@pytest.fixture
def env(servers: Servers) -> dict[str, str]:
    return base_env(DATABASE_URL=servers.new_database(), REDIS_URL=servers.redis_url)


def test_create_api_key_on_an_empty_database(env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli(
        "create_api_key", "New.User@Example.com", "pro", "--name", "laptop", env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert result.stdout == key + "\n"  # the key alone on stdout, once
    assert re.fullmatch(r"sk_[0-9a-f]{64}", key)
    assert "Authorization: Bearer" in result.stderr and key not in result.stderr
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        user = conn.execute("SELECT email, tier, is_active FROM users").fetchall()
        keys = conn.execute("SELECT key_hash, key_prefix, name FROM api_keys").fetchall()
        stored = " ".join(str(v) for row in keys for v in row)
    assert user == [("new.user@example.com", "pro", True)]
    assert keys[0][1] == key[:11] and keys[0][2] == "laptop"
    assert key not in stored and key[3:] not in stored  # only the hash is kept


def test_second_key_updates_the_tier_and_keeps_the_first(
    env: dict[str, str], tmp_path: Path
) -> None:
    first = run_cli("create_api_key", "two@example.com", env=env, cwd=tmp_path).stdout.strip()
    second = run_cli("create_api_key", "two@example.com", "scale", env=env, cwd=tmp_path)
    assert second.returncode == 0 and second.stdout.strip() != first
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        tier = conn.execute("SELECT tier FROM users").fetchone()[0]
        count = conn.execute("SELECT count(*) FROM api_keys WHERE is_active").fetchone()[0]
    assert (tier, count) == ("scale", 2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nobody", "free"], "not a valid email"),
        (["a@b.com", "gold"], "unknown tier"),
    ],
)
def test_create_api_key_refuses_bad_input(
    env: dict[str, str], tmp_path: Path, args: list[str], message: str
) -> None:
    result = run_cli("create_api_key", *args, env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr and result.stdout == ""
    assert "Traceback" not in result.stderr


def test_api_migrate_applies_and_lists(env: dict[str, str], tmp_path: Path) -> None:
    first = run_cli("api", "migrate", env=env, cwd=tmp_path)
    again = run_cli("api", "migrate", env=env, cwd=tmp_path)
    assert first.returncode == 0 and "0001_initial" in first.stdout
    assert "(applied now)" in first.stdout
    assert "0001_initial" in again.stdout and "(applied now)" not in again.stdout


def tables(database_url: str) -> list[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', "
            "'information_schema') ORDER BY tablename"
        ).fetchall()
    return [row[0] for row in rows]


def test_api_migrate_status_lists_without_applying(env: dict[str, str], tmp_path: Path) -> None:
    ids = sorted(p.stem for p in (REPO / "migrations").glob("*.sql") if ".rollback" not in p.name)
    before = run_cli("api", "migrate", "--status", env=env, cwd=tmp_path)
    assert before.returncode == 0, before.stderr
    assert before.stdout.splitlines() == [f"{m}\tpending" for m in ids]
    assert tables(env["DATABASE_URL"]) == []  # not even yoyo's own tables

    assert run_cli("api", "migrate", env=env, cwd=tmp_path).returncode == 0
    after = run_cli("api", "migrate", "--status", env=env, cwd=tmp_path)
    assert after.returncode == 0, after.stderr
    lines = [line.split("\t") for line in after.stdout.splitlines()]
    assert [line[0] for line in lines] == ids
    assert all(line[1] != "pending" and "(applied now)" not in line[1] for line in lines), lines
    assert "_yoyo_migration" in tables(env["DATABASE_URL"])


def delete_rule(database_url: str) -> str:
    """How deleting a user treats its usage rows: 'c' cascade (0001), 'r' restrict (0003)."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT confdeltype FROM pg_constraint WHERE conname = 'usage_user_id_fkey'"
        ).fetchone()
    return row[0]


def test_api_migrate_rollback_reverts_the_newest_and_migrate_reapplies(
    env: dict[str, str], tmp_path: Path
) -> None:
    url = env["DATABASE_URL"]
    assert run_cli("api", "migrate", env=env, cwd=tmp_path).returncode == 0
    assert delete_rule(url) == "r"
    reverted = run_cli("api", "migrate", "--rollback", env=env, cwd=tmp_path)
    assert reverted.returncode == 0, reverted.stderr
    lines = reverted.stdout.splitlines()
    assert lines[0] == "0003_keep_billing_history\trolled back", lines
    assert "0003_keep_billing_history\tpending" in lines
    assert delete_rule(url) == "c"  # its .rollback.sql ran
    again = run_cli("api", "migrate", env=env, cwd=tmp_path)
    assert "0003_keep_billing_history" in again.stdout and "(applied now)" in again.stdout
    assert delete_rule(url) == "r"


def test_api_migrate_rollback_to_keeps_that_one(env: dict[str, str], tmp_path: Path) -> None:
    url = env["DATABASE_URL"]
    assert run_cli("api", "migrate", env=env, cwd=tmp_path).returncode == 0
    assert "quota_fallback" in tables(url)
    result = run_cli("api", "migrate", "--rollback", "--to", "0001_initial", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    reverted = [line.split("\t")[0] for line in result.stdout.splitlines() if "rolled back" in line]
    assert sorted(reverted) == ["0002_quota_fallback", "0003_keep_billing_history"]
    assert "quota_fallback" not in tables(url) and "users" in tables(url)
    assert "0001_initial\tpending" not in result.stdout


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--to", "0001_initial"], 2, "--to goes with --rollback"),
        (["--rollback", "--status"], 2, "exclude each other"),
        (["--rollback", "--to", "0042_nothing"], 1, "is not an applied migration"),
    ],
)
def test_api_migrate_rollback_refuses_bad_requests(
    env: dict[str, str], tmp_path: Path, args: list[str], status: int, message: str
) -> None:
    assert run_cli("api", "migrate", env=env, cwd=tmp_path).returncode == 0
    result = run_cli("api", "migrate", *args, env=env, cwd=tmp_path)
    assert result.returncode == status and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_api_migrate_rollback_never_drops_the_initial_schema(
    env: dict[str, str], tmp_path: Path
) -> None:
    url = env["DATABASE_URL"]
    assert run_cli("api", "migrate", env=env, cwd=tmp_path).returncode == 0
    to_first = run_cli(
        "api", "migrate", "--rollback", "--to", "0001_initial", env=env, cwd=tmp_path
    )
    assert to_first.returncode == 0, to_first.stderr
    result = run_cli("api", "migrate", "--rollback", env=env, cwd=tmp_path)
    assert result.returncode == 1 and "0001_initial is not rolled back" in result.stderr
    assert "Traceback" not in result.stderr
    assert {"users", "api_keys", "usage"} <= set(tables(url))


@pytest.mark.parametrize("program", ["api", "create_api_key"])
def test_version(program: str, tmp_path: Path) -> None:
    result = run_cli(program, "--version", env=base_env(), cwd=tmp_path)
    assert result.returncode == 0
    assert re.match(rf"{program} \d+\.\d+\.\d+ \(git ", result.stdout)


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"DATABASE_URL": ""}, "DATABASE_URL"),
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL"),
        ({"REDIS_URL": ""}, "REDIS_URL"),
        ({"REDIS_URL": "http://secret:pw@host"}, "REDIS_URL"),
        ({"API_PORT": "eighty"}, "API_PORT"),
        ({"API_PORT": "70000"}, "API_PORT"),
        ({"MAX_TOKENS": "0"}, "MAX_TOKENS"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({"WORKERS": "-1"}, "WORKERS"),
    ],
)
def test_config_errors_stop_start_up_with_one_line(
    env: dict[str, str], tmp_path: Path, overrides: dict[str, str], variable: str
) -> None:
    result = run_cli("api", env={**env, **overrides}, cwd=tmp_path, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0], result.stderr
    assert "secret" not in result.stderr and "pw@" not in result.stderr


def test_missing_model_stops_start_up(env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("api", env={**env, "MODEL_PATH": str(tmp_path / "nowhere")}, cwd=tmp_path)
    assert result.returncode == 1
    assert "make model" in result.stderr


def test_dotenv_is_read_and_real_environment_wins(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "# as systemd's EnvironmentFile\n"
        f"DATABASE_URL={env['DATABASE_URL']}\n"
        f'REDIS_URL="{env["REDIS_URL"]}"\n'
        "MAX_TOKENS=16\n"
        "API_PORT=1\n"
    )
    bare = {k: v for k, v in env.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    api = ApiProcess(bare, tmp_path)  # API_PORT from the environment beats .env's 1
    key = run_cli("create_api_key", "dotenv@example.com", env=bare, cwd=tmp_path).stdout.strip()
    api.start()
    try:
        api.wait_healthy()
        with api.client(key) as client:
            response = client.post("/v1/embed", json={"text": " ".join(["word"] * 20)})
        assert response.status_code == 400 and response.json()["max_tokens"] == 16
    finally:
        assert api.stop() == 0


def test_unreachable_database_is_one_line(env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "DATABASE_URL": f"postgresql://nobody:hunter2@/x?host={tmp_path}"}
    result = run_cli("api", env=env, cwd=tmp_path, timeout=30)
    assert result.returncode == 1
    assert "DATABASE_URL" in result.stderr and "hunter2" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_api_migrate_rollback_stops_at_a_failing_step(env: dict[str, str], tmp_path: Path) -> None:
    """yoyo's own rollback_migrations() skips a step that fails; ours stops and says so."""
    url = env["DATABASE_URL"]
    assert run_cli("api", "migrate", env=env, cwd=tmp_path).returncode == 0
    with psycopg.connect(url, autocommit=True) as conn:
        # 0002's rollback re-creates this index: let it already exist.
        conn.execute("CREATE INDEX usage_user_created_idx ON usage (user_id, created_at)")
    result = run_cli("api", "migrate", "--rollback", "--to", "0001_initial", env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stdout
    assert "rolling back 0002_quota_fallback failed" in result.stderr
    assert "Traceback" not in result.stderr
    assert "quota_fallback" in tables(url)  # its transaction was rolled back whole
    status = run_cli("api", "migrate", "--status", env=env, cwd=tmp_path).stdout
    assert "0002_quota_fallback\tpending" not in status
    assert "0003_keep_billing_history\tpending" in status
