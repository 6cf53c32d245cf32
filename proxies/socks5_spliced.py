"""SOCKS5 proxy that hands the data phase to the splice daemon (thesis Fig. 4.2).

Per client, exactly the steps of the thesis' pseudocode, over the daemon's
Unix socket API (docs/api.md):

1. ``accept`` a client connection from a listener the daemon made (the
   ``listen`` op is thesis 4.1's ``init_splice``);
2. negotiate, authenticate and read the request with
   ``socks5_protocol.Negotiation`` (the same wire behaviour as the copy proxy);
3. ``intend_splice(client)``: from here on the proxy must not read the client
   (thesis 4.1), and the daemon keeps whatever the client sends next;
4. ``connect`` the reserved server side;
5. ``splice(client, server, len(reply))``: the daemon relays segments from now
   on, and we may write exactly ``len(reply)`` more bytes to the client;
6. write the success reply, close both descriptors (closing a spliced
   connection only releases our handle, thesis 4.2), serve the next client.

Steps 3-5 go to the daemon as one ``connect_splice`` request (docs/api.md):
the same ops, two round trips fewer on the path every connection waits on.

Reading no further than the request
-----------------------------------
A client may pipeline data right behind its request (RFC 1928 does not forbid
it and curl's ``--socks5`` does it for short requests). Those bytes belong to
the destination and the daemon relays them after the splice; if the proxy
read them they would be lost, since nothing may be written to the server fd
after the splice and the proxy must not read after intend_splice. So the
handshake is read with ``MSG_PEEK`` and fed to ``Negotiation`` one byte at a
time (``feed_exactly``): only the bytes that complete messages are consumed,
and the first byte after the request stays unread in the descriptor.

A failed connect is answered with its SOCKS code (RFC 1928 s.6, see
``reply_for_errno``) and the client is closed with a FIN after that reply; the
reserved server side is released with the ``close`` op.

One event loop serves every client (``proxies.aio_shell`` over the asyncio
client ``daemon.api.aio``): a task per client from accept to splice, and the
daemon's replies complete futures in the same thread.  The thread-per-client
version cost two thread hand-offs per API request and a thread start per
client, a large share of a spliced connection's set-up on a small machine
(docs/architecture.md, "Connection setup").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass

from daemon.api.aio import AsyncConnection, AsyncSpliceClient, DaemonGone, SpliceError
from proxies.aio_shell import close_gently, destinations_async, refuse_intended, run_proxy
from proxies.daemon_shell import check_source, local_for
from proxies.socks5 import HANDSHAKE_TIMEOUT, add_listen_option
from proxies.socks5_protocol import (
    MAX_AUTH_LEN,
    Connect,
    Credentials,
    Event,
    Negotiation,
    Reject,
    Reply,
    Request,
    SendToClient,
    build_reply,
    reply_for_errno,
)

log = logging.getLogger("proxies.socks5_spliced")

PROG = "socks5_spliced"
BND_AT = 4  # VER REP RSV ATYP, then BND.ADDR and BND.PORT (RFC 1928 s.6)


@dataclass(frozen=True, slots=True)
class SplicedConfig:
    credentials: Credentials | None = None
    connect_timeout: float = 10.0
    source: str | None = None  # the daemon address outgoing connections leave from
    # A client that does not finish its handshake in time is dropped: it holds a thread.
    handshake_timeout: float = HANDSHAKE_TIMEOUT


# -- sans-I/O: how many bytes of the handshake to consume ---------------------------


def feed_exactly(negotiation: Negotiation, data: bytes) -> tuple[int, list[Event]]:
    """Feed ``data`` byte by byte until the negotiation ends; (bytes used, events).

    The count stops right after the byte that completed the request (or the
    rejected message), so whatever follows stays with the daemon. Messages are
    at most a few hundred bytes, so the byte-wise feeding costs nothing.
    """
    events: list[Event] = []
    for used in range(1, len(data) + 1):
        new = negotiation.receive(data[used - 1 : used])
        events += new
        if any(isinstance(event, Connect | Reject) for event in new):
            return used, events
    return len(data), events


# -- the I/O shell -------------------------------------------------------------------


async def _recv_exactly(conn: AsyncConnection, count: int) -> None:
    """Consume ``count`` bytes that MSG_PEEK already showed us."""
    while count:
        chunk = await conn.recv(count)
        if not chunk:
            raise ConnectionError("EOF inside bytes already peeked")
        count -= len(chunk)


async def read_request(
    conn: AsyncConnection, peer: object, credentials: Credentials | None
) -> Request | None:
    """Run the handshake on ``conn`` without reading past the request.

    None when the client went away or was rejected (the rejection reply is
    sent and the connection closed gently).
    """
    negotiation = Negotiation(credentials)
    while True:
        # MAX_AUTH_LEN is the longest message: one peek can always complete one.
        data = await conn.recv(MAX_AUTH_LEN, socket.MSG_PEEK)
        if not data:
            return None
        used, events = feed_exactly(negotiation, data)
        await _recv_exactly(conn, used)
        for event in events:
            if isinstance(event, SendToClient):
                await conn.sendall(event.data)
            elif isinstance(event, Reject):
                log.info("rejected %s: %s", peer, event.reason)
                await conn.sendall(event.data)
                await close_gently(conn)
                return None
            else:
                return event.request


async def negotiate(conn: AsyncConnection, peer: object, config: SplicedConfig) -> Request | None:
    """``read_request`` within the handshake timeout; None (``conn`` released) if none came."""
    try:
        async with asyncio.timeout(config.handshake_timeout):
            request = await read_request(conn, peer, config.credentials)
    except (OSError, TimeoutError) as exc:
        log.info("client %s dropped during negotiation: %s", peer, exc or "timeout")
        request = None
    if request is None:
        conn.release()
    return request


async def serve_client(
    api: AsyncSpliceClient, client: AsyncConnection, config: SplicedConfig
) -> None:
    """One client, from accept to splice (its own task)."""
    peer = client.peer
    request = await negotiate(client, peer, config)
    if request is None:
        return
    try:
        remotes = await destinations_async(request.host, request.port, config.source)
    except socket.gaierror as exc:
        # A name that does not resolve is a host that cannot be reached (RFC 1928 s.6).
        log.info("cannot resolve %s: %s", request.host, exc)
        with contextlib.suppress(OSError):
            await client.sendall(build_reply(Reply.HOST_UNREACHABLE))
        await close_gently(client)
        return
    try:
        server = await connect_and_splice(api, client, remotes, config)
    except DaemonGone:
        client.release()
        return
    except SpliceError as exc:
        code = reply_for_errno(exc.errno)
        log.info("connect %s:%d failed: %s -> %s", request.host, request.port, exc, code.name)
        await refuse_intended(client, build_reply(code))
        return
    log.debug("spliced %s <-> %s via %s", peer, server.peer, server.local)
    if server.released:  # the daemon sent the reply and let go of both conns
        return
    assert server.local is not None
    reply = build_reply(Reply.SUCCEEDED, server.local)
    try:
        await client.sendall(reply)  # exactly the len announced with the splice
    except OSError as exc:
        log.info("client %s gone before its reply: %s", peer, exc)
    # Closing a spliced fd only releases our handle (thesis 4.2); nothing
    # the client waits for depends on the daemon's answer.
    client.release()
    server.release()


async def connect_and_splice(
    api: AsyncSpliceClient,
    client: AsyncConnection,
    remotes: list[tuple[str, int]],
    config: SplicedConfig,
) -> AsyncConnection:
    """Thesis Fig. 4.2's intend_splice, connect and splice(len), as one request per address.

    ``connect_splice`` (docs/api.md) does all three in the daemon; the reply's
    length is known before the bound address is (10 bytes for IPv4, 22 for
    IPv6).  A failed address leaves the client intended and the next one is
    tried; the first failure's error is raised when none answers.
    """
    first_error: SpliceError | None = None
    for remote in remotes:
        # --source names one family; a destination of the other leaves from
        # the daemon's default source of its own (--source6, say).
        local = local_for(config.source, remote)
        family_zero = "::" if ":" in remote[0] else "0.0.0.0"
        template = build_reply(Reply.SUCCEEDED, (family_zero, 0))
        try:
            if family_zero == "::":  # the daemon's inline reply knows IPv4 BND fields only
                return await api.connect_splice(
                    client, remote, len(template), local=local, timeout=config.connect_timeout
                )
            # The daemon sends the reply itself, with the bound address in
            # BND.ADDR/BND.PORT, and lets go of both conns: no round trip
            # through this proxy between the server's SYN-ACK and the reply.
            return await api.connect_splice(
                client,
                remote,
                local=local,
                timeout=config.connect_timeout,
                data=template,
                local_at=BND_AT,
                release=True,
            )
        except DaemonGone:
            raise
        except SpliceError as exc:
            log.debug("connect %s:%d failed: %s", remote[0], remote[1], exc)
            first_error = first_error or exc
            if exc.code in ("ESTATE", "ENOENT"):  # the client is gone or the intent is not ours
                break
    raise first_error or SpliceError("EHOSTUNREACH", "no address")


def parse_args(
    argv: list[str] | None,
    *,
    prog: str = "python -m proxies.socks5_spliced",
    description: str = "SOCKS5 proxy (CONNECT) whose data phase is spliced by the splice daemon.",
    addresses: str = "a daemon address",
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[argparse.Namespace, SplicedConfig]:
    """The command line of a SOCKS5 proxy attached to the daemon (this one, socks5_kernel).

    ``extra`` adds a proxy's own options (their values are in the namespace).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--daemon", required=True, metavar="SOCKET_PATH")
    add_listen_option(parser, f" ({addresses})")
    parser.add_argument("--source", metavar="ADDR", help=f"{addresses} to connect from")
    parser.add_argument("--user", help="require RFC 1929 username/password")
    parser.add_argument("--password")
    parser.add_argument("--connect-timeout", type=float, default=10.0, metavar="S")
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=HANDSHAKE_TIMEOUT,
        metavar="S",
        help="drop a client that has not sent its request by then",
    )
    parser.add_argument("--log-level", default="WARNING", metavar="L")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if not args.handshake_timeout > 0:
        parser.error("--handshake-timeout must be positive")
    if (args.user is None) != (args.password is None):
        parser.error("--user and --password go together")
    check_source(parser, args.source)
    credentials = None
    if args.user is not None:
        credentials = Credentials(args.user.encode(), args.password.encode())
    return args, SplicedConfig(
        credentials, args.connect_timeout, args.source, args.handshake_timeout
    )


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv)
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
