"""`make run`: the real service on this machine, with embedded PostgreSQL and Redis if needed.

When DATABASE_URL / REDIS_URL are unset (in the environment and in .env), servers from the
pip wheels start under `.smally/` and keep their data between runs. The venv's `api` then runs as
a child, its output on the terminal. A dev key is created on the first run and kept in
`.smally/dev-api-key` (mode 0600, git-ignored) so each run can print a ready-to-paste curl line.
Ctrl-C (or SIGTERM) stops the service, then the embedded servers; the exit status is the api's.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType

import psycopg

from app.admin.cli import load_settings
from app.admin.keys import create_key
from app.config import read_dotenv
from app.serving.auth import hash_key
from dev.launcher import ApiError, ApiProcess, EmbeddedServers

STATE_DIR = Path(".smally")
DEV_EMAIL = "dev@localhost.localdomain"
STARTUP_TIMEOUT = 300.0  # the first run on a slow machine: initdb, migrations, the model


class Stopped(Exception):
    """SIGINT or SIGTERM arrived: stop the service, then the servers."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    # No second signal interrupts the stopping: it is bounded by SHUTDOWN_TIMEOUT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Stopped(signum)


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


def _exit_status(returncode: int) -> int:
    """A child killed by signal N exits the way a shell reports it: 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _serve(env: dict[str, str]) -> int:
    settings = load_settings(environ=env)
    # Where to reach it: a wildcard address is reached through localhost.
    host = "localhost" if settings.api_host in ("0.0.0.0", "::") else settings.api_host
    stop_timeout = settings.shutdown_timeout + 30
    # own_session: the terminal's Ctrl-C reaches this process only, which passes it on once.
    api = ApiProcess(
        env, Path.cwd(), port=settings.api_port, host=host, console=True, own_session=True
    )
    try:
        api.start()
        api.wait_healthy(STARTUP_TIMEOUT)
        key = _dev_key(settings.database_url, settings.api_key_prefix)
        print(
            f"\ndev API key: {key}\ntry:\n  curl -s {api.base_url}/v1/embed "
            f"-H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' "
            """-d '{"text": "hello world"}'\n""",
            file=sys.stderr,
            flush=True,
        )
        assert api.process is not None
        return _exit_status(api.process.wait())
    except Stopped as stopped:
        return _exit_status(api.stop(stopped.signum, timeout=stop_timeout))
    except ApiError as exc:
        print(f"make run: {str(exc).strip().rstrip(':')}", file=sys.stderr)
        exited = api.process.poll() if api.process is not None else None
        return _exit_status(exited) if exited else 1
    finally:
        # From here on nothing interrupts the stopping (the api's, then the servers').
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if api.process is not None and api.process.poll() is None:
            api.stop(signal.SIGTERM, timeout=stop_timeout)


def main() -> int:
    signal.signal(signal.SIGINT, _raise_stopped)
    signal.signal(signal.SIGTERM, _raise_stopped)
    configured = {**read_dotenv(Path(".env")), **os.environ}
    try:
        with EmbeddedServers(STATE_DIR) as servers:
            env = servers.start(configured)
            if servers.postgres is not None:
                print(f"embedded PostgreSQL: {servers.postgres.pgdata}", file=sys.stderr)
            if servers.redis is not None:
                print(f"embedded Redis: {servers.redis.socket}", file=sys.stderr)
            return _serve(env)
    except Stopped:
        return 0  # stopped while the servers were starting; they are stopped too


if __name__ == "__main__":
    sys.exit(main())
