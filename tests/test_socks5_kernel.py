"""proxies/socks5_kernel.serve_client around the hand-over: when, and what if it fails.

No root, no daemon: loopback sockets and a stand-in for the API client.
Most errors leave the sockets the proxy's (docs/api.md): it copies and the
client sees no difference.  ECONNRESET means the daemon took them over and
then failed: they transmit nothing, so the proxy closes them.  With
``--splice-after`` the proxy copies first and offers the pair only once
that many bytes have crossed.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from daemon.api.replies import SpliceError
from daemon.io.tcp_info import smoothed_rtt_us
from proxies.socks5_kernel import copy_budget, serve_client
from proxies.socks5_spliced import SplicedConfig
from tests.test_socks5_spliced import FakeDaemon, daemon, sock_dir, start_process, stop_process

__all__ = ["daemon", "sock_dir"]  # the fixtures, for pytest


class RefusingApi:
    def __init__(self, code: str) -> None:
        self.code = code
        self.calls = 0
        self.offered = threading.Event()

    def splice_sockets(self, client: socket.socket, server: socket.socket) -> None:
        self.calls += 1
        self.offered.set()
        raise SpliceError(self.code, "refused by the test")


@contextlib.contextmanager
def _socks_pair(
    api: RefusingApi, splice_after: int = 0
) -> Iterator[tuple[socket.socket, socket.socket, threading.Thread]]:
    """A client connected through serve_client to a loopback origin: (client, origin's end)."""
    origin = socket.create_server(("127.0.0.1", 0))
    front = socket.create_server(("127.0.0.1", 0))
    with origin, front:
        client = socket.create_connection(front.getsockname(), timeout=5)
        accepted, peer = front.accept()
        proxy = threading.Thread(
            target=serve_client,
            args=(api, accepted, peer, SplicedConfig(), splice_after),
            daemon=True,
        )
        proxy.start()
        with client:
            port = origin.getsockname()[1]
            client.sendall(b"\x05\x01\x00")
            assert client.recv(2) == b"\x05\x00"
            target = socket.inet_aton("127.0.0.1") + struct.pack("!H", port)
            client.sendall(b"\x05\x01\x00\x01" + target)
            assert _read(client, 10)[:2] == b"\x05\x00"
            server, _ = origin.accept()
            with server:
                server.settimeout(5)
                yield client, server, proxy
        proxy.join(timeout=5)
        assert not proxy.is_alive()


def _read(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _through_proxy(code: str) -> tuple[bytes, bytes, RefusingApi]:
    """b"ping" each way once the pair was offered to the daemon; what each end read."""
    api = RefusingApi(code)
    with _socks_pair(api) as (client, server, _proxy):
        server.sendall(b"ping")
        client.sendall(b"ping")
        at_client = client.recv(100)
        at_server = server.recv(100)
    return at_client, at_server, api


def test_a_refused_take_over_is_copied() -> None:
    at_client, at_server, api = _through_proxy("ESTATE")
    assert api.calls == 1
    assert (at_client, at_server) == (b"ping", b"ping")


def test_a_take_over_that_failed_after_the_point_of_no_return_is_closed() -> None:
    api = RefusingApi("ECONNRESET")
    with _socks_pair(api) as (client, server, proxy):
        proxy.join(timeout=5)
        assert not proxy.is_alive()  # done with the pair: not copying it
        # Closed, not copied: both ends read EOF (the daemon would have reset them).
        assert (client.recv(100), server.recv(100)) == (b"", b"")
    assert api.calls == 1


def test_a_connection_that_ends_within_the_budget_is_copied_and_never_offered() -> None:
    api = RefusingApi("ESTATE")
    with _socks_pair(api, splice_after=1 << 20) as (client, server, _proxy):
        body = bytes(range(256)) * 64
        client.sendall(b"request")
        assert _read(server, 7) == b"request"
        server.sendall(body)
        server.shutdown(socket.SHUT_WR)  # the response's end, then the client's
        assert _read(client, len(body) + 1) == body
        client.shutdown(socket.SHUT_WR)
        assert server.recv(1) == b""
    assert api.calls == 0


def test_a_connection_past_the_budget_is_offered_after_what_crossed() -> None:
    api = RefusingApi("ESTATE")  # refused: the proxy copies on, nothing lost
    with _socks_pair(api, splice_after=1000) as (client, server, _proxy):
        server.sendall(b"a" * 999)
        assert _read(client, 999) == b"a" * 999
        assert api.calls == 0  # 999 bytes: still within the budget
        server.sendall(b"b" * 2)
        assert _read(client, 2) == b"bb"
        assert api.offered.wait(5)
        assert api.calls == 1
        server.sendall(b"after")
        assert _read(client, 5) == b"after"


def test_sigterm_exits_zero_without_a_traceback(daemon: FakeDaemon) -> None:
    """Closing its API connection on the way out must not look like the daemon going
    away: the watcher took it for that, signalled the proxy again in the middle of its
    exit (a traceback) and made it exit 1 with "the splice daemon went away"."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = start_process("proxies.socks5_kernel", daemon.path, "--listen", f"127.0.0.1:{port}")
    assert stop_process(process) == 0
    assert process.stderr is not None
    stderr = process.stderr.read()
    assert b"Traceback" not in stderr and b"went away" not in stderr, stderr


@pytest.mark.parametrize(
    ("client_rtt_us", "server_rtt_us", "budget", "want"),
    [
        (80, 60, 65536, 65536),  # a LAN both ways: copy first
        (900, 50, 65536, 65536),  # far longer, but under a millisecond: copy first
        (20_000, 4_000, 65536, 0),  # 5x and over a millisecond: at once
        (20_000, 5_000, 65536, 65536),  # 4x exactly: copy first
        (20_000, 20, 65536, 0),  # the 10 ms client link that cost 23 Mbit/s: at once
        (20_000, 100, 0, 0),  # at once already
        (20_000, 0, 65536, 0),  # the server socket has no sample yet: at once
    ],
)
def test_a_client_far_away_is_handed_over_before_anything_is_copied(
    client_rtt_us: int, server_rtt_us: int, budget: int, want: int
) -> None:
    assert copy_budget(budget, client_rtt_us, server_rtt_us) == want


def test_the_smoothed_rtt_is_read_from_the_kernel() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        with client, accepted:
            accepted.sendall(b"x")
            assert client.recv(1) == b"x"
            client.sendall(b"y")
            assert accepted.recv(1) == b"y"
            rtt = smoothed_rtt_us(client)
            assert 0 < rtt < 1_000_000  # loopback: a sample, and a small one
            # Under 10 ms: not a neighbouring field (tcpi_ato ~40 ms, tcpi_rto 200 ms,
            # tcpi_snd_mss and tcpi_rcv_ssthresh ~65 K on loopback).
            assert rtt < 10_000, rtt
