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

As in ``socks5_spliced`` the handshake is read with ``MSG_PEEK`` and
consumed no further than the request, so bytes a client pipelines behind it
stay in the socket, where the daemon finds them (they go to the server
first).  If the daemon refuses the pair (no fast path, an unusual state),
this proxy copies the connection itself: the client never notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys

from daemon.api.aio import AsyncSpliceClient, DaemonGone, SpliceError, wait_readable
from proxies.aio_shell import close_gently, destinations_async
from proxies.daemon_shell import local_for
from proxies.socks5 import open_listener
from proxies.socks5_protocol import Reply, build_reply, reply_for_errno
from proxies.socks5_spliced import SplicedConfig, negotiate, parse_args

log = logging.getLogger("proxies.socks5_kernel")

PROG = "socks5_kernel"
COPY_CHUNK = 64 * 1024


class KernelConnection:
    """A kernel socket as the handshake code reads it (``aio_shell.StreamConn``)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock

    async def recv(self, bufsize: int, flags: int = 0) -> bytes:
        while True:
            try:
                return self.sock.recv(bufsize, flags)
            except (BlockingIOError, InterruptedError):
                await wait_readable(self.sock)

    async def sendall(self, data: bytes | bytearray | memoryview) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    def shutdown(self, how: int = socket.SHUT_WR) -> None:
        self.sock.shutdown(how)

    def release(self) -> None:
        self.sock.close()


async def connect_first(
    remotes: list[tuple[str, int]], source: str | None, timeout: float
) -> socket.socket:
    """A kernel connection to the first address that answers; the first failure if none."""
    loop = asyncio.get_running_loop()
    first_error: OSError | None = None
    for remote in remotes:
        family = socket.AF_INET6 if ":" in remote[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            local = local_for(source, remote)
            if local is not None:
                sock.bind(local)
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, remote)
            return sock
        except (OSError, TimeoutError) as exc:
            sock.close()
            err = exc if isinstance(exc, OSError) else TimeoutError(110, "connect timed out")
            first_error = first_error or err
    raise first_error or OSError(113, "no address")


async def copy(src: socket.socket, dst: socket.socket) -> None:
    """One direction of the fallback copy, then FIN."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        while data := await loop.sock_recv(src, COPY_CHUNK):
            await loop.sock_sendall(dst, data)
        dst.shutdown(socket.SHUT_WR)


async def serve_client(api: AsyncSpliceClient, sock: socket.socket, config: SplicedConfig) -> None:
    client = KernelConnection(sock)
    peer = sock.getpeername()
    request = await negotiate(client, peer, config)
    if request is None:
        return
    try:
        remotes = await destinations_async(request.host, request.port, config.source)
        server = await connect_first(remotes, config.source, config.connect_timeout)
    except OSError as exc:
        code = Reply.HOST_UNREACHABLE if isinstance(exc, socket.gaierror) else None
        code = code or reply_for_errno(exc.errno or 0)
        log.info("connect %s:%d failed: %s -> %s", request.host, request.port, exc, code.name)
        with contextlib.suppress(OSError):
            await client.sendall(build_reply(code))
        await close_gently(client)
        return
    try:
        await client.sendall(build_reply(Reply.SUCCEEDED, server.getsockname()[:2]))
        await api.splice_sockets(sock, server)
    except SpliceError as exc:
        # The pair is still ours: copy it, the client sees no difference.
        log.warning("the daemon did not splice %s: %s; copying", peer, exc)
        await asyncio.gather(copy(sock, server), copy(server, sock))
    except OSError as exc:
        log.info("client %s gone before its reply: %s", peer, exc)
    finally:
        # Spliced: these are closed without a sound (repair mode), the daemon
        # carries the connections on.
        sock.close()
        server.close()


async def _serve(path: str, listen: list[tuple[str, int]], config: SplicedConfig) -> int:
    try:
        api = await AsyncSpliceClient.open(path)
    except (OSError, SpliceError) as exc:
        print(f"{PROG}: cannot attach to the splice daemon at {path}: {exc}", file=sys.stderr)
        return 1
    listeners = [open_listener(address) for address in listen]
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[str] = loop.create_future()
    tasks: set[asyncio.Task[None]] = set()

    async def accept_loop(listener: socket.socket) -> None:
        listener.setblocking(False)
        while True:
            sock, _addr = await loop.sock_accept(listener)
            task = asyncio.create_task(serve_client(api, sock, config))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def watch_daemon() -> None:
        # The daemon going away ends the proxy (the other proxies do the same).
        with contextlib.suppress(DaemonGone):
            async for _event in api.events():
                pass
        if not stop.done():
            stop.set_result("the splice daemon went away")

    def on_signal() -> None:
        if not stop.done():
            stop.set_result("")

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    running = [asyncio.create_task(accept_loop(lst)) for lst in listeners]
    running.append(asyncio.create_task(watch_daemon()))
    log.info("%s listening on %s, splicing via %s", PROG, listen, path)
    print("ready", flush=True)
    reason = await stop
    for task in running:
        task.cancel()
    for lst in listeners:
        lst.close()
    api.close()
    if reason:
        print(f"{PROG}: {reason}", file=sys.stderr)
        return 1
    return 0


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
    return asyncio.run(_serve(args.daemon, args.listen, config))


if __name__ == "__main__":
    sys.exit(main())
