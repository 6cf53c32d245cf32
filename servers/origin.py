"""The origin server of the testbed (thesis 6.1: "a typical HTTP like Web server").

    python -m servers.origin --listen ADDR:PORT [--sink-listen ADDR:PORT] [--seed N] [--quiet]

HTTP/1.0 on ``--listen``, one request per connection, closed after the response:

    GET /bytes/N    200, Content-Length N, N bytes of the seeded pattern (servers.pattern)
    POST /sink      200, body = hex SHA-256 of the request body + "\\n". The body is
                    Content-Length bytes, or everything up to the client's FIN.

Anything else gets 400/404/405/501 with a one-line body, and the server carries on.

On ``--sink-listen`` a raw TCP sink: it reads until the client's FIN, answers the
hex SHA-256 of what it read plus "\\n", then closes. A client must half-close
to get its answer, so this exercises half-close through a proxy.

One thread per connection. Bodies go out with ``os.sendfile`` from a memfd
holding the doubled pattern, so a multi-GB response costs no userspace copies
and no memory beyond the 2 MB pattern. Prints ``ready`` on stdout once
listening; SIGTERM or SIGINT stop it with exit status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

from servers.address import address_family, format_host_port, parse_host_port
from servers.http1 import (
    MAX_HEAD,
    HttpParseError,
    RequestHead,
    content_length,
    head_end,
    parse_request_head,
    response_head,
)
from servers.pattern import DEFAULT_SEED, PERIOD, pattern_memfd, pattern_window

# Bounds a response the server agrees to produce: 1 PiB is "unbounded" for any
# test, while still rejecting numbers that are clearly typos.
MAX_BYTES = 1 << 50

DEFAULT_IDLE_TIMEOUT = 30.0

_RECV_SIZE = 256 * 1024


# --- what to do with a request (no I/O) --------------------------------------


@dataclass(slots=True, frozen=True)
class SendPattern:
    length: int


@dataclass(slots=True, frozen=True)
class HashBody:
    length: int | None  # None: the body runs to the client's FIN


@dataclass(slots=True, frozen=True)
class Refuse:
    status: int
    message: str
    allow: str | None = None


Action = SendPattern | HashBody | Refuse


def route(head: RequestHead) -> Action:
    """Map a parsed request to the response the server gives."""
    path = head.path
    if path.startswith("/bytes/"):
        if head.method != "GET":
            return Refuse(405, f"{head.method} not allowed on {path}", allow="GET")
        count = path[len("/bytes/") :]
        if not count.isdigit() or int(count) > MAX_BYTES:
            return Refuse(400, f"byte count must be a decimal 0..{MAX_BYTES}, got {count!r}")
        return SendPattern(int(count))
    if path == "/sink":
        if head.method != "POST":
            return Refuse(405, f"{head.method} not allowed on /sink", allow="POST")
        if "transfer-encoding" in head.headers:
            # HTTP/1.0 has no transfer codings (RFC 1945 section 7.2.2 frames a
            # body by Content-Length or by the close).
            return Refuse(501, "Transfer-Encoding not supported; use Content-Length or EOF")
        try:
            return HashBody(content_length(head.headers))
        except HttpParseError as e:
            return Refuse(e.status, e.message)
    return Refuse(404, f"no such resource {path!r}; try /bytes/N or /sink")


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
    ) -> None:
        self.seed = seed
        self.congestion = congestion
        self.idle_timeout = idle_timeout
        self._log = _RequestLog(log)
        self._memfd: int | None = None
        self._listeners: list[socket.socket] = []
        self._handlers: set[threading.Thread] = set()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = threading.Event()
        try:
            self.http = self._listen(listen)
            self.sink = self._listen(sink_listen) if sink_listen else None
            self._memfd = pattern_memfd(seed)
        except BaseException:
            self.close()
            raise

    @property
    def http_address(self) -> tuple[str, int]:
        host, port = self.http.getsockname()[:2]
        return host, port

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
            sock.listen(1024)
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

    def shutdown(self) -> None:
        """Make serve_forever return; safe from a signal handler or another thread."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def close(self, grace: float = 3.0) -> None:
        """Stop listening, then give requests in flight `grace` seconds to finish.

        A SIGTERM right after a response must not cut the connection's last
        steps (the drain before close, the log line) short.
        """
        for sock in self._listeners:
            sock.close()
        deadline = time.monotonic() + grace
        for thread in list(self._handlers):
            thread.join(max(0.0, deadline - time.monotonic()))
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
        handler = self._serve_http if listener is self.http else self._serve_sink
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

    def _serve_http(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        started = time.monotonic()
        request_line = "-"
        status = 0
        sent = 0
        try:
            self._set_timeouts(conn)
            buffer = bytearray()
            end = head_end(buffer)
            while end < 0:
                if len(buffer) > MAX_HEAD:
                    raise HttpParseError(431, f"head longer than {MAX_HEAD} bytes")
                data = conn.recv(_RECV_SIZE)
                if not data:
                    if buffer:
                        raise HttpParseError(400, "connection closed inside the request head")
                    request_line = "(closed before a request)"
                    return
                buffer += data
                end = head_end(buffer)
            request_line = bytes(buffer[: buffer.find(b"\n")]).decode("latin-1").rstrip("\r")
            action = route(parse_request_head(buffer[:end]))
            status, sent = self._respond(conn, action, bytes(buffer[end:]))
        except HttpParseError as e:
            status, sent = self._respond(conn, Refuse(e.status, e.message), b"")
        except OSError as e:
            request_line += f" [{_describe(e)}]"
        finally:
            _close(conn)
            elapsed = time.monotonic() - started
            peer_text = format_host_port(peer[0], peer[1])
            self._log.write(f'{peer_text} "{request_line}" {status} {sent} {elapsed:.3f}s')

    def _respond(self, conn: socket.socket, action: Action, early_body: bytes) -> tuple[int, int]:
        """Send the response for ``action``; returns (status, body bytes sent)."""
        if isinstance(action, SendPattern):
            self._send_pattern(conn, action.length)
            return 200, action.length
        if isinstance(action, HashBody):
            digest, _ = _hash_body(conn, action.length, early_body)
            body = (digest + "\n").encode()
            conn.sendall(response_head(200, len(body)) + body)
            return 200, len(body)
        body = (action.message + "\n").encode()
        extra = {"Allow": action.allow} if action.allow else None
        with contextlib.suppress(OSError):
            conn.sendall(response_head(action.status, len(body), extra) + body)
        return action.status, len(body)

    def _send_pattern(self, conn: socket.socket, length: int) -> None:
        head = response_head(200, length)
        # MSG_MORE lets the head share a segment with the first body bytes; only
        # when a body follows, or the head would wait for the cork timer.
        conn.sendall(head, socket.MSG_MORE if length else 0)
        offset = 0
        while offset < length:
            count = min(PERIOD, length - offset)
            start = offset % PERIOD
            if self._memfd is not None:
                sent = os.sendfile(conn.fileno(), self._memfd, start, count)
                if sent == 0:
                    raise ConnectionResetError(errno.ECONNRESET, "sendfile sent nothing")
            else:
                conn.sendall(pattern_window(self.seed, offset, count))
                sent = count
            offset += sent

    def _serve_sink(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        started = time.monotonic()
        outcome = ""
        received = 0
        try:
            self._set_timeouts(conn)
            digest, received = _hash_body(conn, None, b"")
            conn.sendall((digest + "\n").encode())
            outcome = f"sha256={digest}"
        except OSError as e:
            outcome = _describe(e)
        finally:
            _close(conn)
            elapsed = time.monotonic() - started
            peer_text = format_host_port(peer[0], peer[1])
            self._log.write(f"{peer_text} sink {received} bytes {outcome} {elapsed:.3f}s")


def _hash_body(conn: socket.socket, length: int | None, early: bytes) -> tuple[str, int]:
    """SHA-256 of a body of ``length`` bytes (None: up to EOF), part of which is in ``early``."""
    sha = hashlib.sha256()
    if length is not None:
        early = early[:length]
    sha.update(early)
    received = len(early)
    buffer = bytearray(_RECV_SIZE)
    view = memoryview(buffer)
    while length is None or received < length:
        want = _RECV_SIZE if length is None else min(_RECV_SIZE, length - received)
        n = conn.recv_into(view, want)
        if n == 0:
            if length is None:
                break
            raise ConnectionResetError(errno.ECONNRESET, f"body ended after {received} bytes")
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
        "--listen", required=True, metavar="ADDR:PORT", help="HTTP/1.0 listen address"
    )
    parser.add_argument("--sink-listen", metavar="ADDR:PORT", help="raw sink listen address")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="pattern seed (default 1)")
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT, metavar="S")
    parser.add_argument("--quiet", "-q", action="store_true", help="no per-request log lines")
    parser.add_argument(
        "--congestion", metavar="ALGO", help="TCP congestion control of every connection (cubic...)"
    )
    args = parser.parse_args(argv)
    try:
        listen = parse_host_port(args.listen)
        sink_listen = parse_host_port(args.sink_listen) if args.sink_listen else None
    except ValueError as e:
        parser.error(str(e))

    try:
        server = OriginServer(
            listen,
            sink_listen,
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
    if not args.quiet:
        # The real ports, for whoever asked for port 0.
        sink = server.sink_address
        sink_text = f", raw sink on {format_host_port(*sink)}" if sink else ""
        print(
            f"origin: HTTP on {format_host_port(*server.http_address)}{sink_text}", file=sys.stderr
        )
    print("ready", flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
