"""scripts/common.sh's load_dump, with which restore.sh loads every backup, against the real
PostgreSQL: a backup file is untrusted input, loaded as the application's role."""

from __future__ import annotations

import gzip
import os
import subprocess
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from app.admin.migrations import apply_migrations
from dev.servers import postgres_bin
from tests.conftest import Servers
from tests.helpers import database_url_for, new_user

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "app-pw"


def tools_env() -> dict[str, str]:
    """The embedded PostgreSQL's psql and pg_dump first on PATH (a psql that knows \\restrict)."""
    return {**os.environ, "PATH": f"{Path(postgres_bin('psql')).parent}:{os.environ['PATH']}"}


def app_database(servers: Servers, role: str, *, superuser: bool = False) -> str:
    """A new database owned by `role`, a login role with a password; its URL as that role."""
    database = f"restore_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(servers.postgres_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        if not exists:
            rights = "SUPERUSER" if superuser else "NOSUPERUSER"
            conn.execute(f"CREATE ROLE \"{role}\" LOGIN {rights} PASSWORD '{PASSWORD}'")
        conn.execute(f'CREATE DATABASE "{database}" OWNER "{role}"')
    parts = urlsplit(database_url_for(servers.postgres_url, database))
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}:{PASSWORD}@{host}"))


def load_dump(url: str, backup: Path) -> subprocess.CompletedProcess[str]:
    script = f'. "{ROOT}/scripts/common.sh"; load_dump "$1" "$2"'
    return subprocess.run(
        ["bash", "-c", script, "load_dump", url, str(backup)],
        env=tools_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def is_superuser(servers: Servers, role: str) -> bool:
    with psycopg.connect(servers.postgres_url) as conn:
        row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        assert row is not None
        return bool(row[0])


def test_a_backup_made_by_backup_sh_loads_into_a_new_database_with_every_row(
    servers: Servers, tmp_path: Path
) -> None:
    source = app_database(servers, "restore_app")
    apply_migrations(source)
    emails = {f"r{i}-{uuid.uuid4().hex[:6]}@example.com" for i in range(3)}
    for email in emails:
        new_user(source, email)
    (tmp_path / "backups").mkdir()
    (tmp_path / ".env").write_text(f"DATABASE_URL={source}\n")
    env = {
        **tools_env(),
        "SMALLY_ENV_FILE": str(tmp_path / ".env"),
        "SMALLY_BACKUP_DIR": str(tmp_path / "backups"),
    }
    made = subprocess.run(
        ["bash", str(ROOT / "scripts/backup.sh")], env=env, capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    backup = Path(made.stdout.strip())
    with gzip.open(backup, "rt") as dump:
        assert dump.read().count("restrict ") == 2  # pg_dump's own \restrict and \unrestrict

    target = app_database(servers, "restore_app")
    loaded = load_dump(target, backup)
    assert loaded.returncode == 0, loaded.stderr
    with psycopg.connect(target) as conn:
        restored = {row[0] for row in conn.execute("SELECT email FROM users").fetchall()}
        owners = conn.execute(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'"
        )
        assert {owner for (owner,) in owners.fetchall()} == {"restore_app"}
    assert restored == emails


def test_a_hostile_backup_runs_no_command_and_gains_no_rights(
    servers: Servers, tmp_path: Path
) -> None:
    """What a superuser session reading the file (restore.sh's SET ROLE) let through: a shell
    command by psql's \\!, a program run by the server, the app's role made a superuser."""
    role = "restore_victim"
    target = app_database(servers, role)
    by_psql, by_server = tmp_path / "by-psql", tmp_path / "by-server"
    hostile = tmp_path / "hostile.sql.gz"
    with gzip.open(hostile, "wt") as dump:
        dump.write(
            f"\\! touch {by_psql}\n"
            "RESET ROLE;\n"
            f"COPY (SELECT 1) TO PROGRAM 'touch {by_server}';\n"
            f'ALTER ROLE "{role}" SUPERUSER;\n'
            "CREATE TABLE loaded (id int);\n"
        )
    loaded = load_dump(target, hostile)
    print(loaded.stderr)
    assert loaded.returncode != 0
    assert not by_psql.exists() and not by_server.exists()
    assert not is_superuser(servers, role)
    with psycopg.connect(target) as conn:  # all or nothing
        assert conn.execute("SELECT to_regclass('loaded')").fetchone() == (None,)


@pytest.mark.parametrize("line", ["\\o |touch {marker}", "\\unrestrict x\n\\! touch {marker}"])
def test_no_meta_command_of_a_backup_runs(servers: Servers, tmp_path: Path, line: str) -> None:
    target = app_database(servers, "restore_app")
    marker = tmp_path / "marker"
    hostile = tmp_path / "hostile.sql.gz"
    with gzip.open(hostile, "wt") as dump:
        dump.write(line.format(marker=marker) + "\nSELECT 1;\n")
    loaded = load_dump(target, hostile)
    assert loaded.returncode != 0 and not marker.exists(), loaded.stderr


def test_a_superuser_database_url_loads_nothing(servers: Servers, tmp_path: Path) -> None:
    target = app_database(servers, "restore_super", superuser=True)
    backup = tmp_path / "backup.sql.gz"
    with gzip.open(backup, "wt") as dump:
        dump.write("CREATE TABLE loaded (id int);\n")
    loaded = load_dump(target, backup)
    assert loaded.returncode != 0
    assert "superuser" in loaded.stderr
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT to_regclass('loaded')").fetchone() == (None,)
