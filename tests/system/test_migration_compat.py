"""Rollback safety (README, "Migrations: expand, then contract"): the release before the newest
migration must still work on the schema with it applied, because rolling back a release switches
the binary and leaves the schema as it is.

The previous release is taken from git (the code as it was before the commit that added the
newest migration) and run, unmodified, against a database migrated by this checkout: it must
start, take a key it creates itself, serve an embedding, meter it and flush its ledger.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from dev.launcher import ApiProcess
from tests.conftest import Servers
from tests.helpers import MODEL_PATH, REPO, base_env, run_cli


def newest_migration() -> Path:
    forward = [p for p in (REPO / "migrations").glob("*.sql") if ".rollback" not in p.name]
    return max(forward, key=lambda p: p.name)


def git(*args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"git {' '.join(args)}: {result.stderr}"
    return result.stdout.strip()


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's app/ as it was just before the newest migration was added."""
    migration = newest_migration().relative_to(REPO)
    added = git("log", "--diff-filter=A", "--format=%H", "--", str(migration)).splitlines()
    assert added, f"{migration} is not in the git history (a shallow clone?): this test needs it"
    before = f"{added[-1]}^"
    tree = tmp_path_factory.mktemp("previous-release")
    archive = subprocess.run(
        ["git", "archive", before, "app", "migrations", "spec"],
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    assert not (tree / "migrations" / migration.name).exists()
    return tree


def entry_point(tree: Path, directory: Path, command: str) -> Path:
    """An executable running the old code's `command` (api or create_api_key) through the entry
    file its frozen binary is built from (spec/entry_*.py: it knows where that release's CLI
    lives), with nothing of ours on the path before it."""
    script = directory / command
    entry = tree / "spec" / f"entry_{command}.py"
    assert entry.is_file(), entry
    script.write_text(
        f"#!{sys.executable}\nimport runpy, sys\nsys.path.insert(0, {str(tree)!r})\n"
        f"runpy.run_path({str(entry)!r}, run_name='__main__')\n"
    )
    script.chmod(0o755)
    return script


def test_previous_release_serves_on_the_newest_schema(
    previous_release: Path, servers: Servers, tmp_path: Path
) -> None:
    env = base_env(DATABASE_URL=servers.new_database(), REDIS_URL=servers.redis_url)
    env["MODEL_PATH"] = str(MODEL_PATH)
    migrated = run_cli("api", "migrate", env=env, cwd=tmp_path)  # this checkout's migrations
    assert migrated.returncode == 0, migrated.stderr
    assert f"{newest_migration().stem}\t" in migrated.stdout

    made = subprocess.run(
        [str(entry_point(previous_release, tmp_path, "create_api_key")), "old@example.com", "pro"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()

    api = ApiProcess(env, tmp_path, executable=entry_point(previous_release, tmp_path, "api"))
    api.start()
    try:
        api.wait_healthy()
        with api.client(key) as client:
            answer = client.post("/v1/embed", json={"text": "rolled back, still serving"})
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["embedding"]) == 384
    finally:
        assert api.stop() == 0, api.logs()
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        (rows,) = conn.execute("SELECT count(*) FROM usage").fetchone()
    assert rows == 1, api.logs()  # the old ledger flush wrote into the new schema
    errors = [r for r in api.log_records() if r.get("level") == "error"]
    assert not errors, errors
