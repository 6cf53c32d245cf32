"""The I/O shell of a proxy attached to the splice daemon, on asyncio.

The asyncio counterpart of ``daemon_shell``, with the same outside
behaviour: attach and listen (a one-line error and exit 1 if either fails),
print ``ready``, stop cleanly on SIGTERM/SIGINT (exit 0), and exit 1 with
one line on stderr when the daemon goes away.  One event loop serves every
client: a task per client instead of a thread, and API replies complete
futures in the same thread (``daemon.api.aio``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from daemon.api.aio import (
    AsyncConnection,
    AsyncListener,
    AsyncSpliceClient,
    DaemonGone,
    SpliceError,
)
from proxies.daemon_shell import accept_stopped, destinations, local_for
from proxies.socks5 import DRAIN_TIMEOUT

log = logging.getLogger("proxies.aio_shell")

# Accept requests kept in flight: a burst of clients is handed over without
# a round trip to the daemon per client (each accept is one request).
ACCEPTS_IN_FLIGHT = 4

ServeClient = Callable[[AsyncSpliceClient, AsyncConnection], Coroutine[Any, Any, None]]


async def close_gently(conn: AsyncConnection) -> None:
    """FIN after a reply, drain what the client still sends, close (no RST).

    Unread input at close() would make the daemon answer with RST (RFC 9293
    3.10.4), which can destroy the reply before the client reads it.
    """
    try:
        conn.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(DRAIN_TIMEOUT):  # a client trickling forever is cut off
            while await conn.recv(65536):
                pass
    except (OSError, TimeoutError):
        pass
    conn.release()


async def refuse_intended(client: AsyncConnection, reply: bytes) -> None:
    """Failure ``reply`` to a client we may no longer read, then FIN.

    Reading is forbidden after intend_splice (thesis 4.1), so unlike
    ``close_gently`` there is no draining: shutdown(SHUT_WR) orders the FIN
    after the reply, and the ``close`` op releases the connection.
    """
    try:
        await client.sendall(reply)
        client.shutdown(socket.SHUT_WR)
    except OSError as exc:
        log.debug("client %s gone before its reply: %s", client.peer, exc)
    client.release()


async def connect_server(
    server: AsyncConnection, remotes: list[tuple[str, int]], source: str | None, timeout: float
) -> None:
    """Connect the reserved server side to the first address that answers.

    Raises the first failure's ``SpliceError`` (the most telling one for the
    name the client asked for) when every address failed.
    """
    first_error: SpliceError | None = None
    for remote in remotes:
        try:
            await server.connect(remote, local=local_for(source, remote), timeout=timeout)
            return
        except DaemonGone:
            raise
        except SpliceError as exc:
            log.debug("connect %s:%d failed: %s", remote[0], remote[1], exc)
            first_error = first_error or exc
            if exc.code == "ESTATE":  # the daemon does not let a reserved side retry
                break
    raise first_error or SpliceError("EHOSTUNREACH", "no address")


async def destinations_async(host: str, port: int, source: str | None) -> list[tuple[str, int]]:
    """``destinations`` without blocking the loop on a name lookup."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, destinations, host, port, source)
    return [(host, port)]


async def _accept_loop(
    listener: AsyncListener, serve: Callable[[AsyncConnection], Coroutine[Any, Any, None]]
) -> str:
    """Accept until the listener is closed; why the daemon stopped us, or "" if we did."""
    tasks: set[asyncio.Task[None]] = set()
    while True:
        try:
            client = await listener.accept()
        except SpliceError as exc:
            return accept_stopped(exc)
        log.debug("accepted %s", client.peer)
        task = asyncio.create_task(serve(client))
        tasks.add(task)  # a reference, or the loop may collect a running task
        task.add_done_callback(tasks.discard)


async def _serve(
    prog: str, path: str, listen: Sequence[tuple[str, int]], serve_client: ServeClient
) -> int:
    try:
        api = await AsyncSpliceClient.open(path)
    except (OSError, SpliceError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"{prog}: cannot attach to the splice daemon at {path}: {reason}", file=sys.stderr)
        return 1
    listeners: list[AsyncListener] = []
    for address in listen:
        try:
            listeners.append(await api.listen(address))
        except SpliceError as exc:
            print(f"{prog}: cannot listen on {address[0]}:{address[1]}: {exc}", file=sys.stderr)
            api.close()
            return 1
    log.info("%s listening on %s via %s", prog, list(listen), path)

    async def serve(client: AsyncConnection) -> None:
        try:
            await serve_client(api, client)
        except Exception:  # a bug costs one client, never the proxy
            log.exception("serving %s failed", client.peer)
            client.release()

    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result("")

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    accepting = [
        asyncio.create_task(_accept_loop(listener, serve))
        for listener in listeners
        for _ in range(ACCEPTS_IN_FLIGHT)
    ]

    def accept_ended(task: asyncio.Task[str]) -> None:
        if stop.done() or task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # a bug must not leave the proxy up but deaf
            log.error("accept loop failed", exc_info=exc)
        stop.set_result(f"accept loop failed: {exc}" if exc is not None else task.result())

    for task in accepting:
        task.add_done_callback(accept_ended)
    print("ready", flush=True)
    reason = await stop
    if not reason:
        log.info("stopping")
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(signum)
    for listener in listeners:
        with contextlib.suppress(SpliceError):
            await listener.close()
    api.close()
    for task in accepting:
        task.cancel()
    if reason:
        print(f"{prog}: {reason}", file=sys.stderr)
        return 1
    return 0


def run_proxy(
    prog: str,
    *,
    daemon: str,
    listen: tuple[str, int],
    log_level: str,
    serve_client: ServeClient,
    more_listen: Sequence[tuple[str, int]] = (),
) -> int:
    """The whole main() of an asyncio proxy attached to the daemon; the exit status.

    ``more_listen``: further addresses to serve (an IPv6 one, say).
    """
    logging.basicConfig(
        level=log_level.upper(), format=f"%(asctime)s {prog} %(levelname)s %(message)s"
    )
    return asyncio.run(_serve(prog, daemon, [listen, *more_listen], serve_client))
