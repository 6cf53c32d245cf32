"""The spliced SOCKS5 proxy (thesis Fig. 4.2) against a fake splicing daemon (no root).

``SpliceCore`` extends test_api_server's ``FakeCore`` (behind the real
``ApiServer``) with the part-2 ops, with semantics a test can observe:

* a daemon ``connect`` to an address in ``routes`` reaches a real TCP server
  on 127.0.0.1 (the origin), so the server side of every test is real TCP;
  clients reach the proxy as on the TUN: a daemon ``connect`` to its listen
  address, paired with the proxy's ``accept``;
* ``intend_splice(B)`` stops delivering the client's bytes to the proxy's fd
  and takes back what the proxy left unread there (the fake keeps a dup of
  the proxy's end, so it knows exactly how many bytes the proxy read);
* a reserved server side, once connected, carries what the proxy writes to
  the origin, but the origin's bytes wait in the kernel until the splice (the
  proxy may never read the server side, thesis 4.1);
* ``splice(B, S, len)`` hands both connections to a thread that relays the
  held client bytes and then client <-> origin, after forwarding exactly
  ``len`` bytes the proxy writes to the client fd; everything the proxy
  writes beyond that, or to the server fd, is counted in ``SpliceRecord``.

The proxy runs as a subprocess, exactly as its CLI is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from daemon.api.aio import AsyncConnection, AsyncSpliceClient
from daemon.api.client import Connection, SpliceClient
from daemon.api.core import ApiError, Done, Result
from daemon.api.protocol import Address, ErrorCode
from daemon.api.replies import with_local
from daemon.api.server import ApiServer
from proxies.socks5_protocol import Connect, Negotiation, Reject, Request, SendToClient
from proxies.socks5_spliced import feed_exactly, read_request
from tests.sockutil import payload, recv_exactly, recv_to_eof, sha256, wait_until
from tests.test_api_server import (
    LOCAL,
    SILENT_HOST,
    UNREACHABLE_HOST,
    FakeConn,
    FakeCore,
    LoopThread,
    sock_dir,
)

__all__ = ["sock_dir"]  # the fixture, re-exported for pytest

REPO = Path(__file__).resolve().parent.parent
SERVICE: Address = ("192.0.2.1", 1080)  # where the proxy listens, in the daemon
ORIGIN: Address = ("203.0.113.2", 80)  # routed to a real TCP server on 127.0.0.1
NET_UNREACHABLE_HOST = "203.0.113.77"
LIMITED_HOST = "203.0.113.88"  # the daemon answers ELIMIT: no errno, a general failure
FIRST_EPHEMERAL = 49152


def _drain_nonblocking(sock: socket.socket) -> tuple[bytes, bool]:
    """What is readable now, and whether EOF was seen."""
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return bytes(data), False
        if not chunk:
            return bytes(data), True
        data += chunk


def _copy_until_eof(source: socket.socket, sink: socket.socket) -> int:
    """One direction: bytes, then EOF as shutdown(SHUT_WR) (a FIN on TCP); bytes copied."""
    copied = 0
    with contextlib.suppress(OSError):  # the other side was torn down meanwhile
        while data := source.recv(1 << 16):
            sink.sendall(data)
            copied += len(data)
        sink.shutdown(socket.SHUT_WR)
    return copied


# -- the fake splicing daemon -------------------------------------------------------------


@dataclass
class SpliceRecord:
    """What one splice looked like from the daemon's side."""

    client: int
    server: int
    length: int
    proxy_read: int  # bytes the proxy consumed from the client fd before intend_splice
    held: bytes  # client bytes the daemon kept from intend_splice on
    written_after_splice: int = 0  # by the proxy to the client fd (must equal length)
    extra_to_client: int = 0  # beyond length: a violation
    written_to_server_fd: int = 0  # after the splice: a violation
    inline: bytes | None = None  # the len bytes, when connect_splice carried them
    done: threading.Event = field(default_factory=threading.Event)


class SpliceCore(FakeCore):
    """``FakeCore`` with routes to real TCP, and intend_splice/splice as described above."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        super().__init__(selector)
        self.routes: dict[Address, Address] = {}
        self.connects: list[tuple[Address, Address | None]] = []
        self.splices: list[SpliceRecord] = []
        self.delivered: dict[int, int] = {}  # accepted conn -> bytes put into the proxy's fd
        self.proxy_read: dict[int, int] = {}  # accepted conn -> bytes the proxy had read
        self._proxy_ends: dict[int, socket.socket] = {}  # accepted conn -> dup of the proxy's end
        self._held: dict[int, bytearray] = {}  # intended client conn -> bytes kept
        self._held_eof: set[int] = set()
        self._backlog: dict[int, bytearray] = {}  # accepted conn -> client bytes not yet in its fd
        self._client_eof: set[int] = set()  # accepted conn -> EOF to pass on after the backlog
        self._tcp: dict[int, socket.socket] = {}  # bridged conn -> its kernel TCP socket
        self._outbound: dict[int, threading.Thread] = {}  # plain bridged conn -> fd-to-TCP copier

    # -- connections ---------------------------------------------------------------------

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
        if conn is not None and self.conns[conn].state != "INTENDED":
            raise ApiError(ErrorCode.ESTATE, f"conn {conn} is not a reserved server side")
        if remote[0] == NET_UNREACHABLE_HOST:
            done(ApiError(ErrorCode.ENETUNREACH, "no route to the network"), None)
            return
        if remote[0] == LIMITED_HOST:
            done(ApiError(ErrorCode.ELIMIT, "too many connections"), None)
            return
        listener = next((lst for lst in self.listeners.values() if lst.addr == remote), None)
        if listener is not None and conn is None:
            self._connect_to_listener(owner, remote, local or LOCAL, listener.owner, done)
            return
        target = self.routes.get(remote)
        if target is None:  # the magic hosts of FakeCore: refused, unreachable, silent
            super().connect(owner, remote, local, timeout, conn, done)
            return
        try:
            tcp = socket.create_connection(target, timeout=5)  # loopback: blocks only briefly
        except ConnectionRefusedError:
            done(ApiError(ErrorCode.ECONNREFUSED, f"RST from {remote}"), None)
            return
        tcp.settimeout(None)
        here = (local[0], local[1] or FIRST_EPHEMERAL + len(self.connects)) if local else LOCAL
        conn_id, proxy_end = self._pair(owner, remote, here)
        daemon_end = self.conns[conn_id].sock
        assert daemon_end is not None
        self.selector.unregister(daemon_end)
        daemon_end.settimeout(None)
        if conn is not None:  # the reserved id takes over; the origin's bytes wait for splice
            self.conns[conn] = self.conns.pop(conn_id)
            conn_id = conn
            self.selector.register(
                daemon_end, selectors.EVENT_READ, lambda m: self._to_origin(conn_id)
            )
        else:  # an ordinary connection, copied both ways by threads of its own
            outbound = threading.Thread(target=_copy_until_eof, args=(daemon_end, tcp), daemon=True)
            outbound.start()
            self._outbound[conn_id] = outbound
            threading.Thread(target=_copy_until_eof, args=(tcp, daemon_end), daemon=True).start()
        self._tcp[conn_id] = tcp
        done({"conn": conn_id, "peer": list(remote), "local": list(here)}, proxy_end)

    def _connect_to_listener(
        self, owner: int, remote: Address, here: Address, listener_owner: int, done: Done
    ) -> None:
        """A client reaching the proxy: as FakeCore, but the fake keeps a dup of the proxy's end."""
        client_id, client_end = self._pair(owner, remote, here)
        proxy_id, proxy_end = self._pair(listener_owner, here, remote)
        client, accepted = self.conns[client_id], self.conns[proxy_id]
        client.partner, accepted.partner = accepted, client
        self._proxy_ends[proxy_id] = proxy_end.dup()
        self.delivered[proxy_id] = 0
        self._backlog[proxy_id] = bytearray()
        assert client.sock is not None and accepted.sock is not None
        # Non-blocking, so a full fd never stalls the loop (a timeout would fire instead).
        accepted.sock.setblocking(False)
        self.selector.modify(accepted.sock, selectors.EVENT_READ, self._accepted_ready(proxy_id))
        self.selector.modify(
            client.sock, selectors.EVENT_READ, lambda m: self._from_client(client_id, proxy_id)
        )
        listener = next(lst for lst in self.listeners.values() if lst.addr == remote)
        result: tuple[Result, socket.socket] = (
            {"conn": proxy_id, "peer": list(here), "local": list(remote)},
            proxy_end,
        )
        if listener.waiting:
            listener.waiting.popleft()(*result)
        else:
            listener.backlog.append(result)
        done({"conn": client_id, "peer": list(remote), "local": list(here)}, client_end)

    def _from_client(self, client_id: int, proxy_id: int) -> None:
        """The client's bytes: towards the proxy's fd, or held once the proxy intends a splice."""
        client = self.conns.get(client_id)
        if client is None or client.sock is None or client.state == "SPLICED":
            return  # freed or spliced earlier in this select() batch
        data = client.sock.recv(1 << 16)
        if not data:
            self.selector.unregister(client.sock)
            if proxy_id in self._held:
                self._held_eof.add(proxy_id)
            else:
                self._client_eof.add(proxy_id)
                self._deliver(proxy_id)
            return
        if proxy_id in self._held:
            self._held[proxy_id] += data
        else:
            self._backlog[proxy_id] += data
            self._deliver(proxy_id)

    def _deliver(self, proxy_id: int) -> None:
        """Write the backlog into the proxy's fd without blocking the loop.

        A proxy that reads only its request head leaves the fd full (a POST
        body); the real daemon then closes its TCP window, the fake keeps the
        rest here and waits for the fd to become writable.
        """
        accepted = self.conns.get(proxy_id)
        if accepted is None or accepted.sock is None or accepted.state != "ESTABLISHED":
            return
        backlog = self._backlog[proxy_id]
        while backlog:
            try:
                sent = accepted.sock.send(backlog)
            except BlockingIOError:
                break
            except OSError:
                backlog.clear()
                break
            self.delivered[proxy_id] += sent
            del backlog[:sent]
        self._watch(proxy_id, write=bool(backlog))
        if not backlog and proxy_id in self._client_eof:
            self._client_eof.discard(proxy_id)
            with contextlib.suppress(OSError):
                accepted.sock.shutdown(socket.SHUT_WR)

    def _watch(self, proxy_id: int, *, write: bool) -> None:
        accepted = self.conns[proxy_id]
        assert accepted.sock is not None
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        try:
            if self.selector.get_key(accepted.sock).events != events:
                self.selector.modify(accepted.sock, events, self._accepted_ready(proxy_id))
        except KeyError:  # the proxy's side already ended: only delivery is left
            if write:
                self.selector.register(
                    accepted.sock, selectors.EVENT_WRITE, self._accepted_ready(proxy_id)
                )

    def _accepted_ready(self, proxy_id: int) -> Callable[[int], None]:
        def ready(mask: int) -> None:
            accepted = self.conns.get(proxy_id)
            if accepted is None:
                return
            if mask & selectors.EVENT_READ:
                self._pump(accepted)
            if mask & selectors.EVENT_WRITE or self._backlog.get(proxy_id):
                self._deliver(proxy_id)

        return ready

    def _to_origin(self, conn_id: int) -> None:
        """What the proxy writes to a reserved server side before the splice."""
        conn = self.conns.get(conn_id)
        if conn is None or conn.sock is None or conn.state == "SPLICED":
            return  # spliced earlier in this select() batch
        data = conn.sock.recv(1 << 16)
        if data:
            self._tcp[conn_id].sendall(data)
            return
        self.selector.unregister(conn.sock)
        with contextlib.suppress(OSError):
            self._tcp[conn_id].shutdown(socket.SHUT_WR)

    def _pump(self, conn: FakeConn) -> None:
        if conn.state != "SPLICED":  # else spliced earlier in this select() batch
            super()._pump(conn)

    def _flush(self, conn_id: int) -> None:
        """Handle now what the proxy wrote before this op (docs/api.md: close and splice
        come after the data already written), instead of whenever the loop gets to it."""
        conn = self.conns.get(conn_id)
        while conn is not None and conn.sock is not None and conn.state != "SPLICED":
            try:
                key = self.selector.get_key(conn.sock)
            except KeyError:
                return
            if not select_readable(conn.sock):
                return
            key.data(selectors.EVENT_READ)

    def close(self, owner: int, conn: int) -> Result:
        outbound = self._outbound.pop(conn, None)
        if outbound is not None:
            outbound.join(timeout=5)  # the proxy closed its fd first: the copy ends at EOF
        self._flush(conn)
        return super().close(owner, conn)

    def _free(self, conn_id: int) -> None:
        conn = self.conns[conn_id]
        if conn.state == "SPLICED":  # the splice thread owns the sockets now
            del self.conns[conn_id]
            return
        dup = self._proxy_ends.pop(conn_id, None)
        if dup is not None:
            dup.close()
        partner = conn.partner
        if partner is not None and partner.sock is not None and partner.state != "SPLICED":
            # Its TCP peer is gone, so the other end sees a FIN (FakeCore leaves it hanging).
            with contextlib.suppress(OSError):
                partner.sock.shutdown(socket.SHUT_WR)
        tcp = self._tcp.pop(conn_id, None)
        if tcp is not None:
            for sock in (tcp, conn.sock):
                if sock is not None:  # wakes copy threads blocked in recv()
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            tcp.close()
        super()._free(conn_id)

    # -- part 2 --------------------------------------------------------------------------

    def intend_splice(self, owner: int, conn: int) -> Result:
        accepted = self.conns[conn]
        if accepted.state != "ESTABLISHED" or conn not in self._proxy_ends:
            raise ApiError(ErrorCode.ESTATE, f"conn {conn} cannot be intended")
        accepted.state = "INTENDED_CLIENT"
        # The proxy may not read any more: what it left unread goes back to the daemon.
        dup = self._proxy_ends.pop(conn)
        unread, eof = _drain_nonblocking(dup)
        dup.close()
        self.proxy_read[conn] = self.delivered[conn] - len(unread)
        self._held[conn] = bytearray(unread) + self._backlog.pop(conn, bytearray())
        self._watch(conn, write=False)
        if eof or conn in self._client_eof:
            self._held_eof.add(conn)
        return super().intend_splice(owner, conn)

    def splice(
        self, owner: int, client: int, server: int, length: int, unread: bytes = b""
    ) -> Result:
        accepted, outgoing = self.conns[client], self.conns[server]
        # Handed back by the client library; this fake already took everything
        # unread at intend_splice, so it only ever receives an empty string.
        self._held[client][:0] = unread
        if accepted.state != "INTENDED_CLIENT" or server not in self._tcp:
            raise ApiError(ErrorCode.ESTATE, f"{client} / {server} cannot be spliced")
        self._flush(client)  # e.g. the method selection, written before the splice
        self._flush(server)  # e.g. a forwarded HTTP request
        peer = accepted.partner
        assert peer is not None and peer.sock is not None
        assert accepted.sock is not None and outgoing.sock is not None
        for sock in (accepted.sock, outgoing.sock, peer.sock):
            with contextlib.suppress(KeyError):
                self.selector.unregister(sock)
        for conn in (accepted, outgoing, peer):
            conn.state = "SPLICED"
        record = SpliceRecord(
            client, server, length, self.proxy_read[client], bytes(self._held.pop(client))
        )
        inline = self.inline_next.get(client)
        if inline is not None:  # connect_splice brought the len bytes: the daemon sends them
            record.inline = (
                inline.data
                if inline.local_at is None
                else with_local(inline.data, inline.local_at, outgoing.local)
            )
        self.splices.append(record)
        threading.Thread(
            target=_relay_spliced,
            args=(
                record,
                client in self._held_eof,
                peer.sock,
                accepted.sock,
                outgoing.sock,
                self._tcp.pop(server),
            ),
            daemon=True,
        ).start()
        return {}


def select_readable(sock: socket.socket) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        return bool(sel.select(0))


def _relay_spliced(
    record: SpliceRecord,
    client_eof: bool,
    client: socket.socket,  # the daemon's end towards the SOCKS/HTTP client
    proxy_client_fd: socket.socket,  # the daemon's end of the proxy's client fd
    proxy_server_fd: socket.socket,  # the daemon's end of the proxy's server fd
    origin: socket.socket,
) -> None:
    """The daemon relaying a splice, with the thesis 4.1 rules checked on the proxy."""

    def upstream() -> None:
        with contextlib.suppress(OSError):
            origin.sendall(record.held)
            if client_eof:
                origin.shutdown(socket.SHUT_WR)
                return
        _copy_until_eof(client, origin)

    def watch_server_fd() -> None:
        record.written_to_server_fd = len(recv_to_eof_quiet(proxy_server_fd))

    threads = [threading.Thread(target=upstream), threading.Thread(target=watch_server_fd)]
    for thread in threads:
        thread.start()
    try:
        proxy_client_fd.settimeout(10)
        if record.inline is None:
            allowed = recv_up_to(proxy_client_fd, record.length)
        else:
            allowed = record.inline
        record.written_after_splice = len(allowed)
        client.sendall(allowed)  # the proxy's last words come before the origin's bytes
        _copy_until_eof(origin, client)
        record.extra_to_client = len(recv_to_eof_quiet(proxy_client_fd))
        for thread in threads:
            thread.join(timeout=30)
    finally:
        for sock in (client, proxy_client_fd, proxy_server_fd, origin):
            sock.close()
        record.done.set()


def recv_up_to(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    with contextlib.suppress(OSError):
        while len(data) < count and (chunk := sock.recv(count - len(data))):
            data += chunk
    return bytes(data)


def recv_to_eof_quiet(sock: socket.socket) -> bytes:
    data = bytearray()
    with contextlib.suppress(OSError):
        sock.settimeout(10)
        while chunk := sock.recv(1 << 16):
            data += chunk
    return bytes(data)


@dataclass
class FakeDaemon:
    path: str
    loop: LoopThread
    core: SpliceCore
    server: ApiServer

    def call(self, fn: Callable[[], object]) -> object:
        return self.loop.call(fn)

    def splices(self) -> list[SpliceRecord]:
        return self.loop.call(lambda: list(self.core.splices))

    def conn_states(self) -> list[str]:
        return self.loop.call(lambda: [c.state for c in self.core.conns.values()])


@pytest.fixture
def daemon(sock_dir: str) -> Iterator[FakeDaemon]:
    loop = LoopThread()
    core = SpliceCore(loop.selector)
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


# -- the origin: a real TCP server on loopback ------------------------------------------------


class Origin:
    """Accepts on 127.0.0.1 and runs ``handler(conn)`` per connection; reached as ``address``."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address: Address = self.listener.getsockname()[:2]
        self.handler = handler
        self.errors: list[BaseException] = []
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
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
def origin(
    daemon: FakeDaemon, handler: Callable[[socket.socket], None], at: Address = ORIGIN
) -> Iterator[Origin]:
    server = Origin(handler)
    daemon.loop.call(lambda: daemon.core.routes.__setitem__(at, server.address))
    try:
        yield server
    finally:
        server.close()
    assert not server.errors, server.errors


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


# -- the proxy under test, as a subprocess ----------------------------------------------------


def start_process(module: str, daemon_path: str, *extra: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", module, "--daemon", daemon_path, *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=10):
            process.kill()
            raise AssertionError(f"{module} did not print ready")
    line = process.stdout.readline()
    if line != b"ready\n":
        process.kill()
        assert process.stderr is not None
        raise AssertionError(f"{module} said {line!r}: {process.stderr.read()!r}")
    return process


def stop_process(process: subprocess.Popen[bytes]) -> int:
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
    process = start_process(
        "proxies.socks5_spliced", daemon.path, "--listen", f"{SERVICE[0]}:{SERVICE[1]}", *extra
    )
    try:
        yield process
    finally:
        stop_process(process)


@pytest.fixture
def proxy(daemon: FakeDaemon) -> Iterator[subprocess.Popen[bytes]]:
    with running_proxy(daemon) as process:
        yield process


@pytest.fixture
def clients(daemon: FakeDaemon) -> Iterator[SpliceClient]:
    """The clients' side of the daemon: each connect() reaches the proxy's accept."""
    with SpliceClient(daemon.path) as api:
        yield api


# -- a raw SOCKS5 client, written from RFC 1928 independently of the code under test -------------

GREETING = b"\x05\x01\x00"


def ipv4_request(host: str, port: int) -> bytes:
    return b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port)


def read_reply(conn: Connection) -> tuple[int, Address]:
    head = recv_exactly(conn.sock, 4)
    assert head[:1] == b"\x05" and head[3] == 1, head  # IPv4 BND in these tests
    body = recv_exactly(conn.sock, 6)
    (port,) = struct.unpack("!H", body[4:])
    return head[1], (socket.inet_ntoa(body[:4]), port)


def socks_connect(api: SpliceClient, target: Address) -> tuple[Connection, int, Address]:
    conn = api.connect(SERVICE)
    conn.settimeout(30)
    conn.sendall(GREETING)
    assert recv_exactly(conn.sock, 2) == b"\x05\x00"
    conn.sendall(ipv4_request(*target))
    code, bound = read_reply(conn)
    return conn, code, bound


def send_then_fin(conn: Connection, data: bytes) -> None:
    conn.sendall(data)
    conn.shutdown()


# -- the handshake reads no byte past the request (sans-I/O and on a socket) -------------------


def test_feeding_stops_at_the_last_byte_of_the_request() -> None:
    data = GREETING + ipv4_request(*ORIGIN) + b"payload"
    used, events = feed_exactly(Negotiation(), data)
    assert used == len(data) - len(b"payload")
    assert isinstance(events[0], SendToClient)
    assert isinstance(events[-1], Connect) and events[-1].early_data == b""


def test_feeding_stops_at_a_rejected_message() -> None:
    used, events = feed_exactly(Negotiation(), b"\x05\x01\x02" + b"more")
    assert used == 3
    assert isinstance(events[-1], Reject)


def test_read_request_leaves_pipelined_data_unread_in_the_socket() -> None:
    proxy_side, client_side = socket.socketpair()
    with proxy_side, client_side:
        # The proxy's end as the asyncio client hands it out (no daemon needed to read it).
        conn = AsyncConnection(cast(AsyncSpliceClient, None), 1, proxy_side, None, None)

        async def handshake() -> Request | None:
            async with asyncio.timeout(5):
                return await read_request(conn, "test", None)

        # Everything at once, in two writes that split the request.
        stream = GREETING + ipv4_request(*ORIGIN) + b"early bytes"
        client_side.sendall(stream[:5])
        threading.Timer(0.1, client_side.sendall, args=(stream[5:],)).start()
        request = asyncio.run(handshake())
        assert request is not None and (request.host, request.port) == ORIGIN
        assert client_side.recv(2) == b"\x05\x00"
        proxy_side.settimeout(5)
        assert proxy_side.recv(100) == b"early bytes"


# -- end to end ------------------------------------------------------------------------------------


def test_connect_is_spliced_and_data_flows_both_ways_intact(
    daemon: FakeDaemon, proxy: subprocess.Popen[bytes], clients: SpliceClient
) -> None:
    upload, download = payload(1 << 20, 1), payload(1 << 20, 2)
    received: list[bytes] = []

    def sink_and_source(conn: socket.socket) -> None:
        reader = threading.Thread(target=lambda: received.append(recv_to_eof(conn)))
        reader.start()
        conn.sendall(download)
        conn.shutdown(socket.SHUT_WR)
        reader.join(timeout=30)

    with origin(daemon, sink_and_source):
        conn, code, bound = socks_connect(clients, ORIGIN)
        with conn:
            assert code == 0
            assert bound == LOCAL  # BND is the server side's local address
            sending = threading.Thread(target=send_then_fin, args=(conn, upload))
            sending.start()
            got = recv_to_eof(conn.sock)
            sending.join(timeout=30)
        assert wait_until(lambda: bool(received))
    assert sha256(got) == sha256(download)
    assert [sha256(r) for r in received] == [sha256(upload)]
    [record] = daemon.splices()
    assert record.done.wait(10)
    assert record.length == 10 and record.written_after_splice == 10
    assert record.extra_to_client == 0 and record.written_to_server_fd == 0


def test_pipelined_payload_is_left_to_the_daemon_and_reaches_the_origin(
    daemon: FakeDaemon, proxy: subprocess.Popen[bytes], clients: SpliceClient
) -> None:
    early = payload(3000, 3)
    with origin(daemon, echo):
        conn = clients.connect(SERVICE)
        with conn:
            conn.settimeout(30)
            # Greeting, request and data in one write, before any reply is read.
            conn.sendall(GREETING + ipv4_request(*ORIGIN) + early)
            assert recv_exactly(conn.sock, 2) == b"\x05\x00"
            assert read_reply(conn)[0] == 0
            assert sha256(recv_exactly(conn.sock, len(early))) == sha256(early)
    [record] = daemon.splices()
    assert record.proxy_read == len(GREETING) + len(ipv4_request(*ORIGIN))
    assert record.held == early  # all of it was kept by the daemon, none read by the proxy


def test_proxy_serves_many_clients_at_once(
    daemon: FakeDaemon, proxy: subprocess.Popen[bytes], clients: SpliceClient
) -> None:
    results: dict[int, bytes] = {}

    def one(i: int) -> None:
        conn, code, _ = socks_connect(clients, ORIGIN)
        with conn:
            assert code == 0
            conn.sendall(payload(20_000, i))
            conn.shutdown()
            results[i] = recv_to_eof(conn.sock)

    with origin(daemon, echo):
        threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert {i: sha256(r) for i, r in results.items()} == {
        i: sha256(payload(20_000, i)) for i in range(20)
    }
    assert len(daemon.splices()) == 20


@pytest.mark.parametrize(
    ("host", "code"),
    [
        ("203.0.113.3", 0x05),  # nothing routed there: RST, connection refused
        (UNREACHABLE_HOST, 0x04),
        (NET_UNREACHABLE_HOST, 0x03),
        (SILENT_HOST, 0x06),  # ETIMEDOUT: "TTL expired", what clients read as a timeout
        (LIMITED_HOST, 0x01),  # a daemon code without an errno: general failure
    ],
)
def test_connect_failure_gets_its_reply_code_then_a_clean_close(
    daemon: FakeDaemon,
    proxy: subprocess.Popen[bytes],
    clients: SpliceClient,
    host: str,
    code: int,
) -> None:
    conn, got, _ = socks_connect(clients, (host, 80))
    with conn:
        assert got == code
        assert conn.sock.recv(100) == b""  # a FIN after the reply, not a reset
    assert daemon.splices() == []
    # The reserved server side was released with the close op, and so was the client.
    assert wait_until(lambda: "INTENDED" not in daemon.conn_states())
    assert wait_until(lambda: "INTENDED_CLIENT" not in daemon.conn_states())
    assert_still_serving(daemon, clients)


def assert_still_serving(daemon: FakeDaemon, clients: SpliceClient) -> None:
    with origin(daemon, echo, at=("203.0.113.9", 7)):
        conn, code, _ = socks_connect(clients, ("203.0.113.9", 7))
        with conn:
            assert code == 0
            conn.sendall(b"still serving")
            assert recv_exactly(conn.sock, 13) == b"still serving"


def test_username_password_is_required_when_configured(
    daemon: FakeDaemon, clients: SpliceClient
) -> None:
    with running_proxy(daemon, "--user", "alice", "--password", "s3cret"), origin(daemon, echo):
        refused = clients.connect(SERVICE)
        with refused:
            refused.settimeout(10)
            refused.sendall(GREETING)
            assert recv_to_eof(refused.sock) == b"\x05\xff"
        conn = clients.connect(SERVICE)
        with conn:
            conn.settimeout(10)
            conn.sendall(b"\x05\x01\x02")
            assert recv_exactly(conn.sock, 2) == b"\x05\x02"
            conn.sendall(b"\x01\x05alice\x06s3cret")
            assert recv_exactly(conn.sock, 2) == b"\x01\x00"
            conn.sendall(ipv4_request(*ORIGIN))
            assert read_reply(conn)[0] == 0
            conn.sendall(b"ping")
            assert recv_exactly(conn.sock, 4) == b"ping"


def test_source_address_is_used_for_the_server_side(
    daemon: FakeDaemon, clients: SpliceClient
) -> None:
    with running_proxy(daemon, "--source", "198.51.100.1"), origin(daemon, echo):
        conn, code, bound = socks_connect(clients, ORIGIN)
        with conn:
            assert code == 0
            assert bound[0] == "198.51.100.1" and bound[1] >= FIRST_EPHEMERAL
    connects = daemon.loop.call(lambda: list(daemon.core.connects))
    assert (ORIGIN, ("198.51.100.1", 0)) in connects


# -- the CLI -----------------------------------------------------------------------------------


def test_sigterm_exits_zero(daemon: FakeDaemon) -> None:
    with running_proxy(daemon) as process:
        assert stop_process(process) == 0


def test_daemon_going_away_exits_nonzero_with_a_reason(daemon: FakeDaemon) -> None:
    with running_proxy(daemon) as process:
        daemon.loop.call(daemon.server.close)
        assert process.wait(timeout=10) == 1
        assert process.stderr is not None
        assert b"daemon went away" in process.stderr.read()


def test_no_daemon_is_a_one_line_error(sock_dir: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxies.socks5_spliced",
            "--daemon",
            os.path.join(sock_dir, "absent.sock"),
            "--listen",
            "192.0.2.1:1080",
        ],
        cwd=REPO,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.decode().count("\n") == 1
    assert b"cannot attach to the splice daemon" in result.stderr


def test_listen_address_in_use_is_a_one_line_error(daemon: FakeDaemon) -> None:
    with running_proxy(daemon):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "proxies.socks5_spliced",
                "--daemon",
                daemon.path,
                "--listen",
                f"{SERVICE[0]}:{SERVICE[1]}",
            ],
            cwd=REPO,
            capture_output=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert b"cannot listen on 192.0.2.1:1080" in result.stderr
