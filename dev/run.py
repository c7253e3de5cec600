"""`make run`: the real service on this machine, with embedded PostgreSQL and Redis if needed.

When DATABASE_URL / REDIS_URL are unset (in the environment and in .env), servers from the
pip wheels start under `.smally/` and keep their data between runs. A dev key is created on the
first run and kept in `.smally/dev-api-key` (mode 0600, git-ignored) so each run can print a
ready-to-paste curl line. Ctrl-C stops the service, then the embedded servers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psycopg

from app.admin.cli import load_settings, migrate_or_exit
from app.admin.keys import create_key
from app.config import read_dotenv
from app.http.runner import run_hypercorn
from app.logs import configure_logging
from app.serving.auth import hash_key
from dev.servers import LocalPostgres, LocalRedis

STATE_DIR = Path(".smally")
DEV_EMAIL = "dev@localhost.localdomain"


def _dev_key(database_url: str, prefix: str) -> str:
    key_file = STATE_DIR / "dev-api-key"
    with psycopg.connect(database_url, autocommit=True) as conn:
        if key_file.exists():
            key = key_file.read_text().strip()
            found = conn.execute(
                "SELECT 1 FROM api_keys WHERE key_hash = %s AND is_active", (hash_key(key),)
            ).fetchone()
            if found:
                return key
        created = create_key(conn, DEV_EMAIL, "scale", "make run", prefix)
    key_file.touch(mode=0o600)
    key_file.write_text(created.key + "\n")
    return created.key


def main() -> int:
    configured = {**read_dotenv(Path(".env")), **os.environ}
    servers: list[LocalPostgres | LocalRedis] = []
    try:
        if not configured.get("DATABASE_URL"):
            postgres = LocalPostgres(STATE_DIR / "postgres")
            servers.append(postgres)
            os.environ["DATABASE_URL"] = postgres.start()
            print(f"embedded PostgreSQL: {postgres.pgdata}", file=sys.stderr)
        if not configured.get("REDIS_URL"):
            redis = LocalRedis(STATE_DIR / "redis")
            servers.append(redis)
            os.environ["REDIS_URL"] = redis.start()
            print(f"embedded Redis: {redis.socket}", file=sys.stderr)

        settings = load_settings()
        migrate_or_exit(settings.database_url)
        key = _dev_key(settings.database_url, settings.api_key_prefix)
        host = "localhost" if settings.api_host in ("0.0.0.0", "::") else settings.api_host
        print(
            f"\ndev API key: {key}\ntry:\n  curl -s http://{host}:{settings.api_port}/v1/embed "
            f"-H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' "
            """-d '{"text": "hello world"}'\n""",
            file=sys.stderr,
            flush=True,
        )
        configure_logging(settings.log_level)
        return run_hypercorn(settings, migrate=migrate_or_exit)
    finally:
        for server in reversed(servers):
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
