"""The asyncio client library: the same protocol, ops and errors as ``client``.

    from daemon.api.aio import AsyncSpliceClient

    async with await AsyncSpliceClient.open("/run/tcp-splice/spliced.sock") as api:
        lst = await api.listen(("192.0.2.1", 1080))    # init_splice (thesis 4.1)
        cli = await lst.accept()                        # has .sock, recv(), sendall()
        request = await cli.recv(4096)
        srv = await api.connect_splice(cli, ("203.0.113.2", 80), len(reply))
        await cli.sendall(reply)
        cli.release(); srv.release()

Everything runs in the event loop's thread: the API socket is read by a
reader callback (``loop.add_reader``), replies complete futures, and the
proxy's own connections are non-blocking sockets driven by the same loop.
Compared with the threaded client this saves, per request, the hand-off
from the reader thread to the caller's thread, and a proxy built on it needs
no thread per client: on a 2-core machine those switches were a large part
of a spliced connection's set-up time (docs/architecture.md, "Connection
setup").

Errors are the threaded client's: ``SpliceError`` with the protocol's code
and errno, ``DaemonGone`` (EDISCONNECTED) for every pending and later call
once the API connection is gone.  Descriptors arrive with SCM_RIGHTS and are
paired with ``"fd": true`` replies in arrival order (docs/api.md).

Cancellation: a cancelled ``accept`` keeps its request; the listener's next
``accept`` gets that connection (none is lost).  Any other cancelled call
that later succeeds with a new connection has it closed in the daemon.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import itertools
import json
import logging
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
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

__all__ = [
    "AsyncConnection",
    "AsyncListener",
    "AsyncSpliceClient",
    "DaemonGone",
    "SpliceError",
]

log = logging.getLogger("daemon.api.aio")

Reply = tuple[dict[str, object], int | None]  # the reply and its descriptor, if any


def _conn_id(conn: AsyncConnection | int) -> int:
    return conn.id if isinstance(conn, AsyncConnection) else conn


class AsyncSpliceClient:
    """One attachment to the splice daemon's API socket, inside an event loop."""

    def __init__(self, path: str, sock: socket.socket, max_events: int) -> None:
        # Use ``await AsyncSpliceClient.open(path)``: attaching needs the loop.
        self.path = path
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._ids = itertools.count(1)
        self._gone: DaemonGone | None = None
        self._framer = LineFramer(REPLY_LIMIT)
        self._fds: deque[int] = deque()
        self._out = bytearray()  # request bytes the socket did not take yet
        # Descriptors (SCM_RIGHTS) that go with the next bytes the socket takes:
        # never later than the first byte of the request they belong to.
        self._out_fds: list[int] = []
        self._writing = False  # _flush is registered as the socket's writer
        self._last_unmatched_error = ""
        self._events: asyncio.Queue[dict[str, object] | None] = asyncio.Queue(max_events)
        self.events_dropped = 0
        # Bounded splices waiting for their hand-back, by client conn id, and
        # the server conn id of each (a reset of either ends the wait).
        self._handbacks: dict[int, asyncio.Future[dict[str, object]]] = {}
        self._handback_servers: dict[int, int] = {}
        self.server_info: dict[str, object] = {}
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    async def open(
        cls, path: str, *, connect_timeout: float = 5.0, max_events: int = 1024
    ) -> AsyncSpliceClient:
        """Attach (connect + ``hello``); raises OSError or SpliceError like the threaded client."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(connect_timeout):
                await asyncio.get_running_loop().sock_connect(sock, path)
        except BaseException:
            sock.close()
            raise
        client = cls(path, sock, max_events)
        try:
            client.server_info = await client._call("hello", version=PROTOCOL_VERSION)
        except BaseException:
            client.close()
            raise
        return client

    # -- context manager -----------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Detach from the daemon: it closes this client's unspliced connections."""
        self._disconnect(DaemonGone("the client closed the API connection"))

    @property
    def closed(self) -> bool:
        return self._gone is not None

    # -- the operations ------------------------------------------------------

    async def listen(self, addr: Address, backlog: int = DEFAULT_BACKLOG) -> AsyncListener:
        """init_splice: a listening endpoint whose connections can later be spliced."""
        reply = await self._call("listen", addr=list(addr), backlog=backlog)
        bound = reply_address(reply["addr"]) if "addr" in reply else addr
        return AsyncListener(self, reply_id(reply, "listener"), bound)

    async def connect(
        self,
        remote: Address,
        local: Address | None = None,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
        rcvbuf: int | None = None,
    ) -> AsyncConnection:
        """A new connection, returned once established (the daemon enforces ``timeout``).

        ``rcvbuf``: receive buffering for it (docs/api.md, connect): small for a
        conn whose bodies will be spliced, so they wait at the peer.
        """
        args: dict[str, object] = {}
        if rcvbuf is not None:
            args["rcvbuf"] = rcvbuf
        reply = await self._request(
            "connect",
            remote=list(remote),
            local=None if local is None else list(local),
            timeout=timeout,
            **args,
        )
        return AsyncConnection._from_reply(self, reply)

    async def intend_splice(self, conn: AsyncConnection | int) -> AsyncConnection:
        """intend_splice (thesis 4.1): reading from ``conn`` stops; returns the server side."""
        reply = await self._call("intend_splice", conn=_conn_id(conn))
        return AsyncConnection(self, reply_id(reply, "conn"), None, None, None)

    async def splice(
        self, client: AsyncConnection | int, server: AsyncConnection | int, length: int
    ) -> dict[str, object]:
        """splice(len): only ``length`` more bytes may be written to ``client``.

        Bytes still unread in the client's fd belong to the server: they are
        taken out here and sent with the request (as the threaded client does).
        """
        unread = take_unread(client._sock) if isinstance(client, AsyncConnection) else b""
        return await self._call(
            "splice",
            client=_conn_id(client),
            server=_conn_id(server),
            len=length,
            unread=base64.b64encode(unread).decode("ascii"),
        )

    async def splice_sockets(
        self, client: socket.socket, server: socket.socket
    ) -> dict[str, object]:
        """Splice two of the proxy's own kernel TCP connections (docs/api.md).

        The proxy accepted ``client`` and connected ``server`` itself, spoke its
        protocol and wrote its reply; the daemon takes both connections over as
        they stand (the sockets' descriptors go with the request).  On success
        close both sockets: they are closed without a FIN or RST, the daemon
        carries the connections.  On a SpliceError they are yours as before.
        """
        return await self._call("splice_sockets", (client.fileno(), server.fileno()))

    async def splice_bounded(
        self,
        client: AsyncConnection,
        server: AsyncConnection,
        *,
        server_limit: int,
        client_limit: int = 0,
        on_tap: Callable[[bytes], None] | None = None,
    ) -> dict[str, object]:
        """Splice two established conns for a byte count each way; return at the hand-back.

        Beyond thesis 4.1 (docs/api.md, "Bounded splice"): the next
        ``server_limit`` bytes of the server's stream that we have not read
        go to the client, the next ``client_limit`` of the client's to the
        server, and then both conns are ours again.  Returns the
        ``unspliced`` event (``bytes_s2c``/``bytes_c2s``: every byte of each
        stream the splice moved; fewer than the limit if a peer closed
        first) plus ``client_extra`` and ``server_extra``: bytes
        the daemon had already put in our fds past a limit, which are ours
        (they come before anything read from the fds afterwards).  Read the
        fds only through ``AsyncConnection.recv``, so that the count of what
        we read is right.  ``SpliceError`` ECONNRESET if a peer reset the
        splice (both conns are then gone).

        ``on_tap``: a TCP tap (thesis 4.4); it is called with every byte of
        the server's stream that goes to the client in this splice, in
        order, exactly once (the ones this call wrote to the client itself
        first).  The result then has ``tapped`` (bytes given to ``on_tap``)
        and ``tap_overflow``: True if the tap stopped early because we read
        it too slowly (the daemon never holds the splice back for it).
        """
        reply = await self._call("intend_splice", conn=client.id, server=server.id)
        delivered = reply.get("delivered")
        if not isinstance(delivered, dict):
            raise SpliceError("EINTERNAL", "intend_splice reply without 'delivered'")
        # What was in the fds when delivery stopped: within a limit it is
        # the start of what the splice carries, so it goes on through the
        # other fd before the splice (in order, ahead of everything the
        # daemon still holds); past a limit it is ours.
        c_left = await client._take_delivered(int(delivered["client"]))
        s_left = await server._take_delivered(int(delivered["server"]))
        to_server, client_extra = c_left[:client_limit], c_left[client_limit:]
        to_client, server_extra = s_left[:server_limit], s_left[server_limit:]
        if to_server:
            await server.sendall(to_server)
        if to_client:
            await client.sendall(to_client)
        if on_tap is not None and to_client:
            on_tap(to_client)
        waiter: asyncio.Future[dict[str, object]] = self._loop.create_future()
        self._handbacks[client.id] = waiter
        self._handback_servers[server.id] = client.id
        tap_reader: asyncio.Task[int] | None = None
        args: dict[str, object] = {}
        if on_tap is not None:
            args["tap"] = "server"
        try:
            reply, fd = await self._request(
                "splice",
                client=client.id,
                server=server.id,
                len=0,
                server_limit=server_limit - len(to_client),
                client_limit=client_limit - len(to_server),
                **args,
            )
            if fd is not None:
                tap_sock = socket.socket(fileno=fd)
                if on_tap is None:
                    tap_sock.close()
                else:
                    tap_reader = asyncio.ensure_future(_read_tap(tap_sock, on_tap))
            event = await waiter
            result = {**event, "client_extra": client_extra, "server_extra": server_extra}
            # Every byte of each stream this call moved, ours from the fds too.
            for name, ours in (("bytes_c2s", to_server), ("bytes_s2c", to_client)):
                count = event.get(name)
                if isinstance(count, int):
                    result[name] = count + len(ours)
            if tap_reader is not None:
                # The daemon closes the tap once it has written everything.
                got = await tap_reader
                tap_reader = None
                result["tap_overflow"] = bool(event.get("tap_overflow")) or got != event.get(
                    "tapped"
                )
                result["tapped"] = got + len(to_client)
            return result
        finally:
            self._handbacks.pop(client.id, None)
            self._handback_servers.pop(server.id, None)
            if tap_reader is not None:
                tap_reader.cancel()

    async def connect_splice(
        self,
        client: AsyncConnection,
        remote: Address,
        length: int | None = None,
        local: Address | None = None,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
        *,
        data: bytes | None = None,
        local_at: int | None = None,
        release: bool = False,
    ) -> AsyncConnection:
        """intend_splice + connect + splice(len) in one request; returns the server side.

        As ``SpliceClient.connect_splice``: if the daemon left the splice to
        us (bytes unread in the client fd) this calls ``splice`` with them; on
        a connect error ``client`` stays intended.

        ``data``: the len bytes themselves, sent by the daemon (with the bound
        local address written at ``local_at``, SOCKS5 style); ``release``:
        the daemon then lets go of both conns (``server.released``: no fd,
        and the ids are gone; just close ``client``'s fd).  Whatever the
        daemon could not do (the splice was left to us) is done here, so on
        return the data is sent and, with ``release``, both conns released.
        """
        args = connect_splice_args(client.id, remote, length, local, timeout, data, local_at)
        reply = await self._request("connect_splice", **args, release=release)
        obj = reply[0]
        if obj.get("released") is True:
            client._let_go()
            return AsyncConnection._released(self, obj)
        server = AsyncConnection._from_reply(self, reply)
        if obj.get("spliced"):
            return server
        await self.splice(client, server, len(data) if data is not None else (length or 0))
        if data is not None:
            if local_at is not None:
                data = with_local(data, local_at, server.local)
            await client.sendall(data)
            if release:
                client.release()
                server.release()
                client.released = server.released = True
        return server

    async def shutdown(self, conn: AsyncConnection | int) -> dict[str, object]:
        """The ``shutdown`` op: FIN after the data already written."""
        return await self._call("shutdown", conn=_conn_id(conn))

    async def stats(self, conn: AsyncConnection | int | None = None) -> dict[str, object]:
        return await self._call("stats", conn=None if conn is None else _conn_id(conn))

    async def list(self) -> dict[str, object]:
        """This client's connections and listeners, as the daemon records them."""
        return await self._call("list")

    async def close_conn(self, conn: int) -> None:
        """The ``close`` op; quiet if the daemon forgot the conn already or went away."""
        await self._call_quiet("close", conn)

    async def _call_quiet(self, op: str, conn: int) -> None:
        """``op`` on ``conn``, quiet if the conn (or the daemon) is already gone."""
        try:
            await self._call(op, conn=conn)
        except DaemonGone:
            pass
        except SpliceError as exc:
            if exc.code != "ENOENT":
                raise

    async def next_event(self, timeout: float | None = None) -> dict[str, object] | None:
        """The oldest unsolicited event, waiting up to ``timeout``; None if there was none."""
        try:
            async with asyncio.timeout(timeout):
                event = await self._events.get()
        except TimeoutError:
            return None
        if event is None:
            self._events.put_nowait(None)  # keep waking later callers too
        return event

    async def events(self, timeout: float | None = None) -> AsyncIterator[dict[str, object]]:
        """Yield events as they come; stops after ``timeout`` idle seconds or at detach."""
        while (event := await self.next_event(timeout)) is not None:
            yield event

    # -- requests and replies --------------------------------------------------

    def _start(self, op: str, fds: Sequence[int] = (), /, **args: object) -> asyncio.Future[Reply]:
        """Send one request; the future gets (reply, fd) or the error."""
        if self._gone is not None:
            raise self._gone
        rid = next(self._ids)
        future: asyncio.Future[Reply] = self._loop.create_future()
        self._pending[rid] = future
        line = json.dumps({"id": rid, "op": op, **args}, separators=(",", ":")) + "\n"
        self._send(line.encode(), fds)
        if self._gone is not None:  # the send found the connection dead
            raise self._gone
        return future

    def _send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Queue a request behind what is waiting, and send as much as the socket takes.

        ``fds`` go with the first byte sent next: the bytes queued ahead, if
        any, else this request's own, so they never reach the daemon after
        the line that takes them (docs/api.md, "File descriptors").
        """
        self._out += data
        self._out_fds += fds
        if len(self._out) == len(data):  # nothing was waiting: no writer registered yet
            self._flush()

    def _flush(self) -> None:
        try:
            if self._out_fds:
                sent = socket.send_fds(self._sock, [self._out], self._out_fds, socket.MSG_NOSIGNAL)
                self._out_fds = []
            else:
                sent = self._sock.send(self._out, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._disconnect(DaemonGone(f"sending a request failed: {exc}"))
            return
        del self._out[:sent]
        if self._out and not self._writing:
            self._writing = True
            self._loop.add_writer(self._sock.fileno(), self._flush)
        elif not self._out and self._writing:
            self._writing = False
            self._loop.remove_writer(self._sock.fileno())

    async def _request(self, op: str, fds: Sequence[int] = (), /, **args: object) -> Reply:
        """The reply and its fd.

        Cancelling the caller cancels the future; a reply that comes later
        with a new connection finds it done and releases it (``_on_line``).
        """
        return await self._start(op, fds, **args)

    async def _call(self, op: str, fds: Sequence[int] = (), /, **args: object) -> dict[str, object]:
        reply, fd = await self._request(op, fds, **args)
        if fd is not None:
            socket.close(fd)
        return reply

    def _drop_late(self, future: asyncio.Future[Reply]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        reply, fd = future.result()
        self._release_orphan(reply, fd)

    def _release_orphan(self, reply: dict[str, object], fd: int | None) -> None:
        if fd is None:
            return
        socket.close(fd)
        conn = reply.get("conn")
        if isinstance(conn, int) and self._gone is None:
            # A connection nobody waits for: release it in the daemon (reply unread).
            with contextlib.suppress(SpliceError):
                self._start("close", conn=conn).add_done_callback(_ignore_result)

    # -- the reader callback ---------------------------------------------------

    def _on_readable(self) -> None:
        while self._gone is None:
            try:
                data, ancdata, flags, _ = self._sock.recvmsg(
                    RECV_SIZE, socket.CMSG_SPACE(MAX_FDS_PER_RECV * 4)
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._disconnect(DaemonGone(f"API connection failed: {exc}"))
                return
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(cdata[: len(cdata) - len(cdata) % received.itemsize])
                    self._fds.extend(received)
            if flags & socket.MSG_CTRUNC:
                self._disconnect(DaemonGone("descriptors were truncated (protocol violation)"))
                return
            if not data:
                self._disconnect(DaemonGone("daemon closed the API connection"))
                return
            lines = self._framer.feed(data)
            if self._framer.overflowed:
                self._disconnect(DaemonGone("daemon sent an over-long line"))
                return
            for line in lines:
                try:
                    self._on_line(line)
                except SpliceError as exc:
                    self._disconnect(DaemonGone(str(exc)))
                    return

    def _on_line(self, line: bytes) -> None:
        try:
            obj = json.loads(line)
        except ValueError:
            log.warning("daemon sent a line that is not JSON: %r", line[:200])
            return
        if not isinstance(obj, dict):
            return
        if "event" in obj and "id" not in obj:
            if self._hand_back_event(obj):
                return
            try:
                self._events.put_nowait(obj)
            except asyncio.QueueFull:
                self.events_dropped += 1
            return
        fd = None
        if obj.get("fd") is True:
            if not self._fds:
                raise SpliceError("EPROTO", f"reply promises an fd but none arrived: {obj!r}")
            fd = self._fds.popleft()
        rid = obj.get("id")
        future = self._pending.pop(rid, None) if isinstance(rid, int) else None
        if future is None or future.done():
            if obj.get("ok") is False and future is None:
                self._last_unmatched_error = f"{obj.get('error')}: {obj.get('message')}"
                log.warning("unmatched error from daemon: %s", self._last_unmatched_error)
            self._release_orphan(obj, fd)
            return
        if obj.get("ok") is True:
            future.set_result((obj, fd))
        else:
            if fd is not None:
                socket.close(fd)
            future.set_exception(error_from(obj))

    def _hand_back_event(self, obj: dict[str, object]) -> bool:
        """An event a bounded splice waits for (``splice_bounded``): True if it was one."""
        kind = obj.get("event")
        if kind == "unspliced":
            client_id = obj.get("client")
        elif kind == "reset":
            conn = obj.get("conn")
            client_id = conn if conn in self._handbacks else None
            if client_id is None and isinstance(conn, int):
                client_id = self._handback_servers.get(conn)
        else:
            return False
        waiter = self._handbacks.get(client_id) if isinstance(client_id, int) else None
        if waiter is None or waiter.done():
            return False
        if kind == "unspliced":
            waiter.set_result(obj)
        else:
            waiter.set_exception(SpliceError("ECONNRESET", f"conn {client_id}: reset mid-splice"))
        return True

    def _disconnect(self, gone: DaemonGone) -> None:
        if self._gone is not None:
            return
        if self._last_unmatched_error:
            gone = DaemonGone(f"{gone.message} (last error: {self._last_unmatched_error})")
        self._gone = gone
        fileno = self._sock.fileno()
        if fileno >= 0:
            self._loop.remove_reader(fileno)
            if self._writing:
                self._loop.remove_writer(fileno)
        self._sock.close()
        while self._fds:
            socket.close(self._fds.popleft())
        pending = list(self._pending.values())
        self._pending.clear()
        for waiter in self._handbacks.values():
            if not waiter.done():
                waiter.set_exception(gone)
        for future in pending:
            if not future.done():
                future.set_exception(gone)
                # Nobody may be waiting any more (a cancelled caller): no warning for that.
                future.add_done_callback(_ignore_result)
        while True:  # make room for the wake-up, dropping the oldest events if full
            try:
                self._events.put_nowait(None)
                break
            except asyncio.QueueFull:
                self._events.get_nowait()
                self.events_dropped += 1


async def _read_tap(sock: socket.socket, on_tap: Callable[[bytes], None]) -> int:
    """Feed a tap's bytes to ``on_tap`` until the daemon closes it; return the count."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    got = 0
    try:
        while data := await loop.sock_recv(sock, RECV_SIZE):
            got += len(data)
            on_tap(data)
    finally:
        sock.close()
    return got


def _ignore_result(future: asyncio.Future[Reply]) -> None:
    if not future.cancelled():
        future.exception()  # marks it retrieved


class AsyncListener:
    """A listening endpoint in the daemon (what init_splice + listen() make)."""

    def __init__(self, client: AsyncSpliceClient, listener_id: int, addr: Address) -> None:
        self.client = client
        self.id = listener_id
        self.addr = addr
        # accept requests whose caller was cancelled (e.g. a timeout): the
        # next accept() waits on them instead of asking again, so no
        # connection is lost or leaked.
        self._abandoned: deque[asyncio.Future[Reply]] = deque()

    async def accept(self) -> AsyncConnection:
        """The next connection (wrap in ``asyncio.timeout`` to bound the wait)."""
        future = self._abandoned.popleft() if self._abandoned else None
        if future is None:
            future = self.client._start("accept", listener=self.id)
        try:
            reply = await asyncio.shield(future)
        except asyncio.CancelledError:
            self._abandoned.appendleft(future)  # shielded: it still completes
            raise
        return AsyncConnection._from_reply(self.client, reply)

    async def close(self) -> None:
        try:
            await self.client._call("close", listener=self.id)
        except DaemonGone:
            pass
        finally:
            abandoned = list(self._abandoned)
            self._abandoned.clear()
            for future in abandoned:
                # A connection accepted for a caller who gave up: release it.
                if future.done():
                    self.client._drop_late(future)
                else:
                    future.add_done_callback(self.client._drop_late)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class AsyncConnection:
    """A TCP connection terminated by the daemon, driven by the event loop.

    ``sock`` is the proxy's end of the daemon's socketpair, non-blocking; the
    coroutines here wrap it (``recv`` takes flags, e.g. ``MSG_PEEK``, which
    ``loop.sock_recv`` does not).  A server side from ``intend_splice`` has
    no socket until ``connect()``.
    """

    def __init__(
        self,
        client: AsyncSpliceClient,
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
        self.released = False  # the daemon let go of it (connect_splice with release)
        self.received = 0  # bytes read from the fd (``recv`` without MSG_PEEK)
        if sock is not None:
            sock.setblocking(False)

    @classmethod
    def _released(cls, client: AsyncSpliceClient, obj: dict[str, object]) -> AsyncConnection:
        conn = cls(client, *handed_conn(obj, None, need_sock=False))
        conn.released = True
        return conn

    @classmethod
    def _from_reply(cls, client: AsyncSpliceClient, reply: Reply) -> AsyncConnection:
        obj, fd = reply
        return cls(client, *handed_conn(obj, None if fd is None else socket.socket(fileno=fd)))

    def __repr__(self) -> str:
        return f"<AsyncConnection {self.id} local={self.local} peer={self.peer}>"

    @property
    def sock(self) -> socket.socket:
        if self._sock is None:
            raise SpliceError("ESTATE", f"conn {self.id} is not connected")
        return self._sock

    async def connect(
        self,
        remote: Address,
        local: Address | None = None,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        """Connect the server side made by ``intend_splice``."""
        if self._sock is not None:
            raise SpliceError("ESTATE", f"conn {self.id} is already connected")
        obj, fd = await self.client._request(
            "connect",
            conn=self.id,
            remote=list(remote),
            local=None if local is None else list(local),
            timeout=timeout,
        )
        _, sock, self.peer, self.local = handed_conn(
            obj, None if fd is None else socket.socket(fileno=fd)
        )
        assert sock is not None
        sock.setblocking(False)
        self._sock = sock

    # -- socket-like coroutines ----------------------------------------------

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        fileno = self.sock.fileno()
        ready = loop.create_future()
        loop.add_reader(fileno, ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_reader(fileno)

    async def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Like ``socket.recv`` (flags included), waiting in the loop."""
        sock = self.sock
        while True:
            try:
                data = sock.recv(bufsize, flags)
            except (BlockingIOError, InterruptedError):
                await self._readable()
                continue
            if not flags & socket.MSG_PEEK:
                self.received += len(data)
            return data

    async def _take_delivered(self, delivered: int) -> bytes:
        """Read what the daemon had put in the fd up to ``delivered`` bytes in all."""
        parts: list[bytes] = []
        while self.received < delivered:
            data = await self.recv(delivered - self.received)
            if not data:
                raise SpliceError("ESTATE", f"conn {self.id}: the fd ended before its bytes")
            parts.append(data)
        return b"".join(parts)

    async def sendall(self, data: bytes | bytearray | memoryview) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    def shutdown(self, how: int = socket.SHUT_WR) -> None:
        """Half-close the descriptor: after the bytes already written, the daemon sends FIN."""
        self.sock.shutdown(how)

    async def set_keepalive(
        self, idle: float | None, interval: float = 75.0, count: int = 9
    ) -> None:
        """RFC 9293 3.8.4 keep-alive in the daemon (as ``client.Connection.set_keepalive``)."""
        args: dict[str, object] = {"conn": self.id, "idle": idle}
        if idle is not None:
            args.update(interval=interval, count=count)
        await self.client._call("keepalive", **args)

    async def abort(self) -> None:
        """RST the connection now (the ``abort`` op): unsent and unread bytes are lost.

        Quiet if the daemon already forgot the conn; ``SpliceError`` ESTATE
        for a spliced conn (``close`` it instead).
        """
        # The op first: closing our end first would look like a half-close
        # to the daemon, and a FIN could go out ahead of the RST.
        await self.client._call_quiet("abort", self.id)
        if self._sock is not None:
            self._sock.close()
        self.released = True  # nothing left to close

    def _let_go(self) -> None:
        """The daemon released this conn for us: only our descriptor is left to close."""
        if self._sock is not None:
            self._sock.close()
        self.released = True

    async def close(self) -> None:
        """Close the descriptor and the conn in the daemon (a spliced conn keeps flowing)."""
        if self._sock is not None:
            self._sock.close()
        if not self.released:
            await self.client.close_conn(self.id)

    def release(self) -> None:
        """``close`` without waiting for the daemon's reply (errors are only logged).

        What a proxy calls once it is done with a spliced pair: nothing on
        the client's path waits for the daemon to confirm it.
        """
        if self._sock is not None:
            self._sock.close()
        client = self.client
        if client.closed or self.released:
            return
        conn_id = self.id

        def logged(future: asyncio.Future[Reply]) -> None:
            if future.cancelled():
                return
            exc = future.exception()
            if isinstance(exc, SpliceError) and exc.code not in ("ENOENT", "EDISCONNECTED"):
                log.debug("closing conn %d: %s", conn_id, exc)

        with contextlib.suppress(DaemonGone):
            client._start("close", conn=conn_id).add_done_callback(logged)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
