"""Hypercorn's serving loop with a shutdown that never closes a connection a client may still use.

Hypercorn's own shutdown marks the server terminated first and stops accepting after: a
connection accepted in between, or accepted just before with its request still unread, is idle,
and hypercorn closes idle connections at once. Behind nginx that is a 502; on a socket systemd
holds (systemd/smally.socket) it is needless, because a connection left in the socket's queue is
served by the next process. A proxy's idle keep-alive connection is the same case: nginx may
send a request on it at the instant hypercorn closes it, and a POST it had sent is never retried.

So on SIGTERM each worker here first stops accepting and marks every answer from then on
`Connection: close` (a proxy drops such a connection after its answer, never reusing it); then
it waits until the clients have closed every connection it holds (each after its answer, or
nginx dropping an idle one after its upstream `keepalive_timeout`), at most IDLE_SECONDS, the
idle time after which a connection is closed anyway; only then does hypercorn shut down
(in-flight requests finish, nothing a client may still use is left to close).

Workers run in this process (`workers == 0`) or as that many spawned processes, which share the
listening sockets and stop when this process is signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from multiprocessing import get_context
from multiprocessing.connection import wait
from multiprocessing.synchronize import Event
from typing import Any

from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config, Sockets
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope
from hypercorn.utils import load_application

log = logging.getLogger(__name__)

# A connection idle this long is closed (hypercorn's keep_alive_timeout, also the time a new
# connection has to send its request's headers), and a stopping worker waits at most this long
# for its clients to close theirs. A proxy keeping connections alive must drop idle ones well
# before: nginx/smally.conf's upstream keepalive_timeout is 2 s (a test holds them apart).
IDLE_SECONDS = 5.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def serve(config: Config) -> int:
    """Serve until SIGTERM or SIGINT; the exit code."""
    sockets = config.create_sockets()
    try:
        if config.workers == 0:
            _worker(config, sockets)
            return 0
        return _serve_in_processes(config, sockets)
    finally:
        for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
            sock.close()


def _serve_in_processes(config: Config, sockets: Sockets) -> int:
    context = get_context("spawn")
    stopping = context.Event()
    # The workers inherit this disposition: Ctrl-C in a terminal reaches the whole process group,
    # and only this process decides when they stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    processes = [
        context.Process(target=_worker, args=(config, sockets, stopping))
        for _ in range(config.workers)
    ]
    for process in processes:
        process.start()
    for signum in _STOP_SIGNALS:
        signal.signal(signum, lambda *_: stopping.set())
    wait([process.sentinel for process in processes])
    if not stopping.is_set():
        log.error("a worker process exited: stopping the others")
        stopping.set()
    exit_code = 0
    for process in processes:
        process.join()
        exit_code = exit_code or (process.exitcode or 0)
    return exit_code


class _ServerRecordingLoop(asyncio.SelectorEventLoop):
    """The default event loop, remembering the servers hypercorn listens with (it keeps them to
    itself), so that a worker can close them before hypercorn's shutdown begins, and counting
    the connections a client may still send a request on (open, and not closed by the client)."""

    def __init__(self) -> None:
        super().__init__()
        self.servers: list[asyncio.Server] = []
        self._usable: set[asyncio.BaseProtocol] = set()

    @property
    def open_connections(self) -> int:
        return len(self._usable)

    async def create_server(
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], *args: Any, **kwargs: Any
    ) -> asyncio.Server:
        def counted() -> asyncio.BaseProtocol:
            protocol = protocol_factory()
            made, lost = protocol.connection_made, protocol.connection_lost

            def connection_made(transport: asyncio.BaseTransport) -> None:
                self._usable.add(protocol)
                made(transport)

            def connection_lost(exc: Exception | None) -> None:
                self._usable.discard(protocol)
                lost(exc)

            protocol.connection_made = connection_made  # type: ignore[method-assign]
            protocol.connection_lost = connection_lost  # type: ignore[method-assign]
            if isinstance(protocol, asyncio.Protocol):
                eof = protocol.eof_received

                # A client that has sent FIN can send no further request: its connection no
                # longer holds a stopping worker back (hypercorn may keep it half-closed until
                # its idle timer).
                def eof_received() -> bool | None:
                    self._usable.discard(protocol)
                    return eof()

                protocol.eof_received = eof_received  # type: ignore[method-assign]
            return protocol

        server = await super().create_server(counted, *args, **kwargs)
        self.servers.append(server)
        return server


class CloseWhenDraining:
    """ASGI middleware: once `draining`, every answer says `Connection: close` (h11 then closes
    the connection after it), so a proxy never reuses a connection of a stopping worker."""

    def __init__(self, app: ASGIFramework) -> None:
        self.app = app
        self.draining = False

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Any) -> None:
            if message["type"] == "http.response.start" and self.draining:
                headers = [h for h in message.get("headers", ()) if h[0].lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing)


def _worker(config: Config, sockets: Sockets, stopping: Event | None = None) -> None:
    loaded = load_application(config.application_path, config.wsgi_max_body_size)
    assert isinstance(loaded, ASGIWrapper), "an ASGI application"
    closing = CloseWhenDraining(loaded.app)
    app = ASGIWrapper(closing)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, _ServerRecordingLoop)
        signalled = asyncio.Event()
        for signum in _STOP_SIGNALS:
            if stopping is None or signum != signal.SIGINT:
                loop.add_signal_handler(signum, signalled.set)

        async def shutdown_trigger() -> None:
            while not signalled.is_set() and not (stopping is not None and stopping.is_set()):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(signalled.wait(), timeout=0.1)
            closing.draining = True
            # Stop accepting, in two steps. asyncio accepts a connection in one loop iteration and
            # attaches its transport to the server in a later one, which fails once the server
            # is closed (Python 3.11: an assertion, swallowed, and the connection dropped with a
            # reset). So first no more accepts, then a moment for the accepted ones to get their
            # transport (and be counted), then close: this process's descriptor of each listening
            # socket; the socket lives on while systemd (or the next process) holds it, and the
            # kernel keeps queueing connections on it.
            for server in loop.servers:
                for sock in server.sockets:
                    loop.remove_reader(sock.fileno())
            await asyncio.sleep(0.05)
            for server in loop.servers:
                server.close()
            # Each open connection ends with the client: after its answer (`Connection: close`),
            # or idle, when the client drops it; the ones still open at IDLE_SECONDS, hypercorn
            # closes (what its idle timer would have done anyway).
            deadline = loop.time() + IDLE_SECONDS
            while loop.open_connections > 0 and loop.time() < deadline:
                await asyncio.sleep(0.05)

        await worker_serve(app, config, sockets=sockets, shutdown_trigger=shutdown_trigger)

    with asyncio.Runner(loop_factory=_ServerRecordingLoop) as runner:
        runner.run(main())
