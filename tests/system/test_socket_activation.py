"""Socket activation (systemd/smally.socket): `api` serves on the listening socket systemd passes
as file descriptor 3 (LISTEN_FDS, LISTEN_PID), accepts only once it is ready, and the socket
outlives the process, so a connection made while no process runs waits and is served by the next.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from dev.launcher import VENV_BIN
from tests.conftest import Servers
from tests.helpers import ApiProcess, base_env, queued_request, read_answer, socket_activated


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
            answers.append(read_answer(queued_request(port)))

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
