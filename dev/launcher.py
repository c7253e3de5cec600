"""The one way `make run`, the tests and the bench start `api` on embedded servers.

`EmbeddedServers` starts dev/servers.py's PostgreSQL and Redis for whichever of DATABASE_URL /
REDIS_URL an environment leaves unset and stops them in reverse order; `ApiProcess` runs the
`api` command (the venv's console script, or a frozen binary) as a child process on a port of its
own and stops it with one signal, as systemd does. Not used by the service itself.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

from dev.servers import LocalPostgres, LocalRedis

VENV_BIN = Path(sys.executable).parent

# Ports handed out by free_port() in this process: the kernel may offer the same free port twice
# before either api has bound it, and two apis of one test run must never race for a port.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, and not one handed out before by this process."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class EmbeddedServers:
    """PostgreSQL and Redis under `state_dir`, started only for what the environment lacks.

    with EmbeddedServers(state_dir) as servers:
        env = servers.start(os.environ)  # DATABASE_URL and REDIS_URL always set
    """

    def __init__(self, state_dir: Path, *, persist_redis: bool = True) -> None:
        self.state_dir = state_dir
        self.persist_redis = persist_redis
        self.postgres: LocalPostgres | None = None
        self.redis: LocalRedis | None = None

    def start(self, env: Mapping[str, str]) -> dict[str, str]:
        """`env` with DATABASE_URL and REDIS_URL naming a server each, embedded ones for those
        it leaves unset or empty."""
        out = dict(env)
        try:
            if not env.get("DATABASE_URL"):
                self.postgres = LocalPostgres(self.state_dir / "postgres")
                out["DATABASE_URL"] = self.postgres.start()
            if not env.get("REDIS_URL"):
                self.redis = LocalRedis(self.state_dir / "redis", persist=self.persist_redis)
                out["REDIS_URL"] = self.redis.start()
        except BaseException:
            self.stop()
            raise
        return out

    def stop(self) -> None:
        """Redis, then PostgreSQL (the reverse of start); each only if this object started it."""
        if self.redis is not None:
            self.redis.stop()
        if self.postgres is not None:
            self.postgres.stop()

    def __enter__(self) -> EmbeddedServers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class ApiError(AssertionError):
    """The api did not start or stop as it should (an AssertionError: a test shows a failure)."""


@dataclass
class ApiProcess:
    """One `api` process on its own port, its output in a log file we can read.

    `console=True` leaves its output on ours instead (`make run`); `own_session=True` keeps the
    terminal's Ctrl-C from reaching it, so that the launcher alone decides when it stops.
    """

    env: dict[str, str]
    workdir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"  # where to reach it; API_HOST in `env` says where it listens
    executable: Path = field(default_factory=lambda: VENV_BIN / "api")
    log_dir: Path | None = None  # None: workdir
    console: bool = False
    own_session: bool = False
    # Descriptors the child inherits (a listening socket, as systemd passes one).
    pass_fds: tuple[int, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    signalled: bool = False

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return (self.log_dir or self.workdir) / f"api-{self.port}.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def process_env(self) -> dict[str, str]:
        """The child's environment: ours, with the port we picked."""
        return {**self.env, "API_PORT": str(self.port)}

    def start(self, *args: str) -> ApiProcess:
        log = None if self.console else self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                [str(self.executable), *args],
                env=self.process_env(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=None if log is None else subprocess.STDOUT,
                start_new_session=self.own_session,
                pass_fds=self.pass_fds,
            )
        finally:
            if log is not None:
                log.close()
        return self

    def wait_healthy(self, timeout: float = 60) -> dict:
        """GET /health until it answers 200 (healthy or degraded); its body."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ApiError(f"api exited with {self.process.returncode}:\n{self.logs()}")
            try:
                response = httpx.get(f"{self.base_url}/health", timeout=2)
                if response.status_code == 200:
                    return response.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise ApiError(f"api not healthy after {timeout}s:\n{self.logs()}")

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(sig)
        self.signalled = True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the process (once: a second SIGTERM is not what systemd does) and wait for its
        exit status; past `timeout` it is killed and ApiError raised."""
        if self.process is None:
            return 0
        if self.process.poll() is None and not self.signalled:
            self.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise ApiError(f"api did not exit within {timeout}s of signal {sig}") from None

    def logs(self) -> str:
        if self.console or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict]:
        """Every log line must be one JSON object."""
        return [json.loads(line) for line in self.logs().splitlines() if line.strip()]
