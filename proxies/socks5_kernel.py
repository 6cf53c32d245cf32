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
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import threading

from daemon.api.client import DaemonGone, SpliceClient, SpliceError
from daemon.api.protocol import ErrorCode
from proxies.daemon_shell import destinations, local_for
from proxies.socks5 import default_copy_strategy, open_pair, relay, run_listeners
from proxies.socks5_spliced import SplicedConfig, parse_args

log = logging.getLogger("proxies.socks5_kernel")

PROG = "socks5_kernel"


def connect_first(host: str, port: int, source: str | None, timeout: float) -> socket.socket:
    """A kernel connection to the first address of ``host`` that answers; else the first error."""
    first_error: OSError | None = None
    for remote in destinations(host, port, source):
        family = socket.AF_INET6 if ":" in remote[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
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


def serve_client(
    api: SpliceClient, client: socket.socket, peer: object, config: SplicedConfig
) -> None:
    """One client, from its greeting to the hand-over (its own thread)."""

    def connect(host: str, port: int) -> socket.socket:
        return connect_first(host, port, config.source, config.connect_timeout)

    server = open_pair(client, peer, config.credentials, config.handshake_timeout, connect)
    if server is None:
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
    args, config = parse_args(
        argv,
        prog="python -m proxies.socks5_kernel",
        description="SOCKS5 proxy (CONNECT) on kernel sockets; the splice daemon relays the data.",
        addresses="an address of this host",
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

    def watch_daemon() -> None:
        # The daemon going away ends the proxy (the other proxies do the same).
        with contextlib.suppress(DaemonGone):
            for _event in api.events():
                pass
        gone.set()
        os.kill(os.getpid(), signal.SIGTERM)

    def start_watching() -> None:
        threading.Thread(target=watch_daemon, name=f"{PROG}-watch", daemon=True).start()

    with api:
        status = run_listeners(
            PROG,
            args.listen,
            lambda client, peer: serve_client(api, client, peer, config),
            start_watching,
        )
    if gone.is_set():
        print(f"{PROG}: the splice daemon went away", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
