"""app/http/runner.py: the bind hypercorn gets, from systemd's socket or from API_HOST/API_PORT."""

from __future__ import annotations

import os

import pytest

from app.config import Settings
from app.http.runner import SOCKET_BACKLOG, hypercorn_config, systemd_socket


def test_socket_passed_to_this_process_is_fd_3() -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid())}
    assert systemd_socket(env, frozen=False) == 3


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LISTEN_FDS": "0", "LISTEN_PID": "{pid}"},
        {"LISTEN_FDS": "1"},
        {"LISTEN_FDS": "1", "LISTEN_PID": "1"},  # another process's socket
        {"LISTEN_FDS": "one", "LISTEN_PID": "{pid}"},
    ],
)
def test_no_socket_unless_passed_to_this_process(env: dict[str, str]) -> None:
    env = {name: value.format(pid=os.getpid()) for name, value in env.items()}
    assert systemd_socket(env, frozen=False) is None


def test_one_file_binary_takes_the_bootloaders_socket() -> None:
    # systemd started PyInstaller's bootloader, whose child runs Python: LISTEN_PID is the parent.
    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getppid())}
    assert systemd_socket(env, frozen=True) == 3
    assert systemd_socket(env, frozen=False) is None


def test_bind_is_the_socket_or_host_and_port() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://u@127.0.0.1/db",
            "REDIS_URL": "redis://127.0.0.1:6379/0",
            "API_HOST": "::1",
            "API_PORT": "8123",
        },
        dotenv=None,
    )
    assert hypercorn_config(settings).bind == ["[::1]:8123"]
    activated = hypercorn_config(settings, listen_fd=3)
    assert activated.bind == ["fd://3"]
    assert activated.backlog == SOCKET_BACKLOG
