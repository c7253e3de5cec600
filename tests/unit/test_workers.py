"""app/http/workers.py: the connections a stopping worker waits for are the ones a client may
still send a request on."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from app.http.workers import _ServerRecordingLoop


async def _until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


def test_a_connection_counts_until_its_client_closes_or_half_closes_it() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, _ServerRecordingLoop)

        async def keep_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Like hypercorn, the server side keeps a half-closed connection until it closes it.
            await reader.read()
            await asyncio.sleep(30)

        # hypercorn listens with asyncio.start_server, which goes through loop.create_server.
        server = await asyncio.start_server(keep_open, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        assert loop.servers == [server]

        half_closed = socket.create_connection(("127.0.0.1", port))
        closed = socket.create_connection(("127.0.0.1", port))
        idle = socket.create_connection(("127.0.0.1", port))
        await _until(lambda: loop.open_connections == 3, "three connections open")

        half_closed.shutdown(socket.SHUT_WR)  # FIN: no further request can come on it
        closed.close()
        await _until(lambda: loop.open_connections == 1, "only the idle connection counts")
        await asyncio.sleep(0.1)
        assert loop.open_connections == 1  # the half-closed one is not counted twice
        idle.close()
        await _until(lambda: loop.open_connections == 0, "none left")
        half_closed.close()
        server.close()

    with asyncio.Runner(loop_factory=_ServerRecordingLoop) as runner:
        runner.run(main())
