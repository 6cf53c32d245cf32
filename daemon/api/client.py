"""The blocking, thread-safe client library a Python proxy imports.

    from daemon.api.client import SpliceClient

    with SpliceClient("/run/tcp-splice/spliced.sock") as api:
        lst = api.listen(("192.0.2.1", 1080))       # init_splice (thesis 4.1)
        cli = lst.accept()                          # socket-like, has fileno()
        request = cli.recv(4096)
        srv = api.intend_splice(cli)                # client reads stop here
        srv.connect(("203.0.113.2", 80))            # SpliceError(code="ECONNREFUSED"), ...
        api.splice(cli, srv, len(reply))
        cli.sendall(reply)

One reader thread per ``SpliceClient`` reads replies and events; callers
block on their own request only, so any number of threads may share one
client (e.g. one thread accepting while others connect).  A reply that hands
over a connection carries one fd (SCM_RIGHTS); fds are queued in arrival
order and paired with ``"fd": true`` replies in order (docs/api.md).

If the daemon goes away, every waiting call and every later call raises
``DaemonGone`` promptly; sockets already handed out stay open (spliced
connections keep flowing in the daemon, the rest are closed by it).
"""

from __future__ import annotations

import array
import base64
import contextlib
import itertools
import json
import logging
import queue
import socket
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from daemon.api.protocol import (
    DEFAULT_BACKLOG,
    DEFAULT_CONNECT_TIMEOUT,
    PROTOCOL_VERSION,
    Address,
    LineFramer,
)
from daemon.api.replies import (
    MAX_FDS_PER_RECV,
    RECV_SIZE,
    REPLY_LIMIT,
    DaemonGone,
    SpliceError,
    connect_splice_args,
    error_from,
    handed_conn,
    reply_address,
    reply_id,
    take_unread,
    with_local,
)

__all__ = ["Connection", "DaemonGone", "Listener", "SpliceClient", "SpliceError"]

log = logging.getLogger("daemon.api.client")


@dataclass(slots=True)
class _Call:
    """One request in flight: the reader thread fills it and sets ``done``."""

    done: threading.Event = field(default_factory=threading.Event)
    reply: dict[str, object] | None = None
    fd: int | None = None
    error: SpliceError | None = None


def _conn_id(conn: Connection | int) -> int:
    return conn.id if isinstance(conn, Connection) else conn


class SpliceClient:
    """One attachment to the splice daemon's API socket."""

    def __init__(self, path: str, *, connect_timeout: float = 5.0, max_events: int = 1024) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(connect_timeout)
            sock.connect(path)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        self.path = path
        self._sock = sock
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # guards _pending, _ids, _gone
        self._pending: dict[int, _Call] = {}
        self._ids = itertools.count(1)
        self._gone: DaemonGone | None = None
        self._last_unmatched_error = ""
        # None is queued once at disconnect, to wake a consumer blocked in events().
        self._events: queue.Queue[dict[str, object] | None] = queue.Queue(max_events)
        self.events_dropped = 0
        self._reader = threading.Thread(
            target=self._read_loop, name=f"splice-api-reader:{path}", daemon=True
        )
        self._reader.start()
        try:
            self.server_info = self._call("hello", version=PROTOCOL_VERSION)
        except BaseException:
            self.close()
            raise

    # -- context manager -----------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Detach from the daemon: it closes this client's unspliced connections."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread
        if threading.current_thread() is not self._reader:
            self._reader.join()
        self._sock.close()

    @property
    def closed(self) -> bool:
        return self._gone is not None

    # -- the operations ------------------------------------------------------

    def listen(self, addr: Address, backlog: int = DEFAULT_BACKLOG) -> Listener:
        """init_splice: a listening endpoint whose connections can later be spliced."""
        reply = self._call("listen", addr=list(addr), backlog=backlog)
        bound = reply_address(reply["addr"]) if "addr" in reply else addr
        return Listener(self, reply_id(reply, "listener"), bound)

    def connect(
        self,
        remote: Address,
        local: Address | None = None,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> Connection:
        """A new connection, returned once established (the daemon enforces ``timeout``)."""
        reply, sock = self._call_fd(
            "connect",
            remote=list(remote),
            local=None if local is None else list(local),
            timeout=timeout,
        )
        return Connection._from_reply(self, reply, sock)

    def intend_splice(self, conn: Connection | int) -> Connection:
        """intend_splice (thesis 4.1): reading from ``conn`` stops; returns the server side.

        The returned connection is not connected yet: call its ``connect()``.
        """
        reply = self._call("intend_splice", conn=_conn_id(conn))
        return Connection(self, reply_id(reply, "conn"), None, None, None)

    def splice(
        self, client: Connection | int, server: Connection | int, length: int
    ) -> dict[str, object]:
        """splice(len): only ``length`` more bytes may be written to ``client``.

        Bytes still unread in the client's fd were delivered before
        intend_splice stopped reading; they belong to the server, so they are
        taken out of the fd here and handed back with the request (the daemon
        sends them on first).  Call this only after ``intend_splice``.
        """
        unread = take_unread(client.sock) if isinstance(client, Connection) else b""
        return self._call(
            "splice",
            client=_conn_id(client),
            server=_conn_id(server),
            len=length,
            unread=base64.b64encode(unread).decode("ascii"),
        )

    def splice_sockets(self, client: socket.socket, server: socket.socket) -> dict[str, object]:
        """Splice two of the proxy's own kernel TCP connections (docs/api.md).

        The proxy accepted ``client`` and connected ``server`` itself, spoke its
        protocol and wrote its reply; the daemon takes both connections over as
        they stand (the sockets' descriptors go with the request).  On success
        close both sockets: they are closed without a FIN or RST, the daemon
        carries the connections.  On a SpliceError they are yours as before.
        """
        return self._call("splice_sockets", (client.fileno(), server.fileno()))

    def connect_splice(
        self,
        client: Connection,
        remote: Address,
        length: int | None = None,
        local: Address | None = None,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
        *,
        data: bytes | None = None,
        local_at: int | None = None,
        release: bool = False,
    ) -> Connection:
        """intend_splice + connect + splice(len) in one request; returns the server side.

        Saves two round trips for a proxy that knows its reply length.  If the
        daemon found bytes still unread in ``client``'s fd it connects but
        leaves the splice to us, and this calls ``splice`` with them.  On a
        connect error (``SpliceError``) ``client`` stays intended, as after
        ``intend_splice``: try the next address with ``connect_splice`` again,
        or write a failure reply and close.

        ``data``: the len bytes themselves, sent by the daemon (with the
        bound local address written at ``local_at``, SOCKS5 style), one more
        round trip saved; ``release``: the daemon then lets go of both conns
        (``server.released``: no fd, the ids are gone; just close
        ``client.sock``).  What the daemon left to us is done here.
        """
        args = connect_splice_args(client.id, remote, length, local, timeout, data, local_at)
        reply, sock = self._call_fd("connect_splice", **args, release=release)
        if reply.get("released") is True:
            if sock is not None:
                sock.close()
            client._let_go()
            return Connection._released(self, reply)
        server = Connection._from_reply(self, reply, sock)
        if reply.get("spliced"):
            return server
        self.splice(client, server, len(data) if data is not None else (length or 0))
        if data is not None:
            if local_at is not None:
                data = with_local(data, local_at, server.local)
            client.sendall(data)
            if release:
                client.close()
                server.close()
                client.released = server.released = True
        return server

    def shutdown(self, conn: Connection | int) -> dict[str, object]:
        """Ask the daemon to send FIN after the data already written (the ``shutdown`` op)."""
        return self._call("shutdown", conn=_conn_id(conn))

    def stats(self, conn: Connection | int | None = None) -> dict[str, object]:
        return self._call("stats", conn=None if conn is None else _conn_id(conn))

    def list(self) -> dict[str, object]:
        """This client's connections and listeners, as the daemon records them."""
        return self._call("list")

    def next_event(self, timeout: float | None = None) -> dict[str, object] | None:
        """The oldest unsolicited event, waiting up to ``timeout``; None if there was none."""
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            return None
        if event is None:
            self._events.put(None)  # keep waking later callers too
        return event

    def events(self, timeout: float | None = None) -> Iterator[dict[str, object]]:
        """Yield events as they come; stops after ``timeout`` idle seconds or at detach."""
        while (event := self.next_event(timeout)) is not None:
            yield event

    # -- requests and replies --------------------------------------------------

    def _start(self, op: str, fds: Sequence[int] = (), /, **args: object) -> _Call:
        call = _Call()
        with self._lock:
            if self._gone is not None:
                raise self._gone
            rid = next(self._ids)
            self._pending[rid] = call
        line = json.dumps({"id": rid, "op": op, **args}, separators=(",", ":")) + "\n"
        try:
            with self._send_lock:
                data = line.encode()
                if fds:  # SCM_RIGHTS, with the line's first byte
                    sent = socket.send_fds(self._sock, [data], list(fds), socket.MSG_NOSIGNAL)
                    data = data[sent:]
                self._sock.sendall(data, socket.MSG_NOSIGNAL)
        except OSError as exc:
            with self._lock:
                self._pending.pop(rid, None)
            raise DaemonGone(f"sending {op!r} failed: {exc}") from exc
        return call

    @staticmethod
    def _finish(call: _Call) -> tuple[dict[str, object], socket.socket | None]:
        if call.error is not None:
            if call.fd is not None:
                socket.close(call.fd)
                call.fd = None
            raise call.error
        assert call.reply is not None
        sock = None if call.fd is None else socket.socket(fileno=call.fd)
        call.fd = None
        return call.reply, sock

    def _call(self, op: str, fds: Sequence[int] = (), /, **args: object) -> dict[str, object]:
        reply, sock = self._call_fd(op, fds, **args)
        if sock is not None:
            sock.close()
        return reply

    def _call_fd(
        self, op: str, fds: Sequence[int] = (), /, **args: object
    ) -> tuple[dict[str, object], socket.socket | None]:
        call = self._start(op, fds, **args)
        call.done.wait()
        return self._finish(call)

    def _call_quiet(self, op: str, conn: int) -> None:
        """``op`` on ``conn``, quiet if the conn (or the daemon) is already gone."""
        try:
            self._call(op, conn=conn)
        except DaemonGone:
            pass
        except SpliceError as exc:
            if exc.code != "ENOENT":
                raise

    def _close_remote(self, conn: int) -> None:
        """Close a conn in the daemon; quiet if it is already gone there."""
        self._call_quiet("close", conn)

    # -- the reader thread -----------------------------------------------------

    def _read_loop(self) -> None:
        framer = LineFramer(REPLY_LIMIT)
        fds: deque[int] = deque()
        reason = "daemon closed the API connection"
        try:
            while True:
                try:
                    data, ancdata, flags, _ = self._sock.recvmsg(
                        RECV_SIZE, socket.CMSG_SPACE(MAX_FDS_PER_RECV * 4)
                    )
                except OSError as exc:
                    reason = f"API connection failed: {exc}"
                    break
                for level, kind, cdata in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        received = array.array("i")
                        received.frombytes(cdata[: len(cdata) - len(cdata) % received.itemsize])
                        fds.extend(received)
                if flags & socket.MSG_CTRUNC:
                    reason = "descriptors were truncated (protocol violation)"
                    break
                if not data:
                    break
                lines = framer.feed(data)
                if framer.overflowed:
                    reason = "daemon sent an over-long line"
                    break
                for line in lines:
                    self._on_line(line, fds)
        except Exception as exc:  # a bug here must still release every waiter
            log.exception("API reader failed")
            reason = f"API reader failed: {exc}"
        finally:
            for fd in fds:
                socket.close(fd)
            if self._last_unmatched_error:
                reason = f"{reason} (last error: {self._last_unmatched_error})"
            self._disconnect(DaemonGone(reason))

    def _on_line(self, line: bytes, fds: deque[int]) -> None:
        try:
            obj = json.loads(line)
        except ValueError:
            log.warning("daemon sent a line that is not JSON: %r", line[:200])
            return
        if not isinstance(obj, dict):
            return
        if "event" in obj and "id" not in obj:
            try:
                self._events.put_nowait(obj)
            except queue.Full:
                self.events_dropped += 1
            return
        fd = None
        if obj.get("fd") is True:
            if not fds:
                raise RuntimeError(f"reply promises an fd but none arrived: {obj!r}")
            fd = fds.popleft()
        rid = obj.get("id")
        with self._lock:
            call = self._pending.pop(rid, None) if isinstance(rid, int) else None
        if call is None:
            self._orphan(obj, fd)
            return
        if obj.get("ok") is True:
            call.reply = obj
            call.fd = fd
        else:
            if fd is not None:
                socket.close(fd)
            call.error = error_from(obj)
        call.done.set()

    def _orphan(self, obj: dict[str, object], fd: int | None) -> None:
        if obj.get("ok") is False:
            # e.g. {"id": null, "error": "ELIMIT"} just before the daemon hangs up on us
            self._last_unmatched_error = f"{obj.get('error')}: {obj.get('message')}"
            log.warning("unmatched error from daemon: %s", self._last_unmatched_error)
        if fd is not None:
            socket.close(fd)
            conn = obj.get("conn")
            if isinstance(conn, int):
                # Nobody waits for this connection: release it in the daemon without
                # waiting for the reply (this is the reader thread, which reads it).
                with contextlib.suppress(SpliceError):
                    self._start("close", conn=conn)

    def _disconnect(self, gone: DaemonGone) -> None:
        with self._lock:
            if self._gone is None:
                self._gone = gone
            calls = list(self._pending.values())
            self._pending.clear()
        for call in calls:
            call.error = self._gone
            call.done.set()
        while True:  # make room for the wake-up, dropping the oldest events if full
            try:
                self._events.put_nowait(None)
                break
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._events.get_nowait()
                    self.events_dropped += 1


class Listener:
    """A listening endpoint in the daemon (what init_splice + listen() make)."""

    def __init__(self, client: SpliceClient, listener_id: int, addr: Address) -> None:
        self.client = client
        self.id = listener_id
        self.addr = addr
        self._lock = threading.Lock()
        # accept requests whose caller timed out: the next accept() waits on
        # them instead of asking again, so no connection is lost or leaked.
        self._abandoned: deque[_Call] = deque()

    def accept(self, timeout: float | None = None) -> Connection:
        """The next connection; raises ``TimeoutError`` after ``timeout`` seconds."""
        with self._lock:
            call = self._abandoned.popleft() if self._abandoned else None
        if call is None:
            call = self.client._start("accept", listener=self.id)
        if not call.done.wait(timeout):
            with self._lock:
                self._abandoned.append(call)
            raise TimeoutError(f"no connection on listener {self.id} within {timeout} s")
        reply, sock = self.client._finish(call)
        return Connection._from_reply(self.client, reply, sock)

    def close(self) -> None:
        try:
            self.client._call("close", listener=self.id)
        except DaemonGone:
            pass
        finally:
            with self._lock:
                abandoned = list(self._abandoned)
                self._abandoned.clear()
            for call in abandoned:
                # A connection accepted for a caller who gave up: release it.
                if call.done.is_set() and call.error is None and call.reply is not None:
                    with contextlib.suppress(SpliceError, OSError):
                        reply, sock = self.client._finish(call)
                        if sock is not None:
                            sock.close()
                        self.client._close_remote(reply_id(reply, "conn"))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Connection:
    """A TCP connection terminated by the daemon, used like a socket.

    ``sock`` is a real ``socket.socket`` (the proxy's end of the daemon's
    socketpair), so it works with select/selectors/asyncio.  A server-side
    connection from ``intend_splice`` has no socket until ``connect()``.
    """

    def __init__(
        self,
        client: SpliceClient,
        conn_id: int,
        sock: socket.socket | None,
        peer: Address | None,
        local: Address | None,
    ) -> None:
        self.client = client
        self.id = conn_id
        self._sock = sock
        self.peer = peer
        self.local = local
        self._timeout: float | None = None
        self.released = False  # the daemon let go of it (connect_splice with release)

    @classmethod
    def _released(cls, client: SpliceClient, reply: dict[str, object]) -> Connection:
        conn = cls(client, *handed_conn(reply, None, need_sock=False))
        conn.released = True
        return conn

    @classmethod
    def _from_reply(
        cls, client: SpliceClient, reply: dict[str, object], sock: socket.socket | None
    ) -> Connection:
        return cls(client, *handed_conn(reply, sock))

    def __repr__(self) -> str:
        return f"<Connection {self.id} local={self.local} peer={self.peer}>"

    @property
    def sock(self) -> socket.socket:
        if self._sock is None:
            raise SpliceError("ESTATE", f"conn {self.id} is not connected")
        return self._sock

    def connect(
        self,
        remote: Address,
        local: Address | None = None,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        """Connect the server side made by ``intend_splice``."""
        if self._sock is not None:
            raise SpliceError("ESTATE", f"conn {self.id} is already connected")
        reply, sock = self.client._call_fd(
            "connect",
            conn=self.id,
            remote=list(remote),
            local=None if local is None else list(local),
            timeout=timeout,
        )
        _, sock, self.peer, self.local = handed_conn(reply, sock)
        assert sock is not None
        sock.settimeout(self._timeout)
        self._sock = sock

    # -- socket-like surface -----------------------------------------------

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        return self.sock.recv(bufsize, flags)

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0, flags: int = 0) -> int:
        return self.sock.recv_into(buffer, nbytes, flags)

    def send(self, data: bytes | bytearray | memoryview, flags: int = 0) -> int:
        return self.sock.send(data, flags)

    def sendall(self, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        self.sock.sendall(data, flags)

    def shutdown(self, how: int = socket.SHUT_WR) -> None:
        """Half-close the descriptor: after the bytes already written, the daemon sends FIN."""
        self.sock.shutdown(how)

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout
        if self._sock is not None:
            self._sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    def set_keepalive(self, idle: float | None, interval: float = 75.0, count: int = 9) -> None:
        """RFC 9293 3.8.4 keep-alive in the daemon (the ``keepalive`` op); ``idle=None``: off.

        After ``idle`` seconds without a segment from the peer the daemon
        probes every ``interval`` seconds; ``count`` unanswered probes time
        the connection out (a ``timed_out`` event, RST to the peer).
        """
        args: dict[str, object] = {"conn": self.id, "idle": idle}
        if idle is not None:
            args.update(interval=interval, count=count)
        self.client._call("keepalive", **args)

    def abort(self) -> None:
        """RST the connection now (the ``abort`` op): unsent and unread bytes are lost.

        Quiet if the daemon already forgot the conn; ``SpliceError`` ESTATE
        for a spliced conn (``close`` it instead).
        """
        # The op first: closing our end first would look like a half-close
        # to the daemon, and a FIN could go out ahead of the RST.
        self.client._call_quiet("abort", self.id)
        if self._sock is not None:
            self._sock.close()
        self.released = True  # nothing left to close

    def _let_go(self) -> None:
        """The daemon released this conn for us: only our descriptor is left to close."""
        if self._sock is not None:
            self._sock.close()
        self.released = True

    def close(self) -> None:
        """Close the descriptor and the conn in the daemon (a spliced conn keeps flowing)."""
        if self._sock is not None:
            self._sock.close()
        if not self.released:
            self.client._close_remote(self.id)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
