"""proxies/socks5_kernel.serve_client when splice_sockets fails: copy, or close on ECONNRESET.

No root, no daemon: loopback sockets and a stand-in for the API client.
Most errors leave the sockets the proxy's (docs/api.md): it copies and the
client sees no difference.  ECONNRESET means the daemon took them over and
then failed: they transmit nothing, so the proxy closes them.
"""

from __future__ import annotations

import socket
import struct
import threading

from daemon.api.replies import SpliceError
from proxies.socks5_kernel import serve_client
from proxies.socks5_spliced import SplicedConfig


class RefusingApi:
    def __init__(self, code: str) -> None:
        self.code = code
        self.calls = 0

    def splice_sockets(self, client: socket.socket, server: socket.socket) -> None:
        self.calls += 1
        raise SpliceError(self.code, "refused by the test")


def _through_proxy(code: str) -> tuple[bytes, bytes, RefusingApi]:
    """A SOCKS5 CONNECT to a loopback origin, then b"ping" each way; what each end read."""
    origin = socket.create_server(("127.0.0.1", 0))
    front = socket.create_server(("127.0.0.1", 0))
    api = RefusingApi(code)
    with origin, front:
        client = socket.create_connection(front.getsockname(), timeout=5)
        accepted, peer = front.accept()
        proxy = threading.Thread(
            target=serve_client, args=(api, accepted, peer, SplicedConfig()), daemon=True
        )
        proxy.start()
        with client:
            port = origin.getsockname()[1]
            client.sendall(b"\x05\x01\x00")
            assert client.recv(2) == b"\x05\x00"
            client.sendall(
                b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port)
            )
            reply = b""
            while len(reply) < 10:
                reply += client.recv(10 - len(reply))
            assert reply[:2] == b"\x05\x00"
            server, _ = origin.accept()
            with server:
                server.settimeout(5)
                server.sendall(b"ping")
                client.sendall(b"ping")
                at_client = client.recv(100)
                at_server = server.recv(100)
        proxy.join(timeout=5)
        assert not proxy.is_alive()
    return at_client, at_server, api


def test_a_refused_take_over_is_copied() -> None:
    at_client, at_server, api = _through_proxy("ESTATE")
    assert api.calls == 1
    assert (at_client, at_server) == (b"ping", b"ping")


def test_a_take_over_that_failed_after_the_point_of_no_return_is_closed() -> None:
    at_client, at_server, api = _through_proxy("ECONNRESET")
    assert api.calls == 1
    # Closed, not copied: both ends read EOF (the daemon would have reset them).
    assert (at_client, at_server) == (b"", b"")
