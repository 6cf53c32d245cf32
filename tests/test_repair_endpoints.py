"""repair.endpoints: a connected socket's 4-tuple as the daemon keys flows, on loopback.

No root needed: the sockets are the test's own, on 127.0.0.1 and ::1.  A
dual-stack IPv6 socket talking to an IPv4 peer names it ::ffff:a.b.c.d; its
segments on the wire are IPv4, so the daemon must see 4-byte addresses.
"""

from __future__ import annotations

import socket

import pytest

from daemon.io.repair import RepairError, endpoints


def _pair(family: int, listen_on: str, connect_to: str) -> tuple[socket.socket, socket.socket]:
    lst = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    lst.bind((listen_on, 0))
    lst.listen()
    port = lst.getsockname()[1]
    conn = socket.create_connection((connect_to, port))
    accepted, _ = lst.accept()
    lst.close()
    return conn, accepted


@pytest.mark.parametrize(
    ("family", "listen_on", "connect_to", "addr"),
    [
        (socket.AF_INET, "127.0.0.1", "127.0.0.1", socket.inet_aton("127.0.0.1")),
        (socket.AF_INET6, "::1", "::1", socket.inet_pton(socket.AF_INET6, "::1")),
        # The accepted side of a dual-stack listener: local and peer are IPv4-mapped.
        (socket.AF_INET6, "::", "127.0.0.1", socket.inet_aton("127.0.0.1")),
    ],
)
def test_endpoints_are_packed_as_on_the_wire(
    family: int, listen_on: str, connect_to: str, addr: bytes
) -> None:
    conn, accepted = _pair(family, listen_on, connect_to)
    try:
        local, remote = endpoints(accepted)
        assert local == (addr, accepted.getsockname()[1])
        assert remote == (addr, conn.getsockname()[1])
    finally:
        conn.close()
        accepted.close()


def test_an_unconnected_or_non_tcp_socket_is_refused() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock,
        pytest.raises(RepairError, match="not connected"),
    ):
        endpoints(sock)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
        pytest.raises(RepairError, match="not a TCP socket"),
    ):
        endpoints(sock)
