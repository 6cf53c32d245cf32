"""ApiServer on a real Unix socket, driven by a selector loop in a thread, with a fake core.

``FakeCore`` is an in-process network: ``listen`` makes a listener, and a
``connect`` to a listened address pairs with an ``accept`` (two socketpairs
whose daemon ends the loop relays to each other); ``ECHO`` echoes; a few
magic hosts fail the way real ones do.  ``test_api_client.py`` reuses it.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import os
import selectors
import shutil
import socket
import stat
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from daemon.api.core import ApiError, ApiSink, Done, ObjectKind, Result
from daemon.api.protocol import Address, ErrorCode, Inline
from daemon.api.server import ApiServer, SocketPathInUse

T = TypeVar("T")

ECHO: Address = ("198.51.100.7", 7)
UNREACHABLE_HOST = "192.0.2.99"
SILENT_HOST = "203.0.113.66"  # never answers: ETIMEDOUT
LOCAL: Address = ("198.51.100.1", 40000)


# -- the fake core ---------------------------------------------------------------


@dataclass(slots=True)
class FakeConn:
    owner: int
    sock: socket.socket | None  # the daemon's end of the socketpair
    peer: Address | None = None
    local: Address | None = None
    partner: FakeConn | None = None  # None: echo
    state: str = "ESTABLISHED"
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(slots=True)
class FakeListener:
    owner: int
    addr: Address
    backlog: deque[tuple[Result, socket.socket]] = field(default_factory=deque)
    waiting: deque[Done] = field(default_factory=deque)


class FakeCore:
    """A ``Core`` whose network is a dict; everything runs in the loop thread."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.selector = selector
        self.sink: ApiSink | None = None
        self.conns: dict[int, FakeConn] = {}
        self.listeners: dict[int, FakeListener] = {}
        self.gone: list[int] = []
        self.fail_stats = False
        self.intents: dict[int, int] = {}  # client conn -> server conn of connect_splice
        # connect_splice inline data of a splice in progress (for a fake that relays it)
        self.inline_next: dict[int, Inline] = {}
        self.aborted: list[int] = []
        self._ids = iter(range(1, 1 << 30))

    # helpers
    def _pair(self, owner: int, peer: Address, local: Address) -> tuple[int, socket.socket]:
        daemon_end, proxy_end = socket.socketpair()
        daemon_end.settimeout(5)
        conn_id = next(self._ids)
        conn = FakeConn(owner, daemon_end, peer, local)
        self.conns[conn_id] = conn
        self.selector.register(daemon_end, selectors.EVENT_READ, lambda m: self._pump(conn))
        return conn_id, proxy_end

    def _pump(self, conn: FakeConn) -> None:
        if conn.sock is None:  # freed earlier in this select() batch
            return
        data = conn.sock.recv(65536)
        target = conn.partner if conn.partner is not None else conn
        if not data:
            self.selector.unregister(conn.sock)
            if target.sock is not None:
                with contextlib.suppress(OSError):
                    target.sock.shutdown(socket.SHUT_WR)
            return
        # Counted as the daemon would: out = to the TCP peer, in = from it.
        conn.bytes_out += len(data)
        if target.sock is None:  # the partner is gone: the bytes are lost, as with an RST
            return
        target.sock.sendall(data)
        target.bytes_in += len(data)

    def _free(self, conn_id: int) -> None:
        conn = self.conns.pop(conn_id)
        if conn.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(conn.sock)
            conn.sock.close()
            conn.sock = None

    def reset(self, conn_id: int) -> None:
        """The peer sent RST: the conn is freed and its owner hears about it."""
        owner = self.conns[conn_id].owner
        self._free(conn_id)
        assert self.sink is not None
        self.sink.forget(ObjectKind.CONN, conn_id)
        self.sink.push_event(owner, {"event": "reset", "conn": conn_id})

    # Core
    def listen(self, owner: int, addr: Address, backlog: int) -> Result:
        if any(lst.addr == addr for lst in self.listeners.values()):
            raise ApiError(ErrorCode.EADDRINUSE, f"{addr} is in use")
        if addr[1] == 0:
            addr = (addr[0], 50000 + len(self.listeners))
        listener_id = next(self._ids)
        self.listeners[listener_id] = FakeListener(owner, addr)
        return {"listener": listener_id, "addr": list(addr)}

    def accept(self, owner: int, listener: int, done: Done) -> None:
        lst = self.listeners[listener]
        if lst.backlog:
            done(*lst.backlog.popleft())
        else:
            lst.waiting.append(done)

    def connect(
        self,
        owner: int,
        remote: Address,
        local: Address | None,
        timeout: float,
        conn: int | None,
        done: Done,
    ) -> None:
        if conn is not None and self.conns[conn].state != "INTENDED":
            raise ApiError(ErrorCode.ESTATE, f"conn {conn} is not a server side from intend_splice")
        listener = next((lst for lst in self.listeners.values() if lst.addr == remote), None)
        if remote[0] == UNREACHABLE_HOST:
            done(ApiError(ErrorCode.EHOSTUNREACH, "no route"), None)
            return
        if remote[0] == SILENT_HOST:
            done(ApiError(ErrorCode.ETIMEDOUT, f"no SYN-ACK in {timeout} s"), None)
            return
        if remote != ECHO and listener is None:
            done(ApiError(ErrorCode.ECONNREFUSED, f"RST from {remote}"), None)
            return
        here = local or LOCAL
        conn_id, proxy_end = self._pair(owner, remote, here)
        if conn is not None:  # the reserved id takes over the new pair
            self.conns[conn] = self.conns.pop(conn_id)
            conn_id = conn
        if listener is not None:
            their_id, their_end = self._pair(listener.owner, here, remote)
            self.conns[conn_id].partner = self.conns[their_id]
            self.conns[their_id].partner = self.conns[conn_id]
            accepted: tuple[Result, socket.socket] = (
                {"conn": their_id, "peer": list(here), "local": list(remote)},
                their_end,
            )
            if listener.waiting:
                listener.waiting.popleft()(*accepted)
            else:
                listener.backlog.append(accepted)
        done({"conn": conn_id, "peer": list(remote), "local": list(here)}, proxy_end)

    def close(self, owner: int, conn: int) -> Result:
        self._free(conn)
        intent = self.intents.pop(conn, None)
        if intent is not None and intent in self.conns:
            self._free(intent)  # a connect_splice intent dies with its client, as in the daemon
        assert self.sink is not None
        self.sink.forget(ObjectKind.CONN, conn)
        return {}

    def keepalive(self, owner: int, conn: int, params: tuple[float, float, int] | None) -> Result:
        return {"conn": conn, "keepalive": None if params is None else list(params)}

    def abort(self, owner: int, conn: int) -> Result:
        self.aborted.append(conn)
        return self.close(owner, conn)

    def close_listener(self, owner: int, listener: int) -> Result:
        lst = self.listeners.pop(listener)
        for done in lst.waiting:
            done(ApiError(ErrorCode.ECANCELED, "listener closed"), None)
        for _, sock in lst.backlog:
            sock.close()
        assert self.sink is not None
        self.sink.forget(ObjectKind.LISTENER, listener)
        return {}

    def shutdown(self, owner: int, conn: int) -> Result:
        self.conns[conn].state = "FIN_WAIT_1"
        return {}

    def stats(self, owner: int, conn: int | None) -> Result:
        if self.fail_stats:
            raise RuntimeError("bug in the core")
        if conn is None:
            return {"conns": len(self.conns), "listeners": len(self.listeners)}
        c = self.conns[conn]
        return {"state": c.state, "bytes_in": c.bytes_in, "bytes_out": c.bytes_out}

    def intend_splice(self, owner: int, conn: int, server: int | None = None) -> Result:
        server_id = next(self._ids)
        self.conns[server_id] = FakeConn(owner, None, state="INTENDED")
        return {"conn": server_id}

    def splice(
        self,
        owner: int,
        client: int,
        server: int,
        length: int,
        unread: bytes = b"",
        limits: tuple[int, int] | None = None,
        server_unread: bytes = b"",
        tap: bool = False,
    ) -> Result:
        raise ApiError(ErrorCode.EUNKNOWNOP, "splice is part 2")

    def connect_splice(
        self,
        owner: int,
        client: int,
        remote: Address,
        local: Address | None,
        timeout: float,
        length: int,
        done: Done,
        inline: Inline | None = None,
    ) -> None:
        """intend_splice (or the intent a failed attempt left), connect, splice: as the daemon."""
        server = self.intents.get(client)
        if server is None:
            server = int(str(self.intend_splice(owner, client)["conn"]))
            self.intents[client] = server

        def connected(result: Result | ApiError, sock: socket.socket | None) -> None:
            if isinstance(result, ApiError):
                done(result, sock)
                return
            self.intents.pop(client, None)
            if inline is not None:
                self.inline_next[client] = inline
            try:
                self.splice(owner, client, server, length)
                result["spliced"] = True
            except ApiError:
                result["spliced"] = False
            self.inline_next.pop(client, None)
            if result["spliced"] and inline is not None and inline.release:
                # As the daemon: both conns go as if the proxy had closed them.
                if sock is not None:
                    sock.close()
                sock = None
                self.close(owner, server)
                self.close(owner, client)
                result["released"] = True
            done(result, sock)

        self.connect(owner, remote, local, timeout, server, connected)

    def client_gone(self, owner: int) -> None:
        self.gone.append(owner)
        for conn_id in [i for i, c in self.conns.items() if c.owner == owner]:
            self._free(conn_id)
        for listener_id in [i for i, lst in self.listeners.items() if lst.owner == owner]:
            del self.listeners[listener_id]


# -- the loop ------------------------------------------------------------------------


class LoopThread:
    """The daemon's event loop in miniature: ``key.data(mask)`` for every ready key."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._calls: deque[tuple[Callable[[], object], Future[object]]] = deque()
        self._stopping = False
        self.after_pass: Callable[[], None] | None = None  # the daemon flushes replies here
        self._thread = threading.Thread(target=self._run, name="api-test-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping:
            for key, mask in self.selector.select(1.0):
                key.data(mask)
            if self.after_pass is not None:
                self.after_pass()

    def _on_wake(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        while self._calls:
            fn, fut = self._calls.popleft()
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the loop thread (where core and server state live); its result."""
        fut: Future[object] = Future()
        self._calls.append((fn, fut))
        self._wake_w.send(b"x")
        return fut.result(timeout=5)  # type: ignore[return-value]

    def stop(self) -> None:
        self.call(lambda: setattr(self, "_stopping", True))
        self._thread.join(timeout=5)
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()


@dataclass
class Daemon:
    path: str
    loop: LoopThread
    core: FakeCore
    server: ApiServer


@contextlib.contextmanager
def running_daemon(path: str, **server_args: object) -> Iterator[Daemon]:
    loop = LoopThread()
    core = FakeCore(loop.selector)
    server = ApiServer(path, core, **server_args)  # type: ignore[arg-type]
    core.sink = server
    server.register(loop.selector)
    loop.start()
    try:
        yield Daemon(path, loop, core, server)
    finally:
        with contextlib.suppress(Exception):
            loop.call(server.close)
        loop.stop()


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Short paths: sun_path holds 108 bytes, pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="api-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(sock_dir: str) -> Iterator[Daemon]:
    with running_daemon(os.path.join(sock_dir, "spliced.sock")) as d:
        yield d


# -- a raw protocol client: what a C proxy would do ------------------------------------


class RawClient:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self._buf = b""
        self._fds: deque[int] = deque()
        self._stash: dict[object, tuple[dict[str, object], socket.socket | None]] = {}
        self.events: list[dict[str, object]] = []
        self._next = 1

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes | dict[str, object]) -> None:
        if isinstance(data, dict):
            data = json.dumps(data).encode() + b"\n"
        self.sock.sendall(data)

    def read_line(self) -> tuple[dict[str, object], socket.socket | None] | None:
        """The next line (with its fd, if it promises one); None at EOF."""
        while b"\n" not in self._buf:
            data, anc, _flags, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
            for _level, _kind, cdata in anc:
                fds = array.array("i")
                fds.frombytes(cdata[: len(cdata) - len(cdata) % 4])
                self._fds.extend(fds)
            if not data:
                return None
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        obj = json.loads(line)
        fd_sock = None
        if obj.get("fd") is True:
            fd_sock = socket.socket(fileno=self._fds.popleft())
            fd_sock.settimeout(5)
        return obj, fd_sock

    def reply(self, rid: object) -> tuple[dict[str, object], socket.socket | None]:
        while rid not in self._stash:
            got = self.read_line()
            assert got is not None, f"EOF while waiting for reply {rid}"
            if "event" in got[0]:
                self.events.append(got[0])
            else:
                self._stash[got[0]["id"]] = got
        return self._stash.pop(rid)

    def start(self, op: str, **args: object) -> int:
        rid = self._next
        self._next += 1
        self.send({"id": rid, "op": op, **args})
        return rid

    def request(self, op: str, **args: object) -> dict[str, object]:
        reply, fd_sock = self.reply(self.start(op, **args))
        assert fd_sock is None
        return reply

    def request_fd(self, op: str, **args: object) -> tuple[dict[str, object], socket.socket]:
        reply, fd_sock = self.reply(self.start(op, **args))
        assert reply["ok"] is True, reply
        assert fd_sock is not None
        return reply, fd_sock


@pytest.fixture
def clients(daemon: Daemon) -> Iterator[Callable[[], RawClient]]:
    made: list[RawClient] = []

    def make() -> RawClient:
        made.append(RawClient(daemon.path))
        return made[-1]

    yield make
    for c in made:
        c.close()


def owner_of(daemon: Daemon, raw: RawClient) -> int:
    """The API client id the server gave ``raw`` (via a listener it made)."""
    reply = raw.request("listen", addr=["192.0.2.200", 0])
    listener = reply["listener"]
    return daemon.loop.call(lambda: daemon.core.listeners[listener].owner)  # type: ignore[index]


def error_of(reply: dict[str, object]) -> str:
    assert reply["ok"] is False, reply
    return str(reply["error"])


def pattern(n: int) -> bytes:
    return bytes((i * 7 + i // 251) & 0xFF for i in range(n))


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 65536))
        assert chunk, "EOF before all data arrived"
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


# -- the tests -------------------------------------------------------------------------


def test_hello_reports_version_and_ops(clients: Callable[[], RawClient]) -> None:
    reply = clients().request("hello", version=1)
    assert reply["ok"] is True and reply["version"] == 1
    assert "connect" in reply["ops"] and "splice" in reply["ops"]  # type: ignore[operator]


def test_accepted_and_connected_fds_carry_data_both_ways(
    clients: Callable[[], RawClient],
) -> None:
    proxy_a, proxy_b = clients(), clients()
    lst = proxy_a.request("listen", addr=["192.0.2.1", 8080])
    assert lst["ok"] is True and lst["addr"] == ["192.0.2.1", 8080]
    accept_id = proxy_a.start("accept", listener=lst["listener"])

    conn_reply, b_sock = proxy_b.request_fd("connect", remote=["192.0.2.1", 8080])
    acc_reply, a_sock = proxy_a.reply(accept_id)
    assert a_sock is not None and acc_reply["fd"] is True
    assert conn_reply["peer"] == ["192.0.2.1", 8080] == acc_reply["local"]
    assert acc_reply["peer"] == conn_reply["local"]

    up, down = pattern(300_000), pattern(200_000)[::-1]
    sender = threading.Thread(target=b_sock.sendall, args=(up,))
    sender.start()
    assert hashlib.sha256(recv_exactly(a_sock, len(up))).digest() == hashlib.sha256(up).digest()
    sender.join()
    a_sock.sendall(down)
    a_sock.shutdown(socket.SHUT_WR)
    assert recv_exactly(b_sock, len(down)) == down
    assert b_sock.recv(1) == b""  # the FIN travelled too
    stats = proxy_b.request("stats", conn=conn_reply["conn"])
    assert (stats["bytes_out"], stats["bytes_in"]) == (len(up), len(down))
    a_sock.close()
    b_sock.close()


def test_echo_connection_and_its_fd_is_selectable(clients: Callable[[], RawClient]) -> None:
    _reply, sock = clients().request_fd("connect", remote=list(ECHO))
    sock.sendall(b"ping")
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    assert sel.select(timeout=5)
    assert sock.recv(4) == b"ping"
    sel.close()
    sock.close()


def test_pending_accept_does_not_hold_back_other_replies(
    clients: Callable[[], RawClient],
) -> None:
    proxy_a, proxy_b = clients(), clients()
    lst = proxy_a.request("listen", addr=["192.0.2.1", 80])["listener"]
    accept_id = proxy_a.start("accept", listener=lst)
    stats_id = proxy_a.start("stats")
    first, _ = proxy_a.reply(stats_id)
    assert first["ok"] is True
    assert accept_id not in proxy_a._stash  # still waiting for a connection
    _reply, b_sock = proxy_b.request_fd("connect", remote=["192.0.2.1", 80])
    reply, a_sock = proxy_a.reply(accept_id)
    assert reply["ok"] is True and a_sock is not None
    a_sock.close()
    b_sock.close()


def test_pipelined_requests_get_replies_matched_by_id(clients: Callable[[], RawClient]) -> None:
    raw = clients()
    raw.send(
        b"".join(
            json.dumps(r).encode() + b"\n"
            for r in [
                {"id": 10, "op": "connect", "remote": [UNREACHABLE_HOST, 80]},
                {"id": 11, "op": "connect", "remote": [SILENT_HOST, 80], "timeout": 1},
                {"id": 12, "op": "connect", "remote": ["203.0.113.2", 80]},
                {"id": 13, "op": "stats"},
                {"id": 14, "op": "frobnicate"},
            ]
        )
    )
    codes = {rid: raw.reply(rid)[0].get("error") for rid in (14, 13, 12, 11, 10)}
    assert codes == {
        10: "EHOSTUNREACH",
        11: "ETIMEDOUT",
        12: "ECONNREFUSED",
        13: None,
        14: "EUNKNOWNOP",
    }


def test_deferred_replies_wait_for_the_loops_flush(daemon: Daemon) -> None:
    """``defer_flush``: replies of a pass go out at ``flush()``, in order, none lost."""

    def defer() -> None:
        daemon.server.defer_flush = True

    daemon.loop.call(defer)
    raw = RawClient(daemon.path)
    try:
        raw.sock.settimeout(0.3)
        rid = raw.start("hello", version=1)
        with pytest.raises(TimeoutError):
            raw.read_line()  # queued, not sent: no flush yet
        daemon.loop.call(daemon.server.flush)
        raw.sock.settimeout(5)
        assert raw.reply(rid)[0]["ok"] is True
        # With the flush after every pass (what Daemon.run_once does), pipelined
        # requests, replies carrying an fd included, all arrive.
        daemon.loop.after_pass = daemon.server.flush
        ids = [raw.start("stats") for _ in range(50)]
        _reply, fd_sock = raw.request_fd("connect", remote=list(ECHO))
        fd_sock.close()
        assert all(raw.reply(i)[0]["ok"] is True for i in ids)
    finally:
        raw.close()


def test_another_clients_objects_are_eperm_and_unknown_ids_enoent(
    clients: Callable[[], RawClient],
) -> None:
    proxy_a, proxy_b = clients(), clients()
    reply, sock = proxy_a.request_fd("connect", remote=list(ECHO))
    conn = reply["conn"]
    lst = proxy_a.request("listen", addr=["192.0.2.1", 81])["listener"]
    for op, args in [
        ("stats", {"conn": conn}),
        ("close", {"conn": conn}),
        ("shutdown", {"conn": conn}),
        ("intend_splice", {"conn": conn}),
        ("splice", {"client": conn, "server": 999_999, "len": 0}),
        ("accept", {"listener": lst}),
        ("close", {"listener": lst}),
    ]:
        assert error_of(proxy_b.request(op, **args)) == "EPERM", op
    assert error_of(proxy_b.request("stats", conn=999_999)) == "ENOENT"
    assert error_of(proxy_a.request("close", listener=999_999)) == "ENOENT"
    # A's connection is untouched by B's attempts.
    sock.sendall(b"still mine")
    assert recv_exactly(sock, 10) == b"still mine"
    assert proxy_a.request("close", conn=conn)["ok"] is True
    assert error_of(proxy_a.request("close", conn=conn)) == "ENOENT"
    sock.close()


def test_list_shows_only_the_callers_objects(clients: Callable[[], RawClient]) -> None:
    proxy_a, proxy_b = clients(), clients()
    reply, sock = proxy_a.request_fd("connect", remote=list(ECHO))
    proxy_b.request("listen", addr=["192.0.2.1", 82])
    listing = proxy_a.request("list")
    assert listing["listeners"] == []
    assert listing["conns"] == [
        {"conn": reply["conn"], "peer": reply["peer"], "local": reply["local"]}
    ]
    assert proxy_b.request("list")["listeners"] == [
        {"listener": proxy_b.request("list")["listeners"][0]["listener"], "addr": ["192.0.2.1", 82]}  # type: ignore[index]
    ]
    sock.close()


def test_bad_json_gets_null_id_error_and_the_connection_stays_usable(
    clients: Callable[[], RawClient],
) -> None:
    raw = clients()
    raw.send(b"{this is not json\n")
    reply, _ = raw.reply(None)
    assert error_of(reply) == "EBADREQ"
    raw.send(b'{"id": 5, "op": "listen", "addr": ["192.0.2.1", "eighty"]}\n')
    assert error_of(raw.reply(5)[0]) == "EBADREQ"
    assert raw.request("hello", version=1)["ok"] is True


def test_over_long_line_closes_that_client_only(
    daemon: Daemon, clients: Callable[[], RawClient]
) -> None:
    bad, good = clients(), clients()
    bad_owner = owner_of(daemon, bad)
    bad.send(b'{"id": 1, "op": "hello", "pad": "' + b"x" * 70_000)
    reply, _ = bad.reply(None)
    assert error_of(reply) == "EMSGSIZE"
    # Then the daemon hangs up; unread request bytes make Linux report that as a reset.
    with contextlib.suppress(ConnectionResetError):
        assert bad.read_line() is None
    assert daemon.loop.call(lambda: bad_owner in daemon.core.gone)
    assert good.request("hello", version=1)["ok"] is True


def test_core_exception_is_einternal_and_the_server_carries_on(
    daemon: Daemon, clients: Callable[[], RawClient]
) -> None:
    raw = clients()
    daemon.core.fail_stats = True
    reply = raw.request("stats")
    assert error_of(reply) == "EINTERNAL"
    daemon.core.fail_stats = False
    assert raw.request("stats")["ok"] is True


def test_part_two_ops_are_routed_to_the_core_with_ownership(
    clients: Callable[[], RawClient],
) -> None:
    proxy_a, proxy_b = clients(), clients()
    reply, cli = proxy_a.request_fd("connect", remote=list(ECHO))
    server_conn = proxy_a.request("intend_splice", conn=reply["conn"])["conn"]
    assert error_of(proxy_b.request("connect", remote=list(ECHO), conn=server_conn)) == "EPERM"
    srv_reply, srv = proxy_a.request_fd("connect", remote=list(ECHO), conn=server_conn)
    assert srv_reply["conn"] == server_conn
    assert error_of(proxy_a.request("connect", remote=list(ECHO), conn=server_conn)) == "ESTATE"
    splice = proxy_a.request("splice", client=reply["conn"], server=server_conn, len=2)
    assert error_of(splice) == "EUNKNOWNOP"
    cli.close()
    srv.close()


def test_disconnect_tells_the_core_and_frees_the_ids(
    daemon: Daemon, clients: Callable[[], RawClient]
) -> None:
    proxy_a, proxy_b = clients(), clients()
    owner = owner_of(daemon, proxy_a)
    reply, sock = proxy_a.request_fd("connect", remote=list(ECHO))
    proxy_a.close()
    assert sock.recv(1) == b""  # the core closed the unspliced connection
    assert daemon.loop.call(lambda: daemon.core.gone) == [owner]
    assert error_of(proxy_b.request("stats", conn=reply["conn"])) == "ENOENT"
    sock.close()


def test_core_forget_and_events_reach_the_owner(
    daemon: Daemon, clients: Callable[[], RawClient]
) -> None:
    raw = clients()
    reply, sock = raw.request_fd("connect", remote=list(ECHO))
    conn = reply["conn"]
    daemon.loop.call(lambda: daemon.core.reset(conn))  # type: ignore[arg-type]
    got = raw.read_line()
    assert got is not None and got[0] == {"event": "reset", "conn": conn}
    assert error_of(raw.request("stats", conn=conn)) == "ENOENT"
    sock.close()


def test_client_that_does_not_read_replies_is_dropped(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "s.sock")
    with running_daemon(path, max_queued_bytes=16 * 1024) as d:
        slow, other = RawClient(path), RawClient(path)
        owner = owner_of(d, slow)
        slow.sock.setblocking(False)
        line = b'{"id":1,"op":"hello","version":1}\n'
        with contextlib.suppress(BlockingIOError, ConnectionResetError, BrokenPipeError):
            for _ in range(50_000):
                slow.sock.send(line * 64)
        assert other.request("hello", version=1)["ok"] is True  # the loop never stalled
        for _ in range(100):
            if d.loop.call(lambda: owner in d.core.gone):
                break
            other.request("list")  # a round trip through the loop, no sleep
        assert d.loop.call(lambda: owner in d.core.gone)
        slow.close()
        other.close()


def test_too_many_clients_get_elimit(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "s.sock")
    with running_daemon(path, max_clients=1) as d:
        first = RawClient(path)
        assert first.request("hello", version=1)["ok"] is True
        second = RawClient(path)
        got = second.read_line()
        assert got is not None and error_of(got[0]) == "ELIMIT"
        assert second.read_line() is None
        assert d.server.client_count == 1
        first.close()
        second.close()


# -- the socket file ------------------------------------------------------------------


def test_socket_file_is_a_socket_with_mode_0660(daemon: Daemon) -> None:
    st = os.lstat(daemon.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert os.listdir(os.path.dirname(daemon.path)) == ["spliced.sock"]  # no temp dir left


def test_stricter_mode_is_honoured(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "s.sock")
    with running_daemon(path, mode=0o600, group=os.getgid()):
        st = os.lstat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == os.getgid()


def test_stale_socket_file_is_replaced(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "s.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens: a crashed daemon's leftover
    with running_daemon(path):
        raw = RawClient(path)
        assert raw.request("hello", version=1)["ok"] is True
        raw.close()
    assert not os.path.exists(path)  # close() removes its own socket file


def test_second_server_on_a_live_path_refuses(daemon: Daemon) -> None:
    with pytest.raises(SocketPathInUse):
        ApiServer(daemon.path, FakeCore(selectors.DefaultSelector()))
    raw = RawClient(daemon.path)
    assert raw.request("hello", version=1)["ok"] is True  # the first one is unharmed
    raw.close()


def test_a_regular_file_at_the_path_is_left_alone(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "not-a-socket")
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(SocketPathInUse):
        ApiServer(path, FakeCore(selectors.DefaultSelector()))
    with open(path) as f:
        assert f.read() == "precious"
