"""Who counts as a local caller of /health (app/http/callers.py): the connection's own peer on
this machine, with no proxy's forwarding header."""

from __future__ import annotations

import pytest

from app.http.callers import is_local_caller


def scope(client: str | None, server: str = "127.0.0.1", headers: dict[str, str] | None = None):
    return {
        "type": "http",
        "client": None if client is None else (client, 40000),
        "server": (server, 8000),
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }


@pytest.mark.parametrize("client", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
def test_a_loopback_peer_without_forwarding_headers_is_local(client: str) -> None:
    assert is_local_caller(scope(client))


def test_a_host_probing_its_own_private_address_is_local() -> None:
    # A cluster's API host listens on its private address only; its own scripts connect there,
    # and the kernel gives the connection that same address as its source.
    assert is_local_caller(scope("10.77.0.11", server="10.77.0.11"))
    assert is_local_caller(scope("fd00::11", server="fd00:0::11"))


@pytest.mark.parametrize(
    ("client", "server"),
    [
        ("10.77.0.10", "10.77.0.11"),  # the edge, another host
        ("203.0.113.7", "127.0.0.1"),
        ("2001:db8::1", "::1"),
        ("::ffff:10.77.0.10", "10.77.0.11"),
    ],
)
def test_a_peer_on_another_machine_is_anonymous(client: str, server: str) -> None:
    assert not is_local_caller(scope(client, server=server))


@pytest.mark.parametrize("header", ["X-Real-IP", "X-Forwarded-For", "Forwarded", "x-forwarded-for"])
def test_a_loopback_peer_passing_on_someone_elses_request_is_anonymous(header: str) -> None:
    # nginx on the same machine connects from 127.0.0.1 and always sets X-Real-IP and
    # X-Forwarded-For: what it passes on is anonymous, whatever the value says.
    assert not is_local_caller(scope("127.0.0.1", headers={header: "127.0.0.1"}))


@pytest.mark.parametrize("client", [None, "testclient", "unix:/run/smally.sock"])
def test_a_caller_whose_address_is_unknown_is_anonymous(client: str | None) -> None:
    assert not is_local_caller(scope(client))
