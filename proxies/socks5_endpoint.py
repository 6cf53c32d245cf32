"""SOCKS5 proxy whose TCP connections are terminated by the splice daemon (no splice yet).

Issue 3's "proof" proxy: the same SOCKS5 wire behaviour as ``proxies.socks5``
(``socks5_protocol.Negotiation``, the same replies), but both TCP connections
come from the splice daemon's Unix socket API (docs/api.md) instead of the
kernel:

* client side: ``api.listen((addr, port))`` then ``accept()`` in a loop;
* server side: ``api.connect((host, port), local=(source, 0), timeout=...)``.

Each connection is handed over as one end of an AF_UNIX stream socketpair, so
the copy relay of ``proxies.socks5`` runs on it unchanged: a thread per
direction, os.splice() (which Linux supports on AF_UNIX stream sockets) or a
buffer copy, and the same half-close rule (EOF one way becomes
shutdown(SHUT_WR), which the daemon turns into a FIN, the other way).

The daemon takes addresses, not names (docs/api.md, "Addresses"), so a
DOMAINNAME request is resolved here and each address tried in turn.

Threads: the main thread only waits for SIGTERM or for the accept thread to
report why it stopped (the daemon went away); the accept thread starts one
thread per client, which negotiates, connects and then relays.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import queue
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from types import FrameType

from daemon.api.client import Connection, DaemonGone, Listener, SpliceClient, SpliceError
from proxies.socks5 import (
    HANDSHAKE_TIMEOUT,
    THREAD_STACK_SIZE,
    CopyStrategy,
    close_gently,
    default_copy_strategy,
    negotiate,
    parse_listen,
    relay,
)
from proxies.socks5_protocol import (
    Credentials,
    Reply,
    Request,
    build_reply,
    reply_for_connect_error,
    reply_for_errno,
)

log = logging.getLogger("proxies.socks5_endpoint")

PROG = "socks5_endpoint"


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    credentials: Credentials | None = None
    connect_timeout: float = 10.0
    source: str | None = None  # the daemon address outgoing connections leave from
    copy: CopyStrategy = field(default_factory=default_copy_strategy)


def reply_for_splice_error(exc: SpliceError) -> Reply:
    """The SOCKS reply for a failed daemon ``connect``.

    The daemon's codes are errno names (ECONNREFUSED -> 0x05, EHOSTUNREACH ->
    0x04, ENETUNREACH -> 0x03, ETIMEDOUT -> 0x06), so the copy proxy's errno
    table applies; codes without an errno (EDISCONNECTED, ELIMIT, ...) are 0x01.
    """
    return reply_for_errno(exc.errno)


def _candidates(request: Request, source: str | None) -> list[tuple[str, int]]:
    """The addresses to try for DST: itself if literal, else what the name resolves to.

    Raises ``socket.gaierror`` for a name that does not resolve.
    """
    try:
        ipaddress.ip_address(request.host)
    except ValueError:
        pass
    else:
        return [(request.host, request.port)]
    family = socket.AF_UNSPEC
    if source is not None:
        # A v4 source cannot reach a v6 destination (nor vice versa): skip those.
        source_version = ipaddress.ip_address(source).version
        family = socket.AF_INET if source_version == 4 else socket.AF_INET6
    infos = socket.getaddrinfo(request.host, request.port, family, socket.SOCK_STREAM)
    seen: list[tuple[str, int]] = []
    for _, _, _, _, address in infos:
        candidate = (str(address[0]), int(address[1]))
        if candidate not in seen:
            seen.append(candidate)
    return seen


def connect_destination(api: SpliceClient, request: Request, config: EndpointConfig) -> Connection:
    """A daemon connection to DST; raises the last ``SpliceError`` if every address failed."""
    local = None if config.source is None else (config.source, 0)
    last_error: SpliceError | None = None
    for remote in _candidates(request, config.source):
        try:
            return api.connect(remote, local=local, timeout=config.connect_timeout)
        except DaemonGone:
            raise  # no point trying the next address
        except SpliceError as exc:
            log.debug("connect %s:%d failed: %s", remote[0], remote[1], exc)
            last_error = exc
    raise last_error if last_error is not None else SpliceError("EHOSTUNREACH", "no address")


def _release(*conns: Connection) -> None:
    """Free the connections in the daemon; quiet if it already forgot them or went away."""
    for conn in conns:
        try:
            conn.close()
        except (SpliceError, OSError) as exc:
            log.debug("closing conn %d: %s", conn.id, exc)


def _refuse(client: Connection, code: Reply) -> None:
    """Send a failure reply, let the client read it, then close its connection."""
    try:
        client.sock.sendall(build_reply(code))
        close_gently(client.sock)
    except OSError as exc:
        log.debug("client %s gone before its reply: %s", client.peer, exc)
    _release(client)


def serve_client(api: SpliceClient, client: Connection, config: EndpointConfig) -> None:
    """One client connection, start to end (its own thread)."""
    peer = client.peer
    sock = client.sock
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        connect = negotiate(sock, peer, config.credentials)
    except OSError as exc:
        log.info("client %s dropped during negotiation: %s", peer, exc)
        _release(client)
        return
    if connect is None:  # EOF, or rejected (negotiate already replied and closed)
        _release(client)
        return
    request = connect.request
    try:
        server = connect_destination(api, request, config)
    except (SpliceError, OSError) as exc:
        code = (
            reply_for_splice_error(exc)
            if isinstance(exc, SpliceError)
            else reply_for_connect_error(exc)
        )
        log.info("connect %s:%d failed: %s -> %s", request.host, request.port, exc, code.name)
        _refuse(client, code)
        return
    try:
        sock.sendall(build_reply(Reply.SUCCEEDED, server.local))
        sock.settimeout(None)
        if connect.early_data:
            server.sock.sendall(connect.early_data)
    except OSError as exc:
        log.info("client %s dropped before relaying: %s", peer, exc)
        _release(client, server)
        return
    log.debug("relaying %s <-> %s:%d via %s", peer, request.host, request.port, server.local)
    relay(sock, server.sock, config.copy, on_done=lambda: _release(client, server))


def serve(api: SpliceClient, listener: Listener, config: EndpointConfig) -> str:
    """Accept until the listener is closed; the reason the daemon stopped us, or "" if we did."""
    while True:
        try:
            client = listener.accept()
        except DaemonGone as exc:
            return f"the splice daemon went away: {exc.message}"
        except SpliceError as exc:
            if exc.code == "ECANCELED":  # our own close of the listener, at SIGTERM
                return ""
            # docs/api.md names no other accept error: do not spin on one we do not know.
            return f"accept failed: {exc}"
        log.debug("accepted %s", client.peer)
        threading.Thread(
            target=serve_client, args=(api, client, config), name="socks5-client", daemon=True
        ).start()


def _accept_thread(
    api: SpliceClient, listener: Listener, config: EndpointConfig, stopped: queue.Queue[str]
) -> None:
    """``serve``, reporting to the main thread however it ends (a bug must not hang main)."""
    try:
        reason = serve(api, listener, config)
    except Exception as exc:
        log.exception("accept loop failed")
        reason = f"accept loop failed: {exc}"
    stopped.put(reason)


class _Stop(Exception):
    """Raised by the SIGTERM handler to leave the main thread's wait."""


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, EndpointConfig]:
    parser = argparse.ArgumentParser(
        prog="python -m proxies.socks5_endpoint",
        description="SOCKS5 proxy (CONNECT) over the splice daemon's TCP endpoint.",
    )
    parser.add_argument("--daemon", required=True, metavar="SOCKET_PATH")
    parser.add_argument("--listen", type=parse_listen, required=True, metavar="ADDR:PORT")
    parser.add_argument("--source", metavar="ADDR", help="daemon address to connect from")
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
    if args.source is not None:
        try:
            ipaddress.ip_address(args.source)
        except ValueError:
            parser.error(f"--source must be an IP address, got {args.source!r}")
    credentials = None
    if args.user is not None:
        credentials = Credentials(args.user.encode(), args.password.encode())
    config = EndpointConfig(credentials, args.connect_timeout, args.source, CopyStrategy(args.copy))
    return args, config


def main(argv: list[str] | None = None) -> int:
    args, config = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s socks5_endpoint %(levelname)s %(message)s",
    )
    # Only the main thread may take SIGTERM/SIGINT: it sleeps in a lock wait, which
    # a signal interrupts only if delivered to it, and the kernel hands a
    # process-directed signal to any thread that does not block it. Every thread
    # started from here on (the API reader, accept, client and relay threads)
    # inherits this mask; main unblocks once its handler is in place.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        api = SpliceClient(args.daemon)
    except (OSError, SpliceError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(
            f"{PROG}: cannot attach to the splice daemon at {args.daemon}: {reason}",
            file=sys.stderr,
        )
        return 1
    host, port = args.listen
    try:
        listener = api.listen((host, port))
    except SpliceError as exc:
        print(f"{PROG}: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        api.close()
        return 1
    threading.stack_size(THREAD_STACK_SIZE)
    stopped: queue.Queue[str] = queue.Queue()
    accepting = threading.Thread(
        target=_accept_thread,
        args=(api, listener, config, stopped),
        name="socks5-accept",
        daemon=True,
    )
    accepting.start()
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:  # from here on a SIGTERM may land anywhere, so everything is inside the try
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        print("ready", flush=True)
        log.info("listening on %s:%d via %s, copy=%s", host, port, args.daemon, config.copy.value)
        reason = stopped.get()
    except (_Stop, KeyboardInterrupt):
        log.info("stopping")
        reason = ""
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop is enough; finish cleaning up
        with contextlib.suppress(SpliceError):
            listener.close()
        api.close()
    if reason:
        print(f"{PROG}: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
