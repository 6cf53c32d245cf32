"""The daemon side of the Unix socket API: a non-blocking server on a selector.

Theory of operation
-------------------
``ApiServer`` owns the listening Unix socket and one ``ApiClient`` per
attached proxy.  It never blocks and never owns the event loop: the daemon's
loop calls ``register(selector)`` once and then, for every ready key, calls
``key.data(mask)``.  That is the convention for everything the server
registers: ``key.data`` is a callable taking the ready mask
(``selectors.EVENT_READ`` / ``EVENT_WRITE`` bits)::

    for key, mask in selector.select(timeout):
        key.data(mask)

Per API client: bytes in -> ``LineFramer`` -> ``parse_request`` -> ownership
check -> ``Core`` call -> reply line queued.  Async ops (accept, connect)
hand the core a ``Done`` callback; their replies go out whenever the core
completes them, so replies are not in request order and clients match ids.

Output is a FIFO of (bytes, optional fd) items, written when the socket is
writable.  A reply that hands over a connection is sent with one sendmsg()
carrying SCM_RIGHTS, so the fd arrives with the first byte of its line; if
the kernel takes only part of it, the rest follows without the fd.  The
queue is bounded in bytes and in fds: an API client that does not read its
replies is disconnected rather than letting it grow the daemon's memory or
stall the loop.

With ``defer_flush`` (the daemon sets it) replies queued during one pass of
the loop go out when the loop calls ``flush()`` at the end of the pass, not
as each is made: a reply wakes its proxy, which may then run on the
daemon's CPU (a Unix socket send is a synchronous wakeup) before the daemon
has written the packets that pass made, e.g. the first segment of a
connection ``splice_sockets`` just took over.

Ownership: every listener / conn id the server hands out is recorded with
the API client it went to; a request naming an id gets ENOENT if no one owns
it and EPERM if someone else does (DESIGN.md: touching another client's
connection is a clear error).  The core calls ``forget`` when it frees one.

Nothing raises out of the server because of what a client sent or because
the core misbehaved: errors become replies (EINTERNAL for core bugs, logged)
and a broken client is dropped alone.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import selectors
import socket
import stat
import struct
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from daemon.api import protocol
from daemon.api.core import TAP_SOCK, ApiError, Core, Done, ObjectKind, Result
from daemon.api.protocol import (
    OPS,
    PROTOCOL_VERSION,
    Abort,
    Accept,
    BadRequest,
    Close,
    CloseListener,
    Connect,
    ConnectSplice,
    ErrorCode,
    Hello,
    IntendSplice,
    Keepalive,
    LineFramer,
    Listen,
    ListObjects,
    Request,
    Shutdown,
    Splice,
    SpliceSockets,
    Stats,
)

log = logging.getLogger("daemon.api")

DAEMON_NAME = "tcp-splice/0.1"
RECV_SIZE = 64 * 1024
# Descriptors a client may have sent ahead of the requests that take them
# (splice_sockets takes two); more and it is dropped.
MAX_FDS_IN = 16
ACCEPTS_PER_EVENT = 64  # bound the work one readiness event can cause

Handler = Callable[[int], None]


class SocketPathInUse(OSError):
    """A live daemon already answers on the socket path, or it is not a socket."""


@dataclass(slots=True)
class _Outgoing:
    data: bytes
    fd_sock: socket.socket | None = None  # the proxy's end, sent with the first byte


@dataclass(slots=True)
class ApiClient:
    """One attached proxy."""

    id: int
    sock: socket.socket
    handler: Handler
    peer_pid: int = 0
    peer_uid: int = -1
    framer: LineFramer = field(default_factory=LineFramer)
    out: deque[_Outgoing] = field(default_factory=deque)
    out_bytes: int = 0
    out_fds: int = 0
    want_write: bool = False
    pending: int = 0  # async ops handed to the core and not yet completed
    closed: bool = False
    # (kind, id) -> what list reports about it
    objects: dict[tuple[ObjectKind, int], dict[str, object]] = field(default_factory=dict)
    # Descriptors received (SCM_RIGHTS) and not yet taken by a request, in order.
    fds_in: deque[socket.socket] = field(default_factory=deque)


class ApiServer:
    """The Unix socket API server.  See the module docstring for the loop convention."""

    def __init__(
        self,
        path: str,
        core: Core,
        *,
        mode: int = 0o660,
        group: str | int | None = None,
        max_clients: int = 256,
        max_queued_bytes: int = 4 * 1024 * 1024,
        max_queued_fds: int = 1024,
        max_pending: int = 4096,
        listen_backlog: int = 64,
    ) -> None:
        if mode & ~0o777:
            raise ValueError(f"mode {mode:#o} has bits beyond permissions")
        self.path = os.path.abspath(path)
        self.core = core
        self.max_clients = max_clients
        self.max_queued_bytes = max_queued_bytes
        self.max_queued_fds = max_queued_fds
        self.max_pending = max_pending
        self._clients: dict[int, ApiClient] = {}
        self.defer_flush = False
        self._unflushed: dict[int, ApiClient] = {}  # defer_flush: queued since the last flush()
        self._owners: dict[tuple[ObjectKind, int], int] = {}
        self._next_client = 1
        self._selector: selectors.BaseSelector | None = None
        gid = _resolve_group(group)
        _remove_stale_socket(self.path)
        self._sock, self._inode = _bind_private(self.path, mode, gid, listen_backlog)
        log.info("API listening on %s (mode %#o)", self.path, mode)

    # -- the loop's side ---------------------------------------------------

    def register(self, selector: selectors.BaseSelector) -> None:
        """Put the listening socket on the daemon's selector (``key.data`` = handler)."""
        self._selector = selector
        selector.register(self._sock, selectors.EVENT_READ, self._on_listener_ready)

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def close(self) -> None:
        """Drop every API client (the core hears ``client_gone``) and remove the socket file."""
        for client in list(self._clients.values()):
            self._drop(client, "server closing")
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._sock)
        self._sock.close()
        # Remove the path only if it is still our socket, not a successor's.
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    # -- what the core calls (ApiSink) -------------------------------------

    def forget(self, kind: ObjectKind, object_id: int) -> None:
        owner = self._owners.pop((kind, object_id), None)
        if owner is not None and (client := self._clients.get(owner)) is not None:
            client.objects.pop((kind, object_id), None)

    def push_event(self, owner: int, event: Mapping[str, object]) -> None:
        client = self._clients.get(owner)
        if client is None or "event" not in event:
            return
        fields = {k: v for k, v in event.items() if k != "event"}
        try:
            line = protocol.encode_event(str(event["event"]), fields)
        except (TypeError, ValueError):
            log.exception("core pushed an event that is not JSON: %r", event)
            return
        self._queue(client, line)

    # -- accepting API clients ---------------------------------------------

    def _on_listener_ready(self, mask: int) -> None:
        for _ in range(ACCEPTS_PER_EVENT):
            try:
                sock, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: log, keep serving the rest
                log.warning("API accept failed: %s", exc)
                return
            if len(self._clients) >= self.max_clients:
                with contextlib.suppress(OSError):
                    sock.setblocking(False)
                    sock.send(
                        protocol.encode_error(None, ErrorCode.ELIMIT, "too many API clients"),
                        socket.MSG_NOSIGNAL,
                    )
                sock.close()
                log.warning("API client refused: %d clients attached", len(self._clients))
                continue
            self._add_client(sock)

    def _add_client(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        cid = self._next_client
        self._next_client += 1
        client = ApiClient(cid, sock, lambda mask: None)
        client.handler = lambda mask: self._on_client_ready(client, mask)
        with contextlib.suppress(OSError):
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            client.peer_pid, client.peer_uid, _gid = struct.unpack("3i", cred)
        self._clients[cid] = client
        if self._selector is not None:
            self._selector.register(sock, selectors.EVENT_READ, client.handler)
        log.info("API client %d attached (pid %d uid %d)", cid, client.peer_pid, client.peer_uid)

    # -- per-client I/O ------------------------------------------------------

    def _on_client_ready(self, client: ApiClient, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and not client.closed:
            self._flush(client)
        if mask & selectors.EVENT_READ and not client.closed:
            self._read(client)

    def _read(self, client: ApiClient) -> None:
        try:
            data, fds, msg_flags, _addr = socket.recv_fds(client.sock, RECV_SIZE, MAX_FDS_IN)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(client, f"recv failed: {exc}")
            return
        for fd in fds:
            # Whatever was sent, the daemon holds it as a socket object, so that
            # it is closed exactly once (by the request that takes it, or _drop).
            client.fds_in.append(socket.socket(fileno=fd))
        if msg_flags & socket.MSG_CTRUNC or len(client.fds_in) > MAX_FDS_IN:
            self._drop(client, f"more than {MAX_FDS_IN} descriptors sent ahead of their requests")
            return
        if not data:
            self._drop(client, "disconnected")
            return
        for line in client.framer.feed(data):
            if client.closed:
                return
            if line.strip():  # blank lines are tolerated (e.g. typed into socat)
                self._handle_line(client, line)
        if client.framer.overflowed and not client.closed:
            msg = f"request line longer than {client.framer.limit} bytes"
            self._queue(client, protocol.encode_error(None, ErrorCode.EMSGSIZE, msg))
            self._flush(client)  # best effort: the client may not read it in time
            self._drop(client, "line too long")

    def _queue(self, client: ApiClient, data: bytes, fd_sock: socket.socket | None = None) -> None:
        if client.closed:
            if fd_sock is not None:
                fd_sock.close()
            return
        client.out.append(_Outgoing(data, fd_sock))
        client.out_bytes += len(data)
        client.out_fds += fd_sock is not None
        if client.out_bytes > self.max_queued_bytes or client.out_fds > self.max_queued_fds:
            self._drop(client, "not reading its replies (output queue full)")
            return
        if len(client.out) == 1:
            # The common case: the socket has room, skip a select round.
            if self.defer_flush:
                self._unflushed[client.id] = client
            else:
                self._flush(client)

    def flush(self) -> None:
        """Send what was queued since the last call (``defer_flush``; module docstring)."""
        while self._unflushed:
            _cid, client = self._unflushed.popitem()
            if not client.closed:
                self._flush(client)

    def _flush(self, client: ApiClient) -> None:
        while client.out:
            item = client.out[0]
            try:
                if item.fd_sock is not None:
                    sent = socket.send_fds(
                        client.sock, [item.data], [item.fd_sock.fileno()], socket.MSG_NOSIGNAL
                    )
                else:
                    sent = client.sock.send(item.data, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._drop(client, f"send failed: {exc}")
                return
            if item.fd_sock is not None:
                # The proxy holds its own reference now; the daemon keeps only its end.
                item.fd_sock.close()
                item.fd_sock = None
                client.out_fds -= 1
            client.out_bytes -= sent
            if sent < len(item.data):
                item.data = item.data[sent:]
                break
            client.out.popleft()
        self._want_write(client, bool(client.out))

    def _want_write(self, client: ApiClient, want: bool) -> None:
        if want == client.want_write or self._selector is None or client.closed:
            return
        client.want_write = want
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
        self._selector.modify(client.sock, events, client.handler)

    def _drop(self, client: ApiClient, reason: str) -> None:
        if client.closed:
            return
        client.closed = True
        log.info("API client %d dropped: %s", client.id, reason)
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(client.sock)
        client.sock.close()
        for item in client.out:
            if item.fd_sock is not None:
                item.fd_sock.close()
        client.out.clear()
        while client.fds_in:
            client.fds_in.popleft().close()
        for key in client.objects:
            self._owners.pop(key, None)
        client.objects.clear()
        del self._clients[client.id]
        try:
            self.core.client_gone(client.id)
        except Exception:
            log.exception("core.client_gone(%d) failed", client.id)

    # -- requests ------------------------------------------------------------

    def _handle_line(self, client: ApiClient, line: bytes) -> None:
        req = protocol.parse_request(line)
        if isinstance(req, BadRequest):
            self._queue(client, protocol.encode_error(req.id, req.code, req.message))
            return
        try:
            self._dispatch(client, req)
        except ApiError as exc:
            self._queue(client, protocol.encode_error(req.id, exc.code, exc.message))
        except Exception:
            log.exception("API request %r from client %d failed", req, client.id)
            msg = "internal error (logged by the daemon)"
            self._queue(client, protocol.encode_error(req.id, ErrorCode.EINTERNAL, msg))

    def _dispatch(self, client: ApiClient, req: Request) -> None:
        owner = client.id
        conn, lst = ObjectKind.CONN, ObjectKind.LISTENER
        match req:
            case Hello():
                self._reply(client, req.id, self._hello())
            case ListObjects():
                self._reply(client, req.id, _list_objects(client))
            case Listen():
                result = self.core.listen(owner, req.addr, req.backlog)
                self._adopt(client, lst, result)
                self._reply(client, req.id, result)
            case Accept():
                self._check(client, lst, req.listener)
                with self._completion(client, req.id) as done:
                    self.core.accept(owner, req.listener, done)
            case Connect():
                if req.conn is not None:
                    self._check(client, conn, req.conn)
                with self._completion(client, req.id) as done:
                    if req.rcvbuf is None:
                        self.core.connect(owner, req.remote, req.local, req.timeout, req.conn, done)
                    else:
                        self.core.connect(
                            owner,
                            req.remote,
                            req.local,
                            req.timeout,
                            req.conn,
                            done,
                            rcvbuf=req.rcvbuf,
                        )
            case Close():
                self._check(client, conn, req.conn)
                self._reply(client, req.id, self.core.close(owner, req.conn))
            case Abort():
                self._check(client, conn, req.conn)
                self._reply(client, req.id, self.core.abort(owner, req.conn))
            case Keepalive():
                self._check(client, conn, req.conn)
                self._reply(client, req.id, self.core.keepalive(owner, req.conn, req.params))
            case CloseListener():
                self._check(client, lst, req.listener)
                self._reply(client, req.id, self.core.close_listener(owner, req.listener))
            case Shutdown():
                self._check(client, conn, req.conn)
                self._reply(client, req.id, self.core.shutdown(owner, req.conn))
            case Stats():
                if req.conn is not None:
                    self._check(client, conn, req.conn)
                result = self.core.stats(owner, req.conn)
                if req.conn is None:
                    result = {**result, "api_clients": len(self._clients)}
                self._reply(client, req.id, result)
            case IntendSplice():
                self._check(client, conn, req.conn)
                if req.server is None:
                    result = self.core.intend_splice(owner, req.conn)
                    self._adopt(client, conn, result)  # the reserved server side
                else:
                    self._check(client, conn, req.server)
                    result = self.core.intend_splice(owner, req.conn, req.server)
                self._reply(client, req.id, result)
            case ConnectSplice():
                self._check(client, conn, req.client)
                with self._completion(client, req.id) as done:
                    self.core.connect_splice(
                        owner,
                        req.client,
                        req.remote,
                        req.local,
                        req.timeout,
                        req.length,
                        done,
                        req.inline,
                    )
            case SpliceSockets():
                if len(client.fds_in) < 2:
                    raise ApiError(
                        ErrorCode.EBADREQ,
                        "splice_sockets: pass the client's and the server's socket"
                        " with the request (SCM_RIGHTS)",
                    )
                socks = (client.fds_in.popleft(), client.fds_in.popleft())
                try:
                    self._reply(client, req.id, self.core.splice_sockets(owner, *socks))
                finally:
                    for s in socks:
                        s.close()  # the daemon's copies; the core took what it needed
            case Splice():
                self._check(client, conn, req.client)
                self._check(client, conn, req.server)
                if req.limits is None and not req.server_unread and not req.tap:
                    # The thesis's splice: the arguments every core takes.
                    result = self.core.splice(owner, req.client, req.server, req.length, req.unread)
                else:
                    result = self.core.splice(
                        owner,
                        req.client,
                        req.server,
                        req.length,
                        req.unread,
                        limits=req.limits,
                        server_unread=req.server_unread,
                        tap=req.tap,
                    )
                tap = result.pop(TAP_SOCK, None)
                if isinstance(tap, socket.socket):
                    # The tap's read end goes with the reply (SCM_RIGHTS).
                    self._queue(client, protocol.encode_reply(req.id, result, fd=True), tap)
                else:
                    self._reply(client, req.id, result)

    def _hello(self) -> Result:
        return {
            "version": PROTOCOL_VERSION,
            "daemon": DAEMON_NAME,
            "ops": list(OPS),
            "max_line": protocol.MAX_LINE,
        }

    def _reply(self, client: ApiClient, rid: int, result: Result) -> None:
        self._queue(client, protocol.encode_reply(rid, result))

    def _check(self, client: ApiClient, kind: ObjectKind, object_id: int) -> None:
        owner = self._owners.get((kind, object_id))
        if owner is None:
            raise ApiError(ErrorCode.ENOENT, f"no {kind.value} {object_id}")
        if owner != client.id:
            raise ApiError(ErrorCode.EPERM, f"{kind.value} {object_id} belongs to another client")

    def _adopt(self, client: ApiClient, kind: ObjectKind, result: Result) -> None:
        """Record that the object a core result names now belongs to ``client``."""
        object_id = result.get(kind.value)
        if not isinstance(object_id, int) or isinstance(object_id, bool):
            raise TypeError(f"core result has no integer {kind.value!r}: {result!r}")
        key = (kind, object_id)
        # Connecting an intend_splice conn names an id the client already owns.
        if self._owners.setdefault(key, client.id) != client.id:
            raise ValueError(f"core reused {kind.value} id {object_id} of another client")
        info: dict[str, object] = {kind.value: object_id}
        for name in ("addr", "peer", "local"):
            if name in result:
                info[name] = result[name]
        client.objects[key] = info

    @contextlib.contextmanager
    def _completion(self, client: ApiClient, rid: int) -> Iterator[Done]:
        """A ``Done`` for one async op; if starting the op raises, it is never counted."""
        if client.pending >= self.max_pending:
            raise ApiError(ErrorCode.ELIMIT, f"more than {self.max_pending} ops in flight")
        client.pending += 1
        fired = False

        def done(result: Result | ApiError, sock: socket.socket | None) -> None:
            nonlocal fired
            if fired:
                log.error("core completed request %d of client %d twice", rid, client.id)
                if sock is not None:
                    sock.close()
                return
            fired = True
            client.pending -= 1
            try:
                self._complete(client, rid, result, sock)
            except Exception:
                log.exception("completing request %d of client %d failed", rid, client.id)

        try:
            yield done
        except BaseException:
            if not fired:
                fired = True  # a late call after the error reply must not answer twice
                client.pending -= 1
            raise

    def _complete(
        self,
        client: ApiClient,
        rid: int,
        result: Result | ApiError,
        sock: socket.socket | None,
    ) -> None:
        if isinstance(result, ApiError):
            if sock is not None:
                sock.close()
            self._queue(client, protocol.encode_error(rid, result.code, result.message))
            return
        if result.get("released") is True:
            # connect_splice with release: the core let go of both conns
            # already; there is nothing to own and no descriptor to pass.
            if sock is not None:
                sock.close()
            if not client.closed:
                self._reply(client, rid, result)
            return
        conn = result.get("conn")
        if client.closed:
            # The proxy left while the op was in flight: nobody will use this conn.
            if sock is not None:
                sock.close()
            if isinstance(conn, int):
                try:
                    self.core.close(client.id, conn)
                except Exception:
                    log.exception("closing orphaned conn %r failed", conn)
            return
        if sock is None:
            log.error("core completed request %d without a socket: %r", rid, result)
            self._queue(client, protocol.encode_error(rid, ErrorCode.EINTERNAL, "no socket"))
            return
        try:
            self._adopt(client, ObjectKind.CONN, result)
            line = protocol.encode_reply(rid, result, fd=sock is not None)
        except (TypeError, ValueError):
            log.exception("core completed request %d with a bad result", rid)
            if sock is not None:
                sock.close()
            self._queue(client, protocol.encode_error(rid, ErrorCode.EINTERNAL, "bad result"))
            return
        self._queue(client, line, sock)


def _list_objects(client: ApiClient) -> Result:
    conns = [info for (kind, _), info in client.objects.items() if kind is ObjectKind.CONN]
    listeners = [info for (kind, _), info in client.objects.items() if kind is ObjectKind.LISTENER]
    return {"conns": conns, "listeners": listeners}


def _resolve_group(group: str | int | None) -> int | None:
    if group is None or isinstance(group, int):
        return group
    if group.isdigit():  # a numeric gid, as chown(1) takes it
        return int(group)
    return grp.getgrnam(group).gr_gid


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file no daemon answers on; refuse if one does or it is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathInUse(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale API socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as exc:  # e.g. EAGAIN: the backlog is full, so someone is listening
        raise SocketPathInUse(f"{path}: a daemon seems to be listening ({exc})") from exc
    finally:
        probe.close()
    raise SocketPathInUse(f"{path}: another daemon is already listening")


def _bind_private(path: str, mode: int, gid: int | None, backlog: int) -> tuple[socket.socket, int]:
    """Bind in a fresh 0700 directory, set mode/group, then rename into place.

    The socket is never reachable under ``path`` with looser permissions than
    ``mode`` (no umask games: umask is per process and other threads may be
    creating files).  rename() is atomic on one filesystem and keeps the
    inode, which the bound socket is attached to.
    """
    tmpdir = tempfile.mkdtemp(prefix=".api-", dir=os.path.dirname(path))
    tmp = os.path.join(tmpdir, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        sock.listen(backlog)  # before the rename, so no client ever sees ECONNREFUSED
        sock.setblocking(False)
        os.chmod(tmp, mode)
        if gid is not None:
            os.chown(tmp, -1, gid)
        os.rename(tmp, path)
        inode = os.lstat(path).st_ino
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(tmpdir)
    return sock, inode
