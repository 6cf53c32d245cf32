"""The origin server of the testbed (thesis 6.1: "a typical HTTP like Web server").

    python -m servers.origin --listen ADDR:PORT [--sink-listen ADDR:PORT] [--seed N] [--quiet]

HTTP/1.1 on ``--listen`` (RFC 9112), framed by h11, for HTTP/1.0 and HTTP/1.1
clients alike. Responses carry the status line ``HTTP/1.1`` whatever the
request's version (RFC 9110 section 2.5: a server sends its own version) and
always a Content-Length:

    GET /bytes/N    200, N bytes of the seeded pattern (servers.pattern).
    HEAD /bytes/N   the same head (Content-Length N), no body.
    POST /sink      200, body = hex SHA-256 of the request body + "\\n". The body
                    is framed by Content-Length or chunked Transfer-Encoding; an
                    HTTP/1.0 request with neither runs to the client's FIN (such
                    an HTTP/1.1 request has an empty body, RFC 9112 section 6.3).
                    ``Expect: 100-continue`` is answered with 100 Continue
                    before the body is read.
    GET /stats      200, application/json, what this server has counted before
                    this request: ``{"requests": R, "by_path": {"/bytes/10": 2,
                    ...}, "connections": C}``. R counts every request whose head
                    parsed (whatever its status, HEAD and /stats included),
                    counted when its head arrives; "by_path" splits R by the
                    target without its query string; C counts the HTTP
                    connections accepted, this one included. HEAD /stats: the
                    head only.

Anything else gets 400/404/405/501 (505 for an HTTP version other than 1.0 and
1.1) with a one-line text body, and the server carries on. A request that does
not parse (h11 names the status: 400, 431 for a head over 16 KiB, 501 for a
transfer coding other than chunked) is answered and the connection closed.

Persistent connections (RFC 9112 section 9.3): after a response the same
connection serves the next request, including requests the client pipelined
behind it. The connection closes after the response instead when the request
said ``Connection: close``, when the client is HTTP/1.0 (``Connection:
keep-alive`` from a 1.0 client is not honoured; the response says ``Connection:
close``), when a request body the answer does not read (a refused POST's, say)
has not all arrived, or when the server is stopping. A connection idle for
``--idle-timeout`` seconds (default 30) between requests, or stalled that long
mid-request, is closed.

On ``--sink-listen`` a raw TCP sink: it reads until the client's FIN, answers the
hex SHA-256 of what it read plus "\\n", then closes. A client must half-close
to get its answer, so this exercises half-close through a proxy.

One thread per connection. Pattern bodies go out with ``os.sendfile`` from a
memfd holding the doubled pattern, so a multi-GB response costs no userspace
copies and no memory beyond the 2 MB pattern: h11 frames the body without
seeing its bytes (a :class:`PatternSpan` passed through
``send_with_data_passthrough``). Likewise the bulk of a Content-Length upload
goes from the socket straight into the hash, around h11's buffers. One log
line per request on stderr. Prints
``ready`` on stdout once listening; SIGTERM or SIGINT stop it with exit status
0, closing idle keep-alive connections at once.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import TextIO, cast

import h11

from servers.address import address_family, format_host_port, parse_host_port
from servers.http1 import MAX_HEAD
from servers.pattern import DEFAULT_SEED, PERIOD, pattern_memfd, pattern_window

# Bounds a response the server agrees to produce: 1 PiB is "unbounded" for any
# test, while still rejecting numbers that are clearly typos.
MAX_BYTES = 1 << 50

DEFAULT_IDLE_TIMEOUT = 30.0

_RECV_SIZE = 256 * 1024

Headers = list[tuple[bytes, bytes]]


# --- what to do with a request (no I/O) --------------------------------------


@dataclass(slots=True, frozen=True)
class SendPattern:
    length: int


@dataclass(slots=True, frozen=True)
class HashBody:
    until_fin: bool = False  # an HTTP/1.0 body with no framing: it ends with the client's FIN


@dataclass(slots=True, frozen=True)
class ServeStats:
    pass


@dataclass(slots=True, frozen=True)
class Refuse:
    status: int
    message: str
    allow: str | None = None
    close: bool = False  # the connection cannot carry another request after this one


Action = SendPattern | HashBody | ServeStats | Refuse


def request_path(request: h11.Request) -> str:
    """The request target without its query string."""
    # h11 admits only visible ASCII in a target, so latin-1 is exact.
    return request.target.decode("latin-1").partition("?")[0]


def route(request: h11.Request) -> Action:
    """Map a parsed request to the response the server gives."""
    method = request.method.decode("latin-1")
    path = request_path(request)
    if request.http_version not in (b"1.0", b"1.1"):
        # Not a framing h11 (or we) can vouch for: answer and close.
        version = request.http_version.decode("latin-1")
        return Refuse(505, f"HTTP/{version} not supported; use 1.0 or 1.1", close=True)
    if path.startswith("/bytes/"):
        if method not in ("GET", "HEAD"):
            return Refuse(405, f"{method} not allowed on {path}", allow="GET, HEAD")
        count = path[len("/bytes/") :]
        if not count.isdigit() or int(count) > MAX_BYTES:
            return Refuse(400, f"byte count must be a decimal 0..{MAX_BYTES}, got {count!r}")
        return SendPattern(int(count))
    if path == "/sink":
        if method != "POST":
            return Refuse(405, f"{method} not allowed on /sink", allow="POST")
        framed = any(
            name in (b"content-length", b"transfer-encoding") for name, _ in request.headers
        )
        # RFC 1945 section 7.2.2: an HTTP/1.0 body without Content-Length ends
        # with the close. HTTP/1.1 has no such request body (RFC 9112 6.3).
        return HashBody(until_fin=request.http_version == b"1.0" and not framed)
    if path == "/stats":
        if method not in ("GET", "HEAD"):
            return Refuse(405, f"{method} not allowed on /stats", allow="GET, HEAD")
        return ServeStats()
    return Refuse(404, f"no such resource {path!r}; try /bytes/N, /sink or /stats")


@dataclass(slots=True, frozen=True)
class PatternSpan:
    """``length`` pattern bytes from stream offset ``offset``, as an h11 Data payload.

    h11 frames a body by ``len()`` of what it is given and hands the object
    back untouched from ``send_with_data_passthrough`` (h11 docs, "Support for
    sendfile()"); the shell then writes it with ``os.sendfile``.
    """

    offset: int
    length: int

    def __len__(self) -> int:
        return self.length


class RequestCounter:
    """Requests and connections seen, for ``GET /stats``; safe from many threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests = 0
        self._by_path: dict[str, int] = {}
        self._connections = 0

    def count_connection(self) -> None:
        with self._lock:
            self._connections += 1

    def count(self, path: str) -> None:
        """Count a request for ``path``."""
        with self._lock:
            self._count(path)

    def report_and_count(self, path: str) -> dict[str, object]:
        """The counts from before this request (the ``/stats`` body), then count it."""
        with self._lock:
            before: dict[str, object] = {
                "requests": self._requests,
                "by_path": dict(self._by_path),
                "connections": self._connections,
            }
            self._count(path)
            return before

    def _count(self, path: str) -> None:
        self._requests += 1
        self._by_path[path] = self._by_path.get(path, 0) + 1


# --- the I/O shell ------------------------------------------------------------


class ListenError(OSError):
    """Binding or listening failed; the message names the address."""


class _RequestLog:
    """One line per request on a stream, written whole even from many threads."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def write(self, line: str) -> None:
        if self._stream is None:
            return
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class OriginServer:
    """The HTTP origin and the optional raw sink, listening on already-bound sockets.

    Construct (which binds and listens; ListenError when the port is taken), then
    call :meth:`serve_forever` in some thread; :meth:`shutdown` makes it return.
    """

    def __init__(
        self,
        listen: tuple[str, int],
        sink_listen: tuple[str, int] | None = None,
        *,
        seed: int = DEFAULT_SEED,
        log: TextIO | None = sys.stderr,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        congestion: str | None = None,
        more_listen: Sequence[tuple[str, int]] = (),
        more_sink_listen: Sequence[tuple[str, int]] = (),
    ) -> None:
        """``more_listen`` / ``more_sink_listen``: further addresses for either service
        (another family, say); ``http_address`` and ``sink_address`` name the first."""
        self.seed = seed
        self.congestion = congestion
        self.idle_timeout = idle_timeout
        self.counter = RequestCounter()
        self._log = _RequestLog(log)
        self._memfd: int | None = None
        self._listeners: list[socket.socket] = []
        self._handlers: set[threading.Thread] = set()
        # Keep-alive connections blocked waiting for their next request, so that
        # close() can end them at once instead of after the idle timeout.
        self._idle: set[socket.socket] = set()
        self._idle_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = threading.Event()
        self._wakes_on_signals = False
        try:
            self.http = self._listen(listen)
            self._http_listeners = {self.http} | {self._listen(a) for a in more_listen}
            self.sink = self._listen(sink_listen) if sink_listen else None
            for address in more_sink_listen:
                self._listen(address)
            self._memfd = pattern_memfd(seed)
        except BaseException:
            self.close()
            raise

    @property
    def http_address(self) -> tuple[str, int]:
        host, port = self.http.getsockname()[:2]
        return host, port

    def listening(self) -> dict[str, list[str]]:
        """Every address each service listens on, as ADDR:PORT text (the real ports)."""
        out: dict[str, list[str]] = {"http": [], "sink": []}
        for sock in self._listeners:
            host, port = sock.getsockname()[:2]
            out["http" if sock in self._http_listeners else "sink"].append(
                format_host_port(host, port)
            )
        return out

    @property
    def sink_address(self) -> tuple[str, int] | None:
        if self.sink is None:
            return None
        host, port = self.sink.getsockname()[:2]
        return host, port

    def _listen(self, address: tuple[str, int]) -> socket.socket:
        sock = socket.socket(address_family(address[0]), socket.SOCK_STREAM)
        try:
            # Lets a restarted server rebind while old connections sit in
            # TIME-WAIT; Linux still refuses a port someone is listening on.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.congestion:
                # Accepted connections keep the listener's algorithm.  Per
                # socket, so it works where the namespace's default may not be
                # changed (net.ipv4.tcp_allowed_congestion_control).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, self.congestion.encode())
            sock.bind(address)
            sock.listen(4096)  # Linux's default somaxconn: bursts of thousands
        except OSError as e:
            sock.close()
            where = format_host_port(*address)
            raise ListenError(e.errno, f"cannot listen on {where}: {e.strerror or e}") from e
        except BaseException:
            sock.close()
            raise
        self._listeners.append(sock)
        return sock

    def serve_forever(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            for sock in self._listeners:
                sel.register(sock, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r or self._stopping.is_set():
                        continue
                    listener = key.fileobj
                    assert isinstance(listener, socket.socket)
                    self._accept(listener)

    def wake_on_signals(self) -> None:
        """From the main thread: let any signal wake serve_forever (undone by close()).

        Linux gives a process-directed SIGTERM to whichever thread does not
        block it, a connection's thread among them; CPython then runs the
        handler in the main thread, but only once that thread wakes, and
        serve_forever's select has no timeout.  The wakeup fd is written by
        the C-level handler in whichever thread took the signal.
        """
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self._wakes_on_signals = True

    def shutdown(self) -> None:
        """Make serve_forever return; safe from a signal handler or another thread."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def close(self, grace: float = 3.0) -> None:
        """Stop listening, then give requests in flight `grace` seconds to finish.

        A SIGTERM right after a response must not cut the connection's last
        steps (the drain before close, the log line) short. Connections idle
        between requests are ended now; busy ones close after their response.
        """
        self._stopping.set()
        for sock in self._listeners:
            sock.close()
        with self._idle_lock:
            for conn in self._idle:
                # Wakes the blocked recv() with EOF; the handler then closes.
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + grace
        for thread in list(self._handlers):
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._wakes_on_signals:
            signal.set_wakeup_fd(-1)  # before the fd closes and its number is reused
        self._wake_r.close()
        self._wake_w.close()
        # The memfd stays open: connection threads still running may read it,
        # and the process is about to exit anyway when close() is called.

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, peer = listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        except OSError as e:
            # EMFILE and friends: log and keep serving what we can.
            self._log.write(f"origin: accept failed: {e}")
            return
        if listener in self._http_listeners:
            self.counter.count_connection()
            handler = self._serve_http
        else:
            handler = self._serve_sink
        thread = threading.Thread(target=handler, args=(conn, peer), daemon=True)
        self._handlers.add(thread)
        thread.start()
        # Forget finished handlers so the set stays as small as the live load.
        self._handlers = {t for t in self._handlers if t.is_alive()}

    def _set_timeouts(self, conn: socket.socket) -> None:
        # A blocking socket with kernel timeouts rather than settimeout(): the
        # latter makes the fd non-blocking, and os.sendfile would then fail with
        # EAGAIN whenever the send buffer is full.
        seconds = int(self.idle_timeout)
        micros = int((self.idle_timeout - seconds) * 1_000_000)
        timeval = struct.pack("ll", seconds, micros)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)

    # --- one HTTP connection: a loop of exchanges ---------------------------------

    def _serve_http(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        peer_text = format_host_port(peer[0], peer[1])
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        started = time.monotonic()
        served = 0
        try:
            self._set_timeouts(conn)
            # Each response is written whole (or corked with MSG_MORE until its
            # body follows), so Nagle could only delay the next pipelined one.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                try:
                    request = self._next_request(conn, http)
                except h11.RemoteProtocolError as e:
                    self._refuse_unparsed(conn, http, peer_text, e)
                    return
                except OSError as e:
                    # Idle keep-alive connections time out or reset quietly;
                    # one that never sent a request, or stalled mid-head, is news.
                    if served == 0 or http.trailing_data[0]:
                        elapsed = time.monotonic() - started
                        self._log.write(f'{peer_text} "- [{_describe(e)}]" 0 0 {elapsed:.3f}s')
                    return
                if request is None:
                    if served == 0:
                        elapsed = time.monotonic() - started
                        line = "(closed before a request)"
                        self._log.write(f'{peer_text} "{line}" 0 0 {elapsed:.3f}s')
                    return
                served += 1
                following = self._exchange(conn, http, request, peer_text)
                if following is None:
                    return
                http = following
        except OSError:
            return  # setsockopt on a connection already reset
        finally:
            _close(conn)

    def _next_request(self, conn: socket.socket, http: h11.Connection) -> h11.Request | None:
        """The next request's head, from the buffer or the socket; None when the client closed.

        Raises RemoteProtocolError for a head that does not parse and OSError
        (a timeout among them) for the socket.
        """
        while True:
            event = http.next_event()
            if isinstance(event, h11.Request):
                if _head_size(event) > MAX_HEAD:
                    # h11 bounds only a head still incomplete; one that arrived
                    # whole in a single read is measured here.
                    raise h11.RemoteProtocolError(
                        f"head longer than {MAX_HEAD} bytes", error_status_hint=431
                    )
                return event
            if isinstance(event, h11.ConnectionClosed):
                return None
            # NEED_DATA (PAUSED needs a request in flight, and there is none).
            if http.trailing_data[0]:
                data = conn.recv(_RECV_SIZE)  # the rest of a head already begun
            else:
                with self._idle_lock:
                    if self._stopping.is_set():
                        return None
                    self._idle.add(conn)
                try:
                    data = conn.recv(_RECV_SIZE)
                finally:
                    with self._idle_lock:
                        self._idle.discard(conn)
            http.receive_data(data)

    def _exchange(
        self, conn: socket.socket, http: h11.Connection, request: h11.Request, peer_text: str
    ) -> h11.Connection | None:
        """Answer one request; the h11 connection for the next one, or None to close."""
        started = time.monotonic()
        version = request.http_version.decode("latin-1")
        line = (
            f"{request.method.decode('latin-1')} {request.target.decode('latin-1')} HTTP/{version}"
        )
        head_only = request.method == b"HEAD"
        status = sent = 0
        body_read_around_h11 = False
        try:
            action = route(request)
            path = request_path(request)
            if isinstance(action, ServeStats):
                stats = self.counter.report_and_count(path)
            else:
                self.counter.count(path)
                stats = {}
            status, sent, body_read_around_h11 = self._respond(
                conn, http, request, action, stats, head_only
            )
        except h11.RemoteProtocolError as e:
            # A body that breaks its framing (bad chunk, FIN before the end).
            line += f" [{e}]"
            if http.our_state is h11.SEND_RESPONSE:
                status = e.error_status_hint
                with contextlib.suppress(OSError):
                    sent = self._send_text(conn, http, status, str(e), head_only, close=True)
            return None
        except OSError as e:
            line += f" [{_describe(e)}]"
            return None
        finally:
            elapsed = time.monotonic() - started
            self._log.write(f'{peer_text} "{line}" {status} {sent} {elapsed:.3f}s')
        if http.our_state is not h11.DONE:
            return None  # MUST_CLOSE: Connection: close, HTTP/1.0, or our own close
        if body_read_around_h11:
            # This h11 connection still waits for the body we consumed; the
            # socket is exactly at the next request, so a fresh one takes over.
            return h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        if http.their_state is not h11.DONE:
            return None
        http.start_next_cycle()
        return http

    def _refuse_unparsed(
        self,
        conn: socket.socket,
        http: h11.Connection,
        peer_text: str,
        error: h11.RemoteProtocolError,
    ) -> None:
        """Answer a head h11 could not parse with the status it suggests, then close."""
        status, sent = error.error_status_hint, 0
        if http.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(OSError):
                sent = self._send_text(conn, http, status, str(error), False, close=True)
        self._log.write(f'{peer_text} "- [{error}]" {status} {sent} 0.000s')

    def _respond(
        self,
        conn: socket.socket,
        http: h11.Connection,
        request: h11.Request,
        action: Action,
        stats: dict[str, object],
        head_only: bool,
    ) -> tuple[int, int, bool]:
        """Send the response for ``action``.

        Returns (status, body bytes sent, whether the request body was read
        around h11: see :meth:`_hash_request_body`).
        """
        if isinstance(action, HashBody):
            digest, around = self._hash_request_body(conn, http, request, action.until_fin)
            return 200, self._send_text(conn, http, 200, digest, head_only, close=False), around
        # The other answers do not read a body: one still arriving means close.
        close = not _request_complete(http)
        if isinstance(action, SendPattern):
            self._send_pattern(conn, http, action.length, head_only, close)
            return 200, 0 if head_only else action.length, False
        if isinstance(action, ServeStats):
            body = json.dumps(stats).encode() + b"\n"
            headers = _framing("application/json", len(body))
            return 200, self._send_small(conn, http, 200, headers, body, head_only, close), False
        extra = [(b"Allow", action.allow.encode())] if action.allow else []
        close = close or action.close
        sent = self._send_text(conn, http, action.status, action.message, head_only, close, extra)
        return action.status, sent, False

    def _hash_request_body(
        self, conn: socket.socket, http: h11.Connection, request: h11.Request, until_fin: bool
    ) -> tuple[str, bool]:
        """Hex SHA-256 of the request body, and whether it was read around h11.

        Chunked bodies, and whatever of a body came in with the head, go
        through h11. The rest of a Content-Length body is read here, straight
        into the hash: h11's buffer copies halve the upload rate (883 -> 442
        MB/s on loopback), and the origin is the testbed's measuring end. h11
        never sees those bytes, so its connection is left mid-body and the
        next request gets a fresh one (:meth:`_exchange`).
        """
        if http.they_are_waiting_for_100_continue:
            conn.sendall(
                http.send(
                    h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
                )
            )
        sha = hashlib.sha256()
        length = _content_length(request)
        received = 0
        while True:
            event = http.next_event()
            if isinstance(event, h11.Data):
                sha.update(event.data)
                received += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif length is not None:
                # NEED_DATA inside a Content-Length body: h11's buffer is
                # empty, and the socket holds the rest of the body, then
                # whatever the client pipelined behind it.
                _hash_exactly(conn, sha, length - received)
                return sha.hexdigest(), True
            else:
                # NEED_DATA: h11 raises RemoteProtocolError itself on EOF mid-body.
                http.receive_data(conn.recv(_RECV_SIZE))
        if until_fin:
            # h11 framed the unframed HTTP/1.0 body as empty (requests have no
            # close-delimited bodies in HTTP/1.1); what follows the head is
            # the body. h11 has made the connection must-close already.
            early, _ = http.trailing_data
            digest, _ = _hash_stream(conn, early)
            return digest, False
        return sha.hexdigest(), False

    def _send_text(
        self,
        conn: socket.socket,
        http: h11.Connection,
        status: int,
        text: str,
        head_only: bool,
        close: bool,
        extra: Headers | None = None,
    ) -> int:
        body = (text + "\n").encode()
        kind = "application/octet-stream" if status == 200 else "text/plain"
        headers = _framing(kind, len(body)) + (extra or [])
        return self._send_small(conn, http, status, headers, body, head_only, close)

    def _send_small(
        self,
        conn: socket.socket,
        http: h11.Connection,
        status: int,
        headers: Headers,
        body: bytes,
        head_only: bool,
        close: bool,
    ) -> int:
        """A response whose body is in memory, in one send; returns the body bytes sent."""
        out = http.send(self._response(status, headers, close))
        if body and not head_only:
            out += http.send(h11.Data(data=body))
        out += http.send(h11.EndOfMessage())
        conn.sendall(out)
        return 0 if head_only else len(body)

    def _send_pattern(
        self, conn: socket.socket, http: h11.Connection, length: int, head_only: bool, close: bool
    ) -> None:
        head = http.send(self._response(200, _framing("application/octet-stream", length), close))
        parts: Sequence[object] = []
        if length and not head_only:
            # h11 counts the span against the Content-Length and returns it as
            # is; its bytes never pass through Python.
            span = cast(bytes, PatternSpan(0, length))
            parts = http.send_with_data_passthrough(h11.Data(data=span)) or []
        tail = http.send(h11.EndOfMessage())  # b"" with Content-Length framing
        # MSG_MORE lets the head share a segment with the first body bytes; only
        # when a body follows, or the head would wait for the cork timer.
        conn.sendall(head, socket.MSG_MORE if parts else 0)
        for part in parts:
            if isinstance(part, PatternSpan):
                self._sendfile_pattern(conn, part)
            else:
                conn.sendall(cast(bytes, part))
        if tail:
            conn.sendall(tail)

    def _sendfile_pattern(self, conn: socket.socket, span: PatternSpan) -> None:
        offset, end = span.offset, span.offset + span.length
        while offset < end:
            count = min(PERIOD, end - offset)
            start = offset % PERIOD
            if self._memfd is not None:
                sent = os.sendfile(conn.fileno(), self._memfd, start, count)
                if sent == 0:
                    raise ConnectionResetError(errno.ECONNRESET, "sendfile sent nothing")
            else:
                conn.sendall(pattern_window(self.seed, offset, count))
                sent = count
            offset += sent

    def _response(self, status: int, headers: Headers, close: bool) -> h11.Response:
        if close or self._stopping.is_set():
            # h11 adds this itself for Connection: close requests and HTTP/1.0.
            headers = [*headers, (b"Connection", b"close")]
        return h11.Response(status_code=status, headers=headers, reason=_reason(status))

    # --- the raw sink -------------------------------------------------------------

    def _serve_sink(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        started = time.monotonic()
        outcome = ""
        received = 0
        try:
            self._set_timeouts(conn)
            digest, received = _hash_stream(conn, b"")
            conn.sendall((digest + "\n").encode())
            outcome = f"sha256={digest}"
        except OSError as e:
            outcome = _describe(e)
        finally:
            _close(conn)
            elapsed = time.monotonic() - started
            peer_text = format_host_port(peer[0], peer[1])
            self._log.write(f"{peer_text} sink {received} bytes {outcome} {elapsed:.3f}s")


def _request_complete(http: h11.Connection) -> bool:
    """Pull what the buffer holds of the request body (discarded); True if it all arrived.

    No I/O: a body still on its way is not waited for, the connection closes
    after the response instead (RFC 9110 section 15: a server that answers
    before reading the body says whether it closes).
    """
    while http.their_state is h11.SEND_BODY:
        if http.next_event() is h11.NEED_DATA:
            return False
    return True


def _head_size(request: h11.Request) -> int:
    """The size of the request's head as sent, give or take the whitespace h11 dropped."""
    line = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n")
    fields = sum(len(name) + len(value) + 4 for name, value in request.headers.raw_items())
    return line + fields + 2


def _framing(content_type: str, length: int) -> Headers:
    return [(b"Content-Type", content_type.encode()), (b"Content-Length", str(length).encode())]


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _content_length(request: h11.Request) -> int | None:
    """The body length a request declares; None when chunked or not given.

    h11 has validated the field and kept one copy (digits only, repeats
    equal) and gives Transfer-Encoding precedence over it (RFC 9112 section
    6.3), as here.
    """
    length = None
    for name, value in request.headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            length = int(value)
    return length


def _hash_exactly(conn: socket.socket, sha: hashlib._Hash, count: int) -> None:
    """Feed exactly ``count`` bytes from the socket into ``sha``; not one byte more."""
    buffer = bytearray(min(_RECV_SIZE, count))
    view = memoryview(buffer)
    while count:
        n = conn.recv_into(view, min(len(buffer), count))
        if n == 0:
            raise ConnectionResetError(errno.ECONNRESET, f"body ended {count} bytes short")
        sha.update(view[:n])
        count -= n


def _hash_stream(conn: socket.socket, early: bytes) -> tuple[str, int]:
    """SHA-256 of ``early`` and then everything up to the client's FIN; (hex, bytes)."""
    sha = hashlib.sha256(early)
    received = len(early)
    buffer = bytearray(_RECV_SIZE)
    view = memoryview(buffer)
    while n := conn.recv_into(view):
        sha.update(view[:n])
        received += n
    return sha.hexdigest(), received


def _close(conn: socket.socket) -> None:
    """Send our FIN first, then close.

    Closing with unread input makes the kernel answer with RST (RFC 1122
    section 4.2.2.13), and an RST can make the client discard response bytes
    it has not read yet. So after SHUT_WR the input is drained, for a bounded
    time, before the descriptor goes.
    """
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(2.0)
        while conn.recv(_RECV_SIZE):
            pass
    except OSError:
        pass
    finally:
        conn.close()


def _describe(error: OSError) -> str:
    if isinstance(error, BlockingIOError | TimeoutError):
        return "timeout"
    return error.strerror or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m servers.origin", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--listen",
        required=True,
        action="append",
        metavar="ADDR:PORT",
        help="HTTP/1.1 listen address; again for another ([v6]:port, say)",
    )
    parser.add_argument(
        "--sink-listen",
        action="append",
        default=[],
        metavar="ADDR:PORT",
        help="raw sink listen address; again for another",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="pattern seed (default 1)")
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="S",
        help="close a connection idle this long, between requests or inside one (default 30)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no per-request log lines")
    parser.add_argument(
        "--congestion", metavar="ALGO", help="TCP congestion control of every connection (cubic...)"
    )
    args = parser.parse_args(argv)
    try:
        listen = [parse_host_port(a) for a in args.listen]
        sink_listen = [parse_host_port(a) for a in args.sink_listen]
    except ValueError as e:
        parser.error(str(e))

    try:
        server = OriginServer(
            listen[0],
            sink_listen[0] if sink_listen else None,
            more_listen=listen[1:],
            more_sink_listen=sink_listen[1:],
            seed=args.seed,
            log=None if args.quiet else sys.stderr,
            idle_timeout=args.idle_timeout,
            congestion=args.congestion,
        )
    except ListenError as e:
        print(f"origin: {e.strerror}", file=sys.stderr)
        return 1

    def stop(signum: int, frame: object) -> None:
        server.shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.wake_on_signals()
    if not args.quiet:
        # The real ports, for whoever asked for port 0.
        names = server.listening()
        sink_text = f", raw sink on {', '.join(names['sink'])}" if names["sink"] else ""
        print(f"origin: HTTP on {', '.join(names['http'])}{sink_text}", file=sys.stderr)
    print("ready", flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
