"""`api serve`: preflight checks, migrations, then the app under hypercorn until SIGTERM.

On SIGTERM/SIGINT the workers stop accepting (app/http/workers.py), let in-flight requests finish
(up to SHUTDOWN_TIMEOUT), then run the lifespan shutdown, which flushes the usage ledger.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping

from hypercorn.config import Config

from app.config import Settings
from app.http.workers import IDLE_SECONDS, serve
from app.model.engine import ModelError, ModelManifest

log = logging.getLogger(__name__)

_READ_TIMEOUT_BACKSTOP = 5.0
# sd_listen_fds(3): the first socket systemd passes is file descriptor 3.
_SD_LISTEN_FDS_START = 3
# The accept queue of a socket systemd holds (systemd/smally.socket, Backlog=): hypercorn
# listen()s again on it with its backlog, which must not shrink it.
SOCKET_BACKLOG = 4096


def systemd_socket(
    environ: Mapping[str, str] | None = None, *, frozen: bool | None = None
) -> int | None:
    """The listening socket systemd passed (socket activation: LISTEN_FDS, LISTEN_PID), or None.

    systemd sets LISTEN_PID to the process it started. A one-file binary is two processes:
    PyInstaller's bootloader (started by systemd) runs Python as its child, which inherits the
    descriptor, so there the parent's pid counts too."""
    env = os.environ if environ is None else environ
    try:
        count = int(env.get("LISTEN_FDS", "0"))
        pid = int(env.get("LISTEN_PID", "0"))
    except ValueError:
        return None
    if frozen is None:
        frozen = bool(getattr(sys, "frozen", False))
    ours = pid == os.getpid() or (frozen and pid == os.getppid())
    if count < 1 or not ours:
        return None
    if count > 1:
        log.warning("systemd passed %d sockets: serving on the first only", count)
    return _SD_LISTEN_FDS_START


def hypercorn_config(settings: Settings, *, listen_fd: int | None = None) -> Config:
    config = Config()
    if listen_fd is not None:
        # Socket activation: systemd holds the socket across restarts, so connections wait in
        # its queue (never refused) while this process starts; hypercorn accepts only once the
        # lifespan has started (model loaded, services up).
        config.bind = [f"fd://{listen_fd}"]
        config.backlog = SOCKET_BACKLOG
    else:
        host = f"[{settings.api_host}]" if ":" in settings.api_host else settings.api_host
        config.bind = [f"{host}:{settings.api_port}"]
    # Each worker process builds its own app and services from the environment.
    config.application_path = "app.http.app:create_app_from_env()"
    # workers=0 serves in this process; more start that many spawned processes.
    config.workers = 0 if settings.workers == 1 else settings.workers
    config.graceful_timeout = settings.shutdown_timeout
    config.accesslog = None  # our middleware writes the access log
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    # Also the time a new connection has to send its request's headers: a client trickling
    # them a byte at a time is dropped after this many seconds.
    config.keep_alive_timeout = IDLE_SECONDS
    # Bodies: the app answers 408 once READ_TIMEOUT has passed without the whole body (a
    # client sending a byte a second never trips a per-read timeout). Hypercorn's own per-read
    # timeout is only a backstop behind it, so that the client gets the 408, not a bare close.
    config.read_timeout = settings.read_timeout + _READ_TIMEOUT_BACKSTOP
    return config


def run_hypercorn(settings: Settings, *, migrate: Callable[[str], list[str]]) -> int:
    try:
        manifest = ModelManifest.load(settings.model_path)
    except ModelError as exc:
        log.error("cannot start: %s", exc)
        return 1
    migrate(settings.database_url)
    listen_fd = systemd_socket()
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # meant for this process only, not for its workers
    log.info(
        "starting",
        extra={
            "bind": f"fd://{listen_fd} (systemd)"
            if listen_fd is not None
            else f"{settings.api_host}:{settings.api_port}",
            "workers": settings.workers,
            "model": manifest.name,
        },
    )
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Workers write their metric samples here; /metrics in any worker adds them all up.
        metrics_dir = tempfile.mkdtemp(prefix="smally-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    else:
        metrics_dir = None
    try:
        return serve(hypercorn_config(settings, listen_fd=listen_fd))
    except Exception as exc:
        log.error("service stopped on an error: %s", exc, exc_info=True)
        return 1
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
