"""SOCKS5 proxy on kernel sockets that hands each connection pair to the splice daemon.

The thesis's own model (Fig. 4.2 with ``splice`` on two kernel sockets): the
proxy accepts the client on an ordinary listening socket, negotiates and
reads the request (``socks5_protocol.Negotiation``, the same wire behaviour
as the other SOCKS5 proxies), connects to the destination itself, writes
the success reply, and then gives both connections to the daemon with one
``splice_sockets`` request (docs/api.md): the daemon takes them over as they
stand (TCP_REPAIR, daemon/io/repair.py) and relays from then on, in the
kernel's fast path.  Set-up is the kernel's, as for a copying proxy; only
the hand-over is the daemon's.

The I/O is the plain proxy's (proxies/socks5.py): a thread per client,
blocking sockets, which is what makes a copying proxy's set-up fast here (an
asyncio version of this proxy answered the SOCKS5 request ~0.5 ms later).
Bytes a client pipelines behind its request are read with it; the proxy
writes them to the server socket itself before the hand-over, where the
daemon finds them as bytes the server has not acknowledged.  If the daemon
refuses the pair (no fast path, an unusual state) or is gone, this proxy
copies the connection itself: the client never notices.

``--splice-after BYTES`` copies each connection first, as the plain proxy
does, and hands it over only once that many bytes have crossed (HAProxy's
``splice-auto`` makes the same bet: splice the fast streamers).  A take-over
costs the daemon ~0.75 ms and sits in the path of the first response
(docs/architecture.md, "Connection setup"); a connection that ends within a
few round trips never earns it back.  0 (the default) hands every pair over
at once, the thesis's model.  A client much farther away than the server
is handed over at once whatever the budget (``copy_budget``): a copy phase
would teach the origin's congestion control the short path's RTT.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import select
import signal
import socket
import sys
import threading

from daemon.api.client import DaemonGone, SpliceClient, SpliceError
from daemon.api.protocol import ErrorCode
from daemon.io.tcp_info import smoothed_rtt_us
from proxies.daemon_shell import destinations, local_for
from proxies.http_proxy import byte_count
from proxies.socks5 import (
    COPY_BUFFER_SIZE,
    default_copy_strategy,
    open_pair,
    relay,
    reset,
    run_listeners,
)
from proxies.socks5_spliced import SplicedConfig, parse_args

log = logging.getLogger("proxies.socks5_kernel")

PROG = "socks5_kernel"


def connect_first(host: str, port: int, source: str | None, timeout: float) -> socket.socket:
    """A kernel connection to the first address of ``host`` that answers; else the first error."""
    first_error: OSError | None = None
    for remote in destinations(host, port, source):
        family = socket.AF_INET6 if ":" in remote[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        # The handshake's last ACK is held back until the first bytes for the
        # server (Linux, an active open with TCP_DEFER_ACCEPT: "save one
        # ACK"): the client's request, which comes a client-path RTT after
        # the reply.  The origin takes its first RTT sample from its SYN-ACK
        # to that ACK; acknowledged at once, it measured this host's LAN
        # (20 us) and once spliced over a 10 ms client link its BBR kept that
        # minimum (10 s, a cwnd of 30 packets): 23 Mbit/s against the
        # router's 320 (experiment 6).  A server that speaks first waits for
        # the take-over's ACK instead (~1.5 ms more for its banner here).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        sock.settimeout(timeout)
        try:
            local = local_for(source, remote)
            if local is not None:
                sock.bind(local)
            sock.connect(remote)
        except OSError as exc:
            sock.close()
            first_error = first_error or exc
            continue
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise first_error or OSError(errno.EHOSTUNREACH, "no address")


# How much longer the client's path may be than the server's before a copy
# phase is too costly to the origin's congestion control (``copy_budget``).
LONG_PATH_RATIO = 4
LONG_PATH_US = 1000


def copy_budget(budget: int, client_rtt_us: int, server_rtt_us: int) -> int:
    """``--splice-after``'s budget for one pair: 0 (at once) when the client is far away.

    While the proxy copies, the origin's RTT samples measure the proxy's
    side of the path; once the pair is spliced the path is the client's
    too, and a congestion control that keeps its minimum RTT (BBR: 10 s)
    or exits slow start on a delay rise (CUBIC's HyStart) is left with a
    minimum the client's path makes 10-1000 times too small: downloads
    handed over after 64 KB crossed a 10 ms client link at 23 Mbit/s
    (router 345, at once 299-325).  So a pair whose client path is more
    than LONG_PATH_RATIO times the server's (and over LONG_PATH_US) is
    handed over before anything is copied.
    """
    if budget <= 0:
        return 0
    if client_rtt_us > LONG_PATH_US and client_rtt_us > LONG_PATH_RATIO * server_rtt_us:
        return 0
    return budget


def copy_until(client: socket.socket, server: socket.socket, budget: int) -> bool:
    """Copy both ways until ``budget`` bytes have crossed; True: hand the pair over now.

    False: the connection was finished here, or failed and both sides were
    reset; the sockets are closed either way.  A direction that ends (EOF)
    before the budget is spent is carried across with shutdown(SHUT_WR) and
    the other one is copied to its end here: the daemon takes over no
    connection the proxy has shut down for writing (docs/api.md).  One thread
    for both directions: within the budget a blocking send waits for the
    network, never for the other direction (the peer's kernel takes up to its
    receive buffer, larger than the budget, whatever its application does);
    past it, only one direction is left.
    """
    if budget <= 0:
        return True
    ends = {client.fileno(): (client, server), server.fileno(): (server, client)}
    poller = select.poll()
    for fd in ends:
        poller.register(fd, select.POLLIN)
    buffer = bytearray(COPY_BUFFER_SIZE)
    view = memoryview(buffer)
    moved = 0
    try:
        while ends:
            for fd, _events in poller.poll():
                source, sink = ends[fd]
                count = source.recv_into(buffer)
                if count == 0:
                    sink.shutdown(socket.SHUT_WR)  # the FIN across; the other way stays open
                    poller.unregister(fd)
                    del ends[fd]
                    continue
                sink.sendall(view[:count])
                moved += count
            if moved >= budget and len(ends) == 2:
                return True
    except OSError as exc:
        log.debug("copy error %s, resetting both sides", exc)
        reset(client)
        reset(server)
        return False
    client.close()
    server.close()
    return False


def serve_client(
    api: SpliceClient,
    client: socket.socket,
    peer: object,
    config: SplicedConfig,
    splice_after: int = 0,
) -> None:
    """One client, from its greeting to the hand-over (its own thread)."""

    def connect(host: str, port: int) -> socket.socket:
        return connect_first(host, port, config.source, config.connect_timeout)

    server = open_pair(client, peer, config.credentials, config.handshake_timeout, connect)
    if server is None:
        return
    if splice_after > 0:
        splice_after = copy_budget(splice_after, smoothed_rtt_us(client), smoothed_rtt_us(server))
    if splice_after > 0:
        # Copying first: the held ACK (connect_first) goes now.  A server that
        # speaks first would otherwise wait for it as long as the client waits
        # for the server, until the delayed-ACK timer (200 ms, measured); and
        # the copy teaches the origin this host's RTT anyway.
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    if not copy_until(client, server, splice_after):
        return
    try:
        api.splice_sockets(client, server)
    except (SpliceError, DaemonGone) as exc:
        if isinstance(exc, SpliceError) and exc.code == ErrorCode.ECONNRESET:
            # Taken over, then failed (docs/api.md): the sockets transmit
            # nothing any more and the daemon reset both peers.
            log.error("the daemon took %s over and failed: %s", peer, exc)
            client.close()
            server.close()
            return
        # The pair is still ours: copy it, the client sees no difference.
        log.warning("the daemon did not splice %s: %s; copying", peer, exc)
        relay(client, server, default_copy_strategy())
        return
    # Spliced: closed without a sound (repair mode), the daemon carries them on.
    client.close()
    server.close()


def main(argv: list[str] | None = None) -> int:
    def splice_after_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--splice-after",
            type=byte_count,
            default=0,
            metavar="BYTES",
            help="copy each connection until this many bytes have crossed, then hand it "
            "to the daemon (default 0: hand every pair over at once)",
        )

    args, config = parse_args(
        argv,
        prog="python -m proxies.socks5_kernel",
        description="SOCKS5 proxy (CONNECT) on kernel sockets; the splice daemon relays the data.",
        addresses="an address of this host",
        extra=splice_after_option,
    )
    logging.basicConfig(
        level=args.log_level.upper(), format=f"%(asctime)s {PROG} %(levelname)s %(message)s"
    )
    try:
        api = SpliceClient(args.daemon)
    except (OSError, SpliceError) as exc:
        where = args.daemon
        print(f"{PROG}: cannot attach to the splice daemon at {where}: {exc}", file=sys.stderr)
        return 1
    gone = threading.Event()
    stopping = threading.Event()

    def watch_daemon() -> None:
        # The daemon going away ends the proxy (the other proxies do the same).
        with contextlib.suppress(DaemonGone):
            for _event in api.events():
                pass
        if stopping.is_set():
            return  # the end of our own API connection, on the way out
        gone.set()
        os.kill(os.getpid(), signal.SIGTERM)

    def start_watching() -> None:
        threading.Thread(target=watch_daemon, name=f"{PROG}-watch", daemon=True).start()

    with api:
        try:
            status = run_listeners(
                PROG,
                args.listen,
                lambda client, peer: serve_client(api, client, peer, config, args.splice_after),
                start_watching,
            )
        finally:
            stopping.set()
    if gone.is_set():
        print(f"{PROG}: the splice daemon went away", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
