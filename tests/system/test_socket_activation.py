"""Socket activation (systemd/smally.socket): `api` serves on the listening socket systemd passes
as file descriptor 3 (LISTEN_FDS, LISTEN_PID), accepts only once it is ready, and the socket
outlives the process, so a connection made while no process runs waits and is served by the next.
"""

from __future__ import annotations

import random
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from dev.launcher import VENV_BIN
from tests.conftest import Servers
from tests.helpers import (
    ApiProcess,
    base_env,
    nginx_upstream_idle_seconds,
    queued_request,
    read_answer,
    socket_activated,
)

# A keep-alive client that drops its idle connections as nginx does (its upstream
# keepalive_timeout in nginx/smally.conf): a connection idle for less may carry its next request
# at any moment, and a stopping worker must not close it under that request (app/http/workers.py).
PROXY_IDLE_SECONDS = nginx_upstream_idle_seconds()


class KeptAlive:
    """One client connection used the way nginx uses an upstream keep-alive connection: request
    after request, dropped once an answer says `Connection: close` or after PROXY_IDLE_SECONDS
    idle. `get` returns the status line (or the error) and whether the answer said close."""

    REQUEST = b"GET /health HTTP/1.1\r\nHost: smally\r\n\r\n"

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.used = 0.0

    def get(self, *, drop_on_close: bool = True) -> tuple[bytes, bool]:
        if self.sock is not None and time.monotonic() - self.used >= PROXY_IDLE_SECONDS:
            self.close()
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=90)
        try:
            self.sock.sendall(self.REQUEST)
            data = b""
            while b"\r\n\r\n" not in data:
                data += self._recv()
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?im)^content-length: *(\d+)", head)[1])  # type: ignore[index]
            while len(body) < length:
                body += self._recv()
        except OSError as exc:
            self.close()
            return f"error: {exc!r}".encode(), True
        closing = re.search(rb"(?im)^connection: *close", head) is not None
        self.used = time.monotonic()
        if closing and drop_on_close:
            self.close()
        return head.split(b"\r\n", 1)[0], closing

    def closed_by_server(self) -> bool:
        assert self.sock is not None
        self.sock.settimeout(10)
        return self.sock.recv(1) == b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _recv(self) -> bytes:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("closed with no answer")
        return chunk


def test_api_serves_on_the_socket_systemd_passes_and_the_socket_outlives_it(
    servers: Servers, tmp_path: Path
) -> None:
    env = base_env(DATABASE_URL=servers.new_database(), REDIS_URL=servers.redis_url)
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
        port = listener.getsockname()[1]
        wrapper = socket_activated(tmp_path, listener, VENV_BIN / "api")
        for generation in ("first", "second"):
            # Sent before the process exists (the first), or after the previous one exited (the
            # second, a restart): either way it waits, and is answered by a ready process.
            early = queued_request(port)
            api = ApiProcess(
                env, tmp_path, port=port, executable=wrapper, pass_fds=(listener.fileno(),)
            )
            api.start()
            try:
                body = read_answer(early)
                assert body.startswith(b"HTTP/1.1 200"), (generation, body[:300], api.logs())
                # Accepted only after the lifespan started: the model was loaded, not "error".
                assert b'"status":"healthy"' in body and b'"model":"ok"' in body, body
                # API_PORT is this same port: had api bound it itself, it would have failed.
                starting = [r for r in api.log_records() if r.get("message") == "starting"]
                assert starting and starting[-1]["bind"] == "fd://3 (systemd)", starting
            finally:
                assert api.stop() == 0, api.logs()


def test_a_stopping_worker_answers_kept_alive_connections_and_closes_each_after_its_answer(
    servers: Servers, tmp_path: Path
) -> None:
    """A connection nginx keeps alive may carry a request up to PROXY_IDLE_SECONDS after its
    last one. After SIGTERM the service answers such requests, each with `Connection: close`
    (so nginx never sends another on it), and closes nothing idle before nginx would have."""
    env = base_env(DATABASE_URL=servers.new_database(), REDIS_URL=servers.redis_url)
    api = ApiProcess(env, tmp_path)
    api.start()
    try:
        api.wait_healthy()
        soon, late = KeptAlive(api.port), KeptAlive(api.port)
        assert soon.get() == (b"HTTP/1.1 200 ", False)
        assert late.get() == (b"HTTP/1.1 200 ", False)
        api.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        time.sleep(0.2)
        status, closing = soon.get(drop_on_close=False)
        assert (status, closing) == (b"HTTP/1.1 200 ", True), api.logs()
        assert soon.closed_by_server()
        # Idle for just under what nginx allows: nginx may still send on it, so it is answered.
        time.sleep(max(0.0, stopped_at + 0.9 * PROXY_IDLE_SECONDS - time.monotonic()))
        status, closing = late.get()
        assert (status, closing) == (b"HTTP/1.1 200 ", True), api.logs()
        assert api.process is not None and api.process.wait(30) == 0, api.logs()
    finally:
        api.stop()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_restart_under_load_answers_every_request(
    servers: Servers, tmp_path: Path, workers: str
) -> None:
    """What `systemctl restart smally` does with the socket unit: SIGTERM to the serving process,
    the next one started on the same socket once it has exited, while clients keep connecting.
    No connection may be closed unanswered: the old process stops accepting before it closes the
    connections it holds idle, so every connection it accepted gets its answer, and the ones it
    did not accept wait in the socket's queue for the next process."""
    env = base_env(
        DATABASE_URL=servers.new_database(), REDIS_URL=servers.redis_url, WORKERS=workers
    )
    answers: list[bytes] = []
    stop_load = threading.Event()

    def load() -> None:
        while not stop_load.is_set():
            try:
                answers.append(read_answer(queued_request(port)))
            except OSError as exc:  # a reset is a request lost, not this thread's end
                answers.append(f"error: {exc!r}".encode())

    def kept_alive_load(seed: int) -> None:
        # Like nginx's upstream connections: reused, some left idle almost as long as nginx
        # keeps them, some just past it.
        pauses = random.Random(seed)
        client = KeptAlive(port)
        while not stop_load.is_set():
            answers.append(client.get()[0])
            time.sleep(pauses.choice((0.0, 0.0, 0.05, 0.5, 0.9, 1.1)) * PROXY_IDLE_SECONDS)
        client.close()

    with socket.create_server(("127.0.0.1", 0), backlog=256) as listener:
        port = listener.getsockname()[1]
        wrapper = socket_activated(tmp_path, listener, VENV_BIN / "api")

        def start() -> ApiProcess:
            api = ApiProcess(
                env, tmp_path, port=port, executable=wrapper, pass_fds=(listener.fileno(),)
            )
            api.start()
            api.wait_healthy()
            return api

        api = start()
        clients = [threading.Thread(target=load) for _ in range(4)]
        clients += [threading.Thread(target=kept_alive_load, args=(n,)) for n in range(4)]
        for client in clients:
            client.start()
        try:
            for _ in range(3):
                time.sleep(1.0)
                served_before = len(answers)
                assert api.stop() == 0, api.logs()
                api = start()
                assert len(answers) > served_before, "no request was served during the restart"
            time.sleep(1.0)
        finally:
            stop_load.set()
            for client in clients:
                client.join(timeout=120)
            api.stop()
    failed = [answer[:80] for answer in answers if not answer.startswith(b"HTTP/1.1 200")]
    assert len(answers) > 100 and not failed, (len(answers), failed[:5])
