"""The I/O shell every proxy attached to the splice daemon shares.

Attach to the daemon's API and listen, accept in a thread (one thread per
client after that), print ``ready``, and stop cleanly on SIGTERM/SIGINT (exit
0) or when the daemon goes away (exit 1 with one line on stderr).

Signals: only the main thread may take SIGTERM/SIGINT.  It waits on a queue
(a lock wait), which a signal interrupts only when it is delivered to that
thread, and the kernel hands a process-directed signal to any thread that
does not block it.  So ``block_stop_signals()`` runs before the first thread
exists (the API reader), every thread inherits the mask, and the main thread
unblocks once its handler is in place.
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
from collections.abc import Callable, Sequence
from types import FrameType

from daemon.api.client import Connection, DaemonGone, Listener, SpliceClient, SpliceError
from proxies.socks5 import THREAD_STACK_SIZE

log = logging.getLogger("proxies.shell")

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class Stop(Exception):
    """Raised by the signal handler to leave the main thread's wait."""


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    raise Stop


def block_stop_signals() -> None:
    """Call first in main(), before any thread starts (see the module docstring)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def release(*conns: Connection) -> None:
    """Close descriptors and ids; quiet if the daemon already forgot them or went away."""
    for conn in conns:
        try:
            conn.close()
        except (SpliceError, OSError) as exc:
            log.debug("closing conn %d: %s", conn.id, exc)


def accept_stopped(exc: SpliceError) -> str:
    """Why accepting ended, as the proxy's exit line says it; "" when we closed the listener."""
    if isinstance(exc, DaemonGone):
        return f"the splice daemon went away: {exc.message}"
    if exc.code == "ECANCELED":  # our own close of the listener, at SIGTERM
        return ""
    # docs/api.md names no other accept error: do not spin on one we do not know.
    return f"accept failed: {exc}"


def accept_loop(listener: Listener, handle: Callable[[Connection], None], name: str) -> str:
    """Accept until the listener is closed; the reason the daemon stopped us, or "" if we did."""
    while True:
        try:
            client = listener.accept()
        except SpliceError as exc:
            return accept_stopped(exc)
        log.debug("accepted %s", client.peer)
        threading.Thread(target=handle, args=(client,), name=name, daemon=True).start()


def attach(
    prog: str, path: str, listen: Sequence[tuple[str, int]]
) -> tuple[SpliceClient, list[Listener]] | None:
    """Attach to the daemon and listen on each address; None after a one-line error."""
    try:
        api = SpliceClient(path)
    except (OSError, SpliceError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"{prog}: cannot attach to the splice daemon at {path}: {reason}", file=sys.stderr)
        return None
    listeners: list[Listener] = []
    for address in listen:
        try:
            listeners.append(api.listen(address))
        except SpliceError as exc:
            print(f"{prog}: cannot listen on {address[0]}:{address[1]}: {exc}", file=sys.stderr)
            api.close()
            return None
    return api, listeners


def run_until_stopped(
    prog: str,
    api: SpliceClient,
    listeners: list[Listener],
    handle: Callable[[Connection], None],
) -> int:
    """Print "ready", serve until SIGTERM/SIGINT (exit 0) or until the daemon goes (exit 1).

    One accept thread per listener; the first to stop ends the proxy.
    """
    threading.stack_size(THREAD_STACK_SIZE)
    stopped: queue.Queue[str] = queue.Queue()

    def accepting(listener: Listener) -> None:
        try:
            reason = accept_loop(listener, handle, f"{prog}-client")
        except Exception as exc:  # a bug must not leave main waiting forever
            log.exception("accept loop failed")
            reason = f"accept loop failed: {exc}"
        stopped.put(reason)

    for listener in listeners:
        threading.Thread(
            target=accepting, args=(listener,), name=f"{prog}-accept", daemon=True
        ).start()
    signal.signal(signal.SIGTERM, _on_stop_signal)
    try:  # from here on a signal may land anywhere, so everything is inside the try
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        print("ready", flush=True)
        reason = stopped.get()
    except (Stop, KeyboardInterrupt):
        log.info("stopping")
        reason = ""
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop is enough; finish cleaning up
        for listener in listeners:
            with contextlib.suppress(SpliceError):
                listener.close()
        api.close()
    if reason:
        print(f"{prog}: {reason}", file=sys.stderr)
        return 1
    return 0


def destinations(host: str, port: int, source: str | None) -> list[tuple[str, int]]:
    """``host`` itself if it is an address literal, else what the name resolves to.

    The daemon takes no names (docs/api.md, "Addresses"). Every family is
    kept: the daemon splices across families, and a connect of the other
    family than ``--source`` leaves from the daemon's own source of it
    (``local_for``); ``--source``'s family is tried first, else the
    resolver's order (RFC 6724). Raises ``socket.gaierror`` for a name that
    does not resolve.
    """
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [(host, port)]
    found: list[tuple[str, int]] = []
    for *_, address in socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM):
        candidate = (str(address[0]), int(address[1]))
        if candidate not in found:
            found.append(candidate)
    if source is not None:
        six = ipaddress.ip_address(source).version == 6
        found.sort(key=lambda a: (":" in a[0]) != six)  # stable: resolver order within
    return found


def local_for(source: str | None, remote: tuple[str, int]) -> tuple[str, int] | None:
    """The ``local`` of a connect to ``remote``: ``--source`` if it is of the remote's
    family, else None (the daemon's default source of that family, ``--source6``)."""
    if source is None or (":" in source) != (":" in remote[0]):
        return None
    return (source, 0)


def check_source(parser: argparse.ArgumentParser, source: str | None) -> None:
    if source is not None:
        try:
            ipaddress.ip_address(source)
        except ValueError:
            parser.error(f"--source must be an IP address, got {source!r}")


def run_proxy(
    prog: str,
    *,
    daemon: str,
    listen: tuple[str, int],
    log_level: str,
    serve_client: Callable[[SpliceClient, Connection], None],
    more_listen: Sequence[tuple[str, int]] = (),
) -> int:
    """The whole main() of a proxy attached to the daemon; returns the exit status.

    ``more_listen``: further addresses to serve (an IPv6 one, say).
    """
    logging.basicConfig(
        level=log_level.upper(), format=f"%(asctime)s {prog} %(levelname)s %(message)s"
    )
    block_stop_signals()
    attached = attach(prog, daemon, [listen, *more_listen])
    if attached is None:
        return 1
    api, listeners = attached
    log.info("%s listening on %s via %s", prog, [listen, *more_listen], daemon)
    return run_until_stopped(prog, api, listeners, lambda client: serve_client(api, client))
