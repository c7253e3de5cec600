"""Who is asking: a caller on the service's own machine, or anyone else.

Local means the connection comes from this machine itself (its peer is a loopback address, or
the very address the connection arrived on: a cluster's API host probing its own private
address) and carries no forwarding header: nginx on the same machine connects from 127.0.0.1
too, but always sends X-Real-IP and X-Forwarded-For, so whatever it passes on is anonymous. A
caller cannot make itself local from elsewhere: the peer address is the TCP connection's.
"""

from __future__ import annotations

import ipaddress

from starlette.types import Scope

# Set by a proxy passing on someone else's request (nginx/smally.conf sets the first two).
FORWARDING_HEADERS = frozenset({b"x-real-ip", b"x-forwarded-for", b"forwarded"})


def is_local_caller(scope: Scope) -> bool:
    if any(name.lower() in FORWARDING_HEADERS for name, _ in scope.get("headers", ())):
        return False
    peer = _address(scope.get("client"))
    if peer is None:
        return False  # no TCP peer (a Unix socket, a transport without one): not provably local
    return peer.is_loopback or peer == _address(scope.get("server"))


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(endpoint: tuple[str, int] | list | None) -> Address | None:
    """The IP address of an ASGI `client` or `server` pair; IPv4-mapped IPv6 (::ffff:127.0.0.1,
    from a dual-stack socket) as the IPv4 address it is."""
    if not endpoint:
        return None
    host = str(endpoint[0]).split("%", 1)[0]  # an IPv6 zone (fe80::1%eth0) is not the address
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
