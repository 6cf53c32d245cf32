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
import logging
import sys
from dataclasses import dataclass, field

from daemon.api.client import Connection, DaemonGone, SpliceClient, SpliceError
from proxies.daemon_shell import (
    check_source,
    destinations,
    local_for,
    release,
    run_proxy,
)
from proxies.socks5 import (
    HANDSHAKE_TIMEOUT,
    CopyStrategy,
    add_listen_option,
    close_gently,
    default_copy_strategy,
    negotiate,
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


def connect_destination(api: SpliceClient, request: Request, config: EndpointConfig) -> Connection:
    """A daemon connection to DST; raises the last ``SpliceError`` if every address failed."""
    last_error: SpliceError | None = None
    for remote in destinations(request.host, request.port, config.source):
        # --source names one family; the other leaves from the daemon's default
        # source of its own (--source6, say).
        try:
            local = local_for(config.source, remote)
            return api.connect(remote, local=local, timeout=config.connect_timeout)
        except DaemonGone:
            raise  # no point trying the next address
        except SpliceError as exc:
            log.debug("connect %s:%d failed: %s", remote[0], remote[1], exc)
            last_error = exc
    raise last_error if last_error is not None else SpliceError("EHOSTUNREACH", "no address")


def _refuse(client: Connection, code: Reply) -> None:
    """Send a failure reply, let the client read it, then close its connection."""
    try:
        client.sock.sendall(build_reply(code))
        close_gently(client.sock)
    except OSError as exc:
        log.debug("client %s gone before its reply: %s", client.peer, exc)
    release(client)


def serve_client(api: SpliceClient, client: Connection, config: EndpointConfig) -> None:
    """One client connection, start to end (its own thread)."""
    peer = client.peer
    sock = client.sock
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        connect = negotiate(sock, peer, config.credentials)
    except OSError as exc:
        log.info("client %s dropped during negotiation: %s", peer, exc)
        release(client)
        return
    if connect is None:  # EOF, or rejected (negotiate already replied and closed)
        release(client)
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
        release(client, server)
        return
    log.debug("relaying %s <-> %s:%d via %s", peer, request.host, request.port, server.local)
    relay(sock, server.sock, config.copy, on_done=lambda: release(client, server))


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, EndpointConfig]:
    parser = argparse.ArgumentParser(
        prog="python -m proxies.socks5_endpoint",
        description="SOCKS5 proxy (CONNECT) over the splice daemon's TCP endpoint.",
    )
    parser.add_argument("--daemon", required=True, metavar="SOCKET_PATH")
    add_listen_option(parser, " (a daemon address)")
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
    check_source(parser, args.source)
    credentials = None
    if args.user is not None:
        credentials = Credentials(args.user.encode(), args.password.encode())
    config = EndpointConfig(credentials, args.connect_timeout, args.source, CopyStrategy(args.copy))
    return args, config


def main(argv: list[str] | None = None) -> int:
    args, config = _parse_args(argv)
    return run_proxy(
        PROG,
        daemon=args.daemon,
        listen=args.listen[0],
        more_listen=args.listen[1:],
        log_level=args.log_level,
        serve_client=lambda api, client: serve_client(api, client, config),
    )


if __name__ == "__main__":
    sys.exit(main())
