"""`make run` (python -m dev.run): embedded servers under `.smally/`, the api as a child, the dev
key printed and kept; SIGINT (Ctrl-C) or SIGTERM stops the api, then the servers, exit status 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson

from tests.helpers import REPO, base_env, free_port

KEY_LINE = re.compile(r"^dev API key: (\S+)$", re.MULTILINE)


def alive(pid: int) -> bool:
    """Running (a zombie not reaped yet is gone as far as we are concerned)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def redis_pid(socket: Path) -> int:
    """The redis-server listening on `socket` (the embedded one has no pid file; it shows its
    socket in its process title)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            command = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if command.startswith(b"/") and b"redis-server" in command and bytes(socket) in command:
            return int(proc.name)
    raise AssertionError(f"no redis-server on {socket}")


def run_once(cwd: Path, port: int, sig: signal.Signals, output: Path) -> str:
    """One `make run` until it serves, an embedding with the printed key, then `sig`; returns
    the key. Checks that every process it started is gone afterwards and the exit status."""
    env = base_env(API_PORT=str(port), PYTHONPATH=str(REPO))
    with output.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dev.run"],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while not (found := KEY_LINE.search(output.read_text(errors="replace"))):
            assert process.poll() is None, output.read_text(errors="replace")
            assert time.monotonic() < deadline, output.read_text(errors="replace")
            time.sleep(0.2)
        key = found[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            response = client.post(
                "/v1/embed",
                json={"text": "hello world"},
                headers={"Authorization": f"Bearer {key}"},
            )
        assert response.status_code == 200, response.text
        assert len(response.json()["embedding"]) == 384

        state = cwd / ".smally"
        pgdata = state / "postgres" / "pgdata"
        postgres = int((pgdata / "postmaster.pid").read_text().split()[0])
        redis = redis_pid(state / "redis" / "redis.sock")
        (api,) = set(children(process.pid)) - {redis}  # pg_ctl's postgres is nobody's child
        assert all(alive(pid) for pid in (postgres, redis, api))

        process.send_signal(sig)
        assert process.wait(60) == 0, output.read_text(errors="replace")
        for pid in (api, redis, postgres):
            deadline = time.monotonic() + 10
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not alive(pid), f"pid {pid} still running after `make run` exited"
        assert not (pgdata / "postmaster.pid").exists()
    finally:
        if process.poll() is None:  # a failed check: still stop what it started
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    # The api stopped first: nothing went wrong while it flushed and closed its connections.
    records = []
    for line in output.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            records.append(orjson.loads(line))
    assert records and not [r for r in records if r["level"] in ("error", "critical")], records
    return key


def test_make_run_serves_keeps_its_key_and_stops_everything(tmp_path: Path) -> None:
    port = free_port()
    first = run_once(tmp_path, port, signal.SIGINT, tmp_path / "first.log")
    key_file = tmp_path / ".smally" / "dev-api-key"
    assert key_file.read_text().strip() == first
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert "embedded PostgreSQL:" in (tmp_path / "first.log").read_text()

    second = run_once(tmp_path, port, signal.SIGTERM, tmp_path / "second.log")
    assert second == first  # the same key, kept between runs
    assert os.stat(key_file).st_mode & 0o777 == 0o600
