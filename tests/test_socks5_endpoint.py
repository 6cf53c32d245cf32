"""The SOCKS5 proxy over the splice daemon's TCP endpoint, against a fake daemon (no root).

The daemon is test_api_server's ``FakeCore`` behind the real ``ApiServer``,
extended into ``BridgingCore``: a daemon ``connect`` to a routed address ends
at a real TCP server on 127.0.0.1 (the loop pumps between the daemon end of
the socketpair and a kernel TCP socket, FIN for EOF both ways), so the origin
side of every test is real TCP. SOCKS clients attach the way real ones reach
the daemon's TUN: a daemon ``connect`` to the proxy's listen address, which
the fake pairs with the proxy's ``accept``.

The proxy runs as a subprocess, exactly as its CLI is used.
"""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.api.client import Connection, SpliceClient, SpliceError
from daemon.api.core import ApiError, Done, Result
from daemon.api.protocol import Address, ErrorCode
from daemon.api.server import ApiServer
from tests.sockutil import payload, recv_exactly, recv_to_eof, sha256, wait_until
from tests.test_api_server import (
    LOCAL,
    SILENT_HOST,
    UNREACHABLE_HOST,
    FakeCore,
    LoopThread,
    sock_dir,
)

__all__ = ["sock_dir"]  # the fixture, re-exported for pytest

REPO = Path(__file__).resolve().parent.parent
SERVICE: Address = ("192.0.2.1", 1080)  # where the proxy listens, in the daemon
SOURCE = "198.51.100.1"  # a daemon address the proxy may connect from
ORIGIN: Address = ("203.0.113.2", 80)  # bridged to a real TCP server on 127.0.0.1
NET_UNREACHABLE_HOST = "203.0.113.77"
SERVED_SOURCES = {SOURCE, LOCAL[0]}  # local addresses the fake daemon accepts for connect
FIRST_EPHEMERAL = 49152


# -- the fake daemon, with connects bridged to real TCP -----------------------------------


class BridgingCore(FakeCore):
    """``FakeCore`` whose ``connect`` to an address in ``routes`` reaches a real TCP server.

    Also: ``NET_UNREACHABLE_HOST`` fails with ENETUNREACH, a ``local`` address
    the daemon does not serve with EADDRNOTAVAIL, and a port-0 ``local`` gets an
    ephemeral port, as a real endpoint would pick.

    A bridge is copied by two threads of its own, not by the loop: the loop's
    pump blocks in sendall(), and with the proxy in the middle one blocked loop
    would wait on itself (server side full -> proxy cannot drain the client side).
    """

    def __init__(self, selector: selectors.BaseSelector) -> None:
        super().__init__(selector)
        self.routes: dict[Address, Address] = {}
        self.connects: list[tuple[Address, Address | None]] = []
        self.bridged_locals: list[Address] = []  # the local address of each bridged connect
        self._bridges: dict[int, socket.socket] = {}  # daemon conn id -> its TCP socket
        self._outbound: dict[int, threading.Thread] = {}  # daemon conn id -> fd-to-TCP copier

    def connect(
        self,
        owner: int,
        remote: Address,
        local: Address | None,
        timeout: float,
        conn: int | None,
        done: Done,
    ) -> None:
        self.connects.append((remote, local))
        if local is not None and local[0] not in SERVED_SOURCES:
            done(ApiError(ErrorCode.EADDRNOTAVAIL, f"{local[0]} is not ours"), None)
            return
        if remote[0] == NET_UNREACHABLE_HOST:
            done(ApiError(ErrorCode.ENETUNREACH, "no route to the network"), None)
            return
        target = self.routes.get(remote)
        if target is None:
            super().connect(owner, remote, local, timeout, conn, done)
            return
        try:
            # Blocks the loop, but only for a loopback handshake.
            tcp = socket.create_connection(target, timeout=5)
        except ConnectionRefusedError:
            done(ApiError(ErrorCode.ECONNREFUSED, f"RST from {remote}"), None)
            return
        tcp.settimeout(None)
        if local is None:
            here = LOCAL
        elif local[1] == 0:  # the daemon picks a port, as a kernel would
            here = (local[0], FIRST_EPHEMERAL + len(self.connects))
        else:
            here = local
        self.bridged_locals.append(here)
        conn_id, proxy_end = self._pair(owner, remote, here)
        daemon_end = self.conns[conn_id].sock
        assert daemon_end is not None
        self.selector.unregister(daemon_end)
        daemon_end.settimeout(None)
        self._bridges[conn_id] = tcp
        outbound = threading.Thread(target=_copy_until_eof, args=(daemon_end, tcp), daemon=True)
        outbound.start()
        self._outbound[conn_id] = outbound
        threading.Thread(target=_copy_until_eof, args=(tcp, daemon_end), daemon=True).start()
        done({"conn": conn_id, "peer": list(remote), "local": list(here)}, proxy_end)

    def close(self, owner: int, conn: int) -> Result:
        self._deliver_written(conn)
        return super().close(owner, conn)

    def _deliver_written(self, conn_id: int) -> None:
        """docs/api.md, close: FIN goes *after* the data already written to the fd.

        ``FakeCore.close`` frees at once and would drop what the loop has not
        pumped yet; a proxy closes its fd before the ``close`` op, so the rest of
        the data and the EOF are already waiting in the socket.
        """
        outbound = self._outbound.pop(conn_id, None)
        if outbound is not None:
            outbound.join(timeout=5)
            return
        conn = self.conns.get(conn_id)
        while conn is not None and conn.sock is not None and self._pumped(conn.sock):
            if not select.select([conn.sock], [], [], 0)[0]:
                return  # the proxy still holds its fd open: nothing more is due now
            self._pump(conn)

    def _pumped(self, sock: socket.socket) -> bool:
        """Still pumped by the loop, i.e. its EOF has not been carried across yet."""
        try:
            self.selector.get_key(sock)
        except KeyError:
            return False
        return True

    def _free(self, conn_id: int) -> None:
        partner = self.conns[conn_id].partner
        if partner is not None and partner.sock is not None:
            # The freed side's TCP connection ends, so its peer sees a FIN (FakeCore
            # leaves the peer hanging, which no real network does).
            with contextlib.suppress(OSError):
                partner.sock.shutdown(socket.SHUT_WR)
        self._outbound.pop(conn_id, None)
        tcp = self._bridges.pop(conn_id, None)
        if tcp is not None:
            daemon_end = self.conns[conn_id].sock
            for sock in (tcp, daemon_end):
                if sock is not None:
                    # Wakes the copy threads blocked in recv() before the close.
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            tcp.close()
        super()._free(conn_id)


def _copy_until_eof(source: socket.socket, sink: socket.socket) -> None:
    """One direction of a bridge: bytes, then EOF as shutdown(SHUT_WR) (a FIN on TCP)."""
    with contextlib.suppress(OSError):  # the conn was freed meanwhile
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)


@dataclass
class FakeDaemon:
    path: str
    loop: LoopThread
    core: BridgingCore
    server: ApiServer

    def conn_count(self) -> int:
        return self.loop.call(lambda: len(self.core.conns))


@pytest.fixture
def daemon(sock_dir: str) -> Iterator[FakeDaemon]:
    loop = LoopThread()
    core = BridgingCore(loop.selector)
    path = os.path.join(sock_dir, "spliced.sock")
    server = ApiServer(path, core)
    core.sink = server
    server.register(loop.selector)
    loop.start()
    try:
        yield FakeDaemon(path, loop, core, server)
    finally:
        with contextlib.suppress(Exception):
            loop.call(server.close)
        loop.stop()


# -- the origin: a real TCP server on loopback, one handler thread per connection ---------


class Origin:
    """Accepts on 127.0.0.1 and runs ``handler(conn)`` for each connection; reached as ORIGIN."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address: Address = self.listener.getsockname()[:2]
        self.handler = handler
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            with conn:
                self.handler(conn)
        except BaseException as exc:
            self.errors.append(exc)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def origin(daemon: FakeDaemon, handler: Callable[[socket.socket], None]) -> Iterator[Origin]:
    server = Origin(handler)
    daemon.loop.call(lambda: daemon.core.routes.__setitem__(ORIGIN, server.address))
    try:
        yield server
    finally:
        server.close()
    assert not server.errors, server.errors


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


# -- the proxy under test, as a subprocess --------------------------------------------------


def start_proxy(daemon_path: str, *extra: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxies.socks5_endpoint",
            "--daemon",
            daemon_path,
            "--listen",
            f"{SERVICE[0]}:{SERVICE[1]}",
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=10):
            process.kill()
            raise AssertionError("proxy did not print ready")
    line = process.stdout.readline()
    if line != b"ready\n":
        process.kill()
        assert process.stderr is not None
        raise AssertionError(f"proxy said {line!r}: {process.stderr.read()!r}")
    return process


def stop_proxy(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running_proxy(daemon: FakeDaemon, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    process = start_proxy(daemon.path, *extra)
    try:
        yield process
    finally:
        stop_proxy(process)


@pytest.fixture
def proxy(daemon: FakeDaemon) -> Iterator[subprocess.Popen[bytes]]:
    with running_proxy(daemon) as process:
        yield process


@pytest.fixture
def clients(daemon: FakeDaemon) -> Iterator[SpliceClient]:
    """The SOCKS clients' side of the daemon: each connect() reaches the proxy's accept."""
    with SpliceClient(daemon.path) as api:
        yield api


# -- a raw SOCKS5 client, written from RFC 1928 independently of the code under test -------


@dataclass
class SocksReply:
    code: int
    bound: Address


def ipv4_address(host: str, port: int) -> bytes:
    return b"\x01" + socket.inet_aton(host) + struct.pack("!H", port)


def domain_address(name: str, port: int) -> bytes:
    return b"\x03" + bytes([len(name)]) + name.encode() + struct.pack("!H", port)


def socks_connect(api: SpliceClient, address_part: bytes) -> tuple[Connection, SocksReply]:
    conn = api.connect(SERVICE)
    conn.settimeout(30)
    conn.sendall(b"\x05\x01\x00")
    assert recv_exactly(conn.sock, 2) == b"\x05\x00"
    conn.sendall(b"\x05\x01\x00" + address_part)
    head = recv_exactly(conn.sock, 4)
    assert head[:1] == b"\x05" and head[3] == 1, head  # IPv4 BND in these tests
    body = recv_exactly(conn.sock, 6)
    (port,) = struct.unpack("!H", body[4:])
    return conn, SocksReply(head[1], (socket.inet_ntoa(body[:4]), port))


def send_all_then_fin(conn: Connection, data: bytes) -> None:
    conn.sendall(data)
    conn.shutdown()


def assert_echo_works(api: SpliceClient) -> None:
    conn, reply = socks_connect(api, ipv4_address(*ORIGIN))
    with conn:
        assert reply.code == 0
        conn.sendall(b"still serving")
        assert recv_exactly(conn.sock, 13) == b"still serving"


# -- data ------------------------------------------------------------------------------------


@pytest.mark.parametrize("copy", ["splice", "buffer"])
def test_one_megabyte_each_way_at_once_arrives_intact(
    daemon: FakeDaemon, clients: SpliceClient, copy: str
) -> None:
    upload, download = payload(1 << 20, 1), payload(1 << 20, 2)
    received: list[bytes] = []

    def sink_and_source(conn: socket.socket) -> None:
        # Both directions at once: reading in a second thread keeps the proxy's
        # two relay threads busy simultaneously.
        reader = threading.Thread(target=lambda: received.append(recv_to_eof(conn)))
        reader.start()
        conn.sendall(download)
        conn.shutdown(socket.SHUT_WR)
        reader.join(timeout=30)

    with running_proxy(daemon, "--copy", copy), origin(daemon, sink_and_source):
        conn, reply = socks_connect(clients, ipv4_address(*ORIGIN))
        with conn, ThreadPoolExecutor(1) as pool:
            assert reply.code == 0
            sending = pool.submit(send_all_then_fin, conn, upload)
            got = recv_to_eof(conn.sock)
            sending.result(timeout=30)
    assert sha256(got) == sha256(download)
    assert [sha256(r) for r in received] == [sha256(upload)]


def test_client_fin_reaches_origin_while_answer_still_flows(
    daemon: FakeDaemon, proxy: subprocess.Popen[bytes], clients: SpliceClient
) -> None:
    request, answer = payload(300_000, 3), payload(700_000, 4)
    seen: list[bytes] = []

    def answer_after_eof(conn: socket.socket) -> None:
        seen.append(recv_to_eof(conn))  # returns only once the client's FIN got through
        conn.sendall(answer)

    with origin(daemon, answer_after_eof):
        conn, reply = socks_connect(clients, ipv4_address(*ORIGIN))
        with conn:
            assert reply.code == 0
            conn.sendall(request)
            conn.shutdown()
            got = recv_to_eof(conn.sock)
    assert sha256(seen[0]) == sha256(request)
    assert sha256(got) == sha256(answer)


def test_origin_fin_reaches_client_while_upload_still_flows(
    daemon: FakeDaemon, proxy: subprocess.Popen[bytes], clients: SpliceClient
) -> None:
    upload = payload(500_000, 5)
    seen: list[bytes] = []

    def greet_then_listen(conn: socket.socket) -> None:
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)
        seen.append(recv_to_eof(conn))

    with origin(daemon, greet_then_listen):
        conn, reply = socks_connect(clients, ipv4_address(*ORIGIN))
        with conn:
            assert reply.code == 0
            assert recv_to_eof(conn.sock) == b"hello"  # the origin's FIN, carried across
            conn.sendall(upload)  # our direction is still open
            conn.shutdown()
            assert wait_until(lambda: bool(seen))
    assert sha256(seen[0]) == sha256(upload)


def test_early_data_after_request_reaches_origin(
    daemon: FakeDaemon, proxy: subprocess.Popen[bytes], clients: SpliceClient
) -> None:
    with origin(daemon, echo):
        conn = clients.connect(SERVICE)
        with conn:
            conn.settimeout(30)
            # Greeting, request and data in one write, before any reply is read.
            conn.sendall(b"\x05\x01\x00" + b"\x05\x01\x00" + ipv4_address(*ORIGIN) + b"early")
            assert recv_exactly(conn.sock, 2 + 10)[3] == 0x00
            assert recv_exactly(conn.sock, 5) == b"early"


def test_domain_name_is_resolved_by_the_proxy(
    daemon: FakeDaemon, proxy: subprocess.Popen[bytes], clients: SpliceClient
) -> None:
    with origin(daemon, echo) as server:
        # The daemon takes no names: the proxy must resolve "localhost" and ask for
        # 127.0.0.1 (after ::1, which the fake refuses, if the resolver lists it first).
        route = ("127.0.0.1", server.address[1])
        daemon.loop.call(lambda: daemon.core.routes.__setitem__(route, server.address))
        conn, reply = socks_connect(clients, domain_address("localhost", server.address[1]))
        with conn:
            assert reply.code == 0
            conn.sendall(b"by name")
            assert recv_exactly(conn.sock, 7) == b"by name"
    connects = daemon.loop.call(lambda: list(daemon.core.connects))
    remotes = [remote for remote, _ in connects if remote != SERVICE]  # not the test's own
    assert route in remotes
    assert all(host in ("127.0.0.1", "::1") for host, _ in remotes)


def test_success_reply_names_the_outgoing_connection_from_source(
    daemon: FakeDaemon, clients: SpliceClient
) -> None:
    with running_proxy(daemon, "--source", SOURCE), origin(daemon, echo):
        conn, reply = socks_connect(clients, ipv4_address(*ORIGIN))
        conn.close()
    connects = daemon.loop.call(lambda: list(daemon.core.connects))
    assert (ORIGIN, (SOURCE, 0)) in connects
    assert reply.code == 0
    chosen = daemon.loop.call(lambda: list(daemon.core.bridged_locals))
    assert chosen[0][0] == SOURCE and chosen[0][1] >= FIRST_EPHEMERAL
    assert reply.bound == chosen[0]


def test_many_clients_at_once(
    daemon: FakeDaemon, proxy: subprocess.Popen[bytes], clients: SpliceClient
) -> None:
    def one(index: int) -> str:
        data = payload(50_000 + index, index)
        conn, reply = socks_connect(clients, ipv4_address(*ORIGIN))
        with conn, ThreadPoolExecutor(1) as pool:
            assert reply.code == 0
            sending = pool.submit(send_all_then_fin, conn, data)
            got = recv_to_eof(conn.sock)
            sending.result(timeout=30)
        return sha256(got) if got == data else "corrupt"

    with origin(daemon, echo), ThreadPoolExecutor(20) as pool:
        digests = list(pool.map(one, range(20)))
    assert digests == [sha256(payload(50_000 + i, i)) for i in range(20)]


def test_finished_connections_are_released_in_the_daemon_and_the_process(
    daemon: FakeDaemon, proxy: subprocess.Popen[bytes], clients: SpliceClient
) -> None:
    fd_dir = Path(f"/proc/{proxy.pid}/fd")
    baseline = len(list(fd_dir.iterdir()))
    with origin(daemon, echo):
        for _ in range(3):
            assert_echo_works(clients)
        conn, reply = socks_connect(clients, ipv4_address(ORIGIN[0], 9))
        conn.close()
        assert reply.code == 0x05
    # The test's own conns are closed; the proxy must have sent `close` for its
    # two per client (and for the refused one), and closed their descriptors.
    assert wait_until(lambda: daemon.conn_count() == 0), daemon.loop.call(
        lambda: dict(daemon.core.conns)
    )
    assert wait_until(lambda: len(list(fd_dir.iterdir())) == baseline)


# -- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "code"),
    [
        (ORIGIN[0], 9, 0x05),  # FakeCore: nobody listens there -> ECONNREFUSED
        (UNREACHABLE_HOST, 80, 0x04),  # EHOSTUNREACH
        (NET_UNREACHABLE_HOST, 80, 0x03),  # ENETUNREACH
        (SILENT_HOST, 80, 0x06),  # ETIMEDOUT
    ],
)
def test_connect_error_gets_its_reply_then_a_clean_close_and_next_client_is_served(
    daemon: FakeDaemon,
    proxy: subprocess.Popen[bytes],
    clients: SpliceClient,
    host: str,
    port: int,
    code: int,
) -> None:
    with origin(daemon, echo):
        conn, reply = socks_connect(clients, ipv4_address(host, port))
        with conn:
            assert reply.code == code
            assert reply.bound == ("0.0.0.0", 0)
            assert conn.recv(1) == b""  # FIN after the reply, not a reset
        assert_echo_works(clients)


def test_real_tcp_refusal_gets_reply_0x05(
    daemon: FakeDaemon, proxy: subprocess.Popen[bytes], clients: SpliceClient
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        closed_port = probe.getsockname()[1]
    daemon.loop.call(lambda: daemon.core.routes.__setitem__(ORIGIN, ("127.0.0.1", closed_port)))
    conn, reply = socks_connect(clients, ipv4_address(*ORIGIN))
    with conn:
        assert reply.code == 0x05
        assert conn.recv(1) == b""


def test_other_daemon_errors_get_general_failure(daemon: FakeDaemon, clients: SpliceClient) -> None:
    # 192.0.2.200 is not an address the daemon serves: EADDRNOTAVAIL -> 0x01.
    with running_proxy(daemon, "--source", "192.0.2.200"), origin(daemon, echo):
        conn, reply = socks_connect(clients, ipv4_address(*ORIGIN))
        with conn:
            assert reply.code == 0x01
            assert conn.recv(1) == b""


def test_auth_required_refuses_wrong_password_and_serves_right_one(
    daemon: FakeDaemon, clients: SpliceClient
) -> None:
    def attempt(password: bytes) -> bytes:
        conn = clients.connect(SERVICE)
        with conn:
            conn.settimeout(30)
            conn.sendall(b"\x05\x01\x02")
            assert recv_exactly(conn.sock, 2) == b"\x05\x02"
            conn.sendall(b"\x01\x01u" + bytes([len(password)]) + password)
            status = recv_exactly(conn.sock, 2)
            if status == b"\x01\x00":
                conn.sendall(b"\x05\x01\x00" + ipv4_address(*ORIGIN))
                assert recv_exactly(conn.sock, 10)[1] == 0
                conn.sendall(b"authed")
                assert recv_exactly(conn.sock, 6) == b"authed"
            else:
                assert conn.recv(1) == b""  # RFC 1929: the server closes
            return status

    with running_proxy(daemon, "--user", "u", "--password", "pw"), origin(daemon, echo):
        assert attempt(b"wrong") == b"\x01\x01"
        assert attempt(b"pw") == b"\x01\x00"


def test_malformed_greeting_is_closed_and_next_client_is_served(
    daemon: FakeDaemon, proxy: subprocess.Popen[bytes], clients: SpliceClient
) -> None:
    with origin(daemon, echo):
        conn = clients.connect(SERVICE)
        with conn:
            conn.settimeout(30)
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert conn.recv(1) == b""
        assert_echo_works(clients)


# -- process behaviour ----------------------------------------------------------------------


def run_proxy(daemon_path: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "proxies.socks5_endpoint",
            "--daemon",
            daemon_path,
            "--listen",
            f"{SERVICE[0]}:{SERVICE[1]}",
        ],
        cwd=REPO,
        capture_output=True,
        timeout=30,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[bytes], *words: bytes) -> None:
    assert result.returncode != 0
    assert b"ready" not in result.stdout
    assert b"Traceback" not in result.stderr
    assert result.stderr.count(b"\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr


def test_missing_daemon_socket_exits_nonzero_with_message(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "nobody.sock")
    result = run_proxy(path)
    assert_one_line_error(result, path.encode(), os.strerror(2).encode())


def test_daemon_socket_that_refuses_exits_nonzero_with_message(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(path)  # bound but not listening: connect() is refused
        result = run_proxy(path)
    assert_one_line_error(result, path.encode(), b"refused")


def test_listen_address_in_use_exits_nonzero_with_message(
    daemon: FakeDaemon, clients: SpliceClient
) -> None:
    with clients.listen(SERVICE):
        result = run_proxy(daemon.path)
    assert_one_line_error(result, b"EADDRINUSE", f"{SERVICE[0]}:{SERVICE[1]}".encode())


def test_sigterm_exits_zero_and_frees_the_listen_address(
    daemon: FakeDaemon, clients: SpliceClient
) -> None:
    process = start_proxy(daemon.path)
    assert stop_proxy(process) == 0
    assert process.stderr is not None
    assert b"Traceback" not in process.stderr.read()
    clients.listen(SERVICE).close()  # raises EADDRINUSE if the proxy still held it


def test_sigterm_with_a_client_mid_relay_exits_zero(
    daemon: FakeDaemon, clients: SpliceClient
) -> None:
    process = start_proxy(daemon.path)
    with origin(daemon, echo):
        conn, reply = socks_connect(clients, ipv4_address(*ORIGIN))
        with conn:
            assert reply.code == 0
            assert stop_proxy(process) == 0
            # The daemon closed the proxy's unspliced connections: the client sees the end.
            assert recv_to_eof(conn.sock) == b""


def test_daemon_going_away_exits_nonzero_with_message(daemon: FakeDaemon) -> None:
    process = start_proxy(daemon.path)
    try:
        daemon.loop.call(daemon.server.close)
        assert process.wait(timeout=10) != 0
    finally:
        stop_proxy(process)
    assert process.stderr is not None
    stderr = process.stderr.read()
    assert b"went away" in stderr and b"Traceback" not in stderr


def test_listen_error_from_daemon_is_a_splice_error(daemon: FakeDaemon) -> None:
    # The fake must answer a second listen on the same address as the real daemon does,
    # or the in-use test above would prove nothing.
    with SpliceClient(daemon.path) as a, SpliceClient(daemon.path) as b, a.listen(SERVICE):
        with pytest.raises(SpliceError) as excinfo:
            b.listen(SERVICE)
        assert excinfo.value.code == "EADDRINUSE"
