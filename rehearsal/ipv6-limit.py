"""Run on the rehearsal VM as root (rehearse.sh pipes it to `sudo python3 - N`, N being the site's
smally_conn_limit): nginx's limits take an IPv6 /64 as one client.

Three addresses on the loopback, two in one /64 and one in another. The first holds N requests
open (headers sent, the body a byte at a time, well within client_body_timeout: each keeps its
slot of limit_conn), so the count does not depend on how fast the machine is. While they are
held, the second address (same /64) must be refused 429 every time and the third (another /64)
must get through to the service (401: no key). Once they are released and limit_req's burst has
drained, the second gets through too. Prints one line; exits 1 when the limit does not hold."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import sys
import threading
import time

FLOODER = "fd00:5e:1::a"
NEIGHBOUR = "fd00:5e:1::b"
OTHER = "fd00:5e:2::a"
TRIES = 5
TRICKLE_SECONDS = 1.0


def tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the rehearsal's certificate names the host, not these
    return context


class Held:
    """Requests to the service whose bodies are still on their way: a byte of each every
    TRICKLE_SECONDS (nginx gives a body 10 s between two reads, and an emulated machine takes
    longer than that to open them all)."""

    def __init__(self) -> None:
        self.sockets: list[ssl.SSLSocket] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.trickler = threading.Thread(target=self._trickle, daemon=True)
        self.trickler.start()

    def open(self, source: str) -> None:
        raw = socket.create_connection((source, 443), timeout=20, source_address=(source, 0))
        held = tls().wrap_socket(raw)
        held.sendall(
            b"POST /v1/embed HTTP/1.1\r\nHost: smally\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1024\r\n\r\n{"
        )
        with self.lock:
            self.sockets.append(held)

    def _trickle(self) -> None:
        while not self.done.wait(TRICKLE_SECONDS):
            with self.lock:
                for held in self.sockets:
                    held.sendall(b" ")

    def release(self) -> None:
        self.done.set()
        self.trickler.join()
        for held in self.sockets:
            held.close()


def status(source: str) -> int:
    connection = http.client.HTTPSConnection(
        source, 443, timeout=20, source_address=(source, 0), context=tls()
    )
    try:
        connection.request(
            "POST", "/v1/embed", body=b"{}", headers={"Content-Type": "application/json"}
        )
        return connection.getresponse().status
    finally:
        connection.close()


def main(held_count: int) -> int:
    addresses = (FLOODER, NEIGHBOUR, OTHER)
    for address in addresses:
        # nodad: usable at once, without waiting for duplicate address detection
        subprocess.run(
            ["ip", "-6", "addr", "replace", f"{address}/128", "dev", "lo", "nodad"], check=True
        )
    try:
        held = Held()
        for _ in range(held_count):
            held.open(FLOODER)
        time.sleep(1)  # nginx has read every held request's headers
        neighbour = [status(NEIGHBOUR) for _ in range(TRIES)]
        other = [status(OTHER) for _ in range(TRIES)]
        held.release()
        time.sleep(3)  # limit_req's burst (20 at 10 a second) drains
        after = status(NEIGHBOUR)
    finally:
        for address in addresses:
            subprocess.run(["ip", "-6", "addr", "del", f"{address}/128", "dev", "lo"], check=False)
    print(
        f"IPv6 /64 limit: while {FLOODER} holds {held_count} requests, {NEIGHBOUR} (same /64) got "
        f"{neighbour}, {OTHER} (another /64) got {other}; released, {NEIGHBOUR} got {after}"
    )
    holds = neighbour == [429] * TRIES and other == [401] * TRIES and after == 401
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
