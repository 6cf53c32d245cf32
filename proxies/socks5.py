"""Plain SOCKS5 proxy: kernel sockets, bytes copied through user space.

This is the baseline the thesis measures TCP splice against (chapter 6).
Negotiation is ``socks5_protocol.Negotiation``; this module is only the I/O
shell: accept, read the handshake, connect, then relay.

Relay: one thread per direction, each blocking in the kernel so the GIL is
free while bytes move. Two copy strategies (``--copy``):

* ``splice``: socket -> pipe -> socket with os.splice(), no copy into Python.
  SPLICE_F_MORE is deliberately not set: it makes TCP hold back small writes
  (~200 ms) waiting for more, which would stall request/response traffic.
* ``buffer``: recv_into() a large preallocated buffer, then sendall().

Half-close (RFC 9293 s.3.6): EOF from one side becomes shutdown(SHUT_WR)
towards the other, whose direction keeps flowing; both sockets close when
both directions have seen EOF. An error on either socket (a reset, mostly)
aborts the pair: the surviving side is closed with SO_LINGER 0, i.e. reset.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import errno
import fcntl
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from proxies.socks5_protocol import (
    MAX_REQUEST_LEN,
    Connect,
    Credentials,
    Negotiation,
    Reject,
    Reply,
    SendToClient,
    build_reply,
    reply_for_connect_error,
)

log = logging.getLogger("proxies.socks5")

COPY_BUFFER_SIZE = 256 * 1024
PIPE_SIZE = 1024 * 1024
HANDSHAKE_TIMEOUT = 30.0  # a client that never finishes its handshake does not hold a thread
DRAIN_TIMEOUT = 1.0
LISTEN_BACKLOG = 1024
THREAD_STACK_SIZE = 256 * 1024  # two threads per connection: keep their stacks small

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_LINGER_ZERO = struct.pack("ii", 1, 0)  # struct linger {l_onoff=1, l_linger=0}


class CopyStrategy(enum.Enum):
    SPLICE = "splice"
    BUFFER = "buffer"


def default_copy_strategy() -> CopyStrategy:
    # Measured on the 2-vCPU dev machine, 64 MB over loopback, 2 x 15 runs each:
    # splice ~1.8 GB/s at ~0.018 s CPU, buffer ~1.4 GB/s at ~0.037 s CPU.
    # The buffer copy is the fallback where os.splice does not exist.
    return CopyStrategy.SPLICE if hasattr(os, "splice") else CopyStrategy.BUFFER


@dataclass(slots=True)
class RelayPair:
    """The two sockets of one proxied connection and how far each direction got."""

    client: socket.socket
    server: socket.socket
    directions_open: int = 2
    aborted: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Runs once both sockets are closed, e.g. to release the connections in the
    # splice daemon, whose ids outlive the descriptors (docs/api.md, "close").
    on_done: Callable[[], None] | None = None

    def finish_direction(self) -> None:
        with self.lock:
            self.directions_open -= 1
            last = self.directions_open == 0
        if last:
            self.client.close()
            self.server.close()
            if self.on_done is not None:
                self.on_done()

    def abort(self) -> None:
        """Reset both sides and wake the other direction's thread."""
        with self.lock:
            if self.aborted:
                return
            self.aborted = True
        for sock in (self.client, self.server):
            try:
                # Linger 0: close() will send RST instead of FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
                # SHUT_RD sends nothing on TCP but wakes a reader blocked in
                # recv()/splice() with EOF, so the other thread can finish.
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass


def _copy_buffer(source: socket.socket, sink: socket.socket) -> None:
    buffer = bytearray(COPY_BUFFER_SIZE)
    view = memoryview(buffer)
    while True:
        count = source.recv_into(buffer)
        if count == 0:
            return
        sink.sendall(view[:count])


def _copy_splice(source: socket.socket, sink: socket.socket) -> None:
    read_end, write_end = os.pipe()
    try:
        # A smaller default pipe (64 KiB) is slower but still correct.
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
        source_fd, sink_fd = source.fileno(), sink.fileno()
        while True:
            count = os.splice(source_fd, write_end, PIPE_SIZE)
            if count == 0:
                return
            while count:
                count -= os.splice(read_end, sink_fd, count)
    finally:
        os.close(read_end)
        os.close(write_end)


_COPIERS: dict[CopyStrategy, Callable[[socket.socket, socket.socket], None]] = {
    CopyStrategy.SPLICE: _copy_splice,
    CopyStrategy.BUFFER: _copy_buffer,
}


def _relay_direction(
    pair: RelayPair, source: socket.socket, sink: socket.socket, strategy: CopyStrategy
) -> None:
    try:
        _COPIERS[strategy](source, sink)
        if not pair.aborted:
            sink.shutdown(socket.SHUT_WR)  # carry the FIN across, keep the other way open
    except OSError as exc:
        log.debug("relay error %s, resetting both sides", exc)
        pair.abort()
    finally:
        pair.finish_direction()


def relay(
    client: socket.socket,
    server: socket.socket,
    strategy: CopyStrategy,
    on_done: Callable[[], None] | None = None,
) -> None:
    """Copy both directions until both are done; runs server->client in this thread.

    ``on_done`` is called (in whichever relay thread finishes last) after both
    sockets are closed.
    """
    pair = RelayPair(client, server, on_done=on_done)
    upstream = threading.Thread(
        target=_relay_direction,
        args=(pair, client, server, strategy),
        name="socks5-up",
        daemon=True,
    )
    upstream.start()
    _relay_direction(pair, server, client, strategy)


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    """Try each address of DST in turn (getaddrinfo order), like create_connection()."""
    last_error: OSError | None = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            last_error = exc
            continue
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise last_error if last_error is not None else OSError(errno.EHOSTUNREACH, "no address")


def reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0) rather than FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    sock.close()


def close_gently(sock: socket.socket) -> None:
    """Close after a reply so it is read: unread input at close() would send RST."""
    deadline = time.monotonic() + DRAIN_TIMEOUT  # a client trickling bytes forever is cut off
    try:
        sock.shutdown(socket.SHUT_WR)
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            if not sock.recv(65536):
                break
    except OSError:
        pass
    finally:
        sock.close()


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    credentials: Credentials | None = None
    connect_timeout: float = 10.0
    copy: CopyStrategy = field(default_factory=default_copy_strategy)


def negotiate(
    client: socket.socket, peer: object, credentials: Credentials | None
) -> Connect | None:
    """Run the handshake on ``client``; the CONNECT request, or None once the client is closed.

    A rejected client gets its reply and is closed gently; on EOF the caller closes.
    """
    negotiation = Negotiation(credentials)
    while True:
        data = client.recv(MAX_REQUEST_LEN)
        if not data:
            return None
        for event in negotiation.receive(data):
            if isinstance(event, SendToClient):
                client.sendall(event.data)
            elif isinstance(event, Reject):
                log.info("rejected %s: %s", peer, event.reason)
                client.sendall(event.data)
                close_gently(client)
                return None
            else:
                return event


def open_pair(
    client: socket.socket,
    peer: object,
    credentials: Credentials | None,
    handshake_timeout: float,
    connect: Callable[[str, int], socket.socket],
) -> socket.socket | None:
    """Handshake, ``connect(host, port)``, reply; the server socket, or None once handled.

    Bytes the client pipelined behind its request go to the server before
    this returns.  None: the client went away, was rejected or refused (its
    reply sent), and its socket is closed.  ``peer`` comes from accept():
    getpeername() fails once the client has reset.
    """
    try:
        client.settimeout(handshake_timeout)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        negotiated = negotiate(client, peer, credentials)
        if negotiated is None:
            client.close()
            return None
        request = negotiated.request
        try:
            server = connect(request.host, request.port)
        except OSError as exc:
            code = reply_for_connect_error(exc)
            log.info("connect %s:%d failed: %s -> %s", request.host, request.port, exc, code.name)
            client.sendall(build_reply(code))
            close_gently(client)
            return None
        try:
            bound = server.getsockname()
            client.sendall(build_reply(Reply.SUCCEEDED, (bound[0], bound[1])))
            client.settimeout(None)
            if negotiated.early_data:
                server.sendall(negotiated.early_data)
        except OSError:
            reset(server)  # the client is gone: mirror that to the server as a reset
            raise
    except OSError as exc:
        log.info("client %s dropped during negotiation: %s", peer, exc)
        reset(client)
        return None
    log.debug("%s <-> %s:%d", peer, request.host, request.port)
    return server


def serve_client(client: socket.socket, peer: object, config: ProxyConfig) -> None:
    """One client connection, start to end (its own thread)."""

    def connect(host: str, port: int) -> socket.socket:
        return _connect(host, port, config.connect_timeout)

    server = open_pair(client, peer, config.credentials, HANDSHAKE_TIMEOUT, connect)
    if server is not None:
        relay(client, server, config.copy)


def parse_listen(text: str) -> tuple[str, int]:
    """ADDR:PORT, or [IPv6]:PORT."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"expected ADDR:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def add_listen_option(parser: argparse.ArgumentParser, where: str = "") -> None:
    """``--listen ADDR:PORT``, required, repeatable (one listener per address, any family)."""
    parser.add_argument(
        "--listen",
        type=parse_listen,
        required=True,
        action="append",
        metavar="ADDR:PORT",
        help=f"where to listen{where}; again for another address ([v6]:port, say)",
    )


def open_listener(address: tuple[str, int]) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
        listener.listen(LISTEN_BACKLOG)
    except OSError:
        listener.close()
        raise
    return listener


class _Stop(Exception):
    """Raised by the SIGTERM handler to leave the accept loop."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def serve(
    listeners: list[socket.socket],
    handle: Callable[[socket.socket, object], None],
    wake: socket.socket,
    name: str = "socks5-client",
    ready: Callable[[], None] | None = None,
) -> None:
    """Accept on every listener until a signal handler raises; ``handle(client, peer)``
    runs in a thread of its own per client.  ``ready`` runs once the loop's own
    descriptors exist (a test counting the proxy's fds takes its baseline then).

    `wake` is the read end of the signal wakeup fd (signal.set_wakeup_fd): a
    SIGTERM the kernel gives to a client's thread, or one that lands just
    before the main thread blocks, runs its Python handler only once the main
    thread wakes, which a blocking accept() might never do.
    """
    with selectors.DefaultSelector() as selector:
        for listener in listeners:
            listener.setblocking(False)
            selector.register(listener, selectors.EVENT_READ)
        selector.register(wake, selectors.EVENT_READ)
        if ready is not None:
            ready()
        while True:
            for key, _ in selector.select():
                if key.fileobj is wake:
                    # The handler runs at the next bytecode boundary, before
                    # this loop can block again.
                    with contextlib.suppress(BlockingIOError):
                        wake.recv(4096)
                    continue
                readable = key.fileobj
                assert isinstance(readable, socket.socket)
                try:
                    client, peer = readable.accept()
                except (BlockingIOError, ConnectionAbortedError):
                    continue
                client.setblocking(True)
                log.debug("accepted %s", peer)
                threading.Thread(target=handle, args=(client, peer), name=name, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m proxies.socks5", description="Plain copy-loop SOCKS5 proxy (CONNECT)."
    )
    add_listen_option(parser)
    parser.add_argument("--user", help="require RFC 1929 username/password")
    parser.add_argument("--password")
    parser.add_argument("--connect-timeout", type=float, default=10.0, metavar="S")
    parser.add_argument(
        "--copy",
        choices=[strategy.value for strategy in CopyStrategy],
        default=default_copy_strategy().value,
        help="how bytes are relayed (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="WARNING", metavar="L")
    args = parser.parse_args(argv)
    if (args.user is None) != (args.password is None):
        parser.error("--user and --password go together")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s socks5 %(levelname)s %(message)s"
    )
    credentials = None
    if args.user is not None:
        credentials = Credentials(args.user.encode(), args.password.encode())
    copy = CopyStrategy(args.copy)
    if copy is CopyStrategy.SPLICE and not hasattr(os, "splice"):
        log.warning("os.splice unavailable, copying through a buffer")
        copy = CopyStrategy.BUFFER
    config = ProxyConfig(credentials, args.connect_timeout, copy)

    log.info("copy=%s", config.copy.value)
    return run_listeners(
        "socks5", args.listen, lambda client, peer: serve_client(client, peer, config)
    )


def run_listeners(
    prog: str,
    listen: list[tuple[str, int]],
    handle: Callable[[socket.socket, object], None],
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Listen, print "ready", serve (``serve``) until SIGTERM; the exit status.

    ``on_ready`` runs once the SIGTERM handler is in place (a watcher that
    may send the process SIGTERM starts there).
    """
    listeners: list[socket.socket] = []
    for host, port in listen:
        try:
            listeners.append(open_listener((host, port)))
        except OSError as exc:
            print(f"{prog}: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
            for listener in listeners:
                listener.close()
            return 1
    threading.stack_size(THREAD_STACK_SIZE)
    wake, woken = socket.socketpair()
    woken.setblocking(False)
    wake.setblocking(False)
    signal.set_wakeup_fd(woken.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:  # from here on a SIGTERM may land anywhere, so everything is inside the try

        def announce() -> None:
            if on_ready is not None:
                on_ready()
            print("ready", flush=True)
            log.info("listening on %s", ", ".join(f"{h}:{p}" for h, p in listen))

        serve(listeners, handle, wake, f"{prog}-client", announce)
    except (_Stop, KeyboardInterrupt):
        log.info("stopping")
    finally:
        signal.set_wakeup_fd(-1)
        for listener in listeners:
            listener.close()
        wake.close()
        woken.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
