"""Test helpers: run the real `api` and `create_api_key` commands the way an operator would."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg

from app.config import TIERS, Settings
from app.serving.auth import Principal
from dev.launcher import ApiProcess, free_port

__all__ = ["ApiProcess", "free_port"]  # the launcher's, used by the tests from here

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODEL_PATH = REPO / "models" / "all-MiniLM-L6-v2"
REFERENCE_PATH = REPO / "tests" / "data" / "all-MiniLM-L6-v2.reference.json"

# Variables of ours that must not leak from the developer's shell into a test's process: one per
# setting (the field names are the variable names), and prometheus-client's.
SMALLY_VARS = {f.name.upper() for f in dataclasses.fields(Settings)} | {"PROMETHEUS_MULTIPROC_DIR"}


def database_url_for(server_url: str, database: str) -> str:
    """The same server's URI with another database name (keeps ?host=/socket/dir)."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def new_database(server_url: str) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return database_url_for(server_url, name)


def base_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SMALLY_VARS}
    env.update({"MODEL_PATH": str(MODEL_PATH), "API_HOST": "127.0.0.1", "LOG_LEVEL": "info"})
    # The per-minute limits are off unless a test is about them: many tests send more than a
    # free tier's minute (tests/system/test_rate_limits.py runs them as shipped).
    env.update(
        {f"{tier.upper()}_TIER_{window}": "-1" for tier in TIERS for window in ("RPM", "TPM")}
    )
    # Services of different tests share one Redis: each env gets its own key space.
    env["REDIS_KEY_PREFIX"] = f"test-{uuid.uuid4().hex[:8]}:"
    env.update(overrides)
    return env


def run_cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 60):
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def create_key(env: dict[str, str], cwd: Path, email: str, tier: str = "free") -> str:
    result = run_cli("create_api_key", email, tier, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def load_reference() -> dict:
    return json.loads(REFERENCE_PATH.read_text())


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def build_tiny_model(out: Path) -> Path:
    """A tiny randomly initialised model, through the same build code as the real one."""
    subprocess.run(
        [
            sys.executable,
            str(REPO / "build" / "make_model.py"),
            "--out",
            str(out),
            "--tiny",
            "--cache-dir",
            str(REPO / ".cache" / "model-src"),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out


def new_user(database_url: str, email: str) -> Principal:
    """A user with one key, written straight into the database (for in-process tests)."""
    with psycopg.connect(database_url) as conn:
        (user_id,) = conn.execute(
            "INSERT INTO users (email) VALUES (%s) RETURNING id", (email,)
        ).fetchone()
        (key_id,) = conn.execute(
            "INSERT INTO api_keys (user_id, key_hash, key_prefix) VALUES (%s, %s, 'sk-test')"
            " RETURNING id",
            (user_id, f"{user_id:064d}"),
        ).fetchone()
    return Principal(key_id=key_id, user_id=user_id, tier="free")


# --- systemd socket activation, as systemd does it ---------------------------------------------
HEALTH_REQUEST = b"GET /health HTTP/1.1\r\nHost: smally\r\nConnection: close\r\n\r\n"


def socket_activated(workdir: Path, listener: socket.socket, executable: Path) -> Path:
    """A wrapper that runs `executable` as systemd runs a socket-activated service: the socket
    as descriptor 3, LISTEN_FDS=1 and LISTEN_PID its own pid. Start it with pass_fds=(listener,)."""
    wrapper = workdir / "as-systemd.sh"
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        "export LISTEN_FDS=1 LISTEN_PID=$$\n"
        f'exec "{executable}" "$@" 3<&{listener.fileno()}\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return wrapper


def queued_request(port: int, timeout: float = 90) -> socket.socket:
    """GET /health sent on a new connection, answered or not: while no process accepts, the
    kernel holds the connection in the listening socket's queue."""
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    client.sendall(HEALTH_REQUEST)
    client.settimeout(timeout)
    return client


def read_answer(client: socket.socket) -> bytes:
    chunks = []
    with client:
        while chunk := client.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def nginx_upstream() -> str:
    """The body of nginx/smally.conf's `upstream smally_api { ... }` block."""
    conf = (REPO / "nginx/smally.conf").read_text()
    upstream = re.search(r"upstream smally_api \{(.*?)\n\}", conf, re.S)
    assert upstream, "nginx/smally.conf has no upstream smally_api"
    return upstream.group(1)


def nginx_upstream_idle_seconds() -> float:
    """nginx/smally.conf's upstream keepalive_timeout: how long nginx keeps an idle connection
    to the service before it drops it."""
    idle = re.search(r"^\s*keepalive_timeout (\d+)s;", nginx_upstream(), re.M)
    assert idle, "the upstream sets no keepalive_timeout in seconds"
    return float(idle.group(1))
